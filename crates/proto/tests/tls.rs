//! Cairn's TLS record layer over real TCP on loopback, against itself and against rustls's own
//! (a standard TLS 1.3 implementation): data both ways, key updates either side starts, a clean
//! close, a cut connection, and a peer that does not speak TLS.

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::tls::{self, TlsStream};
use cairn_trust::tls::{CertSlot, connector_config, server_config};
use cairn_trust::{Authority, Role, Subject, TrustFiles};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(60);

struct Pki {
    authority_pem: String,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn files(authority: &Authority, subject: Subject) -> TrustFiles {
    let (key_pem, request) = cairn_trust::new_key_and_request().unwrap();
    let cert = authority.sign(&request, &subject, Duration::from_secs(3600)).unwrap();
    TrustFiles {
        authority_pem: authority.cert_pem().into(),
        chain_pem: format!("{cert}{}", authority.cert_pem()),
        key_pem,
    }
}

fn pki() -> Pki {
    let authority = Authority::create("fs").unwrap();
    let server = files(&authority, Subject::Server { role: Role::Data, id: 1 });
    let client = files(&authority, Subject::Client { credential: "c1".into() });
    Pki {
        authority_pem: authority.cert_pem().into(),
        server: Arc::new(server_config(&server, CertSlot::new(&server).unwrap()).unwrap()),
        client: connector_config(&client.authority_pem, Some(CertSlot::new(&client).unwrap())).unwrap(),
    }
}

fn name() -> ServerName<'static> {
    ServerName::try_from(cairn_trust::SERVER_NAME).unwrap()
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

/// `len` bytes that differ from position to position.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed).collect()
}

/// Writes `data` in pieces of changing sizes (some vectored, as HTTP/2 writes a frame header
/// and its payload), then shuts the stream down.
async fn send_all<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> std::io::Result<()> {
    let sizes = [1usize, 9, 100, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 70_000, 1 << 20];
    let mut at = 0;
    let mut turn = 0;
    while at < data.len() {
        let n = sizes[turn % sizes.len()].min(data.len() - at);
        if turn % 3 == 0 && n > 9 {
            let bufs = [std::io::IoSlice::new(&data[at..at + 9]), std::io::IoSlice::new(&data[at + 9..at + n])];
            let mut written = 0;
            while written < n {
                let skip = written;
                let pieces: Vec<std::io::IoSlice<'_>> = if skip < 9 {
                    vec![std::io::IoSlice::new(&bufs[0][skip..]), std::io::IoSlice::new(&bufs[1])]
                } else {
                    vec![std::io::IoSlice::new(&bufs[1][skip - 9..])]
                };
                written += w.write_vectored(&pieces).await?;
            }
        } else {
            w.write_all(&data[at..at + n]).await?;
        }
        at += n;
        turn += 1;
    }
    w.flush().await?;
    w.shutdown().await
}

/// Reads to the close with buffers of changing sizes: small ones take records' contents out of
/// the read buffer, large ones have records read and opened straight into them.
async fn receive_all<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let sizes = [1usize, 4096, 70_000, 1 << 20, 100];
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for turn in 0.. {
        let n = r.read(&mut buf[..sizes[turn % sizes.len()]]).await?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(got)
}

/// Both ends send `len` bytes at once and each reads the other's to the close.
async fn exchange<A, B>(mut a: A, mut b: B, len: usize)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (from_a, from_b) = (pattern(len, 1), pattern(len, 2));
    let (a_read, mut a_write) = tokio::io::split(&mut a);
    let (b_read, mut b_write) = tokio::io::split(&mut b);
    let (mut a_read, mut b_read) = (a_read, b_read);
    let (sent_a, sent_b, got_b, got_a) = tokio::time::timeout(DEADLINE, async {
        tokio::join!(
            send_all(&mut a_write, &from_a),
            send_all(&mut b_write, &from_b),
            receive_all(&mut b_read),
            receive_all(&mut a_read)
        )
    })
    .await
    .expect("the exchange finished in time");
    sent_a.unwrap();
    sent_b.unwrap();
    assert!(got_b.unwrap() == from_a, "what a sent is not what b read");
    assert!(got_a.unwrap() == from_b, "what b sent is not what a read");
}

#[tokio::test]
async fn cairn_to_cairn_carries_data_both_ways_to_a_clean_close() {
    let pki = pki();
    let (c, s) = pair().await;
    let (client, server) =
        tokio::join!(tls::connect(pki.client.clone(), name(), c), tls::accept(pki.server.clone(), s));
    let (client, server) = (client.unwrap(), server.unwrap());
    let leaf = server.peer_certificates().expect("the client presented its certificate")[0].clone();
    let peer = cairn_trust::Peer::of_certificate(&leaf).unwrap();
    assert_eq!(peer.id, "c1");
    exchange(client, server, 24 << 20).await;
}

