//! TLS on every link: the file system's authority made at `--init`, servers enrolled with the
//! join token, each connection's handshake, and who may call what.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use cairn_meta::service::{SERVER_CERT_VALIDITY, Signer};
use cairn_proto as pb;
use cairn_trust::files::AuthorityFiles;
use cairn_trust::tls::CertSlot;
use cairn_trust::{Authority, JoinToken, Peer, Role, Subject, TrustFiles};
use pb::net::Security;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How long a handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, at most (a flood of slow ones cannot starve the rest).
const HANDSHAKES_MAX: usize = 256;
/// How long a client credential made at `--init` (the administrator's) is valid.
pub(crate) const ADMIN_CREDENTIAL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The administrator's credential id: it may change the cluster's membership and issue
/// credentials.
pub const ADMIN: &str = cairn_meta::credentials::ADMIN_CREDENTIAL;
/// Where `--init` writes the administrator's credential, in the meta server's directory.
pub fn admin_credential_path(dir: &Path) -> PathBuf {
    cairn_trust::files::tls_dir(dir).join("admin.cred")
}

/// Whether this process runs without TLS (`--plaintext`), said loudly by servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tls,
    Plaintext,
}

pub fn warn_plaintext(what: &str) {
    let line = format!(
        "WARNING: {what} runs WITHOUT TLS (--plaintext): traffic is readable and changeable on the network and no peer is authenticated"
    );
    eprintln!("{line}");
    tracing::warn!("{line}");
}

/// Creates the authority of a new file system in a meta server's directory, with the
/// server's own certificate, the join token and the administrator's credential. Returns the
/// signer the meta service enrolls others with.
pub fn init_authority(dir: &Path, fs_id: &str, meta_id: u64) -> Result<Arc<Signer>> {
    let authority = Authority::create(fs_id)?;
    let authority_der = cairn_trust::tls::certs_of(authority.cert_pem())?.remove(0);
    let token = JoinToken::new(&authority_der);
    AuthorityFiles::save(dir, &authority, &token)?;
    let own = issue(&authority, &Subject::Server { role: Role::Meta, id: meta_id }, SERVER_CERT_VALIDITY)?;
    own.save(dir)?;
    let admin = issue(&authority, &Subject::Client { credential: ADMIN.into() }, ADMIN_CREDENTIAL_VALIDITY)?;
    admin.save_bundle(&admin_credential_path(dir))?;
    Ok(Arc::new(Signer::new(authority, token)))
}

/// A key and a certificate for `subject`, made and signed here.
pub(crate) fn issue(authority: &Authority, subject: &Subject, valid_for: Duration) -> Result<TrustFiles> {
    let (key_pem, request) = cairn_trust::new_key_and_request()?;
    let cert = authority.sign(&request, subject, valid_for)?;
    Ok(TrustFiles {
        authority_pem: authority.cert_pem().to_string(),
        chain_pem: format!("{cert}{}", authority.cert_pem()),
        key_pem,
    })
}

/// The signer a meta server that holds the authority's key enrolls others with.
pub fn load_signer(dir: &Path) -> Result<Option<Arc<Signer>>> {
    if !AuthorityFiles::present(dir) {
        return Ok(None);
    }
    let (authority, token) = AuthorityFiles::load(dir)?;
    Ok(Some(Arc::new(Signer::new(authority, token))))
}

/// A join token given on the command line: the token itself, or a file holding it.
pub fn read_token(given: &str) -> Result<JoinToken> {
    if let Ok(token) = JoinToken::parse(given) {
        return Ok(token);
    }
    let text = std::fs::read_to_string(given)
        .with_context(|| format!("--token {given}: neither a join token (cairn1.…) nor a readable file"))?;
    Ok(JoinToken::parse(&text)?)
}

/// Enrolls this server with the meta group at `meta` unless its directory already holds its
/// certificate: checks that the group's authority is the one the token names, has a new key's
/// certificate signed, and stores it (with, for a meta server, the authority's key and token).
pub async fn enroll(dir: &Path, meta: &[String], token: Option<&JoinToken>, role: Role, id: u64) -> Result<()> {
    if TrustFiles::present(dir) {
        return Ok(());
    }
    let token = token.ok_or_else(|| {
        anyhow!(
            "{} holds no certificate yet: pass --token with the file system's join token (in the first meta server's directory, tls/join.token)",
            dir.display()
        )
    })?;
    let mut last_error = anyhow!("no meta address given");
    for address in meta {
        match enroll_at(address, token, role, id).await {
            Ok(reply) => {
                let files = TrustFiles {
                    authority_pem: reply.authority_pem,
                    chain_pem: reply.chain_pem,
                    key_pem: reply.key_pem,
                };
                files.save(dir)?;
                if role == Role::Meta {
                    let authority = Authority::from_pem(&files.authority_pem, &reply.authority_key_pem)?;
                    AuthorityFiles::save(dir, &authority, &JoinToken::parse(&reply.join_token)?)?;
                }
                return Ok(());
            }
            Err(e) => last_error = e.context(format!("enrolling at {address}")),
        }
    }
    Err(last_error)
}

