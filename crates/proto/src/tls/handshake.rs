//! The TLS handshake, run by rustls's unbuffered API over a socket this module reads and writes
//! itself, so that nothing past the handshake is left inside rustls: the bytes of the first
//! records after it stay in the connection's own read buffer.

use std::io;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ExtractedSecrets, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::{Keys, ReadBuffer, TlsStream};

/// Handshake bytes a peer may send before the handshake is done, at most: far more than a
/// certificate chain of this file system's, and a bound on what a stranger can make us hold.
const HANDSHAKE_BYTES_MAX: usize = 256 * 1024;

/// Opens a TLS 1.3 connection over `tcp` as a client, checking the server as `name`.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    mut tcp: TcpStream,
) -> io::Result<TlsStream> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut read = ReadBuffer::new();
    let early = drive(&mut conn, &mut tcp, &mut read).await?;
    check_version(conn.protocol_version())?;
    let peer = peer_certificates(conn.peer_certificates());
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    finish(tcp, Keys::Client(kernel), secrets, read, early, peer)
}

/// Accepts a TLS 1.3 connection over `tcp` as a server.
pub async fn accept(config: Arc<ServerConfig>, mut tcp: TcpStream) -> io::Result<TlsStream> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut read = ReadBuffer::new();
    let early = drive(&mut conn, &mut tcp, &mut read).await?;
    check_version(conn.protocol_version())?;
    let peer = peer_certificates(conn.peer_certificates());
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    finish(tcp, Keys::Server(kernel), secrets, read, early, peer)
}

fn finish(
    tcp: TcpStream,
    keys: Keys,
    secrets: ExtractedSecrets,
    read: ReadBuffer,
    early: Vec<u8>,
    peer: Option<Arc<Vec<CertificateDer<'static>>>>,
) -> io::Result<TlsStream> {
    TlsStream::new(tcp, keys, secrets, read, early, peer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The records after the handshake are this module's own, in TLS 1.3's format only; both
/// ends' configurations offer nothing else.
fn check_version(version: Option<ProtocolVersion>) -> io::Result<()> {
    match version {
        Some(ProtocolVersion::TLSv1_3) => Ok(()),
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS 1.3 is required, not {other:?}"))),
    }
}

fn peer_certificates(certs: Option<&[CertificateDer<'static>]>) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    certs.filter(|c| !c.is_empty()).map(|c| Arc::new(c.to_vec()))
}

/// A rustls error as the I/O error the transport reports, with the rustls error inside (so a
/// caller can tell, say, a peer that does not speak TLS at all).
pub(crate) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The two sides' unbuffered connections, seen alike.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// Runs the handshake to its end. Application data rustls already decrypted (a peer's first
/// bytes, read together with its last handshake message) is returned, to be read first.
async fn drive<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream, read: &mut ReadBuffer) -> io::Result<Vec<u8>> {
    let mut outgoing = vec![0u8; 4096];
    let mut encoded = 0;
    let mut early = Vec::new();
    let mut handshake_bytes = 0;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(read.unread_mut());
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                read.consume(discard);
                send_alert(conn, tcp, read, &mut outgoing).await;
                return Err(tls_error(e));
            }
        };
        match state {
            ConnectionState::EncodeTlsData(mut data) => loop {
                match data.encode(&mut outgoing[encoded..]) {
                    Ok(n) => {
                        encoded += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(need)) => {
                        outgoing.resize(encoded + need.required_size, 0);
                    }
                    Err(EncodeError::AlreadyEncoded) => break,
                }
            },
            ConnectionState::TransmitTlsData(data) => {
                tcp.write_all(&outgoing[..encoded]).await?;
                encoded = 0;
                data.done();
            }
            ConnectionState::BlockedHandshake => {
                read.consume(discard);
                discard = 0;
                read.make_room();
                let n = tcp.read(read.free_mut()).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the TLS handshake",
                    ));
                }
                handshake_bytes += n;
                if handshake_bytes > HANDSHAKE_BYTES_MAX {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "a TLS handshake longer than any of ours"));
                }
                read.filled(n);
            }
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
            }
            ConnectionState::WriteTraffic(_) => {
                read.consume(discard);
                return Ok(early);
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed during the TLS handshake"));
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected TLS state in the handshake")),
        }
        read.consume(discard);
    }
}

/// Sends the alert a failed handshake left queued (best effort: the peer then learns why, for
/// example that its certificate was refused).
///
/// Only what is queued: rustls hands queued records out before it reads input, and asking it
/// for more would make it read the input that failed once more (and, for bytes that are not
/// TLS at all, queue a second fatal alert, which rustls asserts never happens).
async fn send_alert<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream, read: &mut ReadBuffer, outgoing: &mut Vec<u8>) {
    // The same buffer as before: rustls's handshake state refers to places in it.
    let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process(read.unread_mut()).state else { return };
    let encoded = loop {
        match data.encode(outgoing) {
            Ok(n) => break n,
            Err(EncodeError::InsufficientSize(need)) => outgoing.resize(need.required_size, 0),
            Err(EncodeError::AlreadyEncoded) => return,
        }
    };
    let _ = tcp.write_all(&outgoing[..encoded]).await;
}
