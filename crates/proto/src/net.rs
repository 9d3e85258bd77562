//! Outgoing connections: one place that builds a gRPC endpoint, so every connection a process
//! makes leaves from the same source address.
//!
//! A server listening on a specific address sends from it too. Peers then see one identity per
//! process, which is what lets a network (or a test's fault-injecting proxy) tell servers apart
//! on a host with many loopback or interface addresses.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use std::sync::{Arc, RwLock};

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

use crate::tcp::TlsConnector;

static SOURCE_ADDRESS: OnceLock<IpAddr> = OnceLock::new();
static SECURITY: RwLock<Option<Security>> = RwLock::new(None);

/// How this process's connections are protected.
#[derive(Clone, Debug)]
pub enum Security {
    /// TLS: servers checked against the file system's authority as `server_name`, and this
    /// process's certificate presented (the configuration resolves the current one at each
    /// handshake).
    Tls { config: Arc<ClientConfig>, server_name: ServerName<'static> },
    /// No TLS: only when asked for explicitly (`--plaintext`).
    Plaintext,
}

/// Sets how every later connection of this process is protected.
pub fn set_security(security: Security) {
    *SECURITY.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(security);
}

pub fn security() -> Option<Security> {
    SECURITY.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
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

/// An endpoint for `address` (`host:port`) with no Nagle delay and a bounded connect time,
/// to be connected with [`lazy_channel`] or [`connect`], which add the process's security and
/// source address. A process that set no security speaks plaintext: the `cairn` binary always
/// sets it, to TLS unless `--plaintext` was given.
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    let host = address.trim_start_matches("http://").trim_start_matches("https://");
    // TLS is this process's own (see `crate::tcp`), under HTTP/2 that knows nothing of it.
    let endpoint = Endpoint::from_shared(format!("http://{host}"))?;
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true).local_address(source_address()))
}

/// A channel to `endpoint` that connects on first use, and again after a connection breaks,
/// each time with the security set then.
pub fn lazy_channel(endpoint: &Endpoint) -> Channel {
    match security() {
        Some(Security::Tls { config, server_name }) => {
            endpoint.connect_with_connector_lazy(connector(config, server_name))
        }
        Some(Security::Plaintext) | None => endpoint.connect_lazy(),
    }
}

/// A channel to `endpoint`, connected now (see [`lazy_channel`]).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match security() {
        Some(Security::Tls { config, server_name }) => {
            endpoint.connect_with_connector(connector(config, server_name)).await
        }
        Some(Security::Plaintext) | None => endpoint.connect().await,
    }
}

fn connector(config: Arc<ClientConfig>, server_name: ServerName<'static>) -> TlsConnector {
    TlsConnector { config, server_name, source: source_address() }
}
