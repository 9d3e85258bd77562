//! Who may talk to whom in a Cairn file system.
//!
//! Each file system has its own certificate authority, made when it is created. Every server
//! (meta or data) holds a certificate the authority signed when the server joined, and every
//! client a certificate naming its credential. All links run TLS 1.3 (or 1.2) with both sides
//! authenticated; the server name every client checks is [`SERVER_NAME`], so one certificate
//! serves a server at any address (behind a proxy or NAT too), and a client certificate can
//! never pass for a server.

pub mod authority;
pub mod files;
pub mod identity;
pub mod join;
pub mod tls;

pub use authority::{Authority, Subject, new_key_and_request};
pub use files::TrustFiles;
pub use identity::{Peer, Role};
pub use join::JoinToken;

/// The name in every server certificate, which every client verifies.
pub const SERVER_NAME: &str = "server.cairn";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("{path}: {source}")]
    File { path: std::path::PathBuf, source: std::io::Error },
    #[error("join token: {0}")]
    Token(String),
    #[error("tls: {0}")]
    Tls(String),
}

pub type TrustResult<T> = Result<T, TrustError>;

fn cert_error(e: impl std::fmt::Display) -> TrustError {
    TrustError::Certificate(e.to_string())
}

/// The ring provider, named once: with aws-lc-rs absent from the build it is the only one.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
