//! A log-structured block volume: blocks are appended to segment files, so a small block costs a
//! record, not a file, and one `fdatasync` covers every block written since the last one.
//!
//! Record layout (little endian), repeated until the end of a segment:
//!
//! ```text
//! magic u32 | kind u8 | flags u8 | 0u8 x2 | id u128 | len u32 | pieces u32 | digest [32] | check [8]
//! piece hashes [32] x pieces | data [len]            (kind = BLOCK)
//! ```
//!
//! `check` is a BLAKE3 of the header fields and piece hashes, so a torn tail is told from a
//! record. The data itself is covered by the piece hashes and verified on every read. A
//! tombstone (kind = DELETE) has `len = 0` and no pieces. The in-memory index is rebuilt by
//! scanning headers at start; the torn tail of the last segment is cut off.
//!
//! Blocks are written with `O_DIRECT` where the file system allows it: the data goes from one
//! reused staging buffer to the disk, not through the page cache (a copy into freshly
//! allocated pages that cost more than everything else the server does with a block). So a
//! block record starts on a 4 KiB boundary, its data starts on the next boundary after its
//! header (flag `DATA_ALIGNED`), and the next record on the boundary after its data (flag
//! `PADDED`); zeros fill the gaps. Records without the flags (older volumes) are packed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use cairn_proto::{BLOCK_BYTES_MAX, BlockId, PIECE_BYTES, digest_of_pieces, piece_hash};

const MAGIC: u32 = 0x4b4c_4243; // "CBLK"
const KIND_BLOCK: u8 = 1;
const KIND_DELETE: u8 = 2;
const HEADER_BYTES: usize = 4 + 4 + 16 + 4 + 4 + 32 + 8;
/// The record's data starts on the first `ALIGN` boundary after its header.
const FLAG_DATA_ALIGNED: u8 = 1;
/// The next record starts on the first `ALIGN` boundary after this one.
const FLAG_PADDED: u8 = 2;
/// Records are aligned to this (the page size, and a multiple of every disk's sector), which
/// `O_DIRECT` asks of file offsets, lengths and memory.
const ALIGN: u64 = 4096;
/// The largest block record: header and piece hashes, then data, each rounded up.
const RECORD_BYTES_MAX: usize =
    align_up((HEADER_BYTES + (BLOCK_BYTES_MAX / PIECE_BYTES + 1) * 32) as u64) as usize + BLOCK_BYTES_MAX;

const fn align_up(at: u64) -> u64 {
    at.div_ceil(ALIGN) * ALIGN
}
/// A segment is closed and a new one started once it passes this size.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("block {0} not found")]
    NotFound(BlockId),
    #[error("block {id} is corrupt: {what}")]
    Corrupt { id: BlockId, what: String },
    #[error("bad request: {0}")]
    Invalid(String),
    #[error("volume I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A place in the volume: (segment number, byte offset).
type Position = (u32, u64);
/// The BLAKE3 hashes of a block's pieces, shared between the index and readers.
pub type PieceHashes = Arc<Vec<[u8; 32]>>;

#[derive(Clone, Debug)]
struct Location {
    segment: u32,
    data_offset: u64,
    len: u32,
    digest: [u8; 32],
    pieces: Arc<Vec<[u8; 32]>>,
}

/// A verified block ready to be appended. Its data is kept in the pieces it arrived in (each
/// a whole number of hash pieces, but the last), so it is never copied into one buffer.
pub struct NewBlock {
    pub id: BlockId,
    pub digest: [u8; 32],
    pub pieces: Vec<[u8; 32]>,
    pub data: Vec<Bytes>,
    pub len: usize,
}

impl NewBlock {
    /// Checks `data` against the digest the writer claims, piece by piece.
    pub fn verified(id: BlockId, claimed: &[u8], data: Vec<u8>) -> Result<NewBlock, VolumeError> {
        Self::verified_parts(id, claimed, vec![Bytes::from(data)])
    }

    /// Like [`NewBlock::verified`] for data that arrived in parts; every part but the last
    /// must be a whole number of pieces.
    pub fn verified_parts(id: BlockId, claimed: &[u8], parts: Vec<Bytes>) -> Result<NewBlock, VolumeError> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        if len == 0 || len > BLOCK_BYTES_MAX {
            return Err(VolumeError::Invalid(format!("block length {len} out of range")));
        }
        let last = parts.len() - 1;
        if parts[..last].iter().any(|p| p.len() % PIECE_BYTES != 0) {
            return Err(VolumeError::Invalid("block parts must be whole pieces".into()));
        }
        let pieces: Vec<[u8; 32]> = parts.iter().flat_map(|part| part.chunks(PIECE_BYTES).map(piece_hash)).collect();
        let digest = digest_of_pieces(&pieces);
        if claimed != digest {
            return Err(VolumeError::Invalid(format!("block {id}: data does not match its digest")));
        }
        Ok(NewBlock { id, digest, pieces, data: parts, len })
    }
}

