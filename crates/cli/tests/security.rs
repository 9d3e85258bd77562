//! TLS on every link: callers without this file system's certificate are refused with a clear
//! error and a log line, and the servers keep serving everyone else.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_proto::{self as pb, meta_client::MetaClient};
use cairn_testkit::{Cluster, ClusterSpec, wait_until};
use cairn_trust::files::AuthorityFiles;
use cairn_trust::{Authority, JoinToken, Subject, TrustFiles};
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A credential for `subject` signed by `signer`, trusting `trusted` as the servers' authority.
fn credential(dir: &Path, name: &str, signer: &Authority, trusted: &str, subject: Subject) -> PathBuf {
    let (key_pem, request) = cairn_trust::new_key_and_request().unwrap();
    let cert = signer.sign(&request, &subject, Duration::from_secs(3600)).unwrap();
    let files =
        TrustFiles { authority_pem: trusted.to_string(), chain_pem: format!("{cert}{}", signer.cert_pem()), key_pem };
    let path = dir.join(name);
    files.save_bundle(&path).unwrap();
    path
}

/// The error of a status request to `address` over `channel`, if it failed.
async fn status_with(channel: Result<tonic::transport::Channel, String>) -> Result<(), String> {
    let mut client = MetaClient::new(channel?);
    client
        .status(pb::StatusRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

async fn channel(address: &str, credential: &Path) -> Result<tonic::transport::Channel, String> {
    cairn::security::connect_with(address, credential).await.map_err(|e| format!("{e:#}"))
}

fn log_of(cluster: &Cluster) -> String {
    cluster.metas[0].log()
}

#[test]
fn callers_without_this_file_systems_certificate_are_refused_and_others_are_served() {
    let cluster = common::cluster();
    let address = cluster.metas[0].address.clone();
    let scratch = cluster.dir.path().join("credentials");
    std::fs::create_dir_all(&scratch).unwrap();
    let (authority, _) = AuthorityFiles::load(&cluster.metas[0].dir).unwrap();
    let real_authority = authority.cert_pem().to_string();
    let foreign = Authority::create("another").unwrap();
    let rt = runtime();

    // Plaintext: the TLS port does not speak it.
    let plaintext = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await;
        status_with(channel.map_err(|e| e.to_string())).await
    });
    assert!(plaintext.is_err(), "a plaintext client was served");
    wait_until("the plaintext refusal in the log", Duration::from_secs(10), || {
        log_of(&cluster).contains("refused a connection: not TLS")
    })
    .unwrap();

    // A certificate another authority signed, presented to this file system.
    let subject = Subject::Client { credential: "intruder".into() };
    let forged = credential(&scratch, "foreign.cred", &foreign, &real_authority, subject);
    let refused = rt.block_on(async { status_with(channel(&address, &forged).await).await });
    assert!(refused.is_err(), "a certificate of another authority was accepted");
    wait_until("the foreign certificate's refusal in the log", Duration::from_secs(10), || {
        log_of(&cluster).contains("refused a connection: TLS handshake failed")
    })
    .unwrap();

    // TLS without any certificate: only joining is open; everything else says what is missing.
    let anonymous = rt.block_on(async {
        let config = cairn_trust::tls::client_config(&real_authority, None);
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{address}")).unwrap();
        let channel = endpoint.tls_config(config).unwrap().connect().await.map_err(|e| e.to_string());
        status_with(channel).await
    });
    let error = anonymous.expect_err("a caller without a certificate was served");
    assert!(error.starts_with("Unauthenticated") && error.contains("--credential"), "{error}");
    assert!(log_of(&cluster).contains("refused a request"), "no log line for the refused request");

    // A client of this file system may not act as a server, nor change the cluster.
    let subject = Subject::Client { credential: "c1".into() };
    let client = credential(&scratch, "client.cred", &authority, &real_authority, subject);
    rt.block_on(async {
        let mut meta = MetaClient::new(channel(&address, &client).await.unwrap());
        // (Its credential was never issued, so even status is refused; see credentials.rs.)
        let status = meta.status(pb::StatusRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status}");
        let raft = meta.raft_vote(pb::RaftBytes { payload: vec![] }).await.unwrap_err();
        assert_eq!(raft.code(), Code::PermissionDenied, "{raft}");
        let change = pb::RemoveMetaServerRequest { id: 1 };
        let error = meta.remove_meta_server(change).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
    });

    // And after all of that, the file system serves its own as before.
    rt.block_on(async {
        let admin = cluster.credential();
        status_with(channel(&address, &admin).await).await.expect("the administrator is served");
    });
    assert!(cluster.status().is_some());
}

