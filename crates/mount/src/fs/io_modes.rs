//! How the kernel does I/O through each open file: through its page cache (the default),
//! straight to this process (strict mode), or on a whole-file copy on local disk with no
//! call into this process (FUSE passthrough; `--passthrough`).
//!
//! The kernel refuses to mix page-cache opens with passthrough opens of one inode (such an
//! open fails with EIO), and every open of an inode that has a passthrough open must be one
//! too, on the same backing file, writers included. So:
//! - with no open of the inode, a reader gets passthrough if the copy holds the file whole
//!   and its promise held since the copy started; anything else gets the page cache;
//! - with page-cache opens present, a new open gets the page cache too;
//! - with passthrough opens present, a new open joins them. If the copy went stale meanwhile
//!   (a break), it is brought up to date in place first; writers' changes land in the copy
//!   and are committed from it at flush, fsync and close (`cairn_client::copy_sync`).
//!
//! A copy starts at a read-only open of a large file under a promise; that open drops the
//! kernel's pages, so that the reads which fill the copy come through this process.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cairn_client::copy_sync::{self, Base, Run};
use cairn_client::whole_copies::{COPY_MIN_BYTES, WholeCopies};
use cairn_client::{ClientError, ClientResult, OpenFile};
use cairn_proto as pb;
use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

use super::{CairnFs, Handle, errno_of};

/// How the kernel does I/O through one open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IoMode {
    /// Through the kernel's page cache, filled by reads from this process.
    Cached,
    /// Every read and write comes to this process (FOPEN_DIRECT_IO).
    Direct,
    /// The kernel reads (and, for a writer, writes) the inode's whole-file copy itself.
    Passthrough { writer: bool },
}

/// The passthrough opens of one inode, all on one copy.
struct Shared {
    /// The copy's serial in `WholeCopies` when it was last current there.
    serial: u64,
    file: Arc<File>,
    /// The copy as registered with the kernel: every passthrough open of the inode names it.
    backing: BackingId,
    readers: u32,
    writers: u32,
    /// Who opened the copy for writing last: a commit at close is made as them.
    writer: pb::Caller,
    /// Breaks of the inode since these opens began: a refresh that one overtook is not taken
    /// for current.
    breaks: u64,
    /// What the copy held when it last matched meta, while writers have it open. Its lock
    /// orders commits from the copy, refreshes of it and changes applied to it.
    base: Arc<tokio::sync::Mutex<Option<Base>>>,
    /// The copy was taken away (the mount stopped trusting its promises): reads of it fail,
    /// and new opens of the inode fail until these close.
    revoked: bool,
    /// What writers had written into the copy and not committed when it was taken away, read
    /// out of it just before: committed from here at their next flush.
    saved: Arc<Mutex<Vec<Run>>>,
    /// Some uncommitted writes could not be saved: the writers' next flushes fail.
    lost: bool,
}

/// Uncommitted writes read out of copies about to be taken away, at most.
const SAVED_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Default)]
struct InodeOpens {
    cached: u32,
    direct: u32,
    shared: Option<Shared>,
}

/// The kernel's open files per inode, by mode.
#[derive(Default)]
pub(super) struct KernelIo {
    opens: Mutex<HashMap<u64, InodeOpens>>,
    /// Set at init when the kernel took FUSE_PASSTHROUGH; cleared if it refuses a backing file.
    pub passthrough: AtomicBool,
    /// Opens served from a whole-file copy, for metrics.
    pub passthrough_opens: AtomicU64,
}

/// A passthrough copy as an open or a change sees it.
struct SharedView {
    serial: u64,
    breaks: u64,
    writer: pb::Caller,
    file: Arc<File>,
    base: Arc<tokio::sync::Mutex<Option<Base>>>,
    revoked: bool,
    saved: Arc<Mutex<Vec<Run>>>,
    lost: bool,
}

impl KernelIo {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, InodeOpens>> {
        self.opens.lock().expect("kernel io table poisoned")
    }

    fn shared(&self, ino: u64) -> Option<SharedView> {
        let table = self.table();
        let shared = table.get(&ino)?.shared.as_ref()?;
        Some(SharedView {
            serial: shared.serial,
            breaks: shared.breaks,
            writer: shared.writer.clone(),
            file: shared.file.clone(),
            base: shared.base.clone(),
            revoked: shared.revoked,
            saved: shared.saved.clone(),
            lost: shared.lost,
        })
    }