/// A segment file as readers see it: the file, and the same file opened for reading with
/// `O_DIRECT` where the file system takes it.
struct SegmentFile {
    file: Arc<File>,
    direct: Option<File>,
}

impl SegmentFile {
    fn new(dir: &Path, number: u32, file: Arc<File>) -> Arc<SegmentFile> {
        let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(segment_path(dir, number)).ok();
        Arc::new(SegmentFile { file, direct })
    }
}

/// Reads `len` bytes at `at` (both on `ALIGN` boundaries at the start) with `O_DIRECT`, into a
/// buffer that is not zeroed first: the disk fills it. The read is rounded up to a boundary,
/// which stays within the segment (records are padded) or stops short at its end.
fn read_direct(file: &File, at: u64, len: usize) -> std::io::Result<Bytes> {
    debug_assert!(at.is_multiple_of(ALIGN));
    let read_len = align_up(len as u64) as usize;
    let mut buffer = Vec::<u8>::with_capacity(read_len + ALIGN as usize);
    let skip = buffer.as_ptr().align_offset(ALIGN as usize);
    buffer.resize(skip, 0);
    let mut done = 0;
    while done < len {
        // SAFETY: the buffer's capacity holds `read_len` bytes past `skip`, and `pread` writes at
        // most `read_len - done` bytes from `skip + done` on.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buffer.as_mut_ptr().add(skip + done).cast(),
                read_len - done,
                (at + done as u64) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => {
                done += n as usize;
                // SAFETY: the kernel has just written those bytes.
                unsafe { buffer.set_len(skip + done) };
                // A short direct read ends only at the end of the file; reading on from an
                // unaligned offset would fail as if `O_DIRECT` were refused.
                if done < len && !done.is_multiple_of(ALIGN as usize) {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(Bytes::from(buffer).slice(skip..skip + len))
}

struct Segment {
    number: u32,
    file: Arc<File>,
    /// The same file opened with `O_DIRECT`, if the file system takes it.
    direct: Option<File>,
}

impl Segment {
    fn open(dir: &Path, number: u32, file: Arc<File>) -> Segment {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(segment_path(dir, number))
            .inspect_err(
                |e| tracing::info!(segment = number, error = %e, "no O_DIRECT here: blocks go through the page cache"),
            )
            .ok();
        Segment { number, file, direct }
    }

    /// Writes `record` (aligned in memory, offset and length) at `at`, directly to the disk
    /// when it can.
    fn write_aligned(&mut self, record: &[u8], at: u64) -> std::io::Result<()> {
        debug_assert!(at.is_multiple_of(ALIGN) && (record.len() as u64).is_multiple_of(ALIGN));
        debug_assert!(record.as_ptr().align_offset(ALIGN as usize) == 0);
        if let Some(direct) = &self.direct {
            match direct.write_all_at(record, at) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(segment = self.number, "O_DIRECT refused: blocks go through the page cache");
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(record, at)
    }
}

/// A buffer reused for every record, whose usable part starts on an `ALIGN` boundary.
#[derive(Default)]
struct Staging {
    bytes: Vec<u8>,
}

impl Staging {
    /// `len` bytes starting on a boundary (their content is whatever the last record left).
    fn aligned(&mut self, len: usize) -> &mut [u8] {
        if self.bytes.len() < len + ALIGN as usize {
            self.bytes = vec![0; len.max(RECORD_BYTES_MAX) + ALIGN as usize];
        }
        let skip = self.bytes.as_ptr().align_offset(ALIGN as usize);
        &mut self.bytes[skip..skip + len]
    }
}

struct Writer {
    active: Segment,
    end: u64,
    staging: Staging,
}

/// What a volume holds, for status and placement.
#[derive(Clone, Copy, Debug, Default)]
pub struct VolumeUsage {
    pub blocks: u64,
    pub live_bytes: u64,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// Pieces read at once when verifying a whole block (bounds the memory of a scrub).
const VERIFY_PIECES: usize = 16;

pub struct Volume {
    dir: PathBuf,
    index: RwLock<HashMap<BlockId, Location>>,
    segments: RwLock<HashMap<u32, Arc<SegmentFile>>>,
    /// Cleared when a file system turns `O_DIRECT` reads down after all: reads then go
    /// through the page cache.
    direct_reads: AtomicBool,
    writer: Mutex<Writer>,
    /// How far (segment, offset) the volume is known to be durable.
    synced: Mutex<Position>,
}

fn segment_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("segment-{number:08}.log"))
}

fn header_check(header_without_check: &[u8], pieces: &[[u8; 32]]) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(header_without_check);
    for piece in pieces {
        hasher.update(piece);
    }
    let mut check = [0u8; 8];
    check.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    check
}

fn encode_record(kind: u8, flags: u8, id: BlockId, len: u32, digest: &[u8; 32], pieces: &[[u8; 32]]) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_BYTES + pieces.len() * 32);
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&[kind, flags, 0, 0]);
    header.extend_from_slice(&id.0.to_le_bytes());
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    header.extend_from_slice(digest);
    let check = header_check(&header, pieces);
    header.extend_from_slice(&check);
    for piece in pieces {
        header.extend_from_slice(piece);
    }
    header
}

