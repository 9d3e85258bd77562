//! TLS configurations built from a node's trust files.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

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

/// The chain and key this process presents, replaceable while it runs: a server that renews its
/// certificate serves and connects with the new one from the next handshake on, without a
/// restart. Connections already open keep the certificate they were opened with.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSlot {
    pub fn new(files: &TrustFiles) -> TrustResult<Arc<CertSlot>> {
        Ok(Arc::new(CertSlot { current: RwLock::new(Arc::new(certified_key(files)?)) }))
    }

    /// Presents `files`' chain and key from now on.
    pub fn replace(&self, files: &TrustFiles) -> TrustResult<()> {
        let key = Arc::new(certified_key(files)?);
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

fn certified_key(files: &TrustFiles) -> TrustResult<CertifiedKey> {
    let key = provider()
        .key_provider
        .load_private_key(key_of(&files.key_pem)?)
        .map_err(|e| TrustError::Tls(e.to_string()))?;
    let certified = CertifiedKey::new(certs_of(&files.chain_pem)?, key);
    certified.keys_match().map_err(|e| TrustError::Tls(format!("the key does not match the certificate: {e}")))?;
    Ok(certified)
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a process presents and checks when it opens its own TLS connections (see
/// `cairn_proto::tcp`): servers are checked against the authority by [`SERVER_NAME`], and the
/// chain in `certs`, if any, is presented.
pub fn connector_config(authority_pem: &str, certs: Option<Arc<CertSlot>>) -> TrustResult<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TrustError::Tls(e.to_string()))?
        .with_root_certificates(roots(authority_pem)?);
    let mut config = match certs {
        Some(certs) => builder.with_client_cert_resolver(certs),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Cairn seals and opens the records itself with the negotiated keys (`cairn_proto::tls`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// What a server presents (the chain in `certs`) and accepts: client certificates the authority
/// signed. A peer without a certificate may still connect: the only request it can make is
/// to join (checked per request, where the method is known).
pub fn server_config(files: &TrustFiles, certs: Arc<CertSlot>) -> TrustResult<ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.authority_pem)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TrustError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TrustError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The server's order of cipher suites decides (see `provider`).
    config.ignore_client_order = true;
    // Cairn seals and opens the records itself with the negotiated keys (`cairn_proto::tls`);
    // clients do not resume sessions, so no tickets follow the handshake.
    config.enable_secret_extraction = true;
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The authority certificate a server at `address` presents, taken from its chain. Nothing
/// is sent on this connection: the caller trusts the certificate only if its fingerprint is
/// the one its join token names.
pub async fn fetch_authority(address: &str, timeout: Duration) -> TrustResult<Vec<u8>> {
    let chain = fetch_chain(address, timeout).await?;
    chain.last().cloned().ok_or_else(|| TrustError::Tls(format!("{address} presented no certificate")))
}

/// The chain (DER, leaf first) a server at `address` presents in a new handshake, unchecked.
pub async fn fetch_chain(address: &str, timeout: Duration) -> TrustResult<Vec<Vec<u8>>> {
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
    Ok(seen.lock().map(|s| s.clone()).unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn server_files(authority: &crate::Authority, id: u64) -> TrustFiles {
        let (key_pem, request) = crate::new_key_and_request().unwrap();
        let subject = crate::Subject::Server { role: crate::Role::Data, id };
        let cert = authority.sign(&request, &subject, Duration::from_secs(3600)).unwrap();
        TrustFiles {
            authority_pem: authority.cert_pem().into(),
            chain_pem: format!("{cert}{}", authority.cert_pem()),
            key_pem,
        }
    }

    fn leaf(key: &CertifiedKey) -> Vec<u8> {
        key.cert[0].to_vec()
    }

    #[test]
    fn every_handshake_after_a_replacement_presents_the_new_certificate() {
        let authority = crate::Authority::create("fs").unwrap();
        let (first, second) = (server_files(&authority, 1), server_files(&authority, 2));
        let certs = CertSlot::new(&first).unwrap();
        server_config(&first, certs.clone()).unwrap();
        let client = connector_config(&first.authority_pem, Some(certs.clone())).unwrap();
        let presented_by_client =
            || leaf(&client.client_auth_cert_resolver.resolve(&[], &[SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap());
        let first_leaf = certs_of(&first.chain_pem).unwrap().remove(0).to_vec();
        assert_eq!(presented_by_client(), first_leaf);

        certs.replace(&second).unwrap();
        let second_leaf = certs_of(&second.chain_pem).unwrap().remove(0).to_vec();
        assert_eq!(presented_by_client(), second_leaf, "the client side still presents the old certificate");
        assert_eq!(leaf(&certs.current()), second_leaf);
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let authority = crate::Authority::create("fs").unwrap();
        let (good, other) = (server_files(&authority, 1), server_files(&authority, 2));
        let mismatched = TrustFiles { key_pem: other.key_pem.clone(), ..good.clone() };
        let certs = CertSlot::new(&good).unwrap();
        assert!(CertSlot::new(&mismatched).is_err());
        assert!(certs.replace(&mismatched).is_err());
        assert_eq!(leaf(&certs.current()), certs_of(&good.chain_pem).unwrap().remove(0).to_vec());
    }
}
