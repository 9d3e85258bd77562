//! TLS connections over TCP with a read buffer under TLS, opened by this process itself (not by
//! the gRPC library) so that it presents its current certificate at each new connection.
//!
//! rustls asks its transport for at most 4 KiB per read, so a 16 KiB record costs four or more
//! `read` system calls, and a 4 MiB block over a thousand. A buffer between the socket and
//! rustls turns those into one large read per buffer-full and cheap copies out of it. Writes go
//! straight through: rustls already hands whole records to the socket.
//!
//! Plaintext connections do not need this: HTTP/2 reads large pieces at once by itself.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::Uri;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes read from the socket at once, at most.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Encrypted bytes a TLS connection queues for the socket at most (rustls's default is 64 KiB):
/// a 1 MiB HTTP/2 data frame and its headers fit.
pub const TLS_SEND_BUFFER_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// A TCP stream whose reads go through a buffer of [`READ_BUFFER_BYTES`].
pub struct BufferedTcp {
    inner: BufReader<TcpStream>,
}

impl BufferedTcp {
    pub fn new(stream: TcpStream) -> Self {
        BufferedTcp { inner: BufReader::with_capacity(READ_BUFFER_BYTES, stream) }
    }

    pub fn get_ref(&self) -> &TcpStream {
        self.inner.get_ref()
    }
}

impl AsyncRead for BufferedTcp {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for BufferedTcp {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for BufferedTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.get_ref().connect_info()
    }
}

/// Opens TLS connections over [`BufferedTcp`] for a gRPC channel, with no Nagle delay and from
/// `source` when set, checking the server as `server_name`. The channel bounds the time a
/// connection (handshake included) may take.
#[derive(Clone)]
pub struct TlsConnector {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub source: Option<IpAddr>,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<BufferedTcp>>;
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
                        let mut tls = tokio_rustls::TlsConnector::from(connector.config.clone())
                            .connect(connector.server_name.clone(), BufferedTcp::new(stream))
                            .await?;
                        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
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
