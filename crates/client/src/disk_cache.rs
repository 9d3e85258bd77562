//! A bounded on-disk cache of verified block pieces, kept across mounts.
//!
//! Blocks never change, so a cached piece is never stale: the cache needs no coherence, only
//! integrity and a size bound. Each piece is one file holding a BLAKE3 hash of (block id, piece
//! index, data) followed by the data; a file that fails that check (bit rot, a torn write, a
//! file moved to another name) is deleted and the piece fetched again. Files are written under
//! a temporary name and renamed, so a crash leaves whole files or none.
//!
//! One mount uses a cache directory at a time (an advisory lock on it); the least recently
//! used pieces go when the cache grows past its limit.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;

const HASH_BYTES: usize = 32;

/// The key a piece file's check binds: the block, the piece index and the data.
fn piece_check(block: u128, piece: u32, data: &[u8]) -> [u8; HASH_BYTES] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&block.to_le_bytes());
    hasher.update(&piece.to_le_bytes());
    hasher.update(data);
    *hasher.finalize().as_bytes()
}

struct Index {
    /// (block, piece) → bytes on disk, least recently used first.
    pieces: LruCache<(u128, u32), u64>,
    bytes: u64,
}

pub struct DiskCache {
    dir: PathBuf,
    limit_bytes: u64,
    index: Mutex<Index>,
    /// Held open for its advisory lock: one mount per cache directory.
    _lock: File,
}

impl DiskCache {
    /// Opens (or creates) the cache in `dir`, holding at most `limit_bytes`. Fails with
    /// `WouldBlock` when another mount uses the directory.
    pub fn open(dir: &Path, limit_bytes: u64) -> io::Result<DiskCache> {
        fs::create_dir_all(dir)?;
        let lock = File::create(dir.join("lock"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            limit_bytes,
            index: Mutex::new(Index { pieces: LruCache::unbounded(), bytes: 0 }),
            _lock: lock,
        };
        cache.load()?;
        Ok(cache)
    }

    /// Rebuilds the index from the files present, oldest first, and trims it to the limit.
    fn load(&self) -> io::Result<()> {
        let mut found = Vec::new();
        for shard in fs::read_dir(&self.dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(key) = name.to_str().and_then(parse_name) else {
                    // A temporary file left by a crash, or something that is not ours.
                    let _ = fs::remove_file(entry.path());
                    continue;
                };
                let metadata = entry.metadata()?;
                let used = metadata.accessed().or_else(|_| metadata.modified()).ok();
                found.push((used, key, metadata.len()));
            }
        }
        found.sort_by_key(|(used, _, _)| *used);
        let mut index = self.index.lock().expect("disk cache index poisoned");
        for (_, key, len) in found {
            index.pieces.put(key, len);
            index.bytes += len;
        }
        self.evict(&mut index);
        Ok(())
    }

    fn path(&self, block: u128, piece: u32) -> PathBuf {
        self.dir.join(format!("{:02x}", (block & 0xff) as u8)).join(format!("{block:032x}.{piece}"))
    }

