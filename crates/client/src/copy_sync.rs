//! Keeping a whole-file copy the kernel writes into in step with meta.
//!
//! While an inode has passthrough opens, the kernel wants every open of it to be one, writers
//! included, and their writes land in the copy without passing through this process. So the
//! copy is compared page by page (4 KiB, what a shared mapping writes back too) with what it
//! held when it last matched meta (`Base`), and the pages that differ are committed like any
//! other write (`commit_changes`, at flush, fsync and close): another client's writes to other
//! pages of the file are not overwritten. When the copy went stale (another client changed the
//! file), it is brought up to date in place (`refresh`), keeping the pages written here since
//! the base.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use cairn_proto as pb;

use crate::error::{ClientError, ClientResult};
use crate::files::{Files, OpenFile};

/// Bytes per page of the change check.
pub const PAGE_BYTES: u64 = 4096;
/// Bytes read from the copy, or from meta, at once.
const READ_BYTES: u64 = 1024 * 1024;

type PageHash = [u8; 32];

/// A hash no page has: a page marked with it counts as changed.
const NOT_COMMITTED: PageHash = [0xff; 32];

/// The copy's pages when it last matched meta: a hash for each page holding anything but
/// zeros (a sparse file costs nothing for its holes).
#[derive(Clone, Debug, Default)]
pub struct Base {
    pages: HashMap<u64, PageHash>,
    len: u64,
}

fn io_error(e: io::Error) -> ClientError {
    tracing::warn!(error = %e, "whole-file copy unusable");
    ClientError::Errno(pb::errno::EIO)
}

fn page_len(len: u64, index: u64) -> u64 {
    len.saturating_sub(index * PAGE_BYTES).min(PAGE_BYTES)
}

/// The hash of one page's bytes, or None for zeros.
fn page_hash(data: &[u8]) -> Option<PageHash> {
    (!data.iter().all(|&b| b == 0)).then(|| *blake3::hash(data).as_bytes())
}

/// Where data starts at or after `offset` in `file` (its length if only a hole follows).
fn next_data(file: &File, offset: u64, len: u64) -> u64 {
    // SAFETY: lseek on a descriptor the caller owns.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if at >= 0 {
        at as u64
    } else if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
        len
    } else {
        // A file system that cannot tell: all of it is read.
        offset
    }
}

/// Where the hole after `offset` (in data) starts in `file`.
fn next_hole(file: &File, offset: u64, len: u64) -> u64 {
    // SAFETY: lseek on a descriptor the caller owns.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_HOLE) };
    if at < 0 { len } else { (at as u64).min(len) }
}

impl Base {
    /// Hashes `copy` as it is now, skipping its holes.
    pub fn of(copy: &File) -> io::Result<Base> {
        let len = copy.metadata()?.len();
        let mut pages = HashMap::new();
        let mut buffer = vec![0u8; READ_BYTES as usize];
        // Page-aligned throughout (but for the end): each pass reads one stretch of data.
        let mut offset = 0;
        while offset < len {
            let data_at = next_data(copy, offset, len);
            if data_at >= len {
                break;
            }
            let start = (data_at / PAGE_BYTES * PAGE_BYTES).max(offset);
            let end = (next_hole(copy, data_at, len).div_ceil(PAGE_BYTES) * PAGE_BYTES).min(len);
            debug_assert!(start < end, "each pass moves forward");
            let mut at = start;
            while at < end {
                let take = READ_BYTES.min(end - at) as usize;
                let data = &mut buffer[..take];
                copy.read_exact_at(data, at)?;
                for (i, page) in data.chunks(PAGE_BYTES as usize).enumerate() {
                    if let Some(hash) = page_hash(page) {
                        pages.insert(at / PAGE_BYTES + i as u64, hash);
                    }
                }
                at += take as u64;
            }
            offset = end;
        }
        Ok(Base { pages, len })
    }

    /// Whether `data`, page `index` of a copy, is what the base holds there.
    fn unchanged(&self, index: u64, data: &[u8]) -> bool {
        page_len(self.len, index) == data.len() as u64 && self.pages.get(&index).copied() == page_hash(data)
    }

