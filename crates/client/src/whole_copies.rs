//! Whole-file copies on local disk, which the kernel reads from directly (FUSE passthrough),
//! so that a cached file re-reads at the speed of the local disk's page cache.
//!
//! A copy is started at an open of a file large enough to be worth it (the mount decides when)
//! and filled with what this mount reads of the file afterwards; every change made through
//! this mount (writes, truncation, fallocate) is applied to it as well. Once it holds every
//! byte of the file, the mount may serve opens for reading from it.
//!
//! What keeps a copy current is what keeps the kernel's cached pages current: it was filled
//! under one promise on the inode, with no break since. The mount discards a copy at every
//! break of its inode, at a loss of trust, and at every open that would drop the kernel's pages
//! (their promise lapsed in between). A read fetched before a change is never filled in after
//! it: each fill carries the stamp it was taken under (`FillStamp`).
//!
//! Copies are current only under promises of the session that filled them, so the directory is
//! emptied when the mount starts. Bounded: their total length stays under a limit, least
//! recently used copies going first; a copy some open reads from is never evicted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::copy_volume::CopyVolume;

/// A file smaller than this is not copied: the kernel's own page cache serves it as well.
pub const COPY_MIN_BYTES: u64 = 1024 * 1024;

/// What a fill checks before writing a read's data into a copy: the copy it was taken from,
/// and that no change was applied to it since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillStamp {
    serial: u64,
    changes: u64,
}

struct Copy {
    serial: u64,
    file: Arc<File>,
    /// None for a copy adopted back after it was discarded (its name is gone).
    path: Option<PathBuf>,
    /// Byte ranges (start → end) of the copy that hold the file's data: disjoint, merged.
    filled: BTreeMap<u64, u64>,
    /// The copy file's length (at most `size`).
    len: u64,
    /// The file's size as this mount knows it: what lies past it reads zeros.
    size: u64,
    /// Bytes counted against the limit: the file's size when the copy started, or more.
    reserved: u64,
    /// Changes applied since the copy started (see `FillStamp`).
    changes: u64,
    /// Opens the kernel serves from this copy: it is not evicted while any.
    pinned: u32,
}

impl Copy {
    /// Whether the copy holds every byte of a file of `size` bytes.
    fn holds_whole(&self, size: u64) -> bool {
        self.size == size
            && self.len == size
            && self.filled.first_key_value().is_some_and(|(&start, &end)| start == 0 && end >= size)
    }

    /// Records `[start, end)` as holding the file's data.
    fn note_filled(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Ranges touching or overlapping the new one merge into it.
        let touching: Vec<u64> = self.filled.range(..=end).filter(|(_, e)| **e >= start).map(|(s, _)| *s).collect();
        for s in touching {
            let e = self.filled.remove(&s).expect("range listed above");
            start = start.min(s);
            end = end.max(e);
        }
        self.filled.insert(start, end);
        debug_assert!(
            self.filled.iter().zip(self.filled.iter().skip(1)).all(|((_, e), (s, _))| e < s),
            "filled ranges stay disjoint and apart"
        );
    }

    /// Forgets what lies past `size` (a truncation), and records a part grown by it as zeros.
    fn note_truncated(&mut self, size: u64) {
        let grown_from = self.size;
        let past: Vec<u64> = self.filled.range(size..).map(|(s, _)| *s).collect();
        for s in past {
            self.filled.remove(&s);
        }
        if let Some(mut last) = self.filled.last_entry()
            && *last.get() > size
        {
            *last.get_mut() = size;
        }
        if size > grown_from {
            // A file grown by truncation reads zeros there, and so does the copy.
            self.note_filled(grown_from, size);
        }
        self.len = size;
        self.size = size;
        self.reserved = self.reserved.max(size);
    }
}

struct Index {
    copies: LruCache<u64, Copy>,
    next_serial: u64,
    /// The file system the copies are on, when they have one of their own (see `Revocation`).
    volume: Option<CopyVolume>,
    /// When a new volume was last tried after a revocation.
    volume_tried: Option<Instant>,
    /// A new volume is being made (outside the lock: it takes a `mkfs` and a mount).
    volume_coming: bool,
    /// The mount ended: no volume any more.
    closed: bool,
}

