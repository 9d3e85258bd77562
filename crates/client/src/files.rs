//! Open files: writes are buffered and cut into blocks that upload as they fill; `flush`
//! (close) and `fsync` commit the new extents to meta in one mutation (close-to-open). Reads
//! fetch the file's data map in windows and read blocks through the verified piece cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use cairn_proto::{self as pb, BLOCK_BYTES_MAX, mutate_request::Op};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::blocks::BlockStore;
use crate::data_maps::DataWindow;
use crate::error::{ClientError, ClientResult};
use crate::locks::Locks;
use crate::meta::MetaConnection;

/// Data map fetched per request for reads (a window of the file).
const EXTENT_WINDOW_BYTES: u64 = 256 * 1024 * 1024;
/// Blocks a sequential reader fetches ahead of the one it reads (4 MiB each at most): enough
/// that the data server reads the next while the client verifies and hands over this one.
const READ_AHEAD_BLOCKS: usize = 2;
/// A small file's data goes into the metadata instead of a block.
const INLINE_BYTES_MAX: usize = 64 * 1024;
const INLINE_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Sealed blocks kept before a commit is forced, bounding the size of one commit.
const PENDING_BLOCKS_MAX: usize = 1024;

/// A block upload in flight: the extent it becomes and the servers that hold it.
type Upload = JoinHandle<ClientResult<(pb::Extent, Vec<String>)>>;

struct Building {
    offset: u64,
    data: Vec<u8>,
}

impl Building {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

#[derive(Default)]
struct FileInner {
    building: Option<Building>,
    uploads: Vec<Upload>,
    /// Uploaded extents not yet committed, in write order.
    ready: Vec<pb::Extent>,
    /// Data servers holding blocks of `ready` that may not be durable yet.
    ready_servers: std::collections::BTreeSet<String>,
    /// Largest end offset written since the last commit.
    dirty_end: u64,
    dirty: bool,
    kill_suid: bool,
    writer: pb::Caller,
    window: Option<Arc<DataWindow>>,
    /// `window` came from the maps kept under the file's promise, not from meta for this open.
    window_kept: bool,
    last_read_end: u64,
    /// Size as of the last commit or attribute fetch.
    known_size: u64,
}

/// The client's state for one inode while any handle to it is open.
pub struct OpenFile {
    pub handle: pb::FileHandle,
    opens: AtomicU32,
    inner: Mutex<FileInner>,
}

pub struct Files {
    meta: Arc<MetaConnection>,
    blocks: Arc<BlockStore>,
    locks: Arc<Locks>,
    open: std::sync::Mutex<HashMap<u64, Arc<OpenFile>>>,
    uploads: Arc<Semaphore>,
}

impl Files {
    /// `uploads_in_flight` bounds blocks being uploaded at once (and so their memory).
    pub fn new(
        meta: Arc<MetaConnection>,
        blocks: Arc<BlockStore>,
        locks: Arc<Locks>,
        uploads_in_flight: usize,
    ) -> Self {
        Files {
            meta,
            blocks,
            locks,
            open: std::sync::Mutex::new(HashMap::new()),
            uploads: Arc::new(Semaphore::new(uploads_in_flight)),
        }
    }

    /// Registers one more open handle of `handle`'s inode.
    pub fn open(&self, handle: pb::FileHandle, size: u64) -> Arc<OpenFile> {
        let mut open = self.open.lock().expect("open files poisoned");
        let file = open
            .entry(handle.ino)
            .or_insert_with(|| {
                Arc::new(OpenFile {
                    handle,
                    opens: AtomicU32::new(0),
                    inner: Mutex::new(FileInner { known_size: size, ..Default::default() }),
                })
            })
            .clone();
        file.opens.fetch_add(1, Ordering::SeqCst);
        file
    }

    pub fn get(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.open.lock().expect("open files poisoned").get(&ino).cloned()
    }

    pub fn is_open(&self, ino: u64) -> bool {
        self.open.lock().map(|open| open.contains_key(&ino)).unwrap_or(true)
    }

    /// Drops one open handle; commits pending data when it was the last. Returns whether the
    /// inode has no open handle left on this client.
    pub async fn release(&self, ino: u64) -> ClientResult<bool> {
        let Some(file) = self.get(ino) else { return Ok(true) };
        let result = self.flush(&file).await;
        let last = file.opens.fetch_sub(1, Ordering::SeqCst) == 1;
        if last {
            let mut open = self.open.lock().expect("open files poisoned");
            if open.get(&ino).is_some_and(|f| f.opens.load(Ordering::SeqCst) == 0) {
                open.remove(&ino);
            }
        }
        result.map(|_| last)
    }