#[test]
fn a_server_joins_only_with_this_file_systems_token() {
    let cluster = common::cluster();
    let token = JoinToken::parse(&std::fs::read_to_string(cluster.token()).unwrap()).unwrap();
    let join = |token: &JoinToken, name: &str| {
        let dir = cluster.dir.path().join(name);
        let output = Command::new(common::bin())
            .args(["data", "--dir", dir.to_str().unwrap(), "--listen", &cairn_testkit::free_address()])
            .args(["--meta", &cluster.meta_addresses(), "--token", &token.to_string()])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{name} joined");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let mut wrong_secret = token.clone();
    wrong_secret.secret[0] ^= 1;
    let error = join(&wrong_secret, "wrong-secret");
    assert!(error.contains("join token is not this file system's"), "{error}");
    assert!(log_of(&cluster).contains("refused to enroll a server"), "no log line for the refused join");

    let mut other_fs = token.clone();
    other_fs.authority[0] ^= 1;
    let error = join(&other_fs, "other-authority");
    assert!(error.contains("belongs to another file system"), "{error}");

    // Keys on disk are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for file in ["tls/ca.key", "tls/node.key", "tls/join.token", "tls/admin.cred"] {
        let mode = std::fs::metadata(cluster.metas[0].dir.join(file)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{file} is readable by others: {mode:o}");
    }
}

#[test]
fn a_plaintext_file_system_runs_only_when_asked_and_says_so() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec { plaintext: true, ..Default::default() }) else {
        return;
    };
    let mount = cluster.mount().unwrap();
    std::fs::write(mount.join("f"), b"in the clear").unwrap();
    assert_eq!(std::fs::read(mount.join("f")).unwrap(), b"in the clear");
    for server in cluster.metas.iter().chain(&cluster.datas) {
        assert!(server.log().contains("WITHOUT TLS"), "{} did not warn:\n{}", server.name, server.log());
    }
    // A client that expects TLS is refused by a plaintext server's port, and says why.
    let output = Command::new(common::bin())
        .args(["status", "--meta", &cluster.meta_addresses(), "--credential", "/nonexistent.cred"])
        .output()
        .unwrap();
    assert!(!output.status.success());
}

/// The leaf certificate a server presents in a new handshake (None: no handshake).
fn presented_leaf(address: &str) -> Option<Vec<u8>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let chain = runtime.block_on(cairn_trust::tls::fetch_chain(address, Duration::from_secs(5))).ok()?;
    chain.into_iter().next()
}

/// Restarts the first data server with a new certificate the authority signed for `valid_for`
/// from now (and from five minutes ago: the authority's allowance for clock skew). Returns
/// the new trust files.
fn restart_data_server_with_certificate_for(cluster: &mut Cluster, valid_for: Duration) -> TrustFiles {
    let (authority, _) = AuthorityFiles::load(&cluster.metas[0].dir).unwrap();
    let dir = cluster.datas[0].dir.clone();
    let old = TrustFiles::load(&dir).unwrap();
    let leaf = cairn_trust::tls::certs_of(&old.chain_pem).unwrap().remove(0);
    let id: u64 = cairn_trust::Peer::of_certificate(&leaf).unwrap().id.parse().unwrap();
    cluster.datas[0].process.kill();
    let (key_pem, request) = cairn_trust::new_key_and_request().unwrap();
    let subject = Subject::Server { role: cairn_trust::Role::Data, id };
    let cert = authority.sign(&request, &subject, valid_for).unwrap();
    let short = TrustFiles { chain_pem: format!("{cert}{}", authority.cert_pem()), key_pem, ..old };
    short.save(&dir).unwrap();
    cluster.datas[0].process.restart().unwrap();
    short
}