    /// The copies are about to be taken away (trust in the promises was lost): what writers
    /// wrote into a copy and did not commit yet is read out of it first, to be committed from
    /// memory at their next flush, and every inode's passthrough opens are marked revoked.
    pub fn revoke(&self) {
        let mut table = self.table();
        let mut saved_bytes = 0;
        for (ino, opens) in table.iter_mut() {
            let Some(shared) = opens.shared.as_mut() else { continue };
            shared.revoked = true;
            if shared.writers == 0 {
                continue;
            }
            // A commit under way holds the lock, and has what it read from the copy.
            let Ok(mut base) = shared.base.try_lock() else { continue };
            let Some(base) = base.as_mut() else { continue };
            match copy_sync::changed_pages(&shared.file, base) {
                Ok((now, changes)) => {
                    let bytes: usize = changes.iter().map(|(_, data)| data.len()).sum();
                    if saved_bytes + bytes > SAVED_BYTES_MAX {
                        tracing::warn!(ino, bytes, "too many uncommitted writes in a copy to keep in memory");
                        shared.lost = true;
                        continue;
                    }
                    saved_bytes += bytes;
                    shared.saved.lock().unwrap_or_else(|p| p.into_inner()).extend(changes);
                    *base = now;
                }
                Err(e) => {
                    tracing::warn!(ino, error = %e, "reading uncommitted writes out of a copy failed");
                    shared.lost = true;
                }
            }
        }
    }

    /// Notes a break of `inodes` (every inode for `None`) for the passthrough opens of each.
    pub fn note_breaks(&self, inodes: Option<&[u64]>) {
        let mut table = self.table();
        for (ino, opens) in table.iter_mut() {
            if let Some(shared) = opens.shared.as_mut()
                && inodes.is_none_or(|inodes| inodes.contains(ino))
            {
                shared.breaks += 1;
            }
        }
    }

    /// Bytes the passthrough writers of `ino` have in its copy, if any writer has it open: the
    /// size the kernel should see before they commit.
    pub fn written_len(&self, ino: u64, copies: Option<&WholeCopies>) -> Option<u64> {
        let table = self.table();
        let shared = table.get(&ino)?.shared.as_ref().filter(|s| s.writers > 0)?;
        // A stale copy's length is another client's old size, not what was written here.
        copies.filter(|c| c.is_current(ino, shared.serial))?;
        shared.file.metadata().ok().map(|m| m.len())
    }

    /// The mode of a file the kernel creates and opens at once, or `None` when the inode has
    /// passthrough opens (then it must be opened as one of them).
    pub fn created(&self, ino: u64, strict: bool) -> Option<IoMode> {
        let mut table = self.table();
        let opens = table.entry(ino).or_default();
        if opens.shared.is_some() {
            return None;
        }
        if strict {
            opens.direct += 1;
            Some(IoMode::Direct)
        } else {
            opens.cached += 1;
            Some(IoMode::Cached)
        }
    }

    /// The kernel released an open of `ino` made in `mode`. Returns the copy to unpin when it
    /// was the last passthrough open.
    fn released(&self, ino: u64, mode: IoMode) -> Option<u64> {
        let mut table = self.table();
        let Some(opens) = table.get_mut(&ino) else {
            debug_assert!(false, "a release matches an open");
            return None;
        };
        let mut unpin = None;
        match mode {
            IoMode::Cached => opens.cached = opens.cached.saturating_sub(1),
            IoMode::Direct => opens.direct = opens.direct.saturating_sub(1),
            IoMode::Passthrough { writer } => {
                let shared = opens.shared.as_mut().expect("a passthrough release matches its open");
                if writer {
                    shared.writers -= 1;
                } else {
                    shared.readers -= 1;
                }
                if shared.readers + shared.writers == 0 {
                    // Dropping the backing id unregisters it; the kernel let go of the file
                    // when it released its last passthrough open.
                    unpin = opens.shared.take().map(|s| s.serial);
                }
            }
        }
        if opens.cached == 0 && opens.direct == 0 && opens.shared.is_none() {
            table.remove(&ino);
        }
        unpin
    }
}

/// What an open asks for.
pub(super) struct OpenRequest {
    pub handle: pb::FileHandle,
    pub read_only: bool,
    /// Opened for writing only: such an open never reads the copy.
    pub write_only: bool,
    pub who: pb::Caller,
}

/// How one attempt at an open ended.
enum Attempt {
    Done,
    /// Passthrough opens appeared or went meanwhile: try again.
    Again,
}

