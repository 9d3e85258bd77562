//! What a node keeps of its trust, on disk: `tls/` in its directory (or one file, for a client
//! credential). Private keys and the join token are written owner-only (0600) and synced.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{TrustError, TrustResult};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NODE_CERT: &str = "node.crt";
const NODE_KEY: &str = "node.key";
const JOIN_TOKEN: &str = "join.token";

/// A node's certificate chain (its own first, the authority's last), its key, and the
/// authority's certificate.
#[derive(Clone)]
pub struct TrustFiles {
    pub authority_pem: String,
    pub chain_pem: String,
    pub key_pem: String,
}

pub fn tls_dir(dir: &Path) -> PathBuf {
    dir.join("tls")
}

fn read(path: &Path) -> TrustResult<String> {
    std::fs::read_to_string(path).map_err(|source| TrustError::File { path: path.to_path_buf(), source })
}

/// Writes `text` to `path` (mode 0600 when `secret`), durably, replacing what was there.
pub fn write(path: &Path, text: &str, secret: bool) -> TrustResult<()> {
    let error = |source| TrustError::File { path: path.to_path_buf(), source };
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&temp)
        .map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&temp, path).map_err(error)?;
    Ok(())
}

impl TrustFiles {
    /// Whether `dir` holds a node's trust files.
    pub fn present(dir: &Path) -> bool {
        tls_dir(dir).join(NODE_KEY).exists()
    }

    pub fn load(dir: &Path) -> TrustResult<Self> {
        let tls = tls_dir(dir);
        Ok(TrustFiles {
            authority_pem: read(&tls.join(CA_CERT))?,
            chain_pem: read(&tls.join(NODE_CERT))?,
            key_pem: read(&tls.join(NODE_KEY))?,
        })
    }

    pub fn save(&self, dir: &Path) -> TrustResult<()> {
        let tls = tls_dir(dir);
        std::fs::create_dir_all(&tls).map_err(|source| TrustError::File { path: tls.clone(), source })?;
        write(&tls.join(CA_CERT), &self.authority_pem, false)?;
        write(&tls.join(NODE_KEY), &self.key_pem, true)?;
        write(&tls.join(NODE_CERT), &self.chain_pem, false)
    }

    /// One file holding all three (a client credential): the key, then the chain.
    pub fn load_bundle(path: &Path) -> TrustResult<Self> {
        let text = read(path)?;
        let certs = crate::tls::certs_of(&text)?;
        if certs.len() < 2 {
            return Err(TrustError::Certificate(format!(
                "{}: a credential holds its certificate and the file system's authority",
                path.display()
            )));
        }
        let key_start = text
            .find("-----BEGIN PRIVATE KEY-----")
            .ok_or_else(|| TrustError::Certificate(format!("{}: no private key in the credential", path.display())))?;
        let key_end = text[key_start..]
            .find("-----END PRIVATE KEY-----")
            .map(|e| key_start + e + 25)
            .ok_or_else(|| TrustError::Certificate(format!("{}: the private key is cut short", path.display())))?;
        let authority_pem = pem_of(certs.last().expect("two certificates"));
        Ok(TrustFiles {
            authority_pem,
            chain_pem: text.replace(&text[key_start..key_end], ""),
            key_pem: text[key_start..key_end].to_string(),
        })
    }

    pub fn save_bundle(&self, path: &Path) -> TrustResult<()> {
        write(path, &format!("{}\n{}", self.key_pem.trim_end(), self.chain_pem), true)
    }
}

/// The authority's key and the join token: what every meta server keeps beside its own files.
pub struct AuthorityFiles;

impl AuthorityFiles {
    pub fn present(dir: &Path) -> bool {
        tls_dir(dir).join(CA_KEY).exists()
    }

    pub fn load(dir: &Path) -> TrustResult<(crate::Authority, crate::JoinToken)> {
        let tls = tls_dir(dir);
        let authority = crate::Authority::from_pem(&read(&tls.join(CA_CERT))?, &read(&tls.join(CA_KEY))?)?;
        let token = crate::JoinToken::parse(&read(&tls.join(JOIN_TOKEN))?)?;
        Ok((authority, token))
    }

    pub fn save(dir: &Path, authority: &crate::Authority, token: &crate::JoinToken) -> TrustResult<()> {
        let tls = tls_dir(dir);
        std::fs::create_dir_all(&tls).map_err(|source| TrustError::File { path: tls.clone(), source })?;
        write(&tls.join(CA_CERT), authority.cert_pem(), false)?;
        write(&tls.join(CA_KEY), &authority.key_pem(), true)?;
        write(&tls.join(JOIN_TOKEN), &format!("{token}\n"), true)
    }

    pub fn token_path(dir: &Path) -> PathBuf {
        tls_dir(dir).join(JOIN_TOKEN)
    }
}

/// A certificate in PEM.
pub fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_reads_back_and_its_key_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let authority = crate::Authority::create("fs").unwrap();
        let (key, request) = crate::new_key_and_request().unwrap();
        let subject = crate::Subject::Client { credential: "c".into() };
        let cert = authority.sign(&request, &subject, std::time::Duration::from_secs(60)).unwrap();
        let files = TrustFiles {
            authority_pem: authority.cert_pem().into(),
            chain_pem: format!("{cert}{}", authority.cert_pem()),
            key_pem: key,
        };
        let path = dir.path().join("c.cred");
        files.save_bundle(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let read = TrustFiles::load_bundle(&path).unwrap();
        assert_eq!(
            crate::tls::certs_of(&read.authority_pem).unwrap(),
            crate::tls::certs_of(authority.cert_pem()).unwrap()
        );
        assert_eq!(crate::tls::certs_of(&read.chain_pem).unwrap().len(), 2);
        assert!(read.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        crate::tls::server_config(&read, crate::tls::CertSlot::new(&read).unwrap()).unwrap();
    }
}