/// How reads of copies already open are taken back when trust in the promises is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Copies live on a volume of their own, which is shut down (`CopyVolume`): what the
    /// kernel reads from them fails with `EIO` from then on.
    ShutDown,
    /// Copies live in a plain directory and cannot be taken back (tests of the bookkeeping).
    None,
}

/// How long after a failed attempt a new copies volume is tried again.
const VOLUME_RETRY: Duration = Duration::from_secs(10);

pub struct WholeCopies {
    dir: PathBuf,
    limit_bytes: u64,
    revocation: Revocation,
    index: Mutex<Index>,
}

impl WholeCopies {
    /// Empties (or creates) `dir` for copies whose total length stays under `limit_bytes`; with
    /// `Revocation::ShutDown`, a volume of their own is mounted there.
    pub fn open(dir: &Path, limit_bytes: u64, revocation: Revocation) -> io::Result<WholeCopies> {
        let volume = match revocation {
            Revocation::ShutDown => Some(CopyVolume::create(dir, limit_bytes)?),
            Revocation::None => {
                match fs::remove_dir_all(dir) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                fs::create_dir_all(dir)?;
                None
            }
        };
        Ok(WholeCopies {
            dir: dir.to_path_buf(),
            limit_bytes,
            revocation,
            index: Mutex::new(Index {
                copies: LruCache::unbounded(),
                next_serial: 1,
                volume,
                volume_tried: None,
                volume_coming: false,
                closed: false,
            }),
        })
    }

    /// Trust in the promises was lost: drops every copy and, where copies have a volume of
    /// their own, shuts it down, so that opens already reading a copy fail from now on instead
    /// of serving what may be stale. A new volume is made when a copy is next wanted.
    pub fn revoke_all(&self) {
        let mut index = self.index();
        let Some(volume) = index.volume.as_mut() else {
            drop(index);
            return self.discard_all();
        };
        if let Err(e) = volume.shut_down() {
            // Unmounting still stops new opens; descriptors already open keep their copy.
            tracing::warn!(dir = %self.dir.display(), error = %e, "shutting the copies volume down failed");
        }
        volume.close();
        // The files are gone with their volume: nothing to remove.
        index.copies.clear();
    }

    /// Ends the copies at unmount: drops them and takes their volume away.
    pub fn close(&self) {
        let mut index = self.index();
        index.closed = true;
        index.copies.clear();
        if let Some(mut volume) = index.volume.take() {
            volume.close();
        }
    }

