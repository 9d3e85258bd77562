//! TLS 1.3 record protection (RFC 8446 §5.2): sealing outgoing records and opening incoming
//! ones with the traffic keys a finished handshake left.
//!
//! A protected record is a five-byte header (outer type application data, legacy version
//! 0x0303, length) and the AEAD ciphertext of the inner plaintext: the content, one byte of its
//! real content type, and any zero padding. The nonce is the traffic IV XOR the record's
//! sequence number; the header is the additional data.
//!
//! The cipher itself is the fastest of two well-kept implementations on the processor at hand
//! (see [`Implementation`]): the record format and the keys are the same whichever seals, so
//! the two ends need not agree on it.

use std::ops::{Range, RangeFrom};
use std::sync::OnceLock;

use rustls::ConnectionTrafficSecrets;

/// Largest content one record carries (2^14 bytes).
pub const MAX_CONTENT: usize = 16 * 1024;
/// Bytes of a record header.
pub const HEADER_LEN: usize = 5;
/// Bytes of the AEAD tag after each record's ciphertext (every TLS 1.3 suite).
pub const TAG_LEN: usize = 16;
/// Bytes a record adds to its content: header, content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// Largest ciphertext a peer may send: content, type byte and padding up to 2^14 + 1 bytes,
/// and the tag, within the 2^14 + 256 the protocol allows.
pub const MAX_CIPHERTEXT: usize = MAX_CONTENT + 256;
/// Bytes a whole record may take on the wire, header included.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;

const NONCE_LEN: usize = 12;
/// The outer type of every protected record, and the inner type of application data.
const APPLICATION_DATA: u8 = 23;
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// What a record carries, from its inner content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    Alert,
    Handshake,
    ApplicationData,
}

impl Content {
    fn byte(self) -> u8 {
        match self {
            Content::Alert => 21,
            Content::Handshake => 22,
            Content::ApplicationData => APPLICATION_DATA,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("a record failed authentication (bad_record_mac)")]
    BadRecordMac,
    #[error("a record of {0} bytes is longer than TLS allows (record_overflow)")]
    Overflow(usize),
    #[error("an unprotected record of type {0} after the handshake (unexpected_message)")]
    Unprotected(u8),
    #[error("a record of inner content type {0} (unexpected_message)")]
    UnexpectedType(u8),
    #[error("a record with no content type (unexpected_message)")]
    NoContentType,
    #[error("the record sequence number is exhausted")]
    SequenceExhausted,
    #[error("unusable traffic key")]
    Key,
}

/// The AEAD algorithms of TLS 1.3's cipher suites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// Which library's cipher code runs. aws-lc has AES-GCM for AVX-512 (about 15 GB/s a core
/// where it runs, against ring's 10); ring has it for 256-bit VAES without AVX-512 (about
/// 6 GB/s a core on such a processor, against aws-lc's 3, which falls back to AES-NI there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    AwsLc,
    Ring,
}

impl Implementation {
    /// The faster one on this processor, decided once from its features.
    pub fn for_this_processor() -> Implementation {
        static CHOICE: OnceLock<Implementation> = OnceLock::new();
        *CHOICE.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("vaes")
                    && std::arch::is_x86_feature_detected!("vpclmulqdq");
                if avx512 {
                    return Implementation::AwsLc;
                }
            }
            Implementation::Ring
        })
    }
}

/// A key of one implementation.
enum AeadKey {
    AwsLc(aws_lc_rs::aead::LessSafeKey),
    Ring(ring::aead::LessSafeKey),
}

impl AeadKey {
    fn new(implementation: Implementation, algorithm: Algorithm, key: &[u8]) -> Result<Self, RecordError> {
        Ok(match implementation {
            Implementation::AwsLc => {
                use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
                let algorithm = match algorithm {
                    Algorithm::Aes128Gcm => &AES_128_GCM,
                    Algorithm::Aes256Gcm => &AES_256_GCM,
                    Algorithm::Chacha20Poly1305 => &CHACHA20_POLY1305,
                };
                AeadKey::AwsLc(LessSafeKey::new(UnboundKey::new(algorithm, key).map_err(|_| RecordError::Key)?))
            }
            Implementation::Ring => {
                use ring::aead::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
                let algorithm = match algorithm {
                    Algorithm::Aes128Gcm => &AES_128_GCM,
                    Algorithm::Aes256Gcm => &AES_256_GCM,
                    Algorithm::Chacha20Poly1305 => &CHACHA20_POLY1305,
                };
                AeadKey::Ring(LessSafeKey::new(UnboundKey::new(algorithm, key).map_err(|_| RecordError::Key)?))
            }
        })
    }

