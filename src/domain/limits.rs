//! Field limits and the violation type that names the offending field.
//!
//! Limits keep one request from growing the log or the memory without bound;
//! they are part of the API contract (see the proto header).

use super::agent::{Labels, Metadata};

/// Bytes in `reason`.
pub const MAX_REASON_BYTES: usize = 1024;
/// Bytes in `error_message`: it is recorded as the reason `Error: <message>`.
pub const MAX_ERROR_MESSAGE_BYTES: usize = MAX_REASON_BYTES - "Error: ".len();
/// Bytes in `triggered_by`, `name` and `task_id`.
pub const MAX_SHORT_TEXT_BYTES: usize = 256;
/// Bytes of `metadata` encoded as JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Entries in `labels`.
pub const MAX_LABELS: usize = 64;
/// Bytes in a label key (which must not be empty).
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Bytes in a label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Nesting of objects and lists in `metadata` (the top-level object is 1).
pub const MAX_METADATA_DEPTH: usize = 16;
/// Agent ids in one WatchEvents filter.
pub const MAX_FILTER_IDS: usize = 1000;

/// Characters of a client's value quoted back in an error message.
const MAX_QUOTED_CHARS: usize = 64;

/// `value` quoted for an error message, shortened when long (with its full
/// size), so that an error never grows with the input that caused it.
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &value[..cut], value.len()),
    }
}

/// One bad field of a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {description}")]
pub struct FieldViolation {
    /// The field's name as the API spells it (`reason`, `labels`, ...).
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Checks that `value` has at most `max` bytes.
///
/// # Errors
/// A [`FieldViolation`] naming `field`.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), FieldViolation> {
    if value.len() > max {
        return Err(FieldViolation::new(
            field,
            format!("{} bytes, at most {max} allowed", value.len()),
        ));
    }
    Ok(())
}

/// Checks the number of labels and the size of each key and value.
///
/// # Errors
/// A [`FieldViolation`] naming `field`.
pub fn check_labels(field: &str, labels: &Labels) -> Result<(), FieldViolation> {
    if labels.len() > MAX_LABELS {
        return Err(FieldViolation::new(
            field,
            format!("{} labels, at most {MAX_LABELS} allowed", labels.len()),
        ));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY_BYTES {
            return Err(FieldViolation::new(
                field,
                format!(
                    "label key {} must have 1 to {MAX_LABEL_KEY_BYTES} bytes",
                    quoted(key)
                ),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(FieldViolation::new(
                field,
                format!(
                    "label {} has a value over {MAX_LABEL_VALUE_BYTES} bytes",
                    quoted(key)
                ),
            ));
        }
    }
    Ok(())
}

/// Checks the JSON size of `metadata`.
///
/// # Errors
/// A [`FieldViolation`] naming `field`.
pub fn check_metadata(field: &str, metadata: &Metadata) -> Result<(), FieldViolation> {
    if metadata.is_empty() {
        return Ok(());
    }
    let size = serde_json::to_vec(metadata)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(FieldViolation::new(
            field,
            format!("{size} bytes as JSON, at most {MAX_METADATA_BYTES} allowed"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_the_field() {
        assert!(check_text("reason", &"x".repeat(MAX_REASON_BYTES), MAX_REASON_BYTES).is_ok());
        let err = check_text(
            "reason",
            &"x".repeat(MAX_REASON_BYTES + 1),
            MAX_REASON_BYTES,
        )
        .unwrap_err();
        assert_eq!(err.field, "reason");

        let mut labels = Labels::new();
        labels.insert(String::new(), "v".into());
        assert_eq!(check_labels("labels", &labels).unwrap_err().field, "labels");

        let mut metadata = Metadata::new();
        metadata.insert("k".into(), "x".repeat(MAX_METADATA_BYTES).into());
        assert_eq!(
            check_metadata("metadata", &metadata).unwrap_err().field,
            "metadata"
        );
    }
}
