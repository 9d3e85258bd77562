//! A TLS 1.3 connection after its handshake: records sealed and opened by [`super::record`]
//! with the keys rustls negotiated, and rustls keeping only the key schedule (key updates,
//! session tickets), as it does for kernel TLS.
//!
//! Each byte costs one cipher pass and no copy beyond the socket's own on the way out (records
//! are encrypted straight from the caller's buffers into the send buffer), and one copy on the
//! way in (records are read in large pieces, decrypted in place and copied out to the reader).

use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::record::{Content, MAX_CONTENT, MAX_RECORD, OVERHEAD, Opened, Opener, RecordError, Sealer};

/// Bytes read from the socket at once, at most (many records per read system call).
pub const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Encrypted bytes a connection queues for the socket at most: a 1 MiB HTTP/2 data frame and its
/// headers fit, and leave in one system call.
pub const SEND_BUFFER_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Room a reader's buffer needs for records to be read straight into it (several records'
/// worth, so that a read system call brings many).
const DIRECT_READ_MIN: usize = 4 * MAX_RECORD;

/// Post-handshake messages (key updates, session tickets) a peer may have pending at once.
const HANDSHAKE_MESSAGE_BYTES_MAX: usize = 64 * 1024;

/// Empty application-data records in a row a peer may send (they cost work and carry nothing).
const EMPTY_RECORDS_MAX: u32 = 32;

const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("TLS key schedule: {0}")]
    Keys(#[from] rustls::Error),
    #[error("the peer sent TLS alert {0:?}")]
    Alert(rustls::AlertDescription),
    #[error("malformed TLS message after the handshake: {0}")]
    Malformed(&'static str),
    #[error("the peer ended the connection without a TLS close_notify")]
    Truncated,
}

impl From<StreamError> for io::Error {
    fn from(e: StreamError) -> io::Error {
        let kind = match e {
            StreamError::Truncated => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// The key schedule of either side, kept by rustls.
pub(crate) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_tx_secret(),
            Keys::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_rx_secret(),
            Keys::Server(k) => k.update_rx_secret(),
        }
    }

    /// Records one key may seal (the suite's confidentiality limit).
    fn records_per_key(&self) -> u64 {
        let suite = match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        };
        suite.tls13().map_or(1 << 24, |s| s.common.confidentiality_limit)
    }
}

/// The read side's buffer: bytes from the socket not yet consumed lie in `start..end`.
pub(crate) struct ReadBuffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadBuffer {
    pub(crate) fn new() -> Self {
        ReadBuffer { buf: vec![0; READ_BUFFER_BYTES].into_boxed_slice(), start: 0, end: 0 }
    }

    pub(crate) fn unread_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(self.start + n <= self.end);
        self.start += n;
    }

    /// Makes room for at least a whole record after what is buffered, moving the unread part
    /// to the front when it lies too far back. Only called with no decrypted content pending
    /// in the buffer.
    pub(crate) fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.start < MAX_RECORD {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Keeps `bytes` (the start of a record) as the only unread bytes.
    fn keep(&mut self, bytes: &[u8]) {
        debug_assert!(self.is_empty() && bytes.len() < MAX_RECORD);
        self.buf[..bytes.len()].copy_from_slice(bytes);
        self.start = 0;
        self.end = bytes.len();
    }

    pub(crate) fn free_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }

    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }
}

/// An established TLS 1.3 connection over TCP.
pub struct TlsStream {
    tcp: TcpStream,
    keys: Keys,
    peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    read: ReadBuffer,
    opener: Opener,
    /// Decrypted application data not yet read, inside `read.buf`.
    content: Range<usize>,
    /// Application data rustls decrypted during the handshake, read first.
    early: Vec<u8>,
    /// Post-handshake handshake messages received in part.
    messages: Vec<u8>,
    empty_records: u32,
    peer_closed: bool,
    send: SendBuffer,
    sealer: Sealer,
    /// Records each sending key seals before the next key update.
    records_per_key: u64,
    rekey_after: u64,
    /// The peer updated its key and asked for ours to follow.
    key_update_owed: bool,
    close_sent: bool,
}