#[tokio::test]
async fn cairn_interoperates_with_rustls_either_side() {
    let pki = pki();
    // Cairn's client, rustls's server.
    let (c, s) = pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let (client, server) = tokio::join!(tls::connect(pki.client.clone(), name(), c), acceptor.accept(s));
    exchange(client.unwrap(), server.unwrap(), 8 << 20).await;

    // rustls's client, Cairn's server.
    let (c, s) = pair().await;
    let connector = tokio_rustls::TlsConnector::from(pki.client.clone());
    let (client, server) = tokio::join!(connector.connect(name(), c), tls::accept(pki.server.clone(), s));
    exchange(client.unwrap(), server.unwrap(), 8 << 20).await;
}

#[tokio::test]
async fn keys_update_on_either_side_and_data_keeps_flowing() {
    let pki = pki();
    // Cairn updates its sending key every few records; rustls follows each update.
    let (c, s) = pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let (client, server) = tokio::join!(tls::connect(pki.client.clone(), name(), c), acceptor.accept(s));
    let mut client: TlsStream = client.unwrap();
    client.update_key_every(3);
    exchange(client, server.unwrap(), 4 << 20).await;

    // rustls updates its key and asks Cairn to update its own; both go on.
    let (c, s) = pair().await;
    let connector = tokio_rustls::TlsConnector::from(pki.client.clone());
    let (client, server) = tokio::join!(connector.connect(name(), c), tls::accept(pki.server.clone(), s));
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    for round in 0..5u8 {
        client.get_mut().1.refresh_traffic_keys().unwrap();
        let message = pattern(100_000, round);
        client.write_all(&message).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; message.len()];
        tokio::time::timeout(DEADLINE, server.read_exact(&mut got)).await.unwrap().unwrap();
        assert!(got == message, "round {round}: the server read other bytes");
        server.write_all(&message).await.unwrap();
        server.flush().await.unwrap();
        let mut back = vec![0; message.len()];
        tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.unwrap().unwrap();
        assert!(back == message, "round {round}: the client read other bytes");
    }
}

#[tokio::test]
async fn a_connection_cut_without_close_notify_is_an_error_not_an_end() {
    let pki = pki();
    let (c, s) = pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let (client, server) = tokio::join!(tls::connect(pki.client.clone(), name(), c), acceptor.accept(s));
    let (mut client, server) = (client.unwrap(), server.unwrap());
    let (tcp, _) = server.into_inner();
    drop(tcp);
    let mut buf = [0u8; 16];
    let error = tokio::time::timeout(DEADLINE, client.read(&mut buf)).await.unwrap().unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
}

#[tokio::test]
async fn a_peer_that_does_not_speak_tls_is_refused_as_such() {
    let pki = pki();
    let (mut c, s) = pair().await;
    let (_, accepted) = tokio::join!(
        async { c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap() },
        tokio::time::timeout(DEADLINE, tls::accept(pki.server.clone(), s))
    );
    let error = accepted.unwrap().err().expect("a plaintext peer was accepted");
    let inner = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(matches!(inner, Some(rustls::Error::InvalidMessage(_))), "{error:?}");
}

#[tokio::test]
async fn a_client_certificate_of_another_authority_is_refused_and_the_client_told() {
    let pki = pki();
    let other = Authority::create("other").unwrap();
    let intruder = files(&other, Subject::Client { credential: "c1".into() });
    // The intruder trusts the real servers, but its own certificate is another authority's.
    let config = connector_config(&pki.authority_pem, Some(CertSlot::new(&intruder).unwrap())).unwrap();
    let (c, s) = pair().await;
    let (client, server) = tokio::join!(
        tls::connect(config, name(), c),
        tokio::time::timeout(DEADLINE, tls::accept(pki.server.clone(), s))
    );
    assert!(server.unwrap().is_err(), "the server accepted another authority's certificate");
    // A TLS 1.3 client is done before the server checks its certificate; the alert comes next.
    let error = match client {
        Err(e) => e,
        Ok(mut client) => {
            let mut buf = [0u8; 1];
            tokio::time::timeout(DEADLINE, client.read(&mut buf)).await.unwrap().unwrap_err()
        }
    };
    assert!(error.to_string().contains("UnknownCA") || error.to_string().contains("BadCertificate"), "{error}");
}