struct ScannedRecord {
    kind: u8,
    flags: u8,
    id: BlockId,
    len: u32,
    digest: [u8; 32],
    pieces: Vec<[u8; 32]>,
}

/// Reads one record header at the reader's position; `None` at a clean end or a torn tail.
fn scan_record(reader: &mut impl Read) -> std::io::Result<Option<ScannedRecord>> {
    let mut header = [0u8; HEADER_BYTES];
    if let Err(e) = reader.read_exact(&mut header) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(None) } else { Err(e) };
    }
    let u32_at = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    if u32_at(0) != MAGIC {
        return Ok(None);
    }
    let kind = header[4];
    let flags = header[5];
    let mut id_bytes = [0u8; 16];
    id_bytes.copy_from_slice(&header[8..24]);
    let id = BlockId(u128::from_le_bytes(id_bytes));
    let len = u32_at(24);
    let piece_count = u32_at(28) as usize;
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&header[32..64]);
    if piece_count > BLOCK_BYTES_MAX / PIECE_BYTES + 1 || len as usize > BLOCK_BYTES_MAX {
        return Ok(None);
    }
    let mut pieces = vec![[0u8; 32]; piece_count];
    for piece in pieces.iter_mut() {
        if let Err(e) = reader.read_exact(piece) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(None) } else { Err(e) };
        }
    }
    if header_check(&header[..64], &pieces) != header[64..72] {
        return Ok(None);
    }
    if !matches!(kind, KIND_BLOCK | KIND_DELETE) || flags & !(FLAG_DATA_ALIGNED | FLAG_PADDED) != 0 {
        return Ok(None);
    }
    Ok(Some(ScannedRecord { kind, flags, id, len, digest, pieces }))
}

impl Volume {
    /// Opens (or creates) the volume in `dir`, rebuilding the index from the segments.
    pub fn open(dir: &Path) -> Result<Volume, VolumeError> {
        std::fs::create_dir_all(dir)?;
        let mut numbers: Vec<u32> = std::fs::read_dir(dir)?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_prefix("segment-")?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        let mut index: HashMap<BlockId, Location> = HashMap::new();
        let mut segments = HashMap::new();
        let mut last_end = 0u64;
        for &number in &numbers {
            let path = segment_path(dir, number);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let file_len = file.metadata()?.len();
            let mut reader = std::io::BufReader::with_capacity(1 << 20, file.try_clone()?);
            let mut offset = 0u64;
            while let Some(record) = scan_record(&mut reader)? {
                let mut data_offset = offset + (HEADER_BYTES + record.pieces.len() * 32) as u64;
                if record.flags & FLAG_DATA_ALIGNED != 0 {
                    data_offset = align_up(data_offset);
                }
                let data_end = data_offset + record.len as u64;
                if data_end > file_len {
                    break;
                }
                let record_end = if record.flags & FLAG_PADDED != 0 { align_up(data_end) } else { data_end };
                match record.kind {
                    KIND_BLOCK => {
                        index.insert(
                            record.id,
                            Location {
                                segment: number,
                                data_offset,
                                len: record.len,
                                digest: record.digest,
                                pieces: Arc::new(record.pieces),
                            },
                        );
                    }
                    _ => {
                        index.remove(&record.id);
                    }
                }
                reader.seek(SeekFrom::Start(record_end))?;
                offset = record_end;
            }
            if offset < file_len {
                // Only the last segment can have a torn tail: earlier ones were synced whole
                // before the next was started.
                tracing::warn!(segment = number, offset, file_len, "cutting torn tail of segment");
                file.set_len(offset)?;
                file.sync_all()?;
            }
            last_end = offset;
            segments.insert(number, SegmentFile::new(dir, number, Arc::new(file)));
        }
        let active_number = numbers.last().copied().unwrap_or(1);
        let active_file = match segments.get(&active_number) {
            Some(segment) => segment.file.clone(),
            None => {
                let file = Arc::new(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(segment_path(dir, active_number))?,
                );
                File::open(dir)?.sync_all()?;
                segments.insert(active_number, SegmentFile::new(dir, active_number, file.clone()));
                last_end = 0;
                file
            }
        };
        Ok(Volume {
            dir: dir.to_path_buf(),
            index: RwLock::new(index),
            segments: RwLock::new(segments),
            direct_reads: AtomicBool::new(true),
            writer: Mutex::new(Writer {
                active: Segment::open(dir, active_number, active_file),
                end: last_end,
                staging: Staging::default(),
            }),
            synced: Mutex::new((active_number, last_end)),
        })
    }