    /// The pages where `self` and `other` differ, in order.
    fn differing(&self, other: &Base) -> Vec<u64> {
        let mut pages: Vec<u64> = self
            .pages
            .iter()
            .filter(|(index, hash)| other.pages.get(index) != Some(hash))
            .map(|(index, _)| *index)
            .chain(other.pages.keys().filter(|index| !self.pages.contains_key(index)).copied())
            .collect();
        if self.len != other.len {
            // A size change shows in the last page even when it holds zeros.
            let last = self.len.max(other.len).div_ceil(PAGE_BYTES).saturating_sub(1);
            pages.push(last);
            pages.push(self.len.min(other.len) / PAGE_BYTES);
        }
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// The base after the file was truncated (or grown) to `size` through this process, in meta
    /// and in the copy alike: a grown part reads zeros in both.
    pub fn truncated(&mut self, size: u64) {
        let old_len = self.len;
        let pages = size.div_ceil(PAGE_BYTES);
        self.pages.retain(|&index, _| index < pages);
        // A cut or padded last page is sent again at the next commit rather than read back
        // here, where a write through the copy could slip in unseen.
        if size < old_len && !size.is_multiple_of(PAGE_BYTES) {
            self.pages.insert(size / PAGE_BYTES, NOT_COMMITTED);
        }
        if size > old_len && !old_len.is_multiple_of(PAGE_BYTES) {
            self.pages.insert(old_len / PAGE_BYTES, NOT_COMMITTED);
        }
        self.len = size;
    }

    /// The base after fallocate(`mode`, `offset`, `len`) through this process, in meta and in
    /// the copy alike.
    pub fn fallocated(&mut self, mode: i32, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 && offset < self.len {
            let stop = end.min(self.len);
            let touched: Vec<u64> = self
                .pages
                .keys()
                .copied()
                .filter(|&index| index * PAGE_BYTES < stop && (index + 1) * PAGE_BYTES > offset)
                .collect();
            for index in touched {
                let (start, page_end) = (index * PAGE_BYTES, index * PAGE_BYTES + page_len(self.len, index));
                if offset <= start && page_end <= stop {
                    self.pages.remove(&index);
                } else {
                    // Part of the page is zeroed: sent again.
                    self.pages.insert(index, NOT_COMMITTED);
                }
            }
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > self.len {
            self.truncated(end);
        }
    }
}

/// Commits what was written into `copy` since `base` (through `file`, as `writer`), and moves
/// `base` to the copy as committed. The copy is hashed before the changed pages are read to be
/// sent, so a write meanwhile differs from the new base and goes with the next commit.
pub async fn commit_changes(
    files: &Files,
    file: &OpenFile,
    copy: &File,
    base: &mut Base,
    writer: &pb::Caller,
) -> ClientResult<()> {
    let (now, changes) = changed_pages(copy, base).map_err(io_error)?;
    let written = !changes.is_empty();
    for (start, data) in changes {
        files.write(file, start, &data, writer.clone(), false).await?;
    }
    if written {
        files.flush(file).await?;
    }
    *base = now;
    Ok(())
}

/// Bytes of a file at an offset.
pub type Run = (u64, Vec<u8>);

/// The runs of pages of `copy` that differ from `base` (at most `READ_BYTES` each), with their
/// bytes, and the base the copy has now.
pub fn changed_pages(copy: &File, base: &Base) -> io::Result<(Base, Vec<Run>)> {
    let now = Base::of(copy)?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for index in now.differing(base) {
        let start = index * PAGE_BYTES;
        let end = (start + PAGE_BYTES).min(now.len);
        match runs.last_mut() {
            Some(run) if run.1 == start && run.1 - run.0 < READ_BYTES => run.1 = end,
            _ if start < end => runs.push((start, end)),
            _ => {}
        }
    }
    let mut changes = Vec::with_capacity(runs.len());
    for (start, end) in runs {
        let mut data = vec![0u8; (end - start) as usize];
        copy.read_exact_at(&mut data, start)?;
        changes.push((start, data));
    }
    Ok((now, changes))
}

/// Brings `copy` up to the file's current content (read through `file` as `reader`). With
/// `base` (writers have the copy open), a page that differs from it was written here and is
/// not committed yet: it is kept, and stays a change in the base. Returns the file's size.
pub async fn refresh(
    files: &Files,
    file: &OpenFile,
    copy: &File,
    mut base: Option<&mut Base>,
    reader: &pb::Caller,
) -> ClientResult<u64> {
    let len_before = copy.metadata().map_err(io_error)?.len();
    let mut offset = 0u64;
    loop {
        let data = files.read(file, offset, READ_BYTES as u32, reader).await?;
        // As long as writers here have made it now: a page they appended is theirs.
        let len_now = copy.metadata().map_err(io_error)?.len();
        match base.as_deref_mut() {
            None => copy.write_all_at(&data, offset).map_err(io_error)?,
            Some(base) => {
                for (i, page) in data.chunks(PAGE_BYTES as usize).enumerate() {
                    let index = offset / PAGE_BYTES + i as u64;
                    let mut local = vec![0u8; page_len(len_now, index) as usize];
                    let written_here =
                        copy.read_exact_at(&mut local, index * PAGE_BYTES).is_err() || !base.unchanged(index, &local);
                    if written_here {
                        base.pages.insert(index, NOT_COMMITTED);
                        continue;
                    }
                    // A page that did not change elsewhere is not written: a write here into it
                    // meanwhile (writers do not wait for a refresh) stays.
                    if local.as_slice() != page {
                        copy.write_all_at(page, index * PAGE_BYTES).map_err(io_error)?;
                    }
                    // What meta holds there now, as the copy does.
                    match page_hash(page) {
                        Some(hash) => base.pages.insert(index, hash),
                        None => base.pages.remove(&index),
                    };
                }
            }
        }
        offset += data.len() as u64;
        if (data.len() as u64) < READ_BYTES {
            break;
        }
    }
    let len_now = copy.metadata().map_err(io_error)?.len();
    match base {
        Some(base) if len_now > len_before.max(offset) => {
            // Writers here appended meanwhile: what they wrote stays, to be committed. What
            // lay between the file's new end and theirs (the file was cut elsewhere) reads
            // zeros, as it will in meta once their pages extend the file again.
            if len_before > offset {
                let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                crate::whole_copies::fallocate(copy, punch, offset, len_before - offset).map_err(io_error)?;
            }
            base.pages.retain(|&index, _| index < offset.div_ceil(PAGE_BYTES));
            if !offset.is_multiple_of(PAGE_BYTES) {
                base.pages.insert(offset / PAGE_BYTES, NOT_COMMITTED);
            }
            for index in len_before.max(offset) / PAGE_BYTES..len_now.div_ceil(PAGE_BYTES) {
                base.pages.insert(index, NOT_COMMITTED);
            }
            base.len = offset;
        }
        base => {
            copy.set_len(offset).map_err(io_error)?;
            if let Some(base) = base {
                let pages = offset.div_ceil(PAGE_BYTES);
                base.pages.retain(|&index, _| index < pages);
                base.len = offset;
            }
        }
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_of(dir: &std::path::Path, data: &[u8]) -> File {
        let path = dir.join("copy");
        std::fs::write(&path, data).unwrap();
        std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap()
    }

    fn changed(base: &Base, copy: &File) -> Vec<u64> {
        Base::of(copy).unwrap().differing(base)
    }

    #[test]
    fn a_base_sees_which_pages_changed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let copy = copy_of(dir.path(), &vec![1u8; 3 * PAGE_BYTES as usize + 10]);
        let base = Base::of(&copy).unwrap();
        assert!(changed(&base, &copy).is_empty());
        copy.write_all_at(b"x", PAGE_BYTES + 5).unwrap();
        assert_eq!(changed(&base, &copy), vec![1]);
        copy.write_all_at(b"tail", 3 * PAGE_BYTES + 10).unwrap();
        assert_eq!(changed(&base, &copy), vec![1, 3], "a page that grew changed");
        // Zeros written past the end change the size, and so the last page.
        let base = Base::of(&copy).unwrap();
        copy.write_all_at(&[0u8; 10], 5 * PAGE_BYTES).unwrap();
        assert_eq!(changed(&base, &copy), vec![3, 5]);
    }

    #[test]
    fn holes_cost_nothing_and_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let copy = copy_of(dir.path(), b"start");
        copy.set_len(64 * 1024 * 1024 * 1024).unwrap();
        copy.write_all_at(b"middle", 32 * 1024 * 1024 * 1024).unwrap();
        let base = Base::of(&copy).unwrap();
        assert_eq!(base.pages.len(), 2);
        copy.write_all_at(b"m", 32 * 1024 * 1024 * 1024 + 1).unwrap();
        assert_eq!(changed(&base, &copy), vec![32 * 1024 * 1024 * 1024 / PAGE_BYTES]);
    }

    #[test]
    fn truncation_and_fallocate_move_the_base_as_they_move_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let copy = copy_of(dir.path(), &vec![1u8; 3 * PAGE_BYTES as usize]);
        let mut base = Base::of(&copy).unwrap();
        // Grown: the new pages are zeros in both.
        copy.set_len(PAGE_BYTES * 5).unwrap();
        base.truncated(PAGE_BYTES * 5);
        assert!(changed(&base, &copy).is_empty());
        // Cut inside a page: that page is sent again, the others are as they were.
        copy.set_len(PAGE_BYTES * 2 + 10).unwrap();
        base.truncated(PAGE_BYTES * 2 + 10);
        assert_eq!(changed(&base, &copy), vec![2]);
        // A hole over page 0 and part of page 1.
        let mut base = Base::of(&copy).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        crate::whole_copies::fallocate(&copy, punch, 0, PAGE_BYTES + 5).unwrap();
        base.fallocated(punch, 0, PAGE_BYTES + 5);
        assert_eq!(changed(&base, &copy), vec![1]);
    }
}