    /// How far this client wrote past the committed size, if it has uncommitted writes.
    ///
    /// Take this *before* fetching attributes from meta: if a commit lands in between, meta's
    /// answer already includes it; taken after, a commit that just cleared the dirty state would
    /// leave an older size from meta standing, and the kernel would cut the file short.
    pub async fn dirty_end(&self, ino: u64) -> Option<u64> {
        let file = self.get(ino)?;
        let inner = file.inner.lock().await;
        inner.dirty.then_some(inner.dirty_end)
    }

    /// [`Files::dirty_end`] of every open file, for listings.
    pub async fn dirty_ends(&self) -> HashMap<u64, u64> {
        let files: Vec<Arc<OpenFile>> = self.open.lock().expect("open files poisoned").values().cloned().collect();
        let mut ends = HashMap::new();
        for file in files {
            let inner = file.inner.lock().await;
            if inner.dirty {
                ends.insert(file.handle.ino, inner.dirty_end);
            }
        }
        ends
    }

    pub async fn is_dirty(&self, ino: u64) -> bool {
        match self.get(ino) {
            Some(file) => file.inner.lock().await.dirty,
            None => false,
        }
    }

    pub async fn write(
        &self,
        file: &OpenFile,
        offset: u64,
        data: &[u8],
        writer: pb::Caller,
        kill_suid: bool,
    ) -> ClientResult<()> {
        if offset.checked_add(data.len() as u64).is_none_or(|end| end > 16 * 1024 * 1024 * 1024 * 1024) {
            return Err(ClientError::Errno(pb::errno::EFBIG));
        }
        let mut inner = file.inner.lock().await;
        inner.window = None;
        inner.writer = writer;
        inner.kill_suid |= kill_suid;
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            // Extend the block being built when the write lands inside or right after it.
            if let Some(building) = inner.building.as_mut()
                && at >= building.offset
                && at <= building.end()
                && at < building.offset + BLOCK_BYTES_MAX as u64
            {
                let start = (at - building.offset) as usize;
                let take = rest.len().min(BLOCK_BYTES_MAX - start);
                debug_assert!(start <= building.data.len(), "a write extends a block only from inside or its end");
                // Overwrite what the write overlaps, then append the rest (no zero-filling).
                let overlap = (building.data.len() - start).min(take);
                building.data[start..start + overlap].copy_from_slice(&rest[..overlap]);
                building.data.extend_from_slice(&rest[overlap..take]);
                at += take as u64;
                rest = &rest[take..];
                if building.data.len() == BLOCK_BYTES_MAX {
                    self.seal(&mut inner).await;
                }
                continue;
            }
            if inner.building.is_some() {
                self.seal(&mut inner).await;
            }
            // A block that starts with a large write will most likely fill: reserve it whole so
            // it never reallocates; small writes start small.
            let capacity = if rest.len() >= INLINE_BYTES_MAX { BLOCK_BYTES_MAX } else { rest.len() };
            inner.building = Some(Building { offset: at, data: Vec::with_capacity(capacity) });
        }
        inner.dirty = true;
        inner.dirty_end = inner.dirty_end.max(offset + data.len() as u64);
        let too_many = inner.uploads.len() >= PENDING_BLOCKS_MAX;
        drop(inner);
        if too_many {
            self.flush(file).await?;
        }
        Ok(())
    }

    /// Starts uploading the block being built.
    async fn seal(&self, inner: &mut FileInner) {
        let Some(building) = inner.building.take() else { return };
        if building.data.is_empty() {
            return;
        }
        let permit: OwnedSemaphorePermit = self.uploads.clone().acquire_owned().await.expect("upload semaphore closed");
        let blocks = self.blocks.clone();
        let handle = tokio::spawn(async move {
            let _permit = permit;
            let len = building.data.len() as u64;
            let stored = blocks.put(Bytes::from(building.data), false).await?;
            let extent = pb::Extent {
                offset: building.offset,
                len,
                block: Some(stored.block),
                block_offset: 0,
                inline_data: Vec::new(),
            };
            Ok((extent, stored.addresses))
        });
        inner.uploads.push(handle);
    }