    /// Appends blocks; with `sync`, returns once they are durable. Concurrent syncs share one
    /// `fdatasync` (group commit): whoever syncs covers everything written before it.
    pub fn append(&self, blocks: Vec<NewBlock>, sync: bool) -> Result<(), VolumeError> {
        let (located, written_to) = self.write_records(blocks)?;
        if sync {
            self.sync_through(written_to)?;
        }
        let mut index = self.index.write().map_err(|_| poisoned())?;
        for (id, location) in located {
            index.insert(id, location);
        }
        Ok(())
    }

    /// Makes every block appended so far durable.
    pub fn sync(&self) -> Result<(), VolumeError> {
        let position = {
            let writer = self.writer.lock().map_err(|_| poisoned())?;
            (writer.active.number, writer.end)
        };
        self.sync_through(position)
    }

    /// Makes every record up to `position` (segment, end offset) durable.
    fn sync_through(&self, position: Position) -> Result<(), VolumeError> {
        let mut synced = self.synced.lock().map_err(|_| poisoned())?;
        if *synced >= position {
            return Ok(());
        }
        let (file, target) = {
            let writer = self.writer.lock().map_err(|_| poisoned())?;
            (writer.active.file.clone(), (writer.active.number, writer.end))
        };
        // A record in an older segment was synced when that segment was closed.
        debug_assert!(target >= position);
        file.sync_data()?;
        *synced = target;
        Ok(())
    }