    /// Encrypts `in_out` in place, returning the tag.
    fn seal_in_place(&self, nonce: [u8; NONCE_LEN], aad: [u8; HEADER_LEN], in_out: &mut [u8]) -> Option<[u8; TAG_LEN]> {
        match self {
            AeadKey::AwsLc(key) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce);
                let tag = key.seal_in_place_separate_tag(nonce, aws_lc_rs::aead::Aad::from(aad), in_out).ok()?;
                tag.as_ref().try_into().ok()
            }
            AeadKey::Ring(key) => {
                let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
                let tag = key.seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), in_out).ok()?;
                tag.as_ref().try_into().ok()
            }
        }
    }

    /// Decrypts the ciphertext and tag at `in_out[src..]` into the start of `in_out` (one pass,
    /// moving it towards the front), returning the plaintext's length.
    fn open_within(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: [u8; HEADER_LEN],
        in_out: &mut [u8],
        src: RangeFrom<usize>,
    ) -> Option<usize> {
        match self {
            AeadKey::AwsLc(key) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce);
                key.open_within(nonce, aws_lc_rs::aead::Aad::from(aad), in_out, src).ok().map(|p| p.len())
            }
            AeadKey::Ring(key) => {
                let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
                key.open_within(nonce, ring::aead::Aad::from(aad), in_out, src).ok().map(|p| p.len())
            }
        }
    }
}

/// One direction's traffic key and the sequence number of its next record.
struct TrafficKey {
    key: AeadKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl TrafficKey {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Algorithm::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Algorithm::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Algorithm::Chacha20Poly1305, key, iv),
            _ => return Err(RecordError::Key),
        };
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::Key)?;
        Self::from_parts(Implementation::for_this_processor(), seq, algorithm, key.as_ref(), iv)
    }

    fn from_parts(
        implementation: Implementation,
        seq: u64,
        algorithm: Algorithm,
        key: &[u8],
        iv: [u8; NONCE_LEN],
    ) -> Result<Self, RecordError> {
        Ok(TrafficKey { key: AeadKey::new(implementation, algorithm, key)?, iv, seq })
    }

    /// The nonce of the next record, and the sequence number moved past it: a number is never
    /// used twice with one key.
    fn next_nonce(&mut self) -> Result<[u8; NONCE_LEN], RecordError> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(RecordError::SequenceExhausted)?;
        let mut nonce = self.iv;
        for (byte, seq_byte) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *byte ^= seq_byte;
        }
        Ok(nonce)
    }
}

fn header(ciphertext_len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(ciphertext_len <= MAX_CIPHERTEXT);
    let [hi, lo] = (ciphertext_len as u16).to_be_bytes();
    [APPLICATION_DATA, LEGACY_VERSION[0], LEGACY_VERSION[1], hi, lo]
}

/// Seals outgoing records.
pub struct Sealer {
    key: TrafficKey,
}