impl CairnFs {
    /// Opens a file for the kernel, in the mode the opens already there allow.
    pub(super) fn open_for_kernel(&self, request: OpenRequest, reply: ReplyOpen) {
        let ino = request.handle.ino;
        let strict = self.options.strict;
        let callbacks = &self.client.meta.callbacks;
        // Pages the kernel cached stay only while one promise covered them all along.
        let mut keep_pages = !strict && callbacks.kernel_pages_current(ino);
        if let Some(copies) = self.client.copies.as_deref().filter(|_| !strict) {
            if !callbacks.copy_covered(ino) {
                // The promise the copy started under lapsed: it may be stale.
                copies.discard(ino);
            }
            let size = callbacks.attr(ino).map(|attr| attr.size);
            // Not while the file is open here: a writer's data not committed yet is in no size
            // the copy could start from.
            if request.read_only
                && !self.client.files.is_open(ino)
                && self.io.shared(ino).is_none()
                && !copies.has(ino)
                && size.is_some_and(|s| s >= COPY_MIN_BYTES)
                && callbacks.cover_copy(ino)
                && copies.start(ino, size.unwrap_or(0))
            {
                // The reads that fill the copy must come here, not from the kernel's pages.
                keep_pages = false;
            }
        }
        let file = self.client.files.open(request.handle, 0);
        let mut reply = Some(reply);
        loop {
            let attempt = match self.io.shared(ino) {
                Some(view) => self.join_shared(&request, view, &file, &mut reply),
                None => Ok(self.open_alone(&request, keep_pages, &file, &mut reply)),
            };
            match attempt {
                Ok(Attempt::Done) => return,
                Ok(Attempt::Again) => continue,
                Err(e) => {
                    if let Err(e) = self.runtime.block_on(self.client.files.release(ino)) {
                        tracing::warn!(ino, error = %e, "closing a failed open");
                    }
                    if let Some(reply) = reply.take() {
                        reply.error(errno_of(&e));
                    }
                    return;
                }
            }
        }
    }