    /// Whether new copies can be made: with a volume of their own, it is open, or a new one
    /// could be mounted in place of a revoked one (tried at most once per `VOLUME_RETRY`).
    fn ready(&self) -> bool {
        if self.revocation == Revocation::None {
            return true;
        }
        let old = {
            let mut index = self.index();
            if index.volume.as_ref().is_some_and(CopyVolume::is_open) {
                return true;
            }
            if index.closed || index.volume_coming || index.volume_tried.is_some_and(|at| at.elapsed() < VOLUME_RETRY) {
                return false;
            }
            index.volume_tried = Some(Instant::now());
            index.volume_coming = true;
            index.volume.take()
        };
        // The old one first: its mount is detached before the new one takes its place.
        drop(old);
        let made = CopyVolume::create(&self.dir, self.limit_bytes);
        let mut index = self.index();
        index.volume_coming = false;
        match made {
            Ok(volume) if !index.closed => {
                index.volume = Some(volume);
                true
            }
            Ok(_unmounted_when_dropped) => false,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "no new copies volume");
                false
            }
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().expect("whole copies index poisoned")
    }

    /// Starts an empty copy of `ino`, a file of `size` bytes, in place of any copy it had.
    /// Returns false when it is too small or too large to copy, or the disk refused.
    pub fn start(&self, ino: u64, size: u64) -> bool {
        if size < COPY_MIN_BYTES || size > self.limit_bytes {
            self.discard(ino);
            return false;
        }
        let mut index = self.index();
        if let Some(old) = index.copies.pop(&ino) {
            remove(old.path.as_deref());
        }
        let volume_open = index.volume.as_ref().is_some_and(CopyVolume::is_open);
        if self.revocation == Revocation::ShutDown && !volume_open {
            drop(index);
            if !self.ready() {
                return false;
            }
            index = self.index();
        }
        // Room first: the least recently used copies no open reads from go.
        let mut used: u64 = index.copies.iter().map(|(_, c)| c.reserved).sum();
        while used + size > self.limit_bytes {
            let Some(victim) = index.copies.iter().rev().find(|(_, c)| c.pinned == 0).map(|(ino, _)| *ino) else {
                return false;
            };
            let gone = index.copies.pop(&victim).expect("victim listed above");
            used -= gone.reserved;
            remove(gone.path.as_deref());
        }
        let serial = index.next_serial;
        index.next_serial += 1;
        let path = self.dir.join(format!("{ino}.{serial}"));
        let file = match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot make a whole-file copy");
                return false;
            }
        };
        index.copies.put(
            ino,
            Copy {
                serial,
                file: Arc::new(file),
                path: Some(path),
                filled: BTreeMap::new(),
                len: 0,
                size,
                reserved: size,
                changes: 0,
                pinned: 0,
            },
        );
        true
    }

    /// Whether `ino` has a copy being filled or held.
    pub fn has(&self, ino: u64) -> bool {
        self.index().copies.contains(&ino)
    }

    /// The stamp a read of `ino` takes before it fetches, if `ino` has a copy.
    pub fn stamp(&self, ino: u64) -> Option<FillStamp> {
        self.index().copies.peek(&ino).map(|c| FillStamp { serial: c.serial, changes: c.changes })
    }

    /// Writes what a read fetched at `offset` into `ino`'s copy, unless the copy changed since
    /// `stamp` was taken. A short read (the end of the file) fills only what it holds.
    pub fn fill(&self, ino: u64, stamp: FillStamp, offset: u64, data: &[u8]) {
        let mut index = self.index();
        let Some(copy) = index.copies.peek_mut(&ino) else { return };
        if (FillStamp { serial: copy.serial, changes: copy.changes }) != stamp || data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        if end > self.limit_bytes || copy.file.write_all_at(data, offset).is_err() {
            self.drop_locked(&mut index, ino);
            return;
        }
        copy.len = copy.len.max(end);
        copy.reserved = copy.reserved.max(end);
        copy.note_filled(offset, end);
    }

    /// Applies a write made through this mount to `ino`'s copy.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) {
        let mut index = self.index();
        let Some(copy) = index.copies.peek_mut(&ino) else { return };
        copy.changes += 1;
        let end = offset + data.len() as u64;
        if end > self.limit_bytes || copy.file.write_all_at(data, offset).is_err() {
            self.drop_locked(&mut index, ino);
            return;
        }
        if offset > copy.size {
            // The gap a write past the end of the file leaves reads zeros, there and here.
            let size = copy.size;
            copy.note_filled(size, offset);
        }
        copy.size = copy.size.max(end);
        copy.len = copy.len.max(end);
        copy.reserved = copy.reserved.max(end);
        copy.note_filled(offset, end);
    }

    /// Applies a truncation made through this mount to `ino`'s copy.
    pub fn truncate(&self, ino: u64, size: u64) {
        let mut index = self.index();
        let Some(copy) = index.copies.peek_mut(&ino) else { return };
        copy.changes += 1;
        if size > self.limit_bytes || copy.file.set_len(size).is_err() {
            self.drop_locked(&mut index, ino);
            return;
        }
        copy.note_truncated(size);
    }

    /// Applies an fallocate made through this mount to `ino`'s copy (`mode` as fallocate(2)
    /// takes it), or drops the copy when the local file system cannot do the same.
    pub fn fallocate(&self, ino: u64, mode: i32, offset: u64, len: u64) {
        let mut index = self.index();
        let Some(copy) = index.copies.peek_mut(&ino) else { return };
        copy.changes += 1;
        let done = fallocate(&copy.file, mode, offset, len).is_ok();
        let grows = mode & libc::FALLOC_FL_KEEP_SIZE == 0;
        let end = offset.saturating_add(len);
        if !done || end > self.limit_bytes {
            self.drop_locked(&mut index, ino);
            return;
        }
        if grows && end > copy.size {
            let from = copy.size;
            copy.note_filled(from, end);
            copy.size = end;
            copy.len = copy.len.max(end);
            copy.reserved = copy.reserved.max(end);
        }
    }

    /// The copy of `ino` if it holds every byte of the file, which has `size` bytes: its
    /// serial and file. Marks it the most recently used.
    pub fn whole(&self, ino: u64, size: u64) -> Option<(u64, Arc<File>)> {
        let mut index = self.index();
        let copy = index.copies.get(&ino)?;
        copy.holds_whole(size).then(|| (copy.serial, copy.file.clone()))
    }

    /// Makes `file`, a copy brought up to date in place that passthrough opens read (it holds
    /// all `size` bytes of `ino`), the current copy of `ino` again, pinned once. Returns its
    /// new serial.
    pub fn adopt(&self, ino: u64, file: Arc<File>, size: u64) -> u64 {
        let mut index = self.index();
        let serial = index.next_serial;
        index.next_serial += 1;
        let path = match index.copies.pop(&ino) {
            Some(old) if Arc::ptr_eq(&old.file, &file) => old.path,
            Some(other) => {
                remove(other.path.as_deref());
                None
            }
            None => None,
        };
        let filled = BTreeMap::from([(0, size)]);
        let copy = Copy { serial, file, path, filled, len: size, size, reserved: size, changes: 0, pinned: 1 };
        index.copies.put(ino, copy);
        serial
    }

    /// Records that copy `serial` of `ino` holds the whole file, `size` bytes, as meta does
    /// (every change written into it was committed).
    pub fn refit(&self, ino: u64, serial: u64, size: u64) {
        let mut index = self.index();
        if let Some(copy) = index.copies.peek_mut(&ino).filter(|c| c.serial == serial) {
            copy.filled = BTreeMap::from([(0, size)]);
            copy.len = size;
            copy.size = size;
            copy.reserved = copy.reserved.max(size);
            copy.changes += 1;
        }
    }

    /// Whether copy `serial` of `ino` is still current (not discarded, not replaced).
    pub fn is_current(&self, ino: u64, serial: u64) -> bool {
        self.index().copies.peek(&ino).is_some_and(|c| c.serial == serial)
    }

    /// Counts one more (`true`) or one fewer open the kernel serves from copy `serial`.
    pub fn pin(&self, ino: u64, serial: u64, more: bool) {
        let mut index = self.index();
        if let Some(copy) = index.copies.peek_mut(&ino).filter(|c| c.serial == serial) {
            if more {
                copy.pinned += 1;
            } else {
                debug_assert!(copy.pinned > 0, "a copy is unpinned only as often as pinned");
                copy.pinned = copy.pinned.saturating_sub(1);
            }
        }
    }

    /// Drops `ino`'s copy (a break: it may no longer be current). Opens reading from it keep
    /// the file they have; the name goes now.
    pub fn discard(&self, ino: u64) {
        let mut index = self.index();
        self.drop_locked(&mut index, ino);
    }

    /// Drops every copy (trust in the promises was lost).
    pub fn discard_all(&self) {
        let mut index = self.index();
        while let Some((_, copy)) = index.copies.pop_lru() {
            remove(copy.path.as_deref());
        }
    }

    /// Copies held, and their total length.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.index();
        (index.copies.len(), index.copies.iter().map(|(_, c)| c.len).sum())
    }

    fn drop_locked(&self, index: &mut Index, ino: u64) {
        if let Some(copy) = index.copies.pop(&ino) {
            remove(copy.path.as_deref());
        }
    }
}

