//! Certificates renew before they expire, while everything runs: servers' own (signed by a
//! meta server that holds the authority), the administrator's credential (by the meta server
//! that keeps it), and a client picks up its credential file when that is replaced.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use cairn_meta::service::SERVER_CERT_VALIDITY;
use cairn_proto as pb;
use cairn_trust::files::AuthorityFiles;
use cairn_trust::tls::CertSlot;
use cairn_trust::{Role, Subject, TrustFiles};

use crate::security::{ADMIN, ADMIN_CREDENTIAL_VALIDITY, admin_credential_path, issue};

/// A server's certificate is renewed once less than this is left of it, or less than half its
/// lifetime for one issued for under twice this (whichever is less); one that expired can only
/// join again with the token.
pub const RENEW_BEFORE: Duration = Duration::from_secs(90 * 24 * 3600);
/// How often a running server looks at its certificate's expiry, at most.
const RENEWAL_CHECK_MAX: Duration = Duration::from_secs(3600);

/// How long until the certificate in `files` (read from `source`) is due for renewal (zero:
/// due now), and whether it has expired.
fn renewal_due_in(files: &TrustFiles, source: &Path) -> Result<(Duration, bool)> {
    leaf_due_in(&leaf_of(files)?, source)
}

/// Like [`renewal_due_in`], for a certificate in DER.
fn leaf_due_in(leaf: &[u8], source: &Path) -> Result<(Duration, bool)> {
    let Some((from, until)) = cairn_trust::identity::validity(leaf) else {
        bail!("{}: the certificate has no readable validity", source.display());
    };
    let now = std::time::SystemTime::now();
    let left = until.duration_since(now).unwrap_or_default();
    let lifetime = until.duration_since(from).unwrap_or_default();
    let renew_before = RENEW_BEFORE.min(lifetime / 2);
    Ok((left.saturating_sub(renew_before), left.is_zero()))
}

/// Renews this server's certificate if it is due (see `RENEW_BEFORE`): a meta server that
/// holds the authority signs it itself, a data server asks a meta server over TLS with the
/// certificate it still has. The new key and certificate replace the old ones on disk. Returns
/// whether it renewed.
pub async fn renew_if_due(dir: &Path, meta: &[String], role: Role, id: u64) -> Result<bool> {
    if !TrustFiles::present(dir) {
        return Ok(false);
    }
    let files = TrustFiles::load(dir)?;
    let (due_in, expired) = renewal_due_in(&files, dir)?;
    if !due_in.is_zero() {
        return Ok(false);
    }
    if expired {
        bail!(
            "{}: this server's certificate expired; move tls/node.crt and tls/node.key aside and start it with --token to join again",
            dir.display()
        );
    }
    let leaf = cairn_trust::tls::certs_of(&files.chain_pem)?.remove(0);
    let left = cairn_trust::identity::not_after(&leaf)
        .and_then(|until| until.duration_since(std::time::SystemTime::now()).ok())
        .unwrap_or_default();
    let (key_pem, request_pem) = cairn_trust::new_key_and_request()?;
    let chain_pem = if AuthorityFiles::present(dir) {
        let (authority, _) = AuthorityFiles::load(dir)?;
        let cert = authority.sign(&request_pem, &Subject::Server { role, id }, SERVER_CERT_VALIDITY)?;
        format!("{cert}{}", authority.cert_pem())
    } else {
        renew_at_meta(&files, meta, &request_pem).await?
    };
    TrustFiles { authority_pem: files.authority_pem.clone(), chain_pem, key_pem }.save(dir)?;
    let days = left.as_secs() / 86_400;
    tracing::info!(
        days_left = days,
        seconds_left = left.as_secs(),
        "renewed this server's certificate for another year"
    );
    println!("cairn: renewed this server's certificate ({days} days were left); the new one is valid for a year");
    Ok(true)
}

/// Keeps a running server's certificate renewed: when it falls due, renews it (as at start)
/// and presents the new one from the next handshake on, inbound and outbound, with no restart.
/// A failed renewal is logged and tried again later; the old certificate still serves.
pub async fn keep_renewed(dir: PathBuf, meta: Vec<String>, role: Role, id: u64, certs: Arc<CertSlot>) {
    let mut retry = Duration::from_secs(1);
    loop {
        let wait = match TrustFiles::load(&dir).map_err(anyhow::Error::from).and_then(|f| renewal_due_in(&f, &dir)) {
            Ok((due_in, _)) => due_in.min(RENEWAL_CHECK_MAX),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this server's certificate");
                RENEWAL_CHECK_MAX
            }
        };
        let wait = admin_credential_due_in(&dir).map_or(wait, |admin| admin.min(wait));
        tokio::time::sleep(wait).await;
        if let Err(e) = renew_admin_credential_if_due(&dir) {
            tracing::warn!(error = %e, "renewing the administrator's credential failed; trying again");
        }
        let renewed = match renew_if_due(&dir, &meta, role, id).await {
            Ok(renewed) => renewed,
            Err(e) => {
                tracing::warn!(error = %e, "renewing this server's certificate failed; trying again");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RENEWAL_CHECK_MAX);
                continue;
            }
        };
        retry = Duration::from_secs(1);
        if renewed {
            match TrustFiles::load(&dir).map_err(anyhow::Error::from).and_then(|f| Ok(certs.replace(&f)?)) {
                Ok(()) => tracing::info!("now presenting the renewed certificate"),
                Err(e) => tracing::warn!(error = %e, "cannot present the renewed certificate"),
            }
        }
    }
}