    /// An open of an inode with no passthrough open (checked again under the table's lock).
    fn open_alone(
        &self,
        request: &OpenRequest,
        keep_pages: bool,
        file: &Arc<OpenFile>,
        reply: &mut Option<ReplyOpen>,
    ) -> Attempt {
        let ino = request.handle.ino;
        let mut table = self.io.table();
        let opens = table.entry(ino).or_default();
        if opens.shared.is_some() {
            return Attempt::Again;
        }
        let Some(sender) = reply.take() else { return Attempt::Done };
        if self.options.strict {
            opens.direct += 1;
            let fh = self.new_handle(Handle::File { ino, file: file.clone(), mode: IoMode::Direct });
            sender.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            return Attempt::Done;
        }
        let size = self.client.meta.callbacks.attr(ino).map(|attr| attr.size);
        let copies = self.client.copies.as_deref().filter(|_| self.io.passthrough.load(Ordering::Relaxed));
        let covered = self.client.meta.callbacks.copy_covered(ino);
        if opens.cached == 0 && opens.direct == 0 && request.read_only && covered {
            let whole = copies.zip(size).and_then(|(c, size)| Some((c, c.whole(ino, size)?)));
            if let Some((copies, (serial, copy))) = whole {
                match sender.open_backing(&*copy) {
                    Ok(backing) => {
                        copies.pin(ino, serial, true);
                        let mode = IoMode::Passthrough { writer: false };
                        let fh = FileHandle(self.new_handle(Handle::File { ino, file: file.clone(), mode }));
                        let shared = opens.shared.insert(Shared {
                            serial,
                            file: copy,
                            backing,
                            readers: 1,
                            writers: 0,
                            writer: pb::Caller::default(),
                            breaks: 0,
                            base: Arc::default(),
                            revoked: false,
                            saved: Arc::default(),
                            lost: false,
                        });
                        self.io.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                        sender.opened_passthrough(fh, FopenFlags::empty(), &shared.backing);
                        return Attempt::Done;
                    }
                    Err(e) => {
                        // Without CAP_SYS_ADMIN, for one: reads go through the page cache.
                        tracing::warn!(error = %e, "the kernel refused a passthrough file; reading through the page cache");
                        self.io.passthrough.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        opens.cached += 1;
        let fh = self.new_handle(Handle::File { ino, file: file.clone(), mode: IoMode::Cached });
        sender.opened(FileHandle(fh), if keep_pages { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() });
        Attempt::Done
    }

    /// An open of an inode with passthrough opens: it joins them, on the copy brought up to
    /// date if it went stale.
    fn join_shared(
        &self,
        request: &OpenRequest,
        view: SharedView,
        file: &Arc<OpenFile>,
        reply: &mut Option<ReplyOpen>,
    ) -> ClientResult<Attempt> {
        let ino = request.handle.ino;
        if view.revoked {
            // The kernel would put this open on the copy that was taken away too.
            return Err(ClientError::Errno(pb::errno::EIO));
        }
        let refreshed = self.runtime.block_on(async {
            let mut base = view.base.lock().await;
            // An open for writing only may not read the file, yet appends at the copy's end
            // and sends whole pages: the copy is brought up to date for it too, read as root
            // (what it reads goes only into the copy, which the kernel opens for callers it
            // checked).
            let reader = if request.write_only { pb::Caller::default() } else { request.who.clone() };
            let refreshed = self.refresh_copy(ino, &view, &mut base, file, &reader, false).await?;
            if !request.read_only && base.is_none() {
                *base = Some(Base::of(&view.file).map_err(|_| ClientError::Errno(pb::errno::EIO))?);
            }
            Ok::<_, ClientError>(refreshed)
        });
        if let Err(e) = &refreshed {
            tracing::warn!(ino, error = %e, "bringing a whole-file copy up to date failed");
        }
        let refreshed = refreshed?;
        let mut table = self.io.table();
        let Some(opens) = table.get_mut(&ino) else { return Ok(Attempt::Again) };
        debug_assert!(opens.cached == 0, "no page-cache open beside passthrough opens");
        let Some(shared) = opens.shared.as_mut().filter(|s| Arc::ptr_eq(&s.file, &view.file)) else {
            return Ok(Attempt::Again);
        };
        if let Some(size) = refreshed {
            self.adopt_refreshed(shared, ino, &view, size);
        }
        let Some(sender) = reply.take() else { return Ok(Attempt::Done) };
        if request.read_only {
            shared.readers += 1;
        } else {
            shared.writers += 1;
            shared.writer = request.who.clone();
        }
        let mode = IoMode::Passthrough { writer: !request.read_only };
        let fh = FileHandle(self.new_handle(Handle::File { ino, file: file.clone(), mode }));
        self.io.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        sender.opened_passthrough(fh, FopenFlags::empty(), &shared.backing);
        Ok(Attempt::Done)
    }

    /// Brings the copy `view` shows up to date if it went stale (a break), or in any case with
    /// `always`: what writers here wrote into it is committed first, then the rest catches up,
    /// and readers already on it see the new data, as they would in the page cache. The size
    /// it was brought to, if it was. `base` is the copy's base, locked by the caller.
    async fn refresh_copy(
        &self,
        ino: u64,
        view: &SharedView,
        base: &mut Option<Base>,
        file: &OpenFile,
        reader: &pb::Caller,
        always: bool,
    ) -> ClientResult<Option<u64>> {
        let copies = self.client.copies.as_deref();
        if !always
            && copies.is_some_and(|c| c.is_current(ino, view.serial))
            && self.client.meta.callbacks.copy_covered(ino)
        {
            return Ok(None);
        }
        let files = &self.client.files;
        if let Some(base) = base.as_mut() {
            copy_sync::commit_changes(files, file, &view.file, base, &view.writer).await?;
        }
        Ok(Some(copy_sync::refresh(files, file, &view.file, base.as_mut(), reader).await?))
    }

    /// A copy brought up to date (to `size`) counts as current again, unless a break overtook
    /// the refresh: that was for a change made meanwhile, which the copy may show in part, so
    /// the next open (or lock) refreshes it again.
    fn adopt_refreshed(&self, shared: &mut Shared, ino: u64, view: &SharedView, size: u64) {
        if shared.breaks == view.breaks
            && let Some(copies) = self.client.copies.as_deref()
            && self.client.meta.callbacks.cover_copy(ino)
        {
            // Adopted pinned once, for these opens.
            shared.serial = copies.adopt(ino, view.file.clone(), size);
        }
    }

    /// After a lock on `ino` is granted: the copy its passthrough opens share is brought up to
    /// date, so that the holder reads through the descriptors it kept open what the previous
    /// holder wrote (as the kernel's pages are dropped for the page cache's opens). Whether or
    /// not a break was seen: one may still be on its way (see `setlk`). Read as root, as for an
    /// open for writing only: a lock may be taken through one.
    pub(super) async fn refresh_copy_for_lock(&self, ino: u64, file: &OpenFile) -> ClientResult<()> {
        let Some(view) = self.io.shared(ino).filter(|view| !view.revoked) else { return Ok(()) };
        let refreshed = {
            let mut base = view.base.lock().await;
            self.refresh_copy(ino, &view, &mut base, file, &pb::Caller::default(), true).await?
        };
        let Some(size) = refreshed else { return Ok(()) };
        let mut table = self.io.table();
        if let Some(shared) =
            table.get_mut(&ino).and_then(|opens| opens.shared.as_mut()).filter(|s| Arc::ptr_eq(&s.file, &view.file))
        {
            self.adopt_refreshed(shared, ino, &view, size);
        }
        Ok(())
    }

    /// Commits what passthrough writers wrote into `ino`'s copy, as the writer who opened it
    /// last (before a lock or unlock, taken through any of the copy's opens).
    pub(super) async fn commit_shared_copy(&self, ino: u64, file: &OpenFile) -> ClientResult<()> {
        let Some(view) = self.io.shared(ino) else { return Ok(()) };
        self.commit_copy_writes(ino, file, &view.writer).await
    }

    /// Commits what passthrough writers wrote into `ino`'s copy (flush, fsync, close, and
    /// before a change made through this process).
    pub(super) async fn commit_copy_writes(&self, ino: u64, file: &OpenFile, who: &pb::Caller) -> ClientResult<()> {
        let Some(view) = self.io.shared(ino) else { return Ok(()) };
        let mut base = view.base.lock().await;
        if view.revoked {
            // The copy is gone: what was read out of it before is committed instead.
            let saved = std::mem::take(&mut *view.saved.lock().unwrap_or_else(|p| p.into_inner()));
            for (start, data) in saved {
                self.client.files.write(file, start, &data, who.clone(), false).await?;
            }
            self.client.files.flush(file).await?;
            return if view.lost { Err(ClientError::Errno(pb::errno::EIO)) } else { Ok(()) };
        }
        let Some(base) = base.as_mut() else { return Ok(()) };
        let committed = copy_sync::commit_changes(&self.client.files, file, &view.file, base, who).await;
        if committed.is_err()
            && let Some(copies) = &self.client.copies
        {
            // The copy holds what meta does not: no new open may take it for the file.
            copies.discard(ino);
        }
        committed
    }

    /// Applies a change made through this process (truncate, fallocate) to `ino`'s copies:
    /// the one being filled, and the one passthrough opens use, whose writers' changes are
    /// committed first (`change` runs between, and makes the change in meta).
    pub(super) async fn change_copies<T>(
        &self,
        ino: u64,
        who: &pb::Caller,
        change: impl AsyncFnOnce() -> ClientResult<T>,
        apply: impl Fn(&File) -> std::io::Result<()>,
        rebase: impl FnOnce(&mut Base),
    ) -> ClientResult<T> {
        let view = self.io.shared(ino);
        if view.as_ref().is_some_and(|view| view.revoked) {
            if let Some(file) = self.client.files.get(ino) {
                self.commit_copy_writes(ino, &file, who).await?;
            }
            return change().await;
        }
        let mut base = match &view {
            Some(view) => Some(view.base.lock().await),
            None => None,
        };
        if let (Some(view), Some(Some(base)), Some(file)) = (&view, base.as_deref_mut(), self.client.files.get(ino)) {
            copy_sync::commit_changes(&self.client.files, &file, &view.file, base, who).await?;
        }
        let changed = change().await?;
        if let Some(view) = &view {
            match apply(&view.file) {
                Ok(()) => {
                    if let Some(Some(base)) = base.as_deref_mut() {
                        // Moved as the change moved meta, not read back from the copy: a write
                        // through it meanwhile stays a change to commit.
                        rebase(base);
                    }
                }
                Err(e) => tracing::warn!(ino, error = %e, "a whole-file copy missed a change"),
            }
        }
        Ok(changed)
    }

    /// The kernel released an open: a passthrough writer's changes are committed, and the
    /// copy is unpinned after its last passthrough open.
    pub(super) async fn release_mode(&self, ino: u64, mode: IoMode, file: &OpenFile) -> ClientResult<()> {
        let view = self.io.shared(ino);
        let committed = match (mode, &view) {
            // Writes through a mapping may land after the last flush.
            (IoMode::Passthrough { writer: true }, Some(view)) => {
                self.commit_copy_writes(ino, file, &view.writer).await
            }
            _ => Ok(()),
        };
        if let Some(serial) = self.io.released(ino, mode)
            && let Some(copies) = &self.client.copies
        {
            // All committed: the copy holds the file as meta does, whatever writers did to it.
            if committed.is_ok()
                && let Some(len) = view.and_then(|v| v.file.metadata().ok()).map(|m| m.len())
            {
                copies.refit(ino, serial, len);
            }
            copies.pin(ino, serial, false);
        }
        committed
    }
}
