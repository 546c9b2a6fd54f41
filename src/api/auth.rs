//! Authentication: principals with a role, known by the SHA-256 hash of a
//! bearer token (the server never stores a token in clear) or by the common
//! name of a client certificate verified by mutual TLS.
//!
//! Tokens are 32 random bytes, written as `alt_` followed by 64 hex digits;
//! `agent-lifecycle token create` makes one and prints the configuration
//! lines that hold its hash. Requests carry it as
//! `authorization: Bearer alt_...`.

use std::{collections::HashMap, sync::Arc};

use rustls::pki_types::CertificateDer;

pub use crate::domain::digest::{hex, parse_sha256};
use crate::domain::{AgentId, Caller, Role};

/// The prefix of every token (it makes leaked tokens easy to scan for).
pub const TOKEN_PREFIX: &str = "alt_";

/// One principal of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Its name, recorded with every transition it makes.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// For [`Role::Agent`]: the agents it acts for.
    pub agents: Vec<AgentId>,
    /// SHA-256 of its bearer token.
    pub token_sha256: Option<[u8; 32]>,
    /// The common name of its client certificate (mutual TLS).
    pub cert_subject: Option<String>,
}

/// Why a call was not authenticated; every variant is UNAUTHENTICATED on
/// the wire, with the message naming the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither a token nor a known client certificate.
    #[error(
        "authentication required: send `authorization: Bearer <token>` or a client certificate"
    )]
    Missing,
    /// The `authorization` value is not `Bearer <token>`.
    #[error("the authorization metadata must be `Bearer <token>`")]
    Malformed,
    /// No principal has this token.
    #[error("unknown or revoked token")]
    UnknownToken,
    /// A verified client certificate whose common name no principal claims.
    #[error("no principal for the client certificate {0:?}")]
    UnknownCertificate(String),
}

/// The principals of the configuration, indexed for each call.
#[derive(Debug, Default)]
pub struct Authenticator {
    by_token: HashMap<[u8; 32], Caller>,
    by_subject: HashMap<String, Caller>,
}

impl Authenticator {
    /// Indexes `principals`.
    ///
    /// # Errors
    /// Two principals share a name, a token or a certificate subject.
    pub fn new(principals: &[Principal]) -> Result<Self, String> {
        let mut auth = Authenticator::default();
        let mut names = std::collections::HashSet::new();
        for p in principals {
            if !names.insert(p.name.as_str()) {
                return Err(format!(
                    "auth.principal: the name {:?} is used twice",
                    p.name
                ));
            }
            let caller =
                Caller::authenticated(p.name.as_str(), p.role, Arc::from(p.agents.as_slice()));
            if let Some(hash) = p.token_sha256
                && auth.by_token.insert(hash, caller.clone()).is_some()
            {
                return Err(format!(
                    "auth.principal {:?}: another principal has the same token",
                    p.name
                ));
            }
            if let Some(subject) = &p.cert_subject
                && auth.by_subject.insert(subject.clone(), caller).is_some()
            {
                return Err(format!(
                    "auth.principal {:?}: another principal has the certificate subject {subject:?}",
                    p.name
                ));
            }
        }
        Ok(auth)
    }

    /// The caller of a request with `authorization` metadata (if any) over a
    /// connection whose verified client certificate chain is `peer_certs`
    /// (if any). A token, when sent, must be valid, whatever the
    /// certificate.
    ///
    /// # Errors
    /// See [`AuthError`].
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Caller, AuthError> {
        if let Some(value) = authorization {
            let value = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
            let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Malformed);
            }
            return self
                .by_token
                .get(&sha256(token.trim()))
                .cloned()
                .ok_or(AuthError::UnknownToken);
        }
        let Some(leaf) = peer_certs.and_then(|certs| certs.first()) else {
            return Err(AuthError::Missing);
        };
        let subject = certificate_common_name(leaf).ok_or(AuthError::Missing)?;
        self.by_subject
            .get(&subject)
            .cloned()
            .ok_or(AuthError::UnknownCertificate(subject))
    }
}

/// SHA-256 of `token`.
pub fn sha256(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// A fresh random token.
///
/// # Errors
/// The system's random source failed.
pub fn new_token() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
}

/// The common name (CN) of a certificate's subject, when it has one as a
/// UTF8String, PrintableString or IA5String.
pub fn certificate_common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    common_name(parsed.subject())
}

/// One DER element: its tag, its content and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The CN in the content of an X.501 Name (a sequence of sets of
/// attribute type and value pairs).
fn common_name(mut name: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (tag, mut set, rest) = tlv(name)?;
        name = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, pair, rest) = tlv(set)?;
            set = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = tlv(pair)?;
            if tag == OID && oid == CN {
                let (tag, text, _) = tlv(value)?;
                // UTF8String, PrintableString, IA5String.
                if matches!(tag, 0x0c | 0x13 | 0x16) {
                    return String::from_utf8(text.to_vec()).ok();
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_authenticate() {
        let token = new_token().expect("token");
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 64);
        let hash = sha256(&token);
        assert_eq!(parse_sha256(&hex(&hash)), Ok(hash));
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
        let auth = Authenticator::new(&[Principal {
            name: "ops".into(),
            role: Role::Operator,
            agents: Vec::new(),
            token_sha256: Some(hash),
            cert_subject: None,
        }])
        .expect("principals");
        let header = format!("Bearer {token}");
        let caller = auth
            .authenticate(Some(header.as_bytes()), None)
            .expect("authenticated");
        assert_eq!(caller.principal_name(), "ops");
        assert_eq!(caller.role, Role::Operator);
        assert_eq!(
            auth.authenticate(Some(b"Bearer alt_nope"), None),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(
            auth.authenticate(Some(token.as_bytes()), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(auth.authenticate(None, None), Err(AuthError::Missing));
    }

    #[test]
    fn duplicate_principals_are_refused() {
        let p = Principal {
            name: "a".into(),
            role: Role::Viewer,
            agents: Vec::new(),
            token_sha256: Some([1; 32]),
            cert_subject: None,
        };
        assert!(Authenticator::new(&[p.clone(), p.clone()]).is_err());
        let other = Principal {
            name: "b".into(),
            ..p.clone()
        };
        assert!(Authenticator::new(&[p, other]).is_err());
    }

    #[test]
    fn common_names_are_read_from_certificates() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dashboard");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            certificate_common_name(cert.der()).as_deref(),
            Some("dashboard")
        );
        assert_eq!(common_name(&[0x31, 0x05, 0x30]), None, "truncated");
    }
}
