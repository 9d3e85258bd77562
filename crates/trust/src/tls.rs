//! TLS configurations built from a node's trust files.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{RootCertStore, ServerConfig};

use crate::{SERVER_NAME, TrustError, TrustFiles, TrustResult, provider};

/// How long a client waits for a server's side of the handshake: a connect timeout covers only
/// the TCP connection, and a peer that accepts and then says nothing must not hang a caller.
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// The certificates in a PEM text, in order.
pub fn certs_of(pem: &str) -> TrustResult<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TrustError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TrustError::Certificate("no certificate found".into()));
    }
    Ok(certs)
}

fn key_of(pem: &str) -> TrustResult<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TrustError::Certificate(e.to_string()))
}

fn roots(authority_pem: &str) -> TrustResult<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in certs_of(authority_pem)? {
        roots.add(cert).map_err(|e| TrustError::Certificate(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// What a server presents and accepts: its chain, and client certificates the authority
/// signed. A peer without a certificate may still connect: the only request it can make is
/// to join (checked per request, where the method is known).
pub fn server_config(files: &TrustFiles) -> TrustResult<ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.authority_pem)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TrustError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_of(&files.chain_pem)?, key_of(&files.key_pem)?)
        .map_err(|e| TrustError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The server's order of cipher suites decides (see `provider`).
    config.ignore_client_order = true;
    Ok(config)
}

/// The authority certificate a server at `address` presents, taken from its chain. Nothing
/// is sent on this connection: the caller trusts the certificate only if its fingerprint is
/// the one its join token names.
pub async fn fetch_authority(address: &str, timeout: Duration) -> TrustResult<Vec<u8>> {
    let seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recorder { seen: seen.clone() }))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| TrustError::Tls(e.to_string()))?;
    let handshake = async {
        let stream =
            tokio::net::TcpStream::connect(address).await.map_err(|e| TrustError::Tls(format!("{address}: {e}")))?;
        connector.connect(name, stream).await.map_err(|e| TrustError::Tls(format!("{address}: {e}")))
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| TrustError::Tls(format!("{address}: no TLS handshake within {timeout:?}")))??;
    let chain = seen.lock().map(|s| s.clone()).unwrap_or_default();
    chain.last().cloned().ok_or_else(|| TrustError::Tls(format!("{address} presented no certificate")))
}

/// Records the chain a server presents and accepts it (see `fetch_authority`).
#[derive(Debug)]
struct Recorder {
    seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = std::iter::once(end_entity).chain(intermediates).map(|c| c.to_vec()).collect();
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// What a process presents and checks when it connects: the authority to check servers
/// against (by `SERVER_NAME`) and, unless `identity` is None, its own chain and key.
pub fn client_config(authority_pem: &str, identity: Option<(&str, &str)>) -> tonic::transport::ClientTlsConfig {
    let config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(authority_pem))
        .domain_name(SERVER_NAME)
        .timeout(CLIENT_HANDSHAKE_TIMEOUT);
    match identity {
        Some((chain, key)) => config.identity(tonic::transport::Identity::from_pem(chain, key)),
        None => config,
    }
}
