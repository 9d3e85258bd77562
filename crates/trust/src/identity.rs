//! Who is on the other end of a connection, read from the certificate it presented (which TLS
//! verified against the file system's authority).

use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Meta,
    Data,
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Meta => "meta",
            Role::Data => "data",
            Role::Client => "client",
        }
    }

    pub fn is_server(self) -> bool {
        matches!(self, Role::Meta | Role::Data)
    }
}

/// A verified peer: its role and id (a server's number, a client's credential).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub id: String,
}

impl Peer {
    /// The peer a certificate names; None for one that names no Cairn role.
    pub fn of_certificate(der: &[u8]) -> Option<Peer> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
        let (role, id) = name.split_once(' ')?;
        let role = match role {
            "meta" => Role::Meta,
            "data" => Role::Data,
            "client" => Role::Client,
            _ => return None,
        };
        Some(Peer { role, id: id.to_string() })
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role.as_str(), self.id)
    }
}

/// When a certificate (DER) stops being valid.
pub fn not_after(der: &[u8]) -> Option<std::time::SystemTime> {
    validity(der).map(|(_, until)| until)
}

/// When a certificate (DER) starts and stops being valid.
pub fn validity(der: &[u8]) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let at = |t: &x509_parser::time::ASN1Time| {
        u64::try_from(t.timestamp()).ok().map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
    };
    Some((at(&cert.validity().not_before)?, at(&cert.validity().not_after)?))
}
