//! TLS connections over TCP for gRPC channels, opened by this process itself (not by the gRPC
//! library) so that it presents its current certificate at each new connection, and carried by
//! Cairn's own record layer (see [`crate::tls`]).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::Uri;

use crate::tls::TlsStream;

/// Opens TLS connections for a gRPC channel, with no Nagle delay and from
/// `source` when set, checking the server as `server_name`. The channel bounds the time a
/// connection (handshake included) may take.
#[derive(Clone)]
pub struct TlsConnector {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub source: Option<IpAddr>,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            let host =
                uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address without a host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port =
                uri.port_u16().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address without a port"))?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address found"));
            for address in tokio::net::lookup_host((host, port)).await? {
                match connect_from(address, connector.source).await {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        let tls = crate::tls::connect(connector.config.clone(), connector.server_name.clone(), stream)
                            .await?;
                        return Ok(TokioIo::new(tls));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

async fn connect_from(address: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == address.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(address).await
}
