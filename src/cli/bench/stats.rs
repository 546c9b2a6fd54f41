//! Statistics and formatting of the benchmark tool: nearest-rank latency
//! percentiles, medians of runs, and the units it prints (ms, s, MiB, /s).
//! Pure functions; no I/O.

use std::time::Duration;

/// Latency percentiles of one run, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Latencies {
    count: usize,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Latencies {
    /// Sorts `samples` and takes nearest-rank percentiles.
    pub(super) fn from_samples(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Latencies {
            count: samples.len(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            p999: percentile(&samples, 0.999),
            max: samples.last().copied().unwrap_or(0),
        }
    }

    /// The 99th percentile, ns (0 without samples).
    pub(super) fn p99(&self) -> u64 {
        self.p99
    }

    pub(super) fn line(&self) -> String {
        if self.count == 0 {
            return "p50 n/a  p99 n/a  p999 n/a".to_string();
        }
        format!(
            "p50 {}  p99 {}  p999 {}  max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }

    /// The per-metric median of several runs.
    pub(super) fn median_of(runs: &[Latencies]) -> Latencies {
        let pick = |f: fn(&Latencies) -> u64| median(runs.iter().map(|l| f(l) as f64)) as u64;
        Latencies {
            count: runs.iter().map(|l| l.count).sum(),
            p50: pick(|l| l.p50),
            p99: pick(|l| l.p99),
            p999: pick(|l| l.p999),
            max: pick(|l| l.max),
        }
    }
}

/// Nearest-rank percentile of sorted samples (0 when empty).
pub(super) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median (mean of the two middle values for an even count; 0 when empty).
pub(super) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Nanoseconds as milliseconds with microsecond precision.
pub(super) fn ms(nanos: u64) -> String {
    format!("{:.3}ms", nanos as f64 / 1e6)
}

pub(super) fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub(super) fn rate(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

pub(super) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), 500);
        assert_eq!(percentile(&samples, 0.99), 990);
        assert_eq!(percentile(&samples, 0.999), 999);
        assert_eq!(percentile(&samples, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.999), 7);
        assert_eq!(percentile(&[], 0.5), 0);
        let lat = Latencies::from_samples(vec![3, 1, 2]);
        assert_eq!((lat.count, lat.p50, lat.max), (3, 2, 3));
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
    }
}
