//! The file system's certificate authority: made at `--init`, it signs each server's
//! certificate when the server joins and each client's when its credential is issued.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::{SERVER_NAME, TrustResult, cert_error, identity::Role};

/// How long the authority's own certificate is valid.
const AUTHORITY_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// A certificate is valid from a little before it was signed, for clocks that lag.
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// What a certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A meta or data server, by its id.
    Server { role: Role, id: u64 },
    /// A client holding the credential with this id.
    Client { credential: String },
}

impl Subject {
    pub fn common_name(&self) -> String {
        match self {
            Subject::Server { role, id } => format!("{} {id}", role.as_str()),
            Subject::Client { credential } => format!("{} {credential}", Role::Client.as_str()),
        }
    }
}

pub struct Authority {
    cert_pem: String,
    key: KeyPair,
}

impl Authority {
    /// A new authority for file system `fs_id`.
    pub fn create(fs_id: &str) -> TrustResult<Self> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("Cairn file system {fs_id}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SLACK;
        params.not_after = now + AUTHORITY_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(cert_error)?;
        Ok(Authority { cert_pem: cert.pem(), key })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> TrustResult<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_error)?;
        // Parsed once here, so a damaged file is found at start-up rather than at a join.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(cert_error)?;
        Ok(Authority { cert_pem: cert_pem.to_string(), key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs the public key of a certificate request for `subject`, valid for `valid_for`.
    /// Only the key is taken from the request: the name, uses and lifetime are the
    /// authority's to set.
    pub fn sign(&self, request_pem: &str, subject: &Subject, valid_for: Duration) -> TrustResult<String> {
        let request = CertificateSigningRequestParams::from_pem(request_pem).map_err(cert_error)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, subject.common_name());
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match subject {
            Subject::Server { .. } => {
                params.subject_alt_names = vec![SanType::DnsName(SERVER_NAME.try_into().map_err(cert_error)?)];
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
            Subject::Client { .. } => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SLACK;
        params.not_after = now + valid_for;
        params.serial_number = Some(random_serial());
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(cert_error)?;
        let request = CertificateSigningRequestParams { params, public_key: request.public_key };
        Ok(request.signed_by(&issuer).map_err(cert_error)?.pem())
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// A new private key and a certificate request for it (the key never leaves its owner).
pub fn new_key_and_request() -> TrustResult<(String, String)> {
    let key = KeyPair::generate().map_err(cert_error)?;
    let request = CertificateParams::default().serialize_request(&key).map_err(cert_error)?;
    Ok((key.serialize_pem(), request.pem().map_err(cert_error)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Peer;

    #[test]
    fn a_signed_certificate_names_its_subject_and_not_the_request() {
        let authority = Authority::create("fs").unwrap();
        let (_key, request) = new_key_and_request().unwrap();
        let subject = Subject::Server { role: Role::Data, id: 42 };
        let cert = authority.sign(&request, &subject, Duration::from_secs(3600)).unwrap();
        let der = crate::tls::certs_of(&cert).unwrap().remove(0);
        assert_eq!(Peer::of_certificate(&der), Some(Peer { role: Role::Data, id: "42".into() }));
        let again = Authority::from_pem(authority.cert_pem(), &authority.key_pem()).unwrap();
        let client =
            again.sign(&request, &Subject::Client { credential: "c1".into() }, Duration::from_secs(60)).unwrap();
        let der = crate::tls::certs_of(&client).unwrap().remove(0);
        assert_eq!(Peer::of_certificate(&der), Some(Peer { role: Role::Client, id: "c1".into() }));
    }
}
