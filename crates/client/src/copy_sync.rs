//! Keeping a whole-file copy the kernel writes into in step with meta.
//!
//! While an inode has passthrough opens, the kernel wants every open of it to be one, writers
//! included, and their writes land in the copy without passing through this process. So the
//! copy is compared chunk by chunk with what it held when it last matched meta (`Base`), and
//! the chunks that differ are committed like any other write (`commit_changes`, at flush,
//! fsync and close). When the copy went stale (another client changed the file), it is
//! brought up to date in place (`refresh`), keeping the chunks written here since the base.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use cairn_proto as pb;

use crate::error::{ClientError, ClientResult};
use crate::files::{Files, OpenFile};

/// Bytes per chunk of the change check.
pub const CHUNK_BYTES: u64 = 1024 * 1024;

type ChunkHash = [u8; 32];

/// A hash no chunk has: a chunk marked with it counts as changed.
const NOT_COMMITTED: ChunkHash = [0xff; 32];

fn zeros_hash(len: u64) -> ChunkHash {
    *blake3::hash(&vec![0u8; len as usize]).as_bytes()
}

/// The copy's chunk hashes when it last matched meta.
#[derive(Clone, Debug, Default)]
pub struct Base {
    chunks: Vec<ChunkHash>,
    len: u64,
}

fn io_error(e: io::Error) -> ClientError {
    tracing::warn!(error = %e, "whole-file copy unreadable");
    ClientError::Errno(pb::errno::EIO)
}

/// Reads chunk `index` of `copy` (shorter at the end).
fn read_chunk(copy: &File, index: u64, len: u64) -> io::Result<Vec<u8>> {
    let start = index * CHUNK_BYTES;
    let mut data = vec![0u8; (len.saturating_sub(start)).min(CHUNK_BYTES) as usize];
    copy.read_exact_at(&mut data, start)?;
    Ok(data)
}