impl TlsStream {
    pub(crate) fn new(
        tcp: TcpStream,
        keys: Keys,
        secrets: ExtractedSecrets,
        read: ReadBuffer,
        early: Vec<u8>,
        peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    ) -> Result<Self, StreamError> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        // Room for the key update itself under the old key. The sequence number counts the
        // records this key has sealed already (in the handshake's wake).
        let records_per_key = keys.records_per_key().saturating_sub(2);
        let rekey_after = records_per_key;
        Ok(TlsStream {
            tcp,
            keys,
            peer_certificates,
            read,
            opener: Opener::new(rx_seq, &rx)?,
            content: 0..0,
            early,
            messages: Vec::new(),
            empty_records: 0,
            peer_closed: false,
            send: SendBuffer::new(),
            sealer: Sealer::new(tx_seq, &tx)?,
            records_per_key,
            rekey_after,
            key_update_owed: false,
            close_sent: false,
        })
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// The certificate chain the peer presented, leaf first.
    pub fn peer_certificates(&self) -> Option<&Arc<Vec<CertificateDer<'static>>>> {
        self.peer_certificates.as_ref()
    }

    /// Updates the sending key every `records` records, whatever the suite's limit: lets tests
    /// run key updates without sealing millions of records.
    #[doc(hidden)]
    pub fn update_key_every(&mut self, records: u64) {
        self.records_per_key = records;
        self.rekey_after = self.sealer.records() + records;
    }

    /// Opens the next whole record in the read buffer, if there is one, and acts on it.
    /// Returns whether one was there.
    fn open_next(&mut self) -> Result<bool, StreamError> {
        let Some(len) = Opener::record_len(self.read.unread_mut())? else { return Ok(false) };
        if self.read.unread_mut().len() < len {
            return Ok(false);
        }
        let start = self.read.start;
        let Opened { kind, content } = self.opener.open(&mut self.read.buf[start..start + len])?;
        self.read.consume(len);
        let content = start + content.start..start + content.end;
        if kind == Content::ApplicationData {
            self.count_application_data(content.len())?;
            self.content = content;
        } else {
            let control = self.read.buf[content].to_vec();
            self.take_control(kind, &control)?;
        }
        Ok(true)
    }

    /// Reads records from the socket straight into `buf` (which has room for several) and
    /// opens them there, each content moved to follow the one before: no copy beyond the
    /// socket's and the cipher's. The start of a record read before (at most one record) goes
    /// first, and a record cut short at the end of this read goes back to the read buffer.
    /// Returns the bytes of content added to `buf`.
    fn poll_read_direct(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<Result<usize, io::Error>> {
        debug_assert!(self.content.is_empty() && self.early.is_empty());
        debug_assert!(self.read.unread_mut().len() < MAX_RECORD && buf.remaining() > MAX_RECORD);
        let (n, partial) = {
            // SAFETY: only initialized bytes are written into this part of `buf` (the partial
            // record and what the socket read), and `assume_init` below claims exactly those.
            let mut into = ReadBuf::uninit(unsafe { buf.unfilled_mut() });
            into.put_slice(self.read.unread_mut());
            let partial = into.filled().len();
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut into))?;
            (into.filled().len(), partial)
        };
        if n == partial {
            return Poll::Ready(Err(StreamError::Truncated.into()));
        }
        self.read.consume(partial);
        // SAFETY: the two writes above initialized these `n` bytes.
        unsafe { buf.assume_init(n) };
        let region = &mut buf.initialize_unfilled_to(n)[..n];
        let (mut out, mut at) = (0, 0);
        while !self.peer_closed {
            let Some(len) = Opener::record_len(&region[at..]).map_err(StreamError::from)? else { break };
            if region.len() - at < len {
                break;
            }
            let Opened { kind, content } =
                self.opener.open_into(&mut region[out..at + len], at - out).map_err(StreamError::from)?;
            at += len;
            if kind == Content::ApplicationData {
                self.count_application_data(content.len())?;
                out += content.len();
            } else {
                let control = region[out..out + content.len()].to_vec();
                self.take_control(kind, &control)?;
            }
        }
        if !self.peer_closed {
            self.read.keep(&region[at..]);
        }
        buf.advance(out);
        Poll::Ready(Ok(out))
    }

    fn count_application_data(&mut self, len: usize) -> Result<(), StreamError> {
        self.empty_records = if len == 0 { self.empty_records + 1 } else { 0 };
        if self.empty_records > EMPTY_RECORDS_MAX {
            return Err(StreamError::Malformed("too many empty records"));
        }
        Ok(())
    }

    /// Acts on an alert or a post-handshake message record.
    fn take_control(&mut self, kind: Content, content: &[u8]) -> Result<(), StreamError> {
        match kind {
            Content::ApplicationData => Ok(()),
            Content::Alert => match *content {
                [_, CLOSE_NOTIFY] => {
                    self.peer_closed = true;
                    Ok(())
                }
                [_, USER_CANCELED] => Ok(()),
                [_, description] => Err(StreamError::Alert(description.into())),
                _ => Err(StreamError::Malformed("an alert of other than two bytes")),
            },
            Content::Handshake => {
                if self.messages.len() + content.len() > HANDSHAKE_MESSAGE_BYTES_MAX {
                    return Err(StreamError::Malformed("a post-handshake message too long"));
                }
                self.messages.extend_from_slice(content);
                self.take_messages()
            }
        }
    }

    /// Acts on each whole post-handshake message received.
    fn take_messages(&mut self) -> Result<(), StreamError> {
        let mut at = 0;
        while let [kind, a, b, c, ..] = self.messages[at..] {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let Some(body) = self.messages.get(at + 4..at + 4 + len) else { break };
            match kind {
                KEY_UPDATE => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(StreamError::Malformed("a key update")),
                    };
                    // A key change ends its record (RFC 8446 §5.1).
                    if at + 4 + len != self.messages.len() {
                        return Err(StreamError::Malformed("a message after a key update in its record"));
                    }
                    let (seq, secrets) = self.keys.update_rx()?;
                    self.opener = Opener::new(seq, &secrets)?;
                    self.key_update_owed |= requested;
                }
                NEW_SESSION_TICKET => match &mut self.keys {
                    Keys::Client(keys) => keys.handle_new_session_ticket(body)?,
                    Keys::Server(_) => return Err(StreamError::Malformed("a session ticket from a client")),
                },
                _ => return Err(StreamError::Malformed("an unexpected handshake message")),
            }
            at += 4 + len;
        }
        self.messages.drain(..at);
        Ok(())
    }

    /// Seals a key update (asking the peer for nothing) under the current key, then seals with
    /// the next one.
    fn update_sending_key(&mut self) -> Result<(), StreamError> {
        self.send.seal(&mut self.sealer, Content::Handshake, &[KEY_UPDATE, 0, 0, 1, 0])?;
        let (seq, secrets) = self.keys.update_tx()?;
        self.sealer = Sealer::new(seq, &secrets)?;
        self.rekey_after = seq.saturating_add(self.records_per_key);
        self.key_update_owed = false;
        Ok(())
    }

    fn before_sealing(&mut self) -> Result<(), StreamError> {
        if self.key_update_owed || self.sealer.records() >= self.rekey_after {
            self.update_sending_key()?;
        }
        Ok(())
    }

    /// Seals what of `bufs` fits in the send buffer into records; returns how many bytes it
    /// took. A record lying within one buffer is sealed straight from it; the pieces of one that
    /// spans buffers (an HTTP/2 frame header and the start of its payload) are gathered first.
    fn seal_from(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, StreamError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut taken = 0;
        let (mut index, mut offset) = (0, 0);
        while taken < total && self.send.has_room() {
            let want = MAX_CONTENT.min(total - taken);
            while bufs[index].len() == offset {
                index += 1;
                offset = 0;
            }
            self.before_sealing()?;
            let here = &bufs[index][offset..];
            if here.len() >= want {
                self.send.seal(&mut self.sealer, Content::ApplicationData, &here[..want])?;
                offset += want;
            } else {
                let content = self.send.content_space();
                let mut gathered = 0;
                while gathered < want {
                    let piece = &bufs[index][offset..];
                    let n = piece.len().min(want - gathered);
                    content[gathered..gathered + n].copy_from_slice(&piece[..n]);
                    gathered += n;
                    offset += n;
                    if offset == bufs[index].len() && gathered < want {
                        index += 1;
                        offset = 0;
                    }
                }
                self.send.seal_gathered(&mut self.sealer, Content::ApplicationData, want)?;
            }
            taken += want;
        }
        Ok(taken)
    }

    /// Writes queued records to the socket until none is left or it would block.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.send.is_empty() {
            match Pin::new(&mut self.tcp).poll_write(cx, self.send.queued()) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.send.sent(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Records sealed and not yet sent lie in `start..end` of a buffer allocated (and zeroed) once:
/// records are sealed into it in place, with nothing to clear or grow per record.
struct SendBuffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl SendBuffer {
    fn new() -> Self {
        SendBuffer { buf: vec![0; SEND_BUFFER_BYTES + MAX_RECORD].into_boxed_slice(), start: 0, end: 0 }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn queued(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn sent(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether another record may be queued: less than [`SEND_BUFFER_BYTES`] are, and a whole
    /// record fits after them (moving them to the front when that makes it fit).
    fn has_room(&mut self) -> bool {
        if self.end - self.start >= SEND_BUFFER_BYTES {
            return false;
        }
        if self.buf.len() - self.end < MAX_RECORD {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        true
    }

    fn seal(&mut self, sealer: &mut Sealer, kind: Content, content: &[u8]) -> Result<(), RecordError> {
        debug_assert!(self.buf.len() - self.end >= content.len() + OVERHEAD);
        self.end += sealer.seal(kind, content, &mut self.buf[self.end..])?;
        Ok(())
    }

    /// Where the content of the next record goes, for [`SendBuffer::seal_gathered`].
    fn content_space(&mut self) -> &mut [u8] {
        let at = self.end + super::record::HEADER_LEN;
        &mut self.buf[at..at + MAX_CONTENT]
    }

    fn seal_gathered(&mut self, sealer: &mut Sealer, kind: Content, content_len: usize) -> Result<(), RecordError> {
        self.end += sealer.seal_in_place(kind, content_len, &mut self.buf[self.end..])?;
        Ok(())
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.early.is_empty() {
                let n = this.early.len().min(buf.remaining());
                buf.put_slice(&this.early[..n]);
                this.early.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if !this.content.is_empty() {
                let n = this.content.len().min(buf.remaining());
                buf.put_slice(&this.read.buf[this.content.start..this.content.start + n]);
                this.content.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.open_next()? {
                continue;
            }
            // No whole record is buffered: what is (the start of one) is less than a record.
            if buf.remaining() >= DIRECT_READ_MIN {
                if ready!(this.poll_read_direct(cx, buf))? > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.read.make_room();
            let mut free = ReadBuf::new(this.read.free_mut());
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut free))?;
            let n = free.filled().len();
            if n == 0 {
                return Poll::Ready(Err(StreamError::Truncated.into()));
            }
            this.read.filled(n);
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if !this.send.has_room() {
            ready!(this.poll_send(cx))?;
        }
        let taken = this.seal_from(bufs)?;
        // Start sending at once; what the socket does not take now goes with the next write or
        // flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        if this.key_update_owed && !this.close_sent {
            this.update_sending_key()?;
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.close_sent {
            if !this.send.has_room() {
                ready!(this.poll_send(cx))?;
            }
            this.send.seal(&mut this.sealer, Content::Alert, &[1, CLOSE_NOTIFY]).map_err(StreamError::from)?;
            this.close_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// What a server knows of a connection's peer: its address and, when it presented one, its
/// certificate chain (leaf first).
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub tcp: TcpConnectInfo,
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Connected for TlsStream {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        TlsConnectInfo { tcp: self.tcp.connect_info(), peer_certificates: self.peer_certificates.clone() }
    }
}