async fn renew_at_meta(files: &TrustFiles, meta: &[String], request_pem: &str) -> Result<String> {
    let config = cairn_trust::tls::client_config(&files.authority_pem, Some((&files.chain_pem, &files.key_pem)));
    let mut last_error = anyhow!("no meta address given");
    for address in meta {
        let attempt = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))?
                .tls_config(config.clone())?
                .connect_timeout(pb::net::CONNECT_TIMEOUT)
                .timeout(Duration::from_secs(30))
                .connect()
                .await?;
            let request = pb::RenewCertificateRequest { request_pem: request_pem.to_string() };
            let reply = pb::meta_client::MetaClient::new(channel)
                .renew_certificate(request)
                .await
                .map_err(|s| anyhow!("{}", s.message()))?;
            anyhow::Ok(reply.into_inner().chain_pem)
        };
        match attempt.await {
            Ok(chain) => return Ok(chain),
            Err(e) => last_error = e.context(format!("renewing the certificate at {address}")),
        }
    }
    Err(last_error)
}

/// How long until the administrator's credential kept in `dir` falls due, if this meta server
/// keeps it (it holds the authority and `tls/admin.cred`) and can read it.
fn admin_credential_due_in(dir: &Path) -> Option<Duration> {
    let path = admin_credential_path(dir);
    if !AuthorityFiles::present(dir) || !path.exists() {
        return None;
    }
    let files = TrustFiles::load_bundle(&path).ok()?;
    renewal_due_in(&files, &path).ok().map(|(due_in, _)| due_in)
}

/// Renews the administrator's credential (`tls/admin.cred`, kept by the meta server that made
/// the file system) when it falls due by the rule of [`RENEW_BEFORE`], or has expired: the
/// authority's key is here, so no one else is asked. The file is replaced whole (written
/// aside, then renamed), so a client reading it sees the old credential or the new one. Returns
/// whether it renewed.
pub fn renew_admin_credential_if_due(dir: &Path) -> Result<bool> {
    let path = admin_credential_path(dir);
    if !AuthorityFiles::present(dir) || !path.exists() {
        return Ok(false);
    }
    let files = TrustFiles::load_bundle(&path)?;
    let (due_in, _) = renewal_due_in(&files, &path)?;
    if !due_in.is_zero() {
        return Ok(false);
    }
    let (authority, _) = AuthorityFiles::load(dir)?;
    issue(&authority, &Subject::Client { credential: ADMIN.into() }, ADMIN_CREDENTIAL_VALIDITY)?.save_bundle(&path)?;
    tracing::info!(path = %path.display(), "renewed the administrator's credential for another year");
    println!(
        "cairn: renewed the administrator's credential ({}); clients using that file present the new one from their next connection",
        path.display()
    );
    Ok(true)
}

/// How often a client looks whether its credential file was replaced.
const CREDENTIAL_CHECK: Duration = Duration::from_secs(60);

/// Keeps a long-running client (a mount) presenting what its credential file holds now: when
/// the file is replaced (the administrator's renewed, or a newly issued credential copied over
/// it), later handshakes present the new certificate, with no remount. Connections already
/// open keep the identity they were made with. Warns, at most once a day, while the credential
/// in use is due for renewal and the file still holds it.
pub async fn keep_credential_current(path: PathBuf, certs: Arc<CertSlot>) {
    let mut presented = TrustFiles::load_bundle(&path)
        .map_err(anyhow::Error::from)
        .and_then(|files| leaf_of(&files))
        .unwrap_or_default();
    // Each problem is logged once when it appears, a due credential once a day.
    let mut problem: Option<String> = None;
    let mut warned_due_at: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(CREDENTIAL_CHECK).await;
        match reload_if_replaced(&path, &certs, &mut presented) {
            Ok(replaced) => {
                if replaced {
                    tracing::info!(path = %path.display(), "now presenting the replaced credential");
                }
                problem = None;
            }
            Err(e) => {
                let now = format!("{e:#}");
                if problem.as_ref() != Some(&now) {
                    tracing::warn!(path = %path.display(), error = %now, "cannot use the credential file; keeping the one in use");
                }
                problem = Some(now);
            }
        }
        let due = leaf_due_in(&presented, &path).is_ok_and(|(due_in, _)| due_in.is_zero());
        if due && warned_due_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(24 * 3600)) {
            tracing::warn!(
                path = %path.display(),
                "this mount's credential expires soon: issue a new one (cairn credential issue) and copy it over this file"
            );
            warned_due_at = Some(std::time::Instant::now());
        }
    }
}