impl Sealer {
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        Ok(Sealer { key: TrafficKey::new(seq, secrets)? })
    }

    /// Records sealed with this key so far (the sequence number of the next).
    pub fn records(&self) -> u64 {
        self.key.seq
    }

    /// Writes a record carrying `content` (at most [`MAX_CONTENT`] bytes) at the start of `out`
    /// (at least [`OVERHEAD`] bytes longer than `content`); returns the record's length.
    pub fn seal(&mut self, kind: Content, content: &[u8], out: &mut [u8]) -> Result<usize, RecordError> {
        debug_assert!(content.len() <= MAX_CONTENT);
        let len = content.len();
        let nonce = self.key.next_nonce()?;
        if let AeadKey::AwsLc(key) = &self.key.key {
            // Encrypted straight from `content` into `out`: no copy of the plaintext is made.
            let header = header(len + 1 + TAG_LEN);
            let record = &mut out[..len + OVERHEAD];
            record[..HEADER_LEN].copy_from_slice(&header);
            let (body, type_and_tag) = record[HEADER_LEN..].split_at_mut(len);
            key.seal_out_of_place_scatter(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(header),
                content,
                body,
                &[kind.byte()],
                type_and_tag,
            )
            .map_err(|_| RecordError::Key)?;
            return Ok(len + OVERHEAD);
        }
        out[HEADER_LEN..HEADER_LEN + len].copy_from_slice(content);
        seal_prepared(&self.key.key, nonce, kind, len, out)
    }

    /// Seals the `content_len` bytes of content the caller already put at `out[HEADER_LEN..]`
    /// (gathered from several pieces) into a record at the start of `out`; returns its length.
    pub fn seal_in_place(&mut self, kind: Content, content_len: usize, out: &mut [u8]) -> Result<usize, RecordError> {
        let nonce = self.key.next_nonce()?;
        seal_prepared(&self.key.key, nonce, kind, content_len, out)
    }
}

/// Seals a record whose content is in place after its header's room in `out`.
fn seal_prepared(
    key: &AeadKey,
    nonce: [u8; NONCE_LEN],
    kind: Content,
    content_len: usize,
    out: &mut [u8],
) -> Result<usize, RecordError> {
    debug_assert!(content_len <= MAX_CONTENT);
    let header = header(content_len + 1 + TAG_LEN);
    let record = &mut out[..content_len + OVERHEAD];
    record[..HEADER_LEN].copy_from_slice(&header);
    record[HEADER_LEN + content_len] = kind.byte();
    let (body, tag) = record[HEADER_LEN..].split_at_mut(content_len + 1);
    tag.copy_from_slice(&key.seal_in_place(nonce, header, body).ok_or(RecordError::Key)?);
    Ok(content_len + OVERHEAD)
}

/// Opens incoming records.
pub struct Opener {
    key: TrafficKey,
}

/// A record opened in place: its type, and where its content lies in the record.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub kind: Content,
    pub content: Range<usize>,
}

