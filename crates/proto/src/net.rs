//! Outgoing connections: one place that builds a gRPC endpoint, so every connection a process
//! makes leaves from the same source address.
//!
//! A server listening on a specific address sends from it too. Peers then see one identity per
//! process, which is what lets a network (or a test's fault-injecting proxy) tell servers apart
//! on a host with many loopback or interface addresses.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tonic::transport::Endpoint;

static SOURCE_ADDRESS: OnceLock<IpAddr> = OnceLock::new();

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

/// An endpoint for `address` (`host:port`, or a full `http://` URI) with the process's source
/// address, no Nagle delay and a bounded connect time.
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if address.starts_with("http://") { address.to_string() } else { format!("http://{address}") };
    Ok(Endpoint::from_shared(uri)?.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true).local_address(source_address()))
}