    fn write_records(&self, blocks: Vec<NewBlock>) -> Result<(Vec<(BlockId, Location)>, Position), VolumeError> {
        let mut writer = self.writer.lock().map_err(|_| poisoned())?;
        let mut located = Vec::with_capacity(blocks.len());
        for block in blocks {
            // A segment of an older volume ends unaligned: new records go to a new one.
            if writer.end >= SEGMENT_BYTES_MAX || !writer.end.is_multiple_of(ALIGN) {
                self.roll_segment(&mut writer)?;
            }
            debug_assert_eq!(digest_of_pieces(&block.pieces), block.digest);
            let flags = FLAG_DATA_ALIGNED | FLAG_PADDED;
            let header = encode_record(KIND_BLOCK, flags, block.id, block.len as u32, &block.digest, &block.pieces);
            let data_at = align_up(header.len() as u64) as usize;
            let record_len = align_up((data_at + block.len) as u64) as usize;
            let Writer { active, end, staging } = &mut *writer;
            let record = staging.aligned(record_len);
            record[..header.len()].copy_from_slice(&header);
            record[header.len()..data_at].fill(0);
            let mut at = data_at;
            for part in &block.data {
                record[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            record[at..].fill(0);
            let start = *end;
            active.write_aligned(record, start)?;
            *end = start + record_len as u64;
            located.push((
                block.id,
                Location {
                    segment: active.number,
                    data_offset: start + data_at as u64,
                    len: block.len as u32,
                    digest: block.digest,
                    pieces: Arc::new(block.pieces),
                },
            ));
        }
        Ok((located, (writer.active.number, writer.end)))
    }

    fn roll_segment(&self, writer: &mut Writer) -> Result<(), VolumeError> {
        writer.active.file.sync_all()?;
        let number = writer.active.number + 1;
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(segment_path(&self.dir, number))?,
        );
        File::open(&self.dir)?.sync_all()?;
        self.segments
            .write()
            .map_err(|_| poisoned())?
            .insert(number, SegmentFile::new(&self.dir, number, file.clone()));
        writer.active = Segment::open(&self.dir, number, file);
        writer.end = 0;
        Ok(())
    }

    /// Records deletions durably, drops the blocks from the index, then frees the disk space
    /// of their data (a hole punched where the data was; headers stay for the next scan).
    pub fn delete(&self, ids: &[BlockId]) -> Result<usize, VolumeError> {
        let mut writer = self.writer.lock().map_err(|_| poisoned())?;
        let doomed: Vec<BlockId> = {
            let index = self.index.read().map_err(|_| poisoned())?;
            ids.iter().copied().filter(|id| index.contains_key(id)).collect()
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        if writer.end >= SEGMENT_BYTES_MAX || !writer.end.is_multiple_of(ALIGN) {
            self.roll_segment(&mut writer)?;
        }
        // The tombstones go in one run; the last one pads it to the boundary, where the next
        // block record starts.
        let mut run = Vec::new();
        for (i, &id) in doomed.iter().enumerate() {
            let flags = if i + 1 == doomed.len() { FLAG_PADDED } else { 0 };
            run.extend_from_slice(&encode_record(KIND_DELETE, flags, id, 0, &[0u8; 32], &[]));
        }
        run.resize(align_up(run.len() as u64) as usize, 0);
        let start = writer.end;
        writer.active.file.write_all_at(&run, start)?;
        writer.end = start + run.len() as u64;
        writer.active.file.sync_data()?;
        let removed: Vec<Location> = {
            let mut index = self.index.write().map_err(|_| poisoned())?;
            doomed.iter().filter_map(|id| index.remove(id)).collect()
        };
        // Only with the deletions durable is the space given back: a crash before this leaves
        // the bytes (harmless), never a live block with a hole in it.
        for location in &removed {
            self.punch(location);
        }
        Ok(doomed.len())
    }

    /// Frees the disk space of a deleted block's data. Best effort: a file system that cannot
    /// punch holes keeps the bytes. A reader that found the block before it was deleted may
    /// then read zeros, which fail their hashes: `read_pieces` reports such a block as gone.
    fn punch(&self, location: &Location) {
        let Some(segment) = self.segments.read().ok().and_then(|s| s.get(&location.segment).cloned()) else {
            return;
        };
        // SAFETY: fallocate on a descriptor this volume holds open; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                segment.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                location.data_offset as libc::off_t,
                location.len as libc::off_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot free a deleted block's space");
        }
    }

    /// Piece hashes and block length of a stored block, checked against the digest the
    /// reader expects.
    pub fn piece_hashes(&self, id: BlockId, expected_digest: &[u8]) -> Result<(u32, PieceHashes), VolumeError> {
        let location = self.locate(id)?;
        if location.digest != expected_digest || digest_of_pieces(location.pieces.iter()) != location.digest {
            return Err(VolumeError::Corrupt { id, what: "digest does not match".into() });
        }
        Ok((location.len, location.pieces))
    }

    /// Tells the kernel that pieces `first..=last` of a block are about to be read, so the disk
    /// reads them all at once instead of piece by piece as the reads arrive. Only a hint: an
    /// unknown block or a failed advice is left to the reads to report.
    pub fn will_read(&self, id: BlockId, first: usize, last: usize) {
        let Ok(location) = self.locate(id) else { return };
        let start = first * PIECE_BYTES;
        let end = ((last + 1) * PIECE_BYTES).min(location.len as usize);
        if start >= end {
            return;
        }
        let segment = self.segments.read().ok().and_then(|segments| segments.get(&location.segment).cloned());
        if let Some(segment) = segment {
            if self.reads_directly(&segment, location.data_offset + start as u64) {
                // Direct reads skip the page cache this would fill.
                return;
            }
            let file = &segment.file;
            let offset = (location.data_offset + start as u64) as libc::off_t;
            // SAFETY: posix_fadvise on a descriptor this volume holds open; it only reads memory
            // it is given by value.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), offset, (end - start) as libc::off_t, libc::POSIX_FADV_WILLNEED)
            };
        }
    }

    /// Whether a read at `at` in `segment` goes past the page cache: straight from the disk
    /// into the buffer sent, with no copy by the kernel. Records of older volumes are packed,
    /// so their data is not aligned and is read through the page cache.
    fn reads_directly(&self, segment: &SegmentFile, at: u64) -> bool {
        segment.direct.is_some() && at.is_multiple_of(ALIGN) && self.direct_reads.load(Ordering::Relaxed)
    }

