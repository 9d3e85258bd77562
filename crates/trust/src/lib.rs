//! Who may talk to whom in a Cairn file system.
//!
//! Each file system has its own certificate authority, made when it is created. Every server
//! (meta or data) holds a certificate the authority signed when the server joined, and every
//! client a certificate naming its credential. All links run TLS 1.3 with both sides
//! authenticated; the server name every client checks is [`SERVER_NAME`], so one certificate
//! serves a server at any address (behind a proxy or NAT too), and a client certificate can
//! never pass for a server.

pub mod authority;
pub mod block_token;
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

/// The aws-lc-rs provider (ring is kept out of the build), preferring AES-128-GCM: as strong
/// as the file system needs and about a third cheaper per byte than AES-256, which matters when
/// every block crosses TLS twice on its way to disk. Installed as the process default at
/// start-up, so tonic's client connections use it too.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    std::sync::Arc::new(provider)
}