struct Enrolled {
    authority_pem: String,
    chain_pem: String,
    key_pem: String,
    authority_key_pem: String,
    join_token: String,
}

async fn enroll_at(address: &str, token: &JoinToken, role: Role, id: u64) -> Result<Enrolled> {
    let authority_der = cairn_trust::tls::fetch_authority(address, HANDSHAKE_TIMEOUT).await?;
    if cairn_trust::join::fingerprint(&authority_der) != token.authority {
        bail!(
            "the server at {address} belongs to another file system (its authority is not the one the join token names)"
        );
    }
    let authority_pem = cairn_trust::files::pem_of(&authority_der);
    let config = cairn_trust::tls::client_config(&authority_pem, None);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(config)?
        .connect_timeout(pb::net::CONNECT_TIMEOUT)
        .timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let (key_pem, request_pem) = cairn_trust::new_key_and_request()?;
    let request = pb::EnrollRequest { secret: token.secret.to_vec(), role: role.as_str().into(), id, request_pem };
    let reply =
        pb::meta_client::MetaClient::new(channel).enroll(request).await.map_err(|s| anyhow!("{}", s.message()))?;
    let reply = reply.into_inner();
    Ok(Enrolled {
        authority_pem,
        chain_pem: reply.chain_pem,
        key_pem,
        authority_key_pem: reply.authority_key_pem,
        join_token: reply.join_token,
    })
}

/// Makes this process's connections use `files` (TLS with its certificate). Returns the slot
/// holding the certificate, which a renewal replaces for every later handshake.
pub fn install(files: &TrustFiles) -> Result<Arc<CertSlot>> {
    let certs = CertSlot::new(files)?;
    let config = cairn_trust::tls::connector_config(&files.authority_pem, Some(certs.clone()))?;
    let server_name = rustls::pki_types::ServerName::try_from(cairn_trust::SERVER_NAME)?;
    pb::net::set_security(Security::Tls { config, server_name });
    Ok(certs)
}

pub fn install_plaintext() {
    pb::net::set_security(Security::Plaintext);
}

/// Sets up a command that only connects (mount, status, cluster changes): with the credential
/// file, or plaintext. Returns the slot holding the credential's certificate (with TLS).
pub fn install_client(credential: Option<&Path>, transport: Transport) -> Result<Option<Arc<CertSlot>>> {
    match (transport, credential) {
        (Transport::Plaintext, _) => {
            install_plaintext();
            Ok(None)
        }
        (Transport::Tls, Some(path)) => {
            let files =
                TrustFiles::load_bundle(path).with_context(|| format!("reading credential {}", path.display()))?;
            Ok(Some(install(&files)?))
        }
        (Transport::Tls, None) => bail!(
            "a credential is needed to connect (--credential FILE; the administrator's is tls/admin.cred in the first meta server's directory), or --plaintext for a file system run without TLS"
        ),
    }
}

/// A connection to `address` with the credential at `credential`, for tools and tests that
/// talk to more than one file system (no process-wide setting).
pub async fn connect_with(address: &str, credential: &Path) -> Result<tonic::transport::Channel> {
    let files = TrustFiles::load_bundle(credential)?;
    let config = cairn_trust::tls::client_config(&files.authority_pem, Some((&files.chain_pem, &files.key_pem)));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(config)?
        .connect_timeout(pb::net::CONNECT_TIMEOUT)
        .connect()
        .await?;
    Ok(channel)
}

/// The connections a server accepts: each TLS handshake runs in its own task (bounded in
/// number and time), and a refused one is logged with the peer's address.
pub type Incoming = ReceiverStream<std::io::Result<pb::tls::TlsStream>>;

