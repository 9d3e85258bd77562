//! Join tokens: what a new server is given to join a file system. The token names the
//! authority by the SHA-256 of its certificate, so the new server can check it talks to the
//! right file system before it trusts anything, and carries a secret that proves to meta the
//! server was let in (`cairn1.<fingerprint hex>.<secret hex>`).

use crate::{TrustError, TrustResult};

const PREFIX: &str = "cairn1";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub authority: [u8; 32],
    pub secret: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        write!(f, "JoinToken({})", hex(&self.authority))
    }
}

impl JoinToken {
    /// A token for the authority whose certificate is `authority_der`, with a new secret.
    pub fn new(authority_der: &[u8]) -> Self {
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut secret)
            .expect("the system's random source");
        JoinToken { authority: fingerprint(authority_der), secret }
    }

    pub fn parse(text: &str) -> TrustResult<Self> {
        let bad = || TrustError::Token("not a Cairn join token (cairn1.<64 hex>.<64 hex>)".into());
        let mut parts = text.trim().split('.');
        if parts.next() != Some(PREFIX) {
            return Err(bad());
        }
        let authority = unhex(parts.next().ok_or_else(bad)?).ok_or_else(bad)?;
        let secret = unhex(parts.next().ok_or_else(bad)?).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(JoinToken { authority, secret })
    }

    /// Whether `secret` is this token's, in time independent of where they differ.
    pub fn admits(&self, secret: &[u8]) -> bool {
        secret.len() == self.secret.len() && secret.iter().zip(self.secret).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}", hex(&self.authority), hex(&self.secret))
    }
}

/// SHA-256 of a certificate (what `openssl x509 -fingerprint -sha256` shows).
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_admits_only_its_secret() {
        let token = JoinToken::new(b"authority");
        let read = JoinToken::parse(&token.to_string()).unwrap();
        assert_eq!(read, token);
        assert!(read.admits(&token.secret));
        let mut other = token.secret;
        other[31] ^= 1;
        assert!(!read.admits(&other));
        assert!(!read.admits(&token.secret[..31]));
        assert!(JoinToken::parse("cairn1.zz.00").is_err());
        assert!(!format!("{token:?}").contains(&hex(&token.secret)));
    }
}