/// fallocate(2) on a copy, with `mode` as it takes it.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(at), Ok(length)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate on a descriptor the caller owns.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, at, length) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn remove(path: Option<&Path>) {
    let Some(path) = path else { return };
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "removing a whole-file copy failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn copies(dir: &Path) -> WholeCopies {
        WholeCopies::open(&dir.join("whole"), 8 * MIB, Revocation::None).unwrap()
    }

    #[test]
    fn a_copy_is_whole_once_reads_covered_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let copies = copies(dir.path());
        assert!(copies.start(7, 2 * MIB));
        let stamp = copies.stamp(7).unwrap();
        copies.fill(7, stamp, MIB, &vec![2u8; MIB as usize]);
        assert!(copies.whole(7, 2 * MIB).is_none(), "the first MiB is missing");
        copies.fill(7, stamp, 0, &vec![1u8; MIB as usize]);
        let (_, file) = copies.whole(7, 2 * MIB).unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, MIB - 1).unwrap();
        assert_eq!(byte, [1]);
        file.read_exact_at(&mut byte, MIB).unwrap();
        assert_eq!(byte, [2]);
        assert!(copies.whole(7, 3 * MIB).is_none(), "a file grown elsewhere is not whole here");
    }

    #[test]
    fn a_read_fetched_before_a_change_is_not_filled_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let copies = copies(dir.path());
        assert!(copies.start(7, MIB));
        let stamp = copies.stamp(7).unwrap();
        copies.write(7, 0, &vec![9u8; MIB as usize]);
        copies.fill(7, stamp, 0, &vec![1u8; MIB as usize]);
        let (_, file) = copies.whole(7, MIB).unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 10).unwrap();
        assert_eq!(byte, [9], "the write stays; the older read is not filled over it");
    }

    #[test]
    fn truncation_and_writes_past_the_end_keep_the_copy_whole() {
        let dir = tempfile::tempdir().unwrap();
        let copies = copies(dir.path());
        assert!(copies.start(7, MIB));
        copies.write(7, 0, &vec![1u8; MIB as usize]);
        copies.truncate(7, 3 * MIB);
        assert!(copies.whole(7, 3 * MIB).is_some(), "grown by truncation: zeros, held");
        copies.truncate(7, MIB / 2);
        assert!(copies.whole(7, MIB / 2).is_some());
        copies.write(7, 2 * MIB, b"tail");
        assert!(copies.whole(7, 2 * MIB + 4).is_some(), "the gap a write leaves reads zeros");
    }

    #[test]
    fn a_part_not_read_yet_is_not_taken_for_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let copies = copies(dir.path());
        assert!(copies.start(7, 4 * MIB));
        let stamp = copies.stamp(7).unwrap();
        copies.fill(7, stamp, 0, &vec![1u8; MIB as usize]);
        copies.write(7, 5 * MIB, b"past the end");
        copies.truncate(7, 6 * MIB);
        let stamp = copies.stamp(7).unwrap();
        copies.fill(7, stamp, 3 * MIB, &vec![3u8; MIB as usize]);
        assert!(copies.whole(7, 6 * MIB).is_none(), "1-3 MiB was never read");
        let stamp = copies.stamp(7).unwrap();
        copies.fill(7, stamp, MIB, &vec![2u8; 2 * MIB as usize]);
        assert!(copies.whole(7, 6 * MIB).is_some());
    }

    #[test]
    fn a_discarded_copy_is_gone_and_a_stamp_from_it_fills_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let copies = copies(dir.path());
        assert!(copies.start(7, MIB));
        let stamp = copies.stamp(7).unwrap();
        copies.discard(7);
        assert!(!copies.is_current(7, stamp.serial));
        assert!(copies.start(7, MIB));
        copies.fill(7, stamp, 0, &vec![1u8; MIB as usize]);
        assert!(copies.whole(7, MIB).is_none(), "a fill for the discarded copy lands nowhere");
        assert_eq!(fs::read_dir(dir.path().join("whole")).unwrap().count(), 1);
    }

    #[test]
    fn the_least_recently_used_unpinned_copies_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let copies = copies(dir.path());
        for ino in 1..=2 {
            assert!(copies.start(ino, 4 * MIB));
            let stamp = copies.stamp(ino).unwrap();
            copies.fill(ino, stamp, 0, &vec![1u8; 4 * MIB as usize]);
        }
        let (serial, _) = copies.whole(1, 4 * MIB).unwrap();
        copies.pin(1, serial, true);
        assert!(copies.start(3, 4 * MIB), "copy 2 makes room: copy 1 is pinned");
        assert!(copies.has(1) && !copies.has(2) && copies.has(3));
        assert!(!copies.start(4, 8 * MIB), "no room while copy 1 is pinned");
        assert!(!copies.start(5, 9 * MIB) && !copies.has(5), "larger than the limit");
        assert!(copies.index().copies.iter().map(|(_, c)| c.reserved).sum::<u64>() <= 8 * MIB);
    }

    #[test]
    fn opening_empties_what_an_earlier_mount_left() {
        let dir = tempfile::tempdir().unwrap();
        {
            let copies = copies(dir.path());
            assert!(copies.start(7, MIB));
        }
        let copies = copies(dir.path());
        assert!(!copies.has(7));
        assert_eq!(fs::read_dir(dir.path().join("whole")).unwrap().count(), 0);
    }
}
