//! Outgoing connections: one place that builds a gRPC endpoint, so every connection a process
//! makes leaves from the same source address.
//!
//! A server listening on a specific address sends from it too. Peers then see one identity per
//! process, which is what lets a network (or a test's fault-injecting proxy) tell servers apart
//! on a host with many loopback or interface addresses.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::tcp::BufferedConnector;

static SOURCE_ADDRESS: OnceLock<IpAddr> = OnceLock::new();
static SECURITY: OnceLock<Security> = OnceLock::new();

/// How this process's connections are protected.
#[derive(Clone, Debug)]
pub enum Security {
    /// TLS, with the server checked against the file system's authority and this process's
    /// certificate presented.
    Tls(ClientTlsConfig),
    /// No TLS: only when asked for explicitly (`--plaintext`).
    Plaintext,
}

/// Sets how every later connection of this process is protected (first call wins).
pub fn set_security(security: Security) {
    let _ = SECURITY.set(security);
}

pub fn security() -> Option<&'static Security> {
    SECURITY.get()
}

/// How long opening a connection may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes every later outgoing connection of this process leave from `ip` (first call wins).
pub fn set_source_address(ip: IpAddr) {
    if !ip.is_unspecified() {
        let _ = SOURCE_ADDRESS.set(ip);
    }
}

pub fn source_address() -> Option<IpAddr> {
    SOURCE_ADDRESS.get().copied()
}

/// An endpoint for `address` (`host:port`) with the process's security, source address, no
/// Nagle delay and a bounded connect time. A process that set no security speaks plaintext:
/// the `cairn` binary always sets it, to TLS unless `--plaintext` was given.
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    let host = address.trim_start_matches("http://").trim_start_matches("https://");
    let endpoint = match SECURITY.get() {
        Some(Security::Tls(config)) => Endpoint::from_shared(format!("https://{host}"))?.tls_config(config.clone())?,
        Some(Security::Plaintext) | None => Endpoint::from_shared(format!("http://{host}"))?,
    };
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true).local_address(source_address()))
}

/// A channel to `endpoint` that connects on first use. Under TLS its connections read through
/// a buffer (see [`crate::tcp`]).
pub fn lazy_channel(endpoint: &Endpoint) -> Channel {
    match SECURITY.get() {
        Some(Security::Tls(_)) => endpoint.connect_with_connector_lazy(connector()),
        Some(Security::Plaintext) | None => endpoint.connect_lazy(),
    }
}

/// A channel to `endpoint`, connected now (see [`lazy_channel`]).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match SECURITY.get() {
        Some(Security::Tls(_)) => endpoint.connect_with_connector(connector()).await,
        Some(Security::Plaintext) | None => endpoint.connect().await,
    }
}

fn connector() -> BufferedConnector {
    BufferedConnector { source: source_address() }
}
