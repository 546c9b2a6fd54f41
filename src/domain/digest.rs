//! SHA-256 digests as text: request fingerprints (stored with each record)
//! and token hashes (in the configuration) are written as 64 hex digits.

use std::fmt::Write as _;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The 32 bytes that 64 hex digits spell.
///
/// # Errors
/// Not exactly 64 hex digits.
pub fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let bad = || format!("{text:?} is not a SHA-256 hash (64 hex digits)");
    if text.len() != 64 || !text.is_ascii() {
        return Err(bad());
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(hash)
}