impl Opener {
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        Ok(Opener { key: TrafficKey::new(seq, secrets)? })
    }

    /// How many bytes the record at the start of `buffered` takes, header included, once its
    /// header has arrived; checked before any of it is buffered or decrypted.
    pub fn record_len(buffered: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(header) = buffered.get(..HEADER_LEN) else { return Ok(None) };
        // After the handshake every record is protected; the legacy version is ignored.
        if header[0] != APPLICATION_DATA {
            return Err(RecordError::Unprotected(header[0]));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len > MAX_CIPHERTEXT {
            return Err(RecordError::Overflow(len));
        }
        Ok(Some(HEADER_LEN + len))
    }

    /// Decrypts the whole record in `record` (as long as [`Opener::record_len`] said); its
    /// content is left at the start of `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        self.open_into(record, 0)
    }

    /// Decrypts the whole record at `buf[record_at..]` (as long as [`Opener::record_len`] said)
    /// into the start of `buf`: records read one after another into one buffer come out as
    /// their contents one after another, with no copy beyond the cipher's own pass.
    pub fn open_into(&mut self, buf: &mut [u8], record_at: usize) -> Result<Opened, RecordError> {
        debug_assert_eq!(Self::record_len(&buf[record_at..]), Ok(Some(buf.len() - record_at)));
        let header: [u8; HEADER_LEN] = buf
            .get(record_at..record_at + HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(RecordError::BadRecordMac)?;
        if buf.len() - record_at - HEADER_LEN < TAG_LEN {
            return Err(RecordError::BadRecordMac);
        }
        let nonce = self.key.next_nonce()?;
        let plain_len =
            self.key.key.open_within(nonce, header, buf, record_at + HEADER_LEN..).ok_or(RecordError::BadRecordMac)?;
        if plain_len > MAX_CONTENT + 1 {
            return Err(RecordError::Overflow(plain_len));
        }
        // The type is the last byte that is not padding.
        let type_at = buf[..plain_len].iter().rposition(|&b| b != 0).ok_or(RecordError::NoContentType)?;
        let kind = match buf[type_at] {
            21 => Content::Alert,
            22 => Content::Handshake,
            APPLICATION_DATA => Content::ApplicationData,
            other => return Err(RecordError::UnexpectedType(other)),
        };
        Ok(Opened { kind, content: 0..type_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOTH: [Implementation; 2] = [Implementation::AwsLc, Implementation::Ring];

    /// A key of one of the three suites, made of `fill` bytes.
    fn key(implementation: Implementation, suite: u8, fill: u8, seq: u64) -> TrafficKey {
        let (algorithm, len) = match suite % 3 {
            0 => (Algorithm::Aes128Gcm, 16),
            1 => (Algorithm::Aes256Gcm, 32),
            _ => (Algorithm::Chacha20Poly1305, 32),
        };
        TrafficKey::from_parts(implementation, seq, algorithm, &vec![fill; len], [fill ^ 0x5a; NONCE_LEN]).unwrap()
    }

    fn sealer(implementation: Implementation, suite: u8, fill: u8, seq: u64) -> Sealer {
        Sealer { key: key(implementation, suite, fill, seq) }
    }

    fn opener(implementation: Implementation, suite: u8, fill: u8, seq: u64) -> Opener {
        Opener { key: key(implementation, suite, fill, seq) }
    }

    fn seal(sealer: &mut Sealer, kind: Content, content: &[u8], wire: &mut Vec<u8>) {
        let at = wire.len();
        wire.resize(at + content.len() + OVERHEAD, 0);
        let n = sealer.seal(kind, content, &mut wire[at..]).unwrap();
        assert_eq!(n, content.len() + OVERHEAD);
    }

    fn open_all(opener: &mut Opener, mut wire: &mut [u8]) -> Result<Vec<(Content, Vec<u8>)>, RecordError> {
        let mut opened = Vec::new();
        while !wire.is_empty() {
            let len = Opener::record_len(wire)?.expect("a whole header");
            let (record, rest) = std::mem::take(&mut wire).split_at_mut(len);
            let Opened { kind, content } = opener.open(record)?;
            opened.push((kind, record[content].to_vec()));
            wire = rest;
        }
        Ok(opened)
    }

    #[test]
    fn a_record_is_laid_out_as_rfc_8446_says() {
        for implementation in BOTH {
            let mut sealer = sealer(implementation, 0, 1, 0);
            let mut wire = Vec::new();
            seal(&mut sealer, Content::ApplicationData, b"hello", &mut wire);
            assert_eq!(&wire[..5], &[23, 3, 3, 0, 5 + 1 + 16]);
            assert_eq!(wire.len(), 5 + 5 + 1 + 16);
            assert_eq!(sealer.records(), 1);
        }
    }

    #[test]
    fn a_changed_byte_a_replayed_record_or_a_wrong_key_is_refused() {
        for implementation in BOTH {
            let mut wire = Vec::new();
            seal(&mut sealer(implementation, 0, 1, 7), Content::ApplicationData, b"block data", &mut wire);
            for at in 0..wire.len() {
                if (3..5).contains(&at) {
                    continue; // the length: a different framing, caught by `record_len`
                }
                let mut changed = wire.clone();
                changed[at] ^= 1;
                let result =
                    Opener::record_len(&changed).and_then(|_| opener(implementation, 0, 1, 7).open(&mut changed));
                assert!(result.is_err(), "a change at byte {at} went unnoticed");
            }
            // The same record again is out of sequence.
            let mut same = opener(implementation, 0, 1, 7);
            same.open(&mut wire.clone()).unwrap();
            assert_eq!(same.open(&mut wire.clone()), Err(RecordError::BadRecordMac));
            assert_eq!(opener(implementation, 0, 2, 7).open(&mut wire), Err(RecordError::BadRecordMac));
        }
    }

    #[test]
    fn records_opened_into_one_buffer_leave_their_contents_one_after_another() {
        for implementation in BOTH {
            let mut sealer = sealer(implementation, 0, 4, 0);
            let mut wire = Vec::new();
            let pieces: [&[u8]; 3] = [b"first", b"", &[7u8; MAX_CONTENT]];
            for piece in pieces {
                seal(&mut sealer, Content::ApplicationData, piece, &mut wire);
            }
            let mut opener = opener(implementation, 0, 4, 0);
            let (mut out, mut at) = (0, 0);
            while at < wire.len() {
                let len = Opener::record_len(&wire[at..]).unwrap().unwrap();
                let opened = opener.open_into(&mut wire[out..at + len], at - out).unwrap();
                assert_eq!(opened.kind, Content::ApplicationData);
                out += opened.content.len();
                at += len;
            }
            assert_eq!(&wire[..out], &pieces.concat()[..]);
        }
    }

    #[test]
    fn oversized_and_unprotected_records_are_refused_from_their_header() {
        assert_eq!(Opener::record_len(&[23, 3, 3]), Ok(None));
        assert_eq!(Opener::record_len(&[23, 3, 3, 0x41, 0x01]), Err(RecordError::Overflow(0x4101)));
        assert_eq!(Opener::record_len(&[22, 3, 3, 0, 10]), Err(RecordError::Unprotected(22)));
        assert_eq!(Opener::record_len(&[23, 3, 3, 0x41, 0x00]), Ok(Some(MAX_RECORD)));
    }

    /// A record sealed by hand from `inner` (content, type, padding), with sequence number 0.
    fn sealed_by_hand(inner: &[u8]) -> Vec<u8> {
        let header = header(inner.len() + TAG_LEN);
        let mut record = header.to_vec();
        record.extend_from_slice(inner);
        let tag = key(Implementation::Ring, 1, 9, 0)
            .key
            .seal_in_place([9 ^ 0x5a; NONCE_LEN], header, &mut record[HEADER_LEN..])
            .unwrap();
        record.extend_from_slice(&tag);
        record
    }

    #[test]
    fn padding_is_stripped_and_all_padding_is_refused() {
        let mut padded = sealed_by_hand(&[b'a', b'b', 22, 0, 0]);
        let opened = open_all(&mut opener(Implementation::AwsLc, 1, 9, 0), &mut padded).unwrap();
        assert_eq!(opened, vec![(Content::Handshake, b"ab".to_vec())]);
        let mut zeros = sealed_by_hand(&[0, 0, 0]);
        assert_eq!(opener(Implementation::AwsLc, 1, 9, 0).open(&mut zeros), Err(RecordError::NoContentType));
        let mut unknown = sealed_by_hand(&[b'a', 99]);
        assert_eq!(opener(Implementation::Ring, 1, 9, 0).open(&mut unknown), Err(RecordError::UnexpectedType(99)));
    }

    proptest! {
        /// Whatever one implementation seals, by either path, the other opens to the same
        /// content in the same order.
        #[test]
        fn sealed_records_open_to_what_was_sealed_across_implementations(
            suite in 0u8..3,
            seq in 0u64..u64::MAX / 2,
            ring_seals in any::<bool>(),
            contents in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..MAX_CONTENT), any::<bool>()),
                1..6,
            ),
        ) {
            let (by, to) = if ring_seals { (BOTH[1], BOTH[0]) } else { (BOTH[0], BOTH[1]) };
            let mut sealer = sealer(by, suite, 3, seq);
            let mut wire = Vec::new();
            for (content, gathered) in &contents {
                if *gathered {
                    let at = wire.len();
                    wire.resize(at + content.len() + OVERHEAD, 0);
                    wire[at + HEADER_LEN..at + HEADER_LEN + content.len()].copy_from_slice(content);
                    sealer.seal_in_place(Content::ApplicationData, content.len(), &mut wire[at..]).unwrap();
                } else {
                    seal(&mut sealer, Content::ApplicationData, content, &mut wire);
                }
            }
            let opened = open_all(&mut opener(to, suite, 3, seq), &mut wire).unwrap();
            let expected: Vec<_> = contents.iter().map(|(c, _)| (Content::ApplicationData, c.clone())).collect();
            prop_assert_eq!(opened, expected);
        }
    }
}