    /// Commits everything written so far (close-to-open: called on close and fsync).
    pub async fn flush(&self, file: &OpenFile) -> ClientResult<()> {
        let mut inner = file.inner.lock().await;
        if !inner.dirty {
            return Ok(());
        }
        // Extents whose data is on data servers wait in `ready` until a commit names them, so
        // a commit that fails (meta unreachable past the deadline) can be retried by the next
        // flush without losing them.
        let mut failure = None;
        for upload in std::mem::take(&mut inner.uploads) {
            match upload.await {
                Ok(Ok((extent, addresses))) => {
                    inner.ready.push(extent);
                    inner.ready_servers.extend(addresses);
                }
                Ok(Err(e)) => failure = Some(e),
                Err(e) => failure = Some(ClientError::Refused { what: "block upload", status: e.to_string() }),
            }
        }
        if let Some(e) = failure {
            // The data of the failed block is gone; report it rather than commit a partial file.
            inner.building = None;
            inner.ready.clear();
            inner.ready_servers.clear();
            inner.dirty = false;
            return Err(e);
        }
        if let Some(building) = inner.building.take()
            && !building.data.is_empty()
        {
            let small = building.data.len() <= INLINE_BYTES_MAX
                && inner.known_size.max(inner.dirty_end) <= INLINE_FILE_BYTES_MAX;
            let len = building.data.len() as u64;
            if small {
                inner.ready.push(pb::Extent {
                    offset: building.offset,
                    len,
                    block: None,
                    block_offset: 0,
                    inline_data: building.data,
                });
            } else {
                // Alone, the block syncs as it uploads; among others, the barrier covers it.
                let alone = inner.ready_servers.is_empty();
                let stored = self.blocks.put(Bytes::from(building.data), alone).await?;
                if !alone {
                    inner.ready_servers.extend(stored.addresses);
                }
                inner.ready.push(pb::Extent {
                    offset: building.offset,
                    len,
                    block: Some(stored.block),
                    block_offset: 0,
                    inline_data: Vec::new(),
                });
            }
        }
        // Every block the commit names is durable before meta can reference it.
        let servers: Vec<String> = inner.ready_servers.iter().cloned().collect();
        self.blocks.sync(&servers).await?;
        inner.ready_servers.clear();
        let extents = inner.ready.clone();
        let op = Op::Commit(pb::CommitOp {
            target: Some(file.handle),
            extents,
            min_size: inner.dirty_end,
            update_mtime: true,
            kill_suid: inner.kill_suid,
            lock_token: self.locks.write_token(file.handle.ino),
        });
        if let Op::Commit(commit) = &op
            && let Some(time) = self.meta.delegations.defer_commit(commit, &inner.writer)
        {
            // A file made here under a delegation: the commit goes with the next batch, and
            // the attributes this client shows are what meta will hold then.
            let end = commit.extents.iter().map(|e| e.offset + e.len).max().unwrap_or(0);
            let size = inner.known_size.max(commit.min_size).max(end);
            if let Some(mut attr) = self.meta.callbacks.attr(file.handle.ino) {
                attr.size = attr.size.max(size);
                attr.allocated = attr.allocated.max(attr.size);
                attr.mtime = Some(time);
                attr.ctime = Some(time);
                self.meta.callbacks.note_changed(&attr);
            } else {
                // Not trusted this moment: nothing cached of the file may outlive the change.
                self.meta.callbacks.forget_cached(file.handle.ino);
            }
            inner.ready.clear();
            inner.dirty = false;
            inner.dirty_end = 0;
            inner.kill_suid = false;
            inner.window = None;
            inner.known_size = size;
            return Ok(());
        }
        let reply = self.meta.mutate(&inner.writer, op).await?;
        inner.ready.clear();
        inner.dirty = false;
        inner.dirty_end = 0;
        inner.kill_suid = false;
        inner.window = None;
        if let Some(attr) = reply.attr {
            inner.known_size = attr.size;
        }
        Ok(())
    }

    /// Forgets the cached data map of an open file (a break: it changed elsewhere).
    pub async fn forget_window(&self, ino: u64) {
        if let Some(file) = self.get(ino) {
            file.inner.lock().await.window = None;
        }
    }

    /// Forgets cached data maps (the file changed elsewhere, e.g. a truncate).
    pub async fn invalidate(&self, ino: u64, size: u64) {
        if let Some(file) = self.get(ino) {
            let mut inner = file.inner.lock().await;
            inner.window = None;
            inner.known_size = size;
        }
    }

    /// Reads on behalf of `reader` (meta checks that it may read the file). A block map held
    /// so long that its block tokens expired is fetched again, once; so is one kept from an
    /// earlier open that a read through it failed with (its data servers may have moved).
    pub async fn read(&self, file: &OpenFile, offset: u64, size: u32, reader: &pb::Caller) -> ClientResult<Vec<u8>> {
        // Read your writes; a failure here is the writes', and is not retried below.
        self.flush(file).await?;
        match self.read_once(file, offset, size, reader).await {
            Err(ClientError::TokenRefused(why)) => {
                tracing::debug!(ino = file.handle.ino, %why, "block token refused; fetching the block map again");
                self.drop_window(file).await;
                self.read_once(file, offset, size, reader).await
            }
            Err(e) if !matches!(e, ClientError::Errno(_)) && file.inner.lock().await.window_kept => {
                tracing::debug!(ino = file.handle.ino, error = %e, "a read through a kept block map failed; fetching it again");
                self.drop_window(file).await;
                self.read_once(file, offset, size, reader).await
            }
            other => other,
        }
    }

