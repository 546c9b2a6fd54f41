//! RFC 3339 UTC text of instants (`2026-12-06T22:10:11.123456Z`), written
//! and read without a calendar crate: the proleptic Gregorian days since
//! 1970 by Howard Hinnant's civil-date algorithms.

use std::time::{Duration, SystemTime};

/// `at` as RFC 3339 UTC with microseconds (`1970-01-01T00:00:00.000000Z`
/// for instants before the epoch).
pub fn rfc3339(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let secs = seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        since.subsec_micros()
    )
}

/// The instant of RFC 3339 UTC text (`2026-12-06T22:10:11Z`, with up to
/// nine fraction digits, as Docker's and this crate's times are); `None`
/// for another shape or a time before 1970.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let text = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix('z'))
        .or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut date = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut clock = clock.splitn(3, ':').map(str::parse::<u64>);
    let (h, m, s) = (
        clock.next()?.ok()?,
        clock.next()?.ok()?,
        clock.next()?.ok()?,
    );
    if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    if h > 23 || m > 59 || s > 60 || fraction.is_empty() || fraction.len() > 9 {
        return None;
    }
    let nanos = format!("{fraction:0<9}").parse::<u32>().ok()?;
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_and_read() {
        // 2026-12-06T22:10:11Z, from `date -u -d ... +%s`.
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_796_595_011, 123_456_789);
        assert_eq!(parse_rfc3339("2026-12-06T22:10:11.123456789Z"), Some(at));
        assert_eq!(rfc3339(at), "2026-12-06T22:10:11.123456Z");
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_164_800))
        );
        assert_eq!(
            parse_rfc3339("1970-01-02T00:00:01.5+00:00"),
            Some(SystemTime::UNIX_EPOCH + Duration::new(86_401, 500_000_000))
        );
        for day in [0, 59, 365, 10_957, 20_000, 30_000] {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(day * 86_400 + 3_723);
            assert_eq!(parse_rfc3339(&rfc3339(at)), Some(at), "day {day}");
        }
        for bad in [
            "0001-01-01T00:00:00Z",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-06T22:10:11",
            "2026-12-06T25:00:00Z",
            "2026-12-06T22:10:11.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
