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

use std::collections::HashMap;

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

#[cfg(test)]
mod tests {
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
}