    /// The piece, if cached and intact.
    pub fn get(&self, block: u128, piece: u32) -> Option<Bytes> {
        // Touches the piece in the index (it becomes the most recently used).
        self.index.lock().expect("disk cache index poisoned").pieces.get(&(block, piece))?;
        let path = self.path(block, piece);
        let mut bytes = Vec::new();
        let read = File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes));
        let intact = read.is_ok()
            && bytes.len() >= HASH_BYTES
            && piece_check(block, piece, &bytes[HASH_BYTES..]) == bytes[..HASH_BYTES];
        if !intact {
            if read.is_ok() {
                tracing::warn!(path = %path.display(), "cached piece failed its check; fetching it again");
            }
            self.forget(block, piece);
            return None;
        }
        Some(Bytes::from(bytes).slice(HASH_BYTES..))
    }

    /// Stores a verified piece, evicting the least recently used ones past the limit. A failure
    /// to write only means the piece is not cached.
    pub fn put(&self, block: u128, piece: u32, data: &[u8]) {
        let len = (HASH_BYTES + data.len()) as u64;
        if len > self.limit_bytes {
            return;
        }
        let path = self.path(block, piece);
        let write = || -> io::Result<()> {
            if let Some(shard) = path.parent() {
                fs::create_dir_all(shard)?;
            }
            let temporary = path.with_extension("tmp");
            let mut file = File::create(&temporary)?;
            file.write_all(&piece_check(block, piece, data))?;
            file.write_all(data)?;
            fs::rename(&temporary, &path)
        };
        if let Err(e) = write() {
            tracing::debug!(error = %e, "could not cache a piece on disk");
            return;
        }
        let mut index = self.index.lock().expect("disk cache index poisoned");
        if let Some(old) = index.pieces.put((block, piece), len) {
            index.bytes -= old;
        }
        index.bytes += len;
        self.evict(&mut index);
    }

    fn forget(&self, block: u128, piece: u32) {
        let mut index = self.index.lock().expect("disk cache index poisoned");
        if let Some(len) = index.pieces.pop(&(block, piece)) {
            index.bytes -= len;
        }
        let _ = fs::remove_file(self.path(block, piece));
    }

    fn evict(&self, index: &mut Index) {
        while index.bytes > self.limit_bytes {
            let Some(((block, piece), len)) = index.pieces.pop_lru() else { break };
            index.bytes -= len;
            let _ = fs::remove_file(self.path(block, piece));
        }
        debug_assert!(index.bytes <= self.limit_bytes || index.pieces.is_empty());
    }

    /// Bytes cached now.
    pub fn bytes(&self) -> u64 {
        self.index.lock().expect("disk cache index poisoned").bytes
    }
}

/// `<block hex>.<piece>` → (block, piece).
fn parse_name(name: &str) -> Option<(u128, u32)> {
    let (block, piece) = name.split_once('.')?;
    if block.len() != 32 {
        return None;
    }
    Some((u128::from_str_radix(block, 16).ok()?, piece.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn pieces_come_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            cache.put(7, 0, &piece(1, 65536));
            cache.put(7, 1, &piece(2, 100));
            assert_eq!(cache.get(7, 1).unwrap(), piece(2, 100));
        }
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.get(7, 0).unwrap(), piece(1, 65536));
        assert_eq!(cache.get(7, 1).unwrap(), piece(2, 100));
        assert!(cache.get(8, 0).is_none());
    }

    #[test]
    fn one_mount_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert!(DiskCache::open(dir.path(), 1 << 20).is_err());
    }

    #[test]
    fn the_limit_holds_and_the_least_recently_used_go() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 4 * (65536 + HASH_BYTES as u64);
        let cache = DiskCache::open(dir.path(), limit).unwrap();
        for p in 0..4 {
            cache.put(1, p, &piece(p as u8, 65536));
        }
        assert!(cache.get(1, 0).is_some(), "touch piece 0 so that piece 1 is the oldest");
        cache.put(1, 4, &piece(4, 65536));
        assert!(cache.bytes() <= limit);
        assert!(cache.get(1, 1).is_none());
        assert!(cache.get(1, 0).is_some() && cache.get(1, 4).is_some());
        drop(cache);
        // Reopened with a smaller limit, it trims itself.
        let cache = DiskCache::open(dir.path(), 2 * (65536 + HASH_BYTES as u64)).unwrap();
        assert!(cache.bytes() <= 2 * (65536 + HASH_BYTES as u64));
    }

    #[test]
    fn damaged_or_moved_files_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        cache.put(5, 0, &piece(1, 1000));
        cache.put(5, 1, &piece(2, 1000));
        let path = cache.path(5, 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HASH_BYTES + 10] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(cache.get(5, 0).is_none(), "a flipped bit is caught");
        assert!(!path.exists(), "and the file is dropped");
        // Piece 1's file under piece 0's name: the check binds the name too.
        cache.put(5, 0, &piece(1, 1000));
        fs::copy(cache.path(5, 1), cache.path(5, 0)).unwrap();
        assert!(cache.get(5, 0).is_none());
    }
}
