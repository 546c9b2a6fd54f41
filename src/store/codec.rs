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