/// Presents the credential at `path` if its certificate differs from `presented` (the leaf's
/// DER, updated here). A file whose key does not match its certificate is refused, and the
/// one presented so far kept.
fn reload_if_replaced(path: &Path, certs: &CertSlot, presented: &mut Vec<u8>) -> Result<bool> {
    let files = TrustFiles::load_bundle(path)?;
    let leaf = leaf_of(&files)?;
    if leaf == *presented {
        return Ok(false);
    }
    certs.replace(&files)?;
    *presented = leaf;
    Ok(true)
}

fn leaf_of(files: &TrustFiles) -> Result<Vec<u8>> {
    let leaf = cairn_trust::tls::certs_of(&files.chain_pem)?.into_iter().next();
    Ok(leaf.ok_or_else(|| anyhow!("the credential holds no certificate"))?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_trust::{Authority, JoinToken};

    fn authority_in(dir: &Path) -> Authority {
        let authority = Authority::create("fs-test").unwrap();
        let der = cairn_trust::tls::certs_of(authority.cert_pem()).unwrap().remove(0);
        AuthorityFiles::save(dir, &authority, &JoinToken::new(&der)).unwrap();
        authority
    }

    fn leaf_not_after(path: &Path) -> std::time::SystemTime {
        let files = TrustFiles::load_bundle(path).unwrap();
        let leaf = cairn_trust::tls::certs_of(&files.chain_pem).unwrap().remove(0);
        cairn_trust::identity::not_after(&leaf).unwrap()
    }

    #[test]
    fn the_administrators_credential_is_renewed_only_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let authority = authority_in(dir.path());
        let path = admin_credential_path(dir.path());
        let admin = Subject::Client { credential: ADMIN.into() };
        issue(&authority, &admin, ADMIN_CREDENTIAL_VALIDITY).unwrap().save_bundle(&path).unwrap();
        assert!(!renew_admin_credential_if_due(dir.path()).unwrap(), "a fresh credential is not due");
        assert!(admin_credential_due_in(dir.path()).unwrap() > Duration::from_secs(200 * 24 * 3600));

        // One minute left of a life of six (issued five minutes back for clock slack): due.
        issue(&authority, &admin, Duration::from_secs(60)).unwrap().save_bundle(&path).unwrap();
        assert_eq!(admin_credential_due_in(dir.path()), Some(Duration::ZERO));
        assert!(renew_admin_credential_if_due(dir.path()).unwrap());
        let left = leaf_not_after(&path).duration_since(std::time::SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(300 * 24 * 3600), "renewed for a year, {left:?} left");
        let renewed = TrustFiles::load_bundle(&path).unwrap();
        CertSlot::new(&renewed).expect("the renewed key matches its certificate");
        assert!(!renew_admin_credential_if_due(dir.path()).unwrap());
    }

    #[test]
    fn a_meta_server_without_the_credential_or_the_authority_renews_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!renew_admin_credential_if_due(dir.path()).unwrap());
        assert_eq!(admin_credential_due_in(dir.path()), None);
        authority_in(dir.path());
        assert!(!renew_admin_credential_if_due(dir.path()).unwrap());
    }

    #[test]
    fn a_client_presents_its_credential_file_once_it_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let authority = authority_in(dir.path());
        let path = dir.path().join("client.cred");
        let subject = Subject::Client { credential: "7".into() };
        let first = issue(&authority, &subject, Duration::from_secs(3600)).unwrap();
        first.save_bundle(&path).unwrap();
        let certs = CertSlot::new(&first).unwrap();
        let mut presented = leaf_of(&first).unwrap();
        assert!(!reload_if_replaced(&path, &certs, &mut presented).unwrap(), "unchanged");

        let second = issue(&authority, &subject, Duration::from_secs(7200)).unwrap();
        second.save_bundle(&path).unwrap();
        assert!(reload_if_replaced(&path, &certs, &mut presented).unwrap());
        assert_eq!(presented, leaf_of(&second).unwrap());

        // A key that is not the certificate's: refused, the second one stays.
        let third = issue(&authority, &subject, Duration::from_secs(7200)).unwrap();
        TrustFiles { key_pem: first.key_pem.clone(), ..third }.save_bundle(&path).unwrap();
        assert!(reload_if_replaced(&path, &certs, &mut presented).is_err());
        assert_eq!(presented, leaf_of(&second).unwrap());
    }
}