pub fn tls_incoming(listener: TcpListener, files: &TrustFiles, certs: Arc<CertSlot>) -> Result<Incoming> {
    let config = Arc::new(cairn_trust::tls::server_config(files, certs)?);
    let (tx, rx) = mpsc::channel(HANDSHAKES_MAX);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let (config, tx) = (config.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, pb::tls::accept(config, stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) if not_tls(&e) => {
                        tracing::warn!(%peer, "refused a connection: not TLS (a client run with --plaintext?)")
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "refused a connection: TLS handshake failed"),
                    Err(_) => tracing::warn!(%peer, "refused a connection: no TLS handshake within 10 s"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Whether a failed handshake was a peer speaking something other than TLS.
fn not_tls(error: &std::io::Error) -> bool {
    let inner = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    matches!(inner, Some(rustls::Error::InvalidMessage(_)))
}

/// Who may call what (`method` is `Service/Method`, the package left out). Servers may call
/// anything; the administrator's credential also changes
/// membership; other clients make file system requests. A peer with no certificate may only
/// enroll.
fn admits(method: &str, peer: Option<&Peer>) -> Result<(), &'static str> {
    const ANYONE: &[&str] = &["Meta/Enroll"];
    const SERVERS_ONLY: &[&str] = &[
        "Meta/RegisterDataServer",
        "Meta/FindOrphans",
        "Meta/RaftAppend",
        "Meta/RaftVote",
        "Meta/RaftSnapshot",
        "Data/DeleteBlocks",
        "Data/ReplicateBlock",
        "Meta/RenewCertificate",
    ];
    const ADMIN_OR_SERVERS: &[&str] = &[
        "Meta/AddMetaServer",
        "Meta/RemoveMetaServer",
        "Meta/RemoveDataServer",
        "Meta/IssueCredential",
        "Meta/RevokeCredential",
        "Meta/ListCredentials",
        "Meta/RotateBlockTokenKey",
    ];
    if ANYONE.contains(&method) {
        return Ok(());
    }
    let Some(peer) = peer else {
        return Err("a certificate of this file system is needed (mount with --credential)");
    };
    if peer.role.is_server() {
        return Ok(());
    }
    if SERVERS_ONLY.contains(&method) {
        return Err("only the file system's servers may call this");
    }
    if ADMIN_OR_SERVERS.contains(&method) && peer.id != ADMIN {
        return Err("only the administrator's credential may change the cluster or its credentials");
    }
    Ok(())
}

fn peer_of<B>(request: &http::Request<B>) -> Option<Peer> {
    let info = request.extensions().get::<pb::tls::TlsConnectInfo>()?;
    Peer::of_certificate(info.peer_certificates.as_ref()?.first()?)
}

fn remote_of<B>(request: &http::Request<B>) -> Option<std::net::SocketAddr> {
    request.extensions().get::<pb::tls::TlsConnectInfo>().and_then(|i| i.tcp.remote_addr)
}

/// Checks each request's caller against `admits` (when TLS is on) and hands the verified
/// peer on to the service in the request's extensions.
#[derive(Clone, Copy)]
pub struct GuardLayer {
    pub transport: Transport,
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner, transport: self.transport }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    transport: Transport,
}

impl<S, B, R> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if self.transport == Transport::Tls {
            let peer = peer_of(&request);
            let method = request.uri().path().rsplit('.').next().unwrap_or_default().to_string();
            if let Err(why) = admits(&method, peer.as_ref()) {
                let caller = peer.as_ref().map_or_else(|| "no certificate".to_string(), Peer::to_string);
                tracing::warn!(remote = ?remote_of(&request), %caller, %method, "refused a request: {why}");
                let status = if peer.is_none() {
                    tonic::Status::unauthenticated(why)
                } else {
                    tonic::Status::permission_denied(why)
                };
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
            if let Some(peer) = peer {
                request.extensions_mut().insert(peer);
            }
            // The address, where gRPC's own `remote_addr` looks for it.
            if let Some(tcp) = request.extensions().get::<pb::tls::TlsConnectInfo>().map(|i| i.tcp.clone()) {
                request.extensions_mut().insert(tcp);
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role, id: &str) -> Peer {
        Peer { role, id: id.into() }
    }

    #[test]
    fn each_caller_reaches_only_what_its_role_allows() {
        let client = peer(Role::Client, "c1");
        let admin = peer(Role::Client, ADMIN);
        let data = peer(Role::Data, "7");
        assert!(admits("Meta/Enroll", None).is_ok());
        assert!(admits("Meta/Lookup", None).is_err());
        assert!(admits("Meta/Lookup", Some(&client)).is_ok());
        assert!(admits("Meta/RaftAppend", Some(&client)).is_err());
        assert!(admits("Meta/RaftAppend", Some(&admin)).is_err());
        assert!(admits("Meta/RaftAppend", Some(&data)).is_ok());
        assert!(admits("Meta/AddMetaServer", Some(&client)).is_err());
        assert!(admits("Meta/AddMetaServer", Some(&admin)).is_ok());
        assert!(admits("Data/DeleteBlocks", Some(&client)).is_err());
        assert!(admits("Data/GetBlock", Some(&client)).is_ok());
    }
}
