//! Encodings shared by the SQL back ends: times as microseconds since the
//! Unix epoch, metadata and labels as JSON text (empty text for an empty
//! map), states as their lowercase names.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) fn to_micros(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

pub(crate) fn from_micros(micros: i64) -> SystemTime {
    if micros >= 0 {
        UNIX_EPOCH + Duration::from_micros(micros as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(micros.unsigned_abs())
    }
}

/// A record's request tag as text: empty, or the fingerprint's 64 hex
/// digits followed by the request id.
pub(crate) fn encode_request(request: Option<&crate::domain::RequestTag>) -> String {
    match request {
        None => String::new(),
        Some(tag) => format!("{}{}", crate::domain::digest::hex(&tag.fingerprint), tag.id),
    }
}

/// Decodes [`encode_request`]'s text.
pub(crate) fn decode_request(
    text: &str,
) -> Result<Option<std::sync::Arc<crate::domain::RequestTag>>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let (hash, id) = text
        .split_at_checked(64)
        .ok_or_else(|| format!("request tag {text:?} is too short"))?;
    Ok(Some(std::sync::Arc::new(crate::domain::RequestTag {
        id: id.to_string(),
        fingerprint: crate::domain::digest::parse_sha256(hash)?,
    })))
}

pub(crate) fn encode_map<T: serde::Serialize>(map: &T, empty: bool) -> String {
    if empty {
        return String::new();
    }
    serde_json::to_string(map).unwrap_or_default()
}

/// Decodes JSON text written by [`encode_map`] (empty text: the default).
pub(crate) fn decode_map<T: serde::de::DeserializeOwned + Default>(
    text: &str,
) -> Result<T, serde_json::Error> {
    if text.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(text)
}