    /// Reads whole pieces `first..=last` of a block, verifying each against its hash.
    pub fn read_pieces(&self, id: BlockId, first: usize, last: usize) -> Result<Bytes, VolumeError> {
        let location = self.locate(id)?;
        let piece_count = location.pieces.len();
        if first > last || last >= piece_count {
            return Err(VolumeError::Invalid(format!("pieces {first}..={last} outside block {id}")));
        }
        let start = first * PIECE_BYTES;
        let end = ((last + 1) * PIECE_BYTES).min(location.len as usize);
        let segment = self.segments.read().map_err(|_| poisoned())?.get(&location.segment).cloned();
        let segment = segment.ok_or_else(|| VolumeError::Corrupt { id, what: "segment missing".into() })?;
        let at = location.data_offset + start as u64;
        let direct = match &segment.direct {
            Some(direct) if self.reads_directly(&segment, at) => match read_direct(direct, at, end - start) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(error = %e, "O_DIRECT reads refused: blocks are read through the page cache");
                    self.direct_reads.store(false, Ordering::Relaxed);
                    None
                }
                read => Some(read?),
            },
            _ => None,
        };
        let data = match direct {
            Some(data) => data,
            None => {
                let mut data = vec![0u8; end - start];
                segment.file.read_exact_at(&mut data, at)?;
                Bytes::from(data)
            }
        };
        for (i, piece) in data.chunks(PIECE_BYTES).enumerate() {
            if piece_hash(piece) != location.pieces[first + i] {
                if !self.contains(id) {
                    // Deleted while it was read, and its space freed.
                    return Err(VolumeError::NotFound(id));
                }
                tracing::error!(block = %id, piece = first + i, "piece hash mismatch on disk");
                return Err(VolumeError::Corrupt { id, what: format!("piece {} hash mismatch", first + i) });
            }
        }
        Ok(data)
    }

    fn locate(&self, id: BlockId) -> Result<Location, VolumeError> {
        self.index.read().map_err(|_| poisoned())?.get(&id).cloned().ok_or(VolumeError::NotFound(id))
    }

    /// Every block held, with its length, in id order.
    pub fn blocks(&self) -> Vec<(BlockId, u32)> {
        let mut blocks: Vec<(BlockId, u32)> = match self.index.read() {
            Ok(index) => index.iter().map(|(id, location)| (*id, location.len)).collect(),
            Err(_) => Vec::new(),
        };
        blocks.sort_by_key(|(id, _)| id.0);
        blocks
    }

    /// Reads a whole block back and checks every piece (and the piece list) against the
    /// hashes stored with it.
    pub fn verify(&self, id: BlockId) -> Result<(), VolumeError> {
        let location = self.locate(id)?;
        if digest_of_pieces(location.pieces.iter()) != location.digest {
            return Err(VolumeError::Corrupt { id, what: "piece list does not match the digest".into() });
        }
        let pieces = location.pieces.len();
        for first in (0..pieces).step_by(VERIFY_PIECES) {
            self.read_pieces(id, first, (first + VERIFY_PIECES).min(pieces) - 1)?;
        }
        Ok(())
    }

    pub fn contains(&self, id: BlockId) -> bool {
        self.index.read().map(|index| index.contains_key(&id)).unwrap_or(false)
    }

    pub fn usage(&self) -> VolumeUsage {
        let (blocks, live_bytes) = match self.index.read() {
            Ok(index) => (index.len() as u64, index.values().map(|l| l.len as u64).sum()),
            Err(_) => (0, 0),
        };
        let (capacity_bytes, free_bytes) = disk_space(&self.dir).unwrap_or((0, 0));
        VolumeUsage { blocks, live_bytes, capacity_bytes, free_bytes }
    }
}

fn poisoned() -> VolumeError {
    VolumeError::Io(std::io::Error::other("volume lock poisoned"))
}