impl Base {
    /// Hashes `copy` as it is now.
    pub fn of(copy: &File) -> io::Result<Base> {
        let len = copy.metadata()?.len();
        let chunks = (0..len.div_ceil(CHUNK_BYTES))
            .map(|index| Ok(*blake3::hash(&read_chunk(copy, index, len)?).as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Base { chunks, len })
    }

    /// The base after the file was truncated (or grown) to `size` through this process, in meta
    /// and in the copy alike: a grown part reads zeros in both.
    pub fn truncated(&mut self, size: u64) {
        let old_len = self.len;
        self.chunks.truncate(size.div_ceil(CHUNK_BYTES) as usize);
        if size < old_len && !size.is_multiple_of(CHUNK_BYTES) {
            // Its last chunk was cut: sent again at the next commit rather than read back here,
            // where a write through the copy could slip in unseen.
            if let Some(last) = self.chunks.last_mut() {
                *last = NOT_COMMITTED;
            }
        }
        if size > old_len {
            if !old_len.is_multiple_of(CHUNK_BYTES)
                && let Some(last) = self.chunks.last_mut()
            {
                *last = NOT_COMMITTED;
            }
            for index in self.chunks.len() as u64..size.div_ceil(CHUNK_BYTES) {
                self.chunks.push(zeros_hash(chunk_len(size, index)));
            }
        }
        self.len = size;
    }

    /// The base after fallocate(`mode`, `offset`, `len`) through this process, in meta and in
    /// the copy alike.
    pub fn fallocated(&mut self, mode: i32, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            for index in offset / CHUNK_BYTES..end.min(self.len).div_ceil(CHUNK_BYTES) {
                let (start, stop) = (index * CHUNK_BYTES, index * CHUNK_BYTES + chunk_len(self.len, index));
                let Some(hash) = self.chunks.get_mut(index as usize) else { break };
                // Whole chunks become zeros; a chunk the range cuts is sent again.
                *hash = if offset <= start && stop <= end { zeros_hash(stop - start) } else { NOT_COMMITTED };
            }
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > self.len {
            self.truncated(end);
        }
    }

    /// Whether `data`, chunk `index` of a copy, is what the base holds there.
    fn unchanged(&self, index: u64, data: &[u8]) -> bool {
        let expected = chunk_len(self.len, index);
        if expected == 0 {
            return data.is_empty();
        }
        expected == data.len() as u64 && self.chunks.get(index as usize) == Some(blake3::hash(data).as_bytes())
    }
}

fn chunk_len(len: u64, index: u64) -> u64 {
    len.saturating_sub(index * CHUNK_BYTES).min(CHUNK_BYTES)
}

/// Commits what was written into `copy` since `base` (through `file`, as `writer`), and moves
/// `base` to the copy as committed.
pub async fn commit_changes(
    files: &Files,
    file: &OpenFile,
    copy: &File,
    base: &mut Base,
    writer: &pb::Caller,
) -> ClientResult<()> {
    let now = Base::of(copy).map_err(io_error)?;
    let mut changed = false;
    for (index, hash) in now.chunks.iter().enumerate() {
        let index = index as u64;
        if base.chunks.get(index as usize) == Some(hash) && chunk_len(base.len, index) == chunk_len(now.len, index) {
            continue;
        }
        let data = read_chunk(copy, index, now.len).map_err(io_error)?;
        files.write(file, index * CHUNK_BYTES, &data, writer.clone(), false).await?;
        changed = true;
    }
    if changed {
        files.flush(file).await?;
    }
    *base = now;
    Ok(())
}

/// Brings `copy` up to the file's current content (read through `file`). With `base` (writers
/// have the copy open), the chunks that differ from it were written here and are not
/// committed yet: they are kept, and stay marked changed in the new base. Returns the
/// file's size.
pub async fn refresh(
    files: &Files,
    file: &OpenFile,
    copy: &File,
    base: Option<&mut Base>,
    reader: &pb::Caller,
) -> ClientResult<u64> {
    let mut offset = 0u64;
    let mut kept = Vec::new();
    loop {
        let data = files.read(file, offset, CHUNK_BYTES as u32, reader).await?;
        let index = offset / CHUNK_BYTES;
        let written_here = base.as_deref().is_some_and(|base| {
            let len = copy.metadata().map_or(0, |m| m.len());
            read_chunk(copy, index, len).is_ok_and(|local| !base.unchanged(index, &local))
        });
        if written_here {
            kept.push(index);
        } else {
            copy.write_all_at(&data, offset).map_err(io_error)?;
        }
        offset += data.len() as u64;
        if (data.len() as u64) < CHUNK_BYTES {
            break;
        }
    }
    copy.set_len(offset).map_err(io_error)?;
    if let Some(base) = base {
        *base = Base::of(copy).map_err(io_error)?;
        for index in kept {
            if let Some(hash) = base.chunks.get_mut(index as usize) {
                *hash = NOT_COMMITTED;
            }
        }
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_sees_which_chunks_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        std::fs::write(&path, vec![1u8; (CHUNK_BYTES * 2 + 10) as usize]).unwrap();
        let copy = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let base = Base::of(&copy).unwrap();
        assert_eq!(base.chunks.len(), 3);
        let len = copy.metadata().unwrap().len();
        for index in 0..4 {
            assert!(base.unchanged(index, &read_chunk(&copy, index, len).unwrap()), "chunk {index}");
        }
        copy.write_all_at(b"x", CHUNK_BYTES + 5).unwrap();
        assert!(!base.unchanged(1, &read_chunk(&copy, 1, len).unwrap()));
        assert!(base.unchanged(0, &read_chunk(&copy, 0, len).unwrap()));
        copy.write_all_at(b"tail", len).unwrap();
        let len = copy.metadata().unwrap().len();
        assert!(!base.unchanged(2, &read_chunk(&copy, 2, len).unwrap()), "a chunk that grew changed");
    }

    #[test]
    fn truncation_and_fallocate_move_the_base_as_they_move_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        std::fs::write(&path, vec![1u8; (CHUNK_BYTES * 3) as usize]).unwrap();
        let copy = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut base = Base::of(&copy).unwrap();
        let check = |base: &Base, index: u64| {
            let len = copy.metadata().unwrap().len();
            base.unchanged(index, &read_chunk(&copy, index, len).unwrap())
        };
        // Grown: the new chunks are zeros in both.
        copy.set_len(CHUNK_BYTES * 5).unwrap();
        base.truncated(CHUNK_BYTES * 5);
        assert!((0..5).all(|i| check(&base, i)));
        // Cut inside a chunk: that chunk is sent again, the others are as they were.
        copy.set_len(CHUNK_BYTES * 2 + 10).unwrap();
        base.truncated(CHUNK_BYTES * 2 + 10);
        assert!(check(&base, 0) && check(&base, 1) && !check(&base, 2));
        // A hole over chunk 0 and part of chunk 1.
        let mut base = Base::of(&copy).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        crate::whole_copies::fallocate(&copy, punch, 0, CHUNK_BYTES + 5).unwrap();
        base.fallocated(punch, 0, CHUNK_BYTES + 5);
        assert!(check(&base, 0) && !check(&base, 1) && check(&base, 2));
    }
}