    /// Drops the data map `file` reads through, and those kept of it.
    async fn drop_window(&self, file: &OpenFile) {
        let mut inner = file.inner.lock().await;
        inner.window = None;
        inner.window_kept = false;
        self.meta.callbacks.forget_data_windows(file.handle.ino);
    }

    /// The part of `file`'s data map that answers a read of `offset..offset + size`: the one
    /// this open holds, one kept under the file's promise, or a new one from meta.
    async fn window_for(
        &self,
        file: &OpenFile,
        inner: &mut FileInner,
        offset: u64,
        size: u32,
        reader: &pb::Caller,
    ) -> ClientResult<Arc<DataWindow>> {
        let ino = file.handle.ino;
        let wanted_end = offset.saturating_add(size as u64);
        if let Some(window) = inner.window.as_ref().filter(|w| w.covers(offset, wanted_end)) {
            return Ok(window.clone());
        }
        if let Some(window) = self.meta.callbacks.data_window(ino, offset, wanted_end) {
            inner.known_size = window.size;
            inner.window = Some(window.clone());
            inner.window_kept = true;
            return Ok(window);
        }
        let window_len = EXTENT_WINDOW_BYTES.max(size as u64);
        let (reply, cacheable) = self.meta.extents(reader, file.handle, offset, window_len).await?;
        let file_size = reply.attr.as_ref().map(|a| a.size).unwrap_or(0);
        // A capped reply covers only as far as its last extent.
        let end = match reply.extents.last() {
            Some(last) if reply.extents.len() >= pb::EXTENTS_PER_REPLY_MAX => last.offset + last.len,
            _ => offset.saturating_add(window_len),
        };
        let window = Arc::new(DataWindow {
            start: offset,
            end,
            size: file_size,
            extents: reply.extents,
            servers: Arc::new(reply.servers.into_iter().map(|s| (s.id, s.address)).collect()),
        });
        if let Some(epoch) = cacheable {
            self.meta.callbacks.keep_data_window(ino, window.clone(), epoch);
        }
        inner.known_size = file_size;
        inner.window = Some(window.clone());
        inner.window_kept = false;
        Ok(window)
    }

    async fn read_once(&self, file: &OpenFile, offset: u64, size: u32, reader: &pb::Caller) -> ClientResult<Vec<u8>> {
        let (window, sequential) = {
            let mut inner = file.inner.lock().await;
            let window = self.window_for(file, &mut inner, offset, size, reader).await?;
            let sequential = inner.last_read_end == offset;
            inner.last_read_end = offset + size as u64;
            (window, sequential)
        };
        if offset >= window.size {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(window.size);
        let mut out = vec![0u8; (end - offset) as usize];
        let first = window.extents.partition_point(|e| e.offset + e.len <= offset);
        if sequential {
            self.read_ahead(&window, first, end);
        }
        for extent in &window.extents[first..] {
            if extent.offset >= end {
                break;
            }
            let from = extent.offset.max(offset);
            let to = (extent.offset + extent.len).min(end);
            let dest = &mut out[(from - offset) as usize..(to - offset) as usize];
            let skip = (from - extent.offset) as usize;
            match &extent.block {
                None => {
                    let source =
                        extent.inline_data.get(skip..skip + dest.len()).ok_or(ClientError::Errno(pb::errno::EIO))?;
                    dest.copy_from_slice(source);
                }
                Some(block) => {
                    let block_offset = extent.block_offset + skip as u32;
                    self.blocks.read_into(block, &window.servers, block_offset, dest, sequential).await?;
                }
            }
        }
        Ok(out)
    }

    /// Starts fetching the blocks a sequential reader reaches next: those of the next
    /// [`READ_AHEAD_BLOCKS`] extents past `end`, from extent `first` on.
    fn read_ahead(&self, window: &Arc<DataWindow>, first: usize, end: u64) {
        let ahead = window.extents[first..].iter().filter(|e| e.offset >= end && e.block.is_some());
        for extent in ahead.take(READ_AHEAD_BLOCKS) {
            if let Some(block) = &extent.block {
                self.blocks.prefetch(block.clone(), extent.block_offset, window.servers.clone());
            }
        }
    }
}