#[test]
fn a_running_server_renews_its_certificate_and_presents_the_new_one_without_a_restart() {
    let mut cluster = common::cluster();
    let dir = cluster.datas[0].dir.clone();
    // Valid for 360 s more: not due at start, due at half its lifetime, some 30 s after.
    let short = restart_data_server_with_certificate_for(&mut cluster, Duration::from_secs(360));
    let pid = cluster.datas[0].process.pid();
    let address = cluster.datas[0].address.clone();
    let short_leaf = cairn_trust::tls::certs_of(&short.chain_pem).unwrap().remove(0).to_vec();
    let mut first = None;
    wait_until("the data server to take TLS handshakes", Duration::from_secs(20), || {
        first = presented_leaf(&address);
        first.is_some()
    })
    .unwrap();
    assert_eq!(first, Some(short_leaf.clone()), "the server does not present the certificate it started with");

    wait_until("the running data server to renew its certificate", Duration::from_secs(90), || {
        cluster.datas[0].log().contains("now presenting the renewed certificate")
    })
    .unwrap();
    assert_eq!(cluster.datas[0].process.pid(), pid, "the data server restarted");
    let renewed = TrustFiles::load(&dir).unwrap();
    let renewed_leaf = cairn_trust::tls::certs_of(&renewed.chain_pem).unwrap().remove(0).to_vec();
    assert_ne!(renewed_leaf, short_leaf);
    let left =
        cairn_trust::identity::not_after(&renewed_leaf).unwrap().duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(300 * 86_400), "renewed for only {left:?}");
    assert_eq!(presented_leaf(&address), Some(renewed_leaf), "a new handshake still shows the old certificate");
    cluster.wait_healthy(Duration::from_secs(60)).unwrap();
}

#[test]
fn a_server_renews_its_certificate_before_it_runs_out() {
    let mut cluster = common::cluster();
    let dir = cluster.datas[0].dir.clone();
    // As if it were past the point of renewal: 200 s left, less than half its lifetime.
    restart_data_server_with_certificate_for(&mut cluster, Duration::from_secs(200));
    wait_until("the data server to renew its certificate", Duration::from_secs(30), || {
        cluster.datas[0].log().contains("renewed this server's certificate")
    })
    .unwrap();
    let renewed = TrustFiles::load(&dir).unwrap();
    let leaf = cairn_trust::tls::certs_of(&renewed.chain_pem).unwrap().remove(0);
    let expires = cairn_trust::identity::not_after(&leaf).unwrap();
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(300 * 86_400), "renewed for only {left:?}");
    assert!(log_of(&cluster).contains("renewed a server's certificate"), "meta did not log the renewal");
    cluster.wait_healthy(Duration::from_secs(60)).unwrap();
}

#[test]
fn the_administrators_credential_renews_while_its_meta_server_runs() {
    let mut cluster = common::cluster();
    let meta_dir = cluster.metas[0].dir.clone();
    let path = cairn::security::admin_credential_path(&meta_dir);
    let (authority, _) = AuthorityFiles::load(&meta_dir).unwrap();
    cluster.metas[0].process.kill();
    // Valid for 360 s more: not due at start, due at half its lifetime, some 30 s after.
    let (key_pem, request) = cairn_trust::new_key_and_request().unwrap();
    let admin = Subject::Client { credential: cairn::security::ADMIN.into() };
    let cert = authority.sign(&request, &admin, Duration::from_secs(360)).unwrap();
    let chain_pem = format!("{cert}{}", authority.cert_pem());
    let short = TrustFiles { authority_pem: authority.cert_pem().to_string(), chain_pem, key_pem };
    short.save_bundle(&path).unwrap();
    cluster.metas[0].process.restart().unwrap();
    let pid = cluster.metas[0].process.pid();

    wait_until("the meta server to renew the administrator's credential", Duration::from_secs(90), || {
        log_of(&cluster).contains("renewed the administrator's credential")
    })
    .unwrap();
    assert_eq!(cluster.metas[0].process.pid(), pid, "the meta server restarted");
    let renewed = TrustFiles::load_bundle(&path).unwrap();
    let leaf = cairn_trust::tls::certs_of(&renewed.chain_pem).unwrap().remove(0);
    let left = cairn_trust::identity::not_after(&leaf).unwrap().duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(300 * 86_400), "renewed for only {left:?}");
    // The renewed file still administers the file system.
    let address = cluster.metas[0].address.clone();
    runtime().block_on(async { status_with(channel(&address, &path).await).await }).unwrap();
    cluster.wait_healthy(Duration::from_secs(60)).unwrap();
}
