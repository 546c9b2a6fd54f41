//! The signature of a webhook delivery, the way GitHub and Stripe sign
//! theirs: HMAC-SHA256 with the webhook's secret over the Unix time of the
//! attempt, a dot, and the body, sent as
//!
//! ```text
//! X-Agent-Lifecycle-Signature: t=1767225600,v1=7d4120fcebf444efab10ba7cd6c651bf463cefb039db5fad37ff9f7231ac8a4a
//! ```
//!
//! A receiver recomputes `HMAC_SHA256(secret, "{t}.{body}")` over the raw
//! body bytes, compares it with `v1` in constant time, and refuses a `t`
//! further than its tolerance (five minutes is usual) from its own clock,
//! so that a recorded delivery cannot be replayed later. The time is the
//! attempt's: a retry is signed anew. [`verify`] is such a receiver's
//! check. Pure; nothing here does I/O.

use std::time::Duration;

use ring::hmac;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-agent-lifecycle-signature";

/// The tolerance [`verify`] is usually given: how far the signature's time
/// may be from the receiver's clock.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// The value of [`SIGNATURE_HEADER`] for `body` sent at Unix time
/// `timestamp`: `t=TIMESTAMP,v1=HEX`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let tag = hmac::sign(&key(secret), &signed_text(timestamp, body));
    format!("t={timestamp},v1={}", hex(tag.as_ref()))
}

/// Why a signature was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=UNIX,v1=HEX[,v1=HEX...]`.
    #[error("malformed signature header: {0}")]
    Malformed(String),
    /// The signature's time is outside the tolerance (a replay, or a clock
    /// far off).
    #[error("signature time {timestamp} is more than {tolerance:?} from now ({now})")]
    Expired {
        /// The header's `t`.
        timestamp: u64,
        /// The receiver's Unix time.
        now: u64,
        /// The tolerance.
        tolerance: Duration,
    },
    /// No `v1` is the HMAC of the body with the secret.
    #[error("no signature matches the body")]
    Mismatch,
}

/// Checks a [`SIGNATURE_HEADER`] value against `body` at Unix time `now`:
/// its time within `tolerance` of `now`, and one of its `v1` values the
/// HMAC of the body (compared in constant time).
///
/// # Errors
/// The header is malformed, its time is outside the tolerance, or no
/// signature matches.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        let (name, value) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| SignatureError::Malformed(header.to_string()))?;
        match name {
            "t" => timestamp = value.parse::<u64>().ok(),
            "v1" => tags
                .push(unhex(value).ok_or_else(|| SignatureError::Malformed(header.to_string()))?),
            // Other schemes, for receivers that know them.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or_else(|| SignatureError::Malformed(header.to_string()))?;
    if tags.is_empty() {
        return Err(SignatureError::Malformed(header.to_string()));
    }
    if timestamp.abs_diff(now) > tolerance.as_secs() {
        return Err(SignatureError::Expired {
            timestamp,
            now,
            tolerance,
        });
    }
    let key = key(secret);
    let text = signed_text(timestamp, body);
    tags.iter()
        .any(|tag| hmac::verify(&key, &text, tag).is_ok())
        .then_some(())
        .ok_or(SignatureError::Mismatch)
}

fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

/// `{timestamp}.{body}`: what is signed.
fn signed_text(timestamp: u64, body: &[u8]) -> Vec<u8> {
    let mut text = format!("{timestamp}.").into_bytes();
    text.extend_from_slice(body);
    text
}

/// Lowercase hexadecimal.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of hexadecimal text (either case).
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature of a known input, computed independently
    /// (`printf '1767225600.{"a":1}' | openssl dgst -sha256 -hmac s3cret`).
    #[test]
    fn signatures_are_hmac_sha256_over_the_time_and_the_body() {
        let header = signature(b"s3cret", 1_767_225_600, br#"{"a":1}"#);
        assert_eq!(
            header,
            "t=1767225600,v1=7d4120fcebf444efab10ba7cd6c651bf463cefb039db5fad37ff9f7231ac8a4a"
        );
    }

    #[test]
    fn verify_accepts_the_signature_within_the_tolerance_only() {
        let body = br#"{"sequence":42}"#;
        let header = signature(b"s3cret", 1_000_000, body);
        let check = |secret: &[u8], header: &str, body: &[u8], now: u64| {
            verify(secret, header, body, now, DEFAULT_TOLERANCE)
        };
        assert_eq!(check(b"s3cret", &header, body, 1_000_000), Ok(()));
        assert_eq!(check(b"s3cret", &header, body, 1_000_300), Ok(()));
        assert_eq!(check(b"s3cret", &header, body, 999_700), Ok(()));
        assert!(matches!(
            check(b"s3cret", &header, body, 1_000_301),
            Err(SignatureError::Expired { .. })
        ));
        assert_eq!(
            check(b"other", &header, body, 1_000_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(b"s3cret", &header, br#"{"sequence":43}"#, 1_000_000),
            Err(SignatureError::Mismatch)
        );
        // A replay with a fresh time but the old tag fails too.
        let replayed = header.replace("t=1000000", "t=1000100");
        assert_eq!(
            check(b"s3cret", &replayed, body, 1_000_100),
            Err(SignatureError::Mismatch)
        );
        // Several v1 values (a receiver rotating secrets): any match.
        let other = signature(b"other", 1_000_000, body);
        let v1 = other.split_once(",v1=").map(|(_, v)| v).unwrap_or_default();
        let both = format!("{header},v1={v1}");
        assert_eq!(check(b"other", &both, body, 1_000_000), Ok(()));
        for malformed in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=0", "t=1;v1=00"] {
            assert!(
                matches!(
                    check(b"s3cret", malformed, body, 1),
                    Err(SignatureError::Malformed(_))
                ),
                "{malformed:?}"
            );
        }
    }
}