/// Capacity and free bytes of the file system holding `dir`.
pub fn disk_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = stat.f_frsize as u64;
    Ok((stat.f_blocks as u64 * frsize, stat.f_bavail as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: u64, data: Vec<u8>) -> NewBlock {
        let (_, digest) = cairn_proto::block_digest(&data);
        NewBlock::verified(BlockId::new(7, id), &digest, data).expect("valid block")
    }

    #[test]
    fn blocks_survive_reopen_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        {
            let volume = Volume::open(dir.path()).unwrap();
            volume.append(vec![block(1, data.clone()), block(2, vec![9; 10])], true).unwrap();
            volume.delete(&[BlockId::new(7, 2)]).unwrap();
        }
        let volume = Volume::open(dir.path()).unwrap();
        let read = volume.read_pieces(BlockId::new(7, 1), 0, 3).unwrap();
        assert_eq!(read, data);
        assert!(!volume.contains(BlockId::new(7, 2)));
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_blocks_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let volume = Volume::open(dir.path()).unwrap();
            volume.append(vec![block(1, vec![1; 5000])], true).unwrap();
            volume.append(vec![block(2, vec![2; 5000])], true).unwrap();
        }
        // Cut inside the second block's data (the file ends with its padding).
        let second = Volume::open(dir.path()).unwrap().locate(BlockId::new(7, 2)).unwrap();
        let path = segment_path(dir.path(), 1);
        OpenOptions::new().write(true).open(&path).unwrap().set_len(second.data_offset + 4900).unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        assert!(volume.contains(BlockId::new(7, 1)));
        assert!(!volume.contains(BlockId::new(7, 2)));
        volume.append(vec![block(3, vec![3; 10])], false).unwrap();
        drop(volume);
        let volume = Volume::open(dir.path()).unwrap();
        assert!(volume.contains(BlockId::new(7, 3)));
    }

    #[test]
    fn flipped_byte_is_reported_as_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        volume.append(vec![block(1, vec![5; 100_000])], true).unwrap();
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let data_end = volume.locate(BlockId::new(7, 1)).unwrap().data_offset + 100_000;
        file.write_all_at(&[6], data_end - 10).unwrap();
        assert!(volume.read_pieces(BlockId::new(7, 1), 0, 0).is_ok());
        assert!(matches!(volume.read_pieces(BlockId::new(7, 1), 1, 1), Err(VolumeError::Corrupt { .. })));
    }

    #[test]
    fn records_are_aligned_so_blocks_can_bypass_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        let sizes = [1usize, 4096, 65_536 + 3, BLOCK_BYTES_MAX];
        for (i, &len) in sizes.iter().enumerate() {
            volume.append(vec![block(i as u64, vec![i as u8 + 1; len])], true).unwrap();
            volume.delete(&[BlockId::new(7, 100 + i as u64)]).unwrap();
        }
        volume.append(vec![block(50, vec![7; 10])], false).unwrap();
        volume.delete(&[BlockId::new(7, 50), BlockId::new(7, 0)]).unwrap();
        volume.append(vec![block(51, vec![8; 70_000])], true).unwrap();
        for id in [1, 2, 3, 51] {
            let location = volume.locate(BlockId::new(7, id)).unwrap();
            assert_eq!(location.data_offset % ALIGN, 0, "block {id} data unaligned");
        }
        let end = volume.writer.lock().unwrap().end;
        assert_eq!(end % ALIGN, 0);
        drop(volume);
        let volume = Volume::open(dir.path()).unwrap();
        assert!(!volume.contains(BlockId::new(7, 0)) && !volume.contains(BlockId::new(7, 50)));
        for (i, &len) in sizes.iter().enumerate().skip(1) {
            let pieces = len.div_ceil(PIECE_BYTES) - 1;
            let read = volume.read_pieces(BlockId::new(7, i as u64), 0, pieces).unwrap();
            assert_eq!(read, vec![i as u8 + 1; len], "block {i} after reopening");
        }
        assert_eq!(volume.read_pieces(BlockId::new(7, 51), 0, 1).unwrap(), vec![8; 70_000]);
        assert_eq!(volume.writer.lock().unwrap().end, end, "reopened at the same end");
    }

    /// How many pages of `file` in `offset..offset + len` are in the page cache.
    fn resident_pages(file: &File, offset: u64, len: usize) -> usize {
        // SAFETY: a read-only shared mapping of a file the caller holds open, unmapped below;
        // `mincore` writes one byte per page into a vector of that many.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            );
            assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            let mut pages = vec![0u8; len.div_ceil(ALIGN as usize)];
            let rc = libc::mincore(map, len, pages.as_mut_ptr());
            libc::munmap(map, len);
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            pages.iter().filter(|page| *page & 1 != 0).count()
        }
    }

    #[test]
    fn blocks_are_written_and_read_past_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..BLOCK_BYTES_MAX).map(|i| (i % 251) as u8).collect();
        let id = BlockId::new(7, 1);
        volume.append(vec![block(1, data.clone())], true).unwrap();
        let location = volume.locate(id).unwrap();
        let segment = volume.segments.read().unwrap().get(&location.segment).cloned().unwrap();
        if segment.direct.is_none() {
            eprintln!("this file system refuses O_DIRECT: blocks go through the page cache, nothing to check");
            return;
        }
        let pieces = BLOCK_BYTES_MAX / PIECE_BYTES;
        assert_eq!(volume.read_pieces(id, 0, pieces - 1).unwrap(), data);
        assert_eq!(volume.read_pieces(id, 3, 5).unwrap(), data[3 * PIECE_BYTES..6 * PIECE_BYTES]);
        assert_eq!(
            resident_pages(&segment.file, location.data_offset, location.len as usize),
            0,
            "the block's data went through the page cache"
        );
        assert!(volume.direct_reads.load(Ordering::Relaxed));
    }

    #[test]
    fn a_segment_cut_short_under_a_block_is_an_error_and_direct_reads_stay_on() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        volume.append(vec![block(1, vec![5; BLOCK_BYTES_MAX])], true).unwrap();
        volume.append(vec![block(2, vec![6; 10_000])], true).unwrap();
        let location = volume.locate(BlockId::new(7, 1)).unwrap();
        let segment = volume.segments.read().unwrap().get(&location.segment).cloned().unwrap();
        if segment.direct.is_none() {
            eprintln!("this file system refuses O_DIRECT: nothing to check");
            return;
        }
        // The disk lost the segment's end, in the middle of the first block's data.
        segment.file.set_len(location.data_offset + 5000).unwrap();
        assert!(matches!(volume.read_pieces(BlockId::new(7, 1), 0, 15), Err(VolumeError::Io(_))));
        assert!(volume.direct_reads.load(Ordering::Relaxed), "a short file is not a refusal of O_DIRECT");
    }

    #[test]
    fn a_volume_of_packed_records_is_read_and_written_on_in_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        // An older volume: records packed one after another, without the alignment flags.
        let old = block(1, vec![3; 5000]);
        let mut bytes = encode_record(KIND_BLOCK, 0, old.id, old.len as u32, &old.digest, &old.pieces);
        bytes.extend_from_slice(&old.data[0]);
        bytes.extend_from_slice(&encode_record(KIND_DELETE, 0, BlockId::new(7, 9), 0, &[0u8; 32], &[]));
        let second = block(2, vec![4; 300]);
        bytes.extend_from_slice(&encode_record(KIND_BLOCK, 0, second.id, 300, &second.digest, &second.pieces));
        bytes.extend_from_slice(&second.data[0]);
        std::fs::write(segment_path(dir.path(), 1), &bytes).unwrap();

        let volume = Volume::open(dir.path()).unwrap();
        assert_eq!(volume.read_pieces(BlockId::new(7, 1), 0, 0).unwrap(), vec![3; 5000]);
        assert_eq!(volume.read_pieces(BlockId::new(7, 2), 0, 0).unwrap(), vec![4; 300]);
        volume.append(vec![block(3, vec![5; 20_000])], true).unwrap();
        assert_eq!(volume.locate(BlockId::new(7, 3)).unwrap().segment, 2, "the packed segment is left as it is");
        drop(volume);
        let volume = Volume::open(dir.path()).unwrap();
        for (id, byte, len) in [(1, 3, 5000), (2, 4, 300), (3, 5, 20_000)] {
            assert_eq!(volume.read_pieces(BlockId::new(7, id), 0, 0).unwrap(), vec![byte; len]);
        }
        assert_eq!(std::fs::metadata(segment_path(dir.path(), 1)).unwrap().len(), bytes.len() as u64);
    }

    #[test]
    fn a_deleted_blocks_space_is_freed_and_the_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open(dir.path()).unwrap();
        let path = segment_path(dir.path(), 1);
        let allocated = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
        volume.append(vec![block(1, vec![1; 3_000_000]), block(2, vec![2; 100_000])], true).unwrap();
        let before = allocated();
        assert_eq!(volume.delete(&[BlockId::new(7, 1)]).unwrap(), 1);
        let freed = before.saturating_sub(allocated());
        assert!(freed >= 2_900_000, "only {freed} bytes freed of a deleted 3 MB block");
        assert!(matches!(volume.read_pieces(BlockId::new(7, 1), 0, 0), Err(VolumeError::NotFound(_))));
        assert_eq!(volume.read_pieces(BlockId::new(7, 2), 0, 1).unwrap(), vec![2; 100_000]);
        drop(volume);
        let volume = Volume::open(dir.path()).unwrap();
        assert!(!volume.contains(BlockId::new(7, 1)));
        volume.verify(BlockId::new(7, 2)).unwrap();
    }

    #[test]
    fn wrong_digest_is_refused() {
        let err = NewBlock::verified(BlockId::new(1, 1), &[0u8; 32], vec![1, 2, 3]);
        assert!(matches!(err, Err(VolumeError::Invalid(_))));
    }
}
