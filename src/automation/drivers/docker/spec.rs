//! What a bound agent's container is made of, read from the agent's
//! labels: `docker.image`, `docker.command`, `docker.memory`.
//!
//! | label | value | default |
//! |---|---|---|
//! | `docker.image` | an image reference | `[docker] image` |
//! | `docker.command` | the command, split on whitespace | the image's |
//! | `docker.memory` | a memory limit: bytes, or a number with `k`, `m` or `g` | none |
//!
//! Every container the driver makes carries the Docker label
//! `agent-lifecycle.agent` with the agent's id.

use std::{collections::HashMap, time::SystemTime};

use bollard::models::{ContainerCreateBody, HostConfig};

use crate::domain::{Agent, Labels};

/// The label naming the image.
pub const IMAGE_LABEL: &str = "docker.image";
/// The label holding the command.
pub const COMMAND_LABEL: &str = "docker.command";
/// The label holding the memory limit.
pub const MEMORY_LABEL: &str = "docker.memory";
/// The Docker label on every container the driver makes: the agent's id.
pub const AGENT_LABEL: &str = "agent-lifecycle.agent";

/// The body of the create call for `agent`, or why there is none.
pub fn container_body(
    agent: &Agent,
    default_image: Option<&str>,
) -> Result<ContainerCreateBody, String> {
    let labels: &Labels = &agent.labels;
    let image = labels
        .get(IMAGE_LABEL)
        .map(String::as_str)
        .or(default_image)
        .ok_or_else(|| {
            format!("no image: label the agent {IMAGE_LABEL}=IMAGE or set [docker] image")
        })?;
    let cmd = labels
        .get(COMMAND_LABEL)
        .map(|command| command.split_whitespace().map(str::to_string).collect());
    let memory = labels
        .get(MEMORY_LABEL)
        .map(|text| {
            memory_bytes(text).ok_or_else(|| {
                format!("{MEMORY_LABEL}={text:?} is not a size (bytes, or a number with k, m or g)")
            })
        })
        .transpose()?;
    Ok(ContainerCreateBody {
        image: Some(image.to_string()),
        cmd,
        labels: Some(HashMap::from([(
            AGENT_LABEL.to_string(),
            agent.id.to_string(),
        )])),
        host_config: memory.map(|bytes| HostConfig {
            memory: Some(bytes),
            // No swap beyond the limit: the limit is what the agent gets.
            memory_swap: Some(bytes),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    })
}

/// `64m`, `1g`, `512k` or plain bytes.
fn memory_bytes(text: &str) -> Option<i64> {
    let text = text.trim().to_ascii_lowercase();
    let text = text.strip_suffix('b').unwrap_or(&text);
    let (digits, unit) = match text.char_indices().last()? {
        (i, 'k') => (&text[..i], 1 << 10),
        (i, 'm') => (&text[..i], 1 << 20),
        (i, 'g') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    digits
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)?
        .checked_mul(unit)
}

/// The instant of Docker's RFC 3339 UTC time (`2026-12-06T22:10:11.123456789Z`,
/// as `State.StartedAt` gives it); `None` for another shape, or for the
/// zero time Docker shows for a container never started.
pub fn docker_time(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
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
    // Days since 1970-01-01 of a proleptic Gregorian date.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let digits: String = fraction.chars().take(9).collect();
    let nanos = format!("{digits:0<9}").parse::<u32>().ok()?;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(memory_bytes("8m"), Some(8 << 20));
        assert_eq!(memory_bytes("8MB"), Some(8 << 20));
        assert_eq!(memory_bytes("1g"), Some(1 << 30));
        assert_eq!(memory_bytes("4096"), Some(4096));
        for bad in ["", "m", "-1m", "0", "8x", "lots"] {
            assert_eq!(memory_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn docker_times() {
        assert_eq!(
            docker_time("1970-01-02T00:00:01.5Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::new(86_401, 500_000_000))
        );
        // 2026-12-06T22:10:11Z, from `date -d ... +%s`.
        assert_eq!(
            docker_time("2026-12-06T22:10:11.123456789Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_796_595_011, 123_456_789))
        );
        assert_eq!(
            docker_time("2024-02-29T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_164_800))
        );
        assert_eq!(docker_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(docker_time("yesterday"), None);
    }
}
