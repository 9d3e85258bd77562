//! The FUSE file system: each kernel request becomes a call into the client library. Inode
//! numbers are Cairn's own; the generation that makes a handle is remembered from the replies
//! that introduced the inode to the kernel.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cairn_client::callbacks::{Forget, KernelCaches};
use cairn_client::copy_sync::Base;
use cairn_client::{Client, ClientError, OpenFile, whole_copies};
use cairn_proto::{self as pb, errno, mutate_request::Op};
use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::convert::{caller, file_attr, file_type, kind_of_mode, timestamp};
use crate::fs::io_modes::{IoMode, KernelIo, OpenRequest};
use crate::names::KernelNames;

mod io_modes;

/// Directory entries fetched per readdir round trip.
const READDIR_PAGE: u32 = 128;

#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Every write reaches meta before `write()` returns, and the kernel caches no file data:
    /// other clients see each write at once (instead of at close).
    pub strict: bool,
    /// Readers of a large file held whole in a local copy read it with no call into this
    /// process (FUSE passthrough; needs CAP_SYS_ADMIN and the client's `whole_copies`). When
    /// the lease lapses, the copies' file system is shut down and reads of them fail with
    /// `EIO`, through files already open too (see ARCHITECTURE.md).
    pub passthrough: bool,
}

struct KnownInode {
    generation: u64,
    lookups: u64,
    /// Meta said this inode lost its last link while we may hold it open.
    orphaned: bool,
}

struct DirStream {
    dir: pb::FileHandle,
    parent: u64,
    /// Index (in the whole listing after "." and "..") of `page[0]`.
    base: u64,
    page: Vec<pb::DirEntry>,
    /// The name `page` was fetched after (empty: the start of the directory).
    page_after: Vec<u8>,
    eof: bool,
    loaded: bool,
    /// Who opened the directory: meta checks that it may list it.
    opener: pb::Caller,
}

enum Handle {
    File { ino: u64, file: Arc<OpenFile>, mode: IoMode },
    Dir(Box<DirStream>),
}

pub struct CairnFs {
    client: Arc<Client>,
    runtime: tokio::runtime::Handle,
    options: MountOptions,
    inodes: Arc<Mutex<HashMap<u64, KnownInode>>>,
    names: Arc<Mutex<KernelNames>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    /// Set once the session is up: tells the kernel to drop what it caches of an inode.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// The meta inode of the mount's root (see `swap_root`).
    root_ino: u64,
    /// `getxattr` requests the kernel passed on: each is a round trip to this process even
    /// when the answer is cached, so a cached walk is at local speed only when there are none.
    xattr_reads: AtomicU64,
    /// Listing requests from the kernel (readdir and readdirplus), for metrics.
    dir_reads: AtomicU64,
    /// Reads of file data that reached the mount (the kernel's pages did not answer them).
    file_reads: AtomicU64,
    /// How the kernel does I/O through each open file.
    io: Arc<KernelIo>,
    /// What breaks tell the kernel; also used by an open the kernel is behind on.
    kernel_forget: Arc<KernelForget>,
}

fn errno_of(e: &ClientError) -> Errno {
    if let ClientError::Timeout { .. } | ClientError::Refused { .. } | ClientError::Corrupt(_) = e {
        tracing::warn!(error = %e, "request failed");
    }
    Errno::from_i32(e.errno())
}

fn stale() -> ClientError {
    ClientError::Errno(errno::ESTALE)
}

fn time_set(t: TimeOrNow) -> pb::TimeSet {
    match t {
        TimeOrNow::Now => pb::TimeSet { value: Some(pb::time_set::Value::Now(true)) },
        TimeOrNow::SpecificTime(t) => pb::TimeSet { value: Some(pb::time_set::Value::At(timestamp(t))) },
    }
}

impl CairnFs {
    pub fn new(
        client: Arc<Client>,
        runtime: tokio::runtime::Handle,
        options: MountOptions,
        notifier: Arc<OnceLock<fuser::Notifier>>,
    ) -> Self {
        let root = client.meta.root();
        let mut inodes = HashMap::new();
        inodes.insert(root.ino, KnownInode { generation: root.generation, lookups: 1, orphaned: false });
        let inodes = Arc::new(Mutex::new(inodes));
        let names = Arc::new(Mutex::new(KernelNames::default()));
        let io = Arc::new(KernelIo::default());
        let forget = Arc::new(KernelForget {
            io: io.clone(),
            client: client.clone(),
            runtime: runtime.clone(),
            inodes: inodes.clone(),
            names: names.clone(),
            notifier: notifier.clone(),
            root_ino: root.ino,
        });
        client.meta.callbacks.set_kernel_caches(forget.clone());
        let kernel_forget = forget;
        CairnFs {
            client,
            runtime,
            options,
            inodes,
            names,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            notifier,
            root_ino: root.ino,
            xattr_reads: AtomicU64::new(0),
            dir_reads: AtomicU64::new(0),
            file_reads: AtomicU64::new(0),
            io,
            kernel_forget,
        }
    }

    /// Before an open of `ino`: if a break made this client forget the inode and its kernel
    /// has not yet (see `Callbacks::kernel_behind`), the kernel forgets the inode's attributes
    /// now, and its pages with the open's reply, so the open reads what the break announced.
    /// Its names, if a directory, follow with the break (that needs the directory's lock,
    /// which the kernel may hold).
    fn catch_up_kernel(&self, ino: u64) {
        if self.client.meta.callbacks.kernel_behind(ino) {
            self.kernel_forget.catch_up(ino);
        }
    }

    /// How long the kernel may keep `attr`: while it is what this client holds a promise on,
    /// the rest of the lease; otherwise not at all. A name's reply may make the kernel a new
    /// inode, whose attributes it takes with no version check: a break that came after the
    /// reply was read found no inode to invalidate, and a request beside this one may have
    /// cached newer attributes since.
    fn attr_ttl_for(&self, attr: &pb::Attr) -> Duration {
        let callbacks = &self.client.meta.callbacks;
        if callbacks.attr(attr.ino).is_some_and(|cached| cached == *attr) { callbacks.ttl() } else { Duration::ZERO }
    }

    /// How long the kernel may keep a name: while it is promised and tracked for breaks.
    fn entry_ttl(&self, parent: u64, name: &[u8], ino: u64, tracked: bool) -> Duration {
        let callbacks = &self.client.meta.callbacks;
        match callbacks.entry(parent, name) {
            Some(Some(attr)) if tracked && attr.ino == ino => callbacks.ttl(),
            _ => Duration::ZERO,
        }
    }

    /// Makes the kernel ask again about `ino` (its attributes and cached data) and about the
    /// names it has cached in the directories holding it: a lock holder sees what the previous
    /// holder did, such as a journal file created or removed beside the locked file.
    fn forget_kernel_caches(&self, ino: u64) {
        let Some(notifier) = self.notifier.get() else { return };
        if let Err(e) = notifier.inval_inode(self.kernel_ino(ino), 0, 0) {
            tracing::debug!(ino, error = %e, "kernel cache invalidation failed");
        }
        let stale: Vec<(u64, Vec<u8>)> = {
            let names = self.names.lock().expect("name cache poisoned");
            names.parents_of(ino).into_iter().flat_map(|p| names.names_in(p).into_iter().map(move |n| (p, n))).collect()
        };
        for (parent, name) in stale {
            // ENOENT means the kernel no longer had it: nothing to forget.
            let _ = notifier.inval_entry(self.kernel_ino(parent), OsStr::from_bytes(&name));
        }
    }

    /// After this mount changed who may search `dir`: the kernel, which shares the names it
    /// caches among all callers, forgets those it holds in it (other mounts get a break for
    /// the change; this one does not). On another thread, once the reply is sent: the kernel
    /// holds the directory's lock until then, and an invalidation waits for that lock.
    fn forget_kernel_names_in(&self, dir: u64) {
        let Some(notifier) = self.notifier.get().cloned() else { return };
        let names = self.names.lock().expect("name cache poisoned").take_dir(dir);
        if names.is_empty() {
            return;
        }
        let kernel_dir = self.kernel_ino(dir);
        std::thread::spawn(move || {
            for name in names {
                // ENOENT: the kernel had already forgotten it.
                let _ = notifier.inval_entry(kernel_dir, OsStr::from_bytes(&name));
            }
        });
    }

    fn handle_of(&self, ino: INodeNo) -> Result<pb::FileHandle, ClientError> {
        let inodes = self.inodes.lock().expect("inode table poisoned");
        inodes
            .get(&self.meta_ino(ino))
            .map(|known| pb::FileHandle { ino: self.meta_ino(ino), generation: known.generation })
            .ok_or_else(stale)
    }

    /// Records that the kernel now holds one more reference to `attr`'s inode.
    fn remember(&self, attr: &pb::Attr) {
        let mut inodes = self.inodes.lock().expect("inode table poisoned");
        let known =
            inodes.entry(attr.ino).or_insert(KnownInode { generation: attr.generation, lookups: 0, orphaned: false });
        if known.generation != attr.generation {
            *known = KnownInode { generation: attr.generation, lookups: 0, orphaned: false };
        }
        known.lookups += 1;
    }

    /// Records a name given to the kernel; false when it cannot be tracked (then the kernel
    /// must not keep it).
    fn remember_name(&self, parent: u64, name: &[u8], ino: u64) -> bool {
        self.names.lock().expect("name cache poisoned").insert(parent, name, ino)
    }

    fn forget_name(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.names.lock().expect("name cache poisoned").remove(parent, name)
    }

    fn known_name(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.names.lock().expect("name cache poisoned").get(parent, name)
    }

    /// Whether this client might hold the inode `name` points to open.
    fn may_hold(&self, parent: u64, name: &[u8]) -> bool {
        match self.known_name(parent, name) {
            Some(ino) => self.client.files.is_open(ino),
            None => true,
        }
    }

    fn new_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::SeqCst);
        self.handles.lock().expect("handle table poisoned").insert(fh, handle);
        fh
    }

    fn open_file_mode(&self, fh: FileHandle) -> Result<(u64, Arc<OpenFile>, IoMode), ClientError> {
        match self.handles.lock().expect("handle table poisoned").get(&fh.0) {
            Some(Handle::File { ino, file, mode }) => Ok((*ino, file.clone(), *mode)),
            _ => Err(ClientError::Errno(errno::EBADF)),
        }
    }

    fn open_file(&self, fh: FileHandle) -> Result<(u64, Arc<OpenFile>), ClientError> {
        match self.handles.lock().expect("handle table poisoned").get(&fh.0) {
            Some(Handle::File { ino, file, .. }) => Ok((*ino, file.clone())),
            _ => Err(ClientError::Errno(errno::EBADF)),
        }
    }

    /// Attributes for the kernel: the size includes this client's uncommitted writes as they
    /// were in `dirty_end`, taken before `attr` was fetched.
    fn attr_with(&self, attr: &pb::Attr, dirty_end: Option<u64>) -> fuser::FileAttr {
        let dirty_end = dirty_end.max(self.io.written_len(attr.ino, self.client.copies.as_deref()));
        let mut fattr = file_attr(attr, dirty_end.map_or(attr.size, |end| end.max(attr.size)));
        fattr.ino = self.kernel_ino(attr.ino);
        fattr
    }

    /// The meta inode the kernel's `ino` names: the kernel calls the mount's root 1, whatever
    /// inode it is (for a credential confined to a subtree, a directory deeper in).
    fn meta_ino(&self, ino: INodeNo) -> u64 {
        swap_root(ino.0, self.root_ino)
    }

    fn kernel_ino(&self, ino: u64) -> INodeNo {
        INodeNo(swap_root(ino, self.root_ino))
    }

    /// Attributes to answer the kernel with after this client changed the inode: the reply's,
    /// while they are promised and cached, else meta's current ones. The kernel takes the size
    /// from a `setattr` or `link` reply whatever it learned meanwhile (no attribute version is
    /// checked there). So such a reply goes with no time to live: a break may come between
    /// this check and the kernel taking the reply, after the break made it forget the
    /// attributes; the kernel then asks again before it trusts the size. A reply not promised
    /// may lack a change another client made after it was applied, whose close returned before
    /// this reply arrived (an open here would then read the older size).
    async fn current_after_own_change(&self, attr: pb::Attr, handle: pb::FileHandle) -> pb::Attr {
        if self.client.meta.callbacks.attr(attr.ino).is_some_and(|cached| cached == attr) {
            return attr;
        }
        // The change was made: a failure here (an unlink meanwhile, meta out of reach) does
        // not fail it. Attributes cached meanwhile are newer than the reply; without them, the
        // reply's go with no time to live (see `attr_ttl`).
        match self.client.meta.getattr_fresh(handle).await {
            Ok(current) => current,
            Err(_) => self.client.meta.callbacks.attr(attr.ino).unwrap_or(attr),
        }
    }

    /// Attributes of an inode this request just created or changed (the reply is current).
    async fn attr_of(&self, attr: &pb::Attr) -> fuser::FileAttr {
        let dirty_end = self.client.files.dirty_end(attr.ino).await;
        self.attr_with(attr, dirty_end)
    }

    fn reply_entry(&self, parent: u64, name: &[u8], attr: &pb::Attr, fattr: &fuser::FileAttr, reply: ReplyEntry) {
        self.reply_entry_for(parent, name, attr, fattr, true, reply);
    }

    /// Answers an entry; the kernel may keep its attributes only if `keep_attr` (and
    /// `attr_ttl_for` allows).
    fn reply_entry_for(
        &self,
        parent: u64,
        name: &[u8],
        attr: &pb::Attr,
        fattr: &fuser::FileAttr,
        keep_attr: bool,
        reply: ReplyEntry,
    ) {
        self.remember(attr);
        let tracked = self.remember_name(parent, name, attr.ino);
        let entry_ttl = self.entry_ttl(parent, name, attr.ino, tracked);
        let attr_ttl = if keep_attr { self.attr_ttl_for(attr) } else { Duration::ZERO };
        reply.entry_with_ttls(&attr_ttl, &entry_ttl, fattr, Generation(attr.generation));
    }

    async fn create_node(
        &self,
        req_ids: (u32, u32, u32),
        parent: INodeNo,
        op: pb::CreateOp,
    ) -> Result<pb::Attr, ClientError> {
        let parent_handle = self.handle_of(parent)?;
        let (uid, gid, pid) = req_ids;
        let caller = caller(uid, gid, pid);
        let reply =
            self.client.meta.mutate(&caller, Op::Create(pb::CreateOp { parent: Some(parent_handle), ..op })).await?;
        reply.attr.ok_or(ClientError::Errno(errno::EIO))
    }

    fn entry_op(&self, req: &Request, parent: INodeNo, name: &OsStr, op: pb::CreateOp, reply: ReplyEntry) {
        let ids = (req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let attr = self.create_node(ids, parent, op).await?;
            let fattr = self.attr_of(&attr).await;
            Ok::<_, ClientError>((attr, fattr))
        });
        match result {
            Ok((attr, fattr)) => self.reply_entry(self.meta_ino(parent), name.as_bytes(), &attr, &fattr, reply),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    /// Marks an inode that meta kept for us after its last link went; releases it at once if
    /// nothing here holds it.
    async fn note_orphan(&self, attr: &pb::Attr) {
        if self.client.files.is_open(attr.ino) {
            if let Some(known) = self.inodes.lock().expect("inode table poisoned").get_mut(&attr.ino) {
                known.orphaned = true;
            }
        } else {
            self.client.release_orphan(pb::FileHandle { ino: attr.ino, generation: attr.generation }).await;
        }
    }

    /// Fills a directory listing from `offset` on; `add` returns true when the reply is full.
    async fn list(
        &self,
        fh: FileHandle,
        offset: u64,
        mut add: impl FnMut(u64, u64, &[u8], Option<&pb::Attr>) -> bool,
    ) -> Result<(), ClientError> {
        let mut stream = match self.handles.lock().expect("handle table poisoned").remove(&fh.0) {
            Some(Handle::Dir(stream)) => stream,
            Some(other) => {
                self.handles.lock().expect("handle table poisoned").insert(fh.0, other);
                return Err(ClientError::Errno(errno::EBADF));
            }
            None => return Err(ClientError::Errno(errno::EBADF)),
        };
        let result = self.fill(&mut stream, offset, &mut add).await;
        self.handles.lock().expect("handle table poisoned").insert(fh.0, Handle::Dir(stream));
        result
    }

    async fn fill(
        &self,
        stream: &mut DirStream,
        offset: u64,
        add: &mut impl FnMut(u64, u64, &[u8], Option<&pb::Attr>) -> bool,
    ) -> Result<(), ClientError> {
        // Each call lists from a freshly fetched page: attributes in the reply must not be
        // older than the caller's snapshot of this client's uncommitted writes, and names
        // added since the last page must not be missed (the kernel may be filling the listing
        // it keeps for every process). A directory listed whole under a promise answers these
        // pages from the client's cache, with no request.
        if offset < 2 {
            // From the start again (`rewinddir`): nothing read before is reused.
            stream.loaded = false;
        }
        if offset >= 2 && stream.loaded {
            let position = offset - 2;
            if position >= stream.base && position <= stream.base + stream.page.len() as u64 {
                let at = (position - stream.base) as usize;
                let after = if at == 0 { stream.page_after.clone() } else { stream.page[at - 1].name.clone() };
                let (page, eof) = self.client.meta.readdir(&stream.opener, stream.dir, &after, READDIR_PAGE).await?;
                stream.base = position;
                stream.page = page;
                stream.page_after = after;
                stream.eof = eof;
            } else {
                stream.loaded = false;
            }
        }
        let mut index = offset;
        loop {
            match index {
                0 => {
                    if add(stream.dir.ino, 1, b".", None) {
                        return Ok(());
                    }
                }
                1 => {
                    if add(stream.parent, 2, b"..", None) {
                        return Ok(());
                    }
                }
                _ => {
                    let position = index - 2;
                    if !stream.loaded || position < stream.base {
                        let (page, eof) =
                            self.client.meta.readdir(&stream.opener, stream.dir, b"", READDIR_PAGE).await?;
                        *stream = DirStream {
                            base: 0,
                            page,
                            page_after: Vec::new(),
                            eof,
                            loaded: true,
                            ..*stream_clone(stream)
                        };
                    }
                    while position >= stream.base + stream.page.len() as u64 {
                        if stream.eof {
                            return Ok(());
                        }
                        let after = stream.page.last().map(|e| e.name.clone()).unwrap_or_default();
                        let (page, eof) =
                            self.client.meta.readdir(&stream.opener, stream.dir, &after, READDIR_PAGE).await?;
                        stream.base += stream.page.len() as u64;
                        stream.page = page;
                        stream.page_after = after;
                        stream.eof = eof;
                        if stream.page.is_empty() && stream.eof {
                            return Ok(());
                        }
                    }
                    let entry = &stream.page[(position - stream.base) as usize];
                    let Some(attr) = entry.attr.as_ref() else { return Err(ClientError::Errno(errno::EIO)) };
                    if add(attr.ino, index + 1, &entry.name, Some(attr)) {
                        return Ok(());
                    }
                }
            }
            index += 1;
        }
    }
}

fn stream_clone(stream: &DirStream) -> Box<DirStream> {
    Box::new(DirStream {
        dir: stream.dir,
        parent: stream.parent,
        base: stream.base,
        page: Vec::new(),
        page_after: Vec::new(),
        eof: stream.eof,
        loaded: stream.loaded,
        opener: stream.opener.clone(),
    })
}

impl Filesystem for CairnFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Locks are kept in meta, so that they hold across every mount: the kernel passes
        // fcntl and flock requests on.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::info!(?missing, "kernel lacks some FUSE capabilities");
        }
        if self.options.passthrough && self.client.copies.is_some() {
            // Backing files sit on a local file system that is not itself stacked.
            let taken =
                config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok();
            if !taken {
                tracing::warn!("the kernel lacks FUSE passthrough; reading through the page cache");
            }
            self.io.passthrough.store(taken, Ordering::Relaxed);
        }
        let _ = config.set_max_write(1024 * 1024);
        let _ = config.set_max_readahead(1024 * 1024);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn destroy(&mut self) {
        // An unmount sends what delegations made here first (bounded by the retry deadline).
        self.runtime.block_on(self.client.meta.delegations.settle());
        if self.client.meta.delegations.take_lost() {
            tracing::error!("changes made under directory delegations were lost before the unmount");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let parent_handle = self.handle_of(parent)?;
            let known = self.known_name(self.meta_ino(parent), name.as_bytes());
            let dirty_end = match known {
                Some(ino) => self.client.files.dirty_end(ino).await,
                None => None,
            };
            let attr = self.client.meta.lookup(&who, parent_handle, name.as_bytes()).await?;
            let dirty_end =
                if known == Some(attr.ino) { dirty_end } else { self.client.files.dirty_end(attr.ino).await };
            Ok::<_, ClientError>((attr, self.attr_with(&attr, dirty_end)))
        });
        match result {
            Ok((attr, fattr)) => self.reply_entry(self.meta_ino(parent), name.as_bytes(), &attr, &fattr, reply),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut inodes = self.inodes.lock().expect("inode table poisoned");
        if self.meta_ino(ino) == self.client.meta.root().ino {
            return;
        }
        if let Some(known) = inodes.get_mut(&self.meta_ino(ino)) {
            known.lookups = known.lookups.saturating_sub(nlookup);
            if known.lookups == 0 {
                inodes.remove(&self.meta_ino(ino));
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let result = self.runtime.block_on(async {
            let handle = self.handle_of(ino)?;
            let dirty_end = self.client.files.dirty_end(self.meta_ino(ino)).await;
            let attr = self.client.meta.getattr(handle).await?;
            Ok::<_, ClientError>((attr, self.attr_with(&attr, dirty_end)))
        });
        match result {
            Ok((attr, fattr)) => reply.attr(&self.attr_ttl_for(&attr), &fattr),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let handle = self.handle_of(ino)?;
            if let Some(file) = self.client.files.get(self.meta_ino(ino)) {
                self.client.files.flush(&file).await?;
            }
            let op = pb::SetAttrOp {
                target: Some(handle),
                perm: mode.map(|m| m & 0o7777),
                uid,
                gid,
                size,
                atime: atime.map(time_set),
                mtime: mtime.map(time_set),
                kill_suid: false,
            };
            let meta_ino = self.meta_ino(ino);
            let attr = match size {
                None => self.client.meta.mutate(&who, Op::SetAttr(op)).await?.attr,
                Some(size) => {
                    let change = async || self.client.meta.mutate(&who, Op::SetAttr(op)).await;
                    self.change_copies(meta_ino, &who, change, |copy| copy.set_len(size), |base| base.truncated(size))
                        .await?
                        .attr
                }
            };
            let attr = attr.ok_or(ClientError::Errno(errno::EIO))?;
            if size.is_some() {
                self.client.files.invalidate(meta_ino, attr.size).await;
                if let Some(copies) = &self.client.copies {
                    copies.truncate(meta_ino, attr.size);
                }
            }
            let attr = self.current_after_own_change(attr, handle).await;
            Ok::<_, ClientError>(self.attr_of(&attr).await)
        });
        match result {
            Ok(fattr) => {
                reply.attr(&Duration::ZERO, &fattr);
                if mode.is_some() && fattr.kind == fuser::FileType::Directory {
                    self.forget_kernel_names_in(self.meta_ino(ino));
                }
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self.runtime.block_on(async { self.client.meta.readlink(self.handle_of(ino)?).await });
        match result {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let Some(kind) = kind_of_mode(mode).filter(|k| !matches!(k, pb::FileKind::Directory | pb::FileKind::Symlink))
        else {
            reply.error(Errno::EINVAL);
            return;
        };
        let op = pb::CreateOp {
            name: name.as_bytes().to_vec(),
            kind: kind as i32,
            perm: mode & !umask & 0o7777,
            rdev,
            exclusive: true,
            ..Default::default()
        };
        self.entry_op(req, parent, name, op, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let op = pb::CreateOp {
            name: name.as_bytes().to_vec(),
            kind: pb::FileKind::Directory as i32,
            perm: mode & !umask & 0o7777,
            exclusive: true,
            ..Default::default()
        };
        self.entry_op(req, parent, name, op, reply);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, false, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, true, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let op = pb::CreateOp {
            name: link_name.as_bytes().to_vec(),
            kind: pb::FileKind::Symlink as i32,
            perm: 0o777,
            exclusive: true,
            symlink_target: target.as_os_str().as_bytes().to_vec(),
            ..Default::default()
        };
        self.entry_op(req, parent, link_name, op, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let mut wire_flags = 0;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            wire_flags |= 1;
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            wire_flags |= 2;
        }
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let result = self.runtime.block_on(async {
            let op = pb::RenameOp {
                parent: Some(self.handle_of(parent)?),
                name: name.as_bytes().to_vec(),
                new_parent: Some(self.handle_of(newparent)?),
                new_name: newname.as_bytes().to_vec(),
                flags: wire_flags,
                caller_not_holding: !self.may_hold(self.meta_ino(newparent), newname.as_bytes()),
            };
            let replaced = self.known_name(self.meta_ino(newparent), newname.as_bytes());
            let reply = self.client.meta.mutate(&who, Op::Rename(op)).await?;
            let moved = self.forget_name(self.meta_ino(parent), name.as_bytes());
            let replaced_now = self.forget_name(self.meta_ino(newparent), newname.as_bytes()).or(replaced);
            if wire_flags & 2 != 0
                && let Some(other) = replaced_now
            {
                let _ = self.remember_name(self.meta_ino(parent), name.as_bytes(), other);
            }
            if let Some(ino) = moved {
                let _ = self.remember_name(self.meta_ino(newparent), newname.as_bytes(), ino);
            }
            if wire_flags & 2 == 0
                && let (Some(ino), Some(copies)) = (replaced_now, &self.client.copies)
            {
                // Replaced: most often its last link went.
                copies.discard(ino);
            }
            if reply.orphaned
                && let Some(ino) = replaced_now
            {
                let generation = self.inodes.lock().expect("inode table poisoned").get(&ino).map(|k| k.generation);
                if let Some(generation) = generation {
                    self.note_orphan(&pb::Attr { ino, generation, ..Default::default() }).await;
                }
            }
            Ok::<_, ClientError>(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let target = self.handle_of(ino)?;
            let op = pb::LinkOp {
                target: Some(target),
                new_parent: Some(self.handle_of(newparent)?),
                new_name: newname.as_bytes().to_vec(),
            };
            let reply = self.client.meta.mutate(&who, Op::Link(op)).await?;
            let attr = reply.attr.ok_or(ClientError::Errno(errno::EIO))?;
            // The kernel takes the size of a link's reply as it takes a setattr's.
            let attr = self.current_after_own_change(attr, target).await;
            let fattr = self.attr_of(&attr).await;
            Ok::<_, ClientError>((attr, fattr))
        });
        match result {
            // No attribute time to live: see `current_after_own_change`.
            Ok((attr, fattr)) => {
                self.reply_entry_for(self.meta_ino(newparent), newname.as_bytes(), &attr, &fattr, false, reply)
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let handle = match self.handle_of(ino) {
            Ok(handle) => handle,
            Err(e) => return reply.error(errno_of(&e)),
        };
        let request = OpenRequest {
            handle,
            read_only: flags.0 & libc::O_ACCMODE == libc::O_RDONLY,
            write_only: flags.0 & libc::O_ACCMODE == libc::O_WRONLY,
            who: caller(req.uid(), req.gid(), req.pid()),
        };
        self.catch_up_kernel(handle.ino);
        self.open_for_kernel(request, reply);
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.file_reads.fetch_add(1, Ordering::Relaxed);
        let result = self.runtime.block_on(async {
            let (ino, file) = self.open_file(fh)?;
            let copies = self.client.copies.as_deref();
            let stamp = copies.and_then(|copies| copies.stamp(ino));
            let data = self.client.files.read(&file, offset, size, &caller(req.uid(), req.gid(), req.pid())).await?;
            if let (Some(copies), Some(stamp)) = (copies, stamp) {
                copies.fill(ino, stamp, offset, &data);
            }
            Ok(data)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let kill_suid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let result = self.runtime.block_on(async {
            let (ino, file) = self.open_file(fh)?;
            self.client.files.write(&file, offset, data, who, kill_suid).await?;
            if let Some(copies) = &self.client.copies {
                // Readers served from the copy see the write as they would in a page cache.
                copies.write(ino, offset, data);
            }
            if self.options.strict {
                // Write-through: committed (and other clients' promises broken) before the
                // write returns.
                self.client.files.flush(&file).await?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let (ino, file, mode) = self.open_file_mode(fh)?;
            if mode == (IoMode::Passthrough { writer: true }) {
                self.commit_copy_writes(ino, &file, &who).await?;
            }
            self.client.files.flush(&file).await?;
            // A close drops the closing process's POSIX locks on the file (the kernel leaves
            // that to a file system that keeps its own locks).
            if self.client.locks.holds(ino, lock_owner.0) {
                self.client.locks.release_owner(file.handle, lock_owner.0).await?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles.lock().expect("handle table poisoned").remove(&fh.0);
        let Some(Handle::File { ino, file, mode }) = handle else {
            reply.ok();
            return;
        };
        let result = self.runtime.block_on(async {
            // The last close of an open file description drops its flock lock.
            if let Some(owner) = lock_owner
                && self.client.locks.holds(ino, owner.0)
                && let Err(e) = self.client.locks.release_owner(file.handle, owner.0).await
            {
                tracing::warn!(ino, error = %e, "dropping a flock lock at close failed");
            }
            let committed = self.release_mode(ino, mode, &file).await;
            let last = self.client.files.release(ino).await;
            committed?;
            let last = last?;
            let orphan = {
                let inodes = self.inodes.lock().expect("inode table poisoned");
                inodes.get(&ino).filter(|k| k.orphaned).map(|k| k.generation)
            };
            if last && let Some(generation) = orphan {
                self.client.release_orphan(pb::FileHandle { ino, generation }).await;
            }
            Ok::<_, ClientError>(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn fsync(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let (ino, file, mode) = self.open_file_mode(fh)?;
            if mode == (IoMode::Passthrough { writer: true }) {
                self.commit_copy_writes(ino, &file, &who).await?;
            }
            self.client.files.flush(&file).await?;
            // A file made under a delegation (its name, its data) is durable once its batch is.
            self.settle_delegations().await
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.handle_of(ino) {
            Ok(dir) => {
                self.catch_up_kernel(dir.ino);
                let stream = DirStream {
                    dir,
                    parent: self.meta_ino(ino),
                    base: 0,
                    page: Vec::new(),
                    page_after: Vec::new(),
                    eof: false,
                    loaded: false,
                    opener: caller(req.uid(), req.gid(), req.pid()),
                };
                let fh = self.new_handle(Handle::Dir(Box::new(stream)));
                // The kernel keeps the listing while the directory's promise holds (a break
                // drops it with the directory's other cached pages).
                let mut flags = FopenFlags::FOPEN_CACHE_DIR;
                if self.client.meta.callbacks.kernel_pages_current(self.meta_ino(ino)) {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.dir_reads.fetch_add(1, Ordering::Relaxed);
        let result = self.runtime.block_on(self.list(fh, offset, |ino, next, name, attr| {
            let kind = attr.map(|a| file_type(a.kind)).unwrap_or(fuser::FileType::Directory);
            reply.add(self.kernel_ino(ino), next, kind, OsStr::from_bytes(name))
        }));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.dir_reads.fetch_add(1, Ordering::Relaxed);
        let dir_attr = match self.runtime.block_on(async { self.client.meta.getattr(self.handle_of(ino)?).await }) {
            Ok(attr) => attr,
            Err(e) => {
                reply.error(errno_of(&e));
                return;
            }
        };
        let dirty_ends = self.runtime.block_on(self.client.files.dirty_ends());
        let mut added: Vec<(pb::Attr, bool)> = Vec::new();
        let result = self.runtime.block_on(self.list(fh, offset, |entry_ino, next, name, attr| match attr {
            Some(attr) => {
                let fattr = self.attr_with(attr, dirty_ends.get(&attr.ino).copied());
                let tracked = self.remember_name(self.meta_ino(ino), name, attr.ino);
                // One time to live for the name and the attributes.
                let ttl = self.entry_ttl(self.meta_ino(ino), name, attr.ino, tracked).min(self.attr_ttl_for(attr));
                let full = reply.add(
                    self.kernel_ino(entry_ino),
                    next,
                    OsStr::from_bytes(name),
                    &ttl,
                    &fattr,
                    Generation(attr.generation),
                );
                if !full {
                    added.push((*attr, !ttl.is_zero()));
                }
                full
            }
            None => {
                let mut fattr = file_attr(&dir_attr, dir_attr.size);
                fattr.ino = self.kernel_ino(entry_ino);
                reply.add(
                    self.kernel_ino(entry_ino),
                    next,
                    OsStr::from_bytes(name),
                    &Duration::ZERO,
                    &fattr,
                    Generation(0),
                )
            }
        }));
        if let Err(e) = result {
            return reply.error(errno_of(&e));
        }
        for (attr, _) in &added {
            self.remember(attr);
        }
        // Entries read before a later page was fetched may have been broken meanwhile; the
        // kernel makes a new inode with no version check, so it forgets those attributes
        // again once it has the reply.
        let broken: Vec<u64> = added
            .iter()
            .filter(|(attr, kept)| *kept && self.attr_ttl_for(attr).is_zero())
            .map(|(a, _)| a.ino)
            .collect();
        reply.ok();
        for ino in broken {
            self.kernel_forget.forget_inode_in_kernel(ino, false);
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.handles.lock().expect("handle table poisoned").remove(&fh.0);
        reply.ok();
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let result = self.runtime.block_on(async {
            let (_, file) = self.open_file(fh)?;
            let call = lock_call(file.handle, lock_owner, start, end, typ, pid)?;
            self.client.locks.get(call).await
        });
        match result {
            Ok(Some(conflict)) => {
                let typ = if conflict.kind == pb::LockKind::LockWrite as i32 { libc::F_WRLCK } else { libc::F_RDLCK };
                reply.locked(conflict.start, conflict.end, typ, conflict.pid);
            }
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => {
                tracing::debug!(ino = self.meta_ino(ino), error = %e, "getlk failed");
                reply.error(errno_of(&e));
            }
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.runtime.block_on(async {
            let (ino, file, mode) = self.open_file_mode(fh)?;
            let call = lock_call(file.handle, lock_owner, start, end, typ, pid)?;
            let passthrough = matches!(mode, IoMode::Passthrough { .. });
            // What this client wrote under the lock reaches meta before the lock is let go (and
            // before another is taken), so the next holder reads it: from the write buffer,
            // and from a whole-file copy writers here share.
            if passthrough {
                self.commit_shared_copy(ino, &file).await?;
            }
            self.client.files.flush(&file).await?;
            self.client.locks.set(call, sleep).await?;
            if call.kind == pb::LockKind::LockUnlock {
                return Ok(());
            }
            // Whoever held the lock before may have changed the file and its directory (a
            // journal made or removed): read them afresh. Its commits broke this client's
            // promises on them, but while this client has a request naming the inode in flight
            // (a lock request polling, for one) the leader waits only until this client's cache
            // forgot, not its kernel: the kernel's part may still be under way. What this
            // client cached of them goes too, as it costs little and leans on nothing.
            let parents = self.names.lock().expect("name cache poisoned").parents_of(ino);
            for cached in parents.into_iter().chain([ino]) {
                self.client.meta.callbacks.forget_cached(cached);
            }
            let attr = self.client.meta.getattr_fresh(file.handle).await?;
            self.client.files.invalidate(ino, attr.size).await;
            self.forget_kernel_caches(ino);
            if passthrough {
                self.refresh_copy_for_lock(ino, &file).await?;
            }
            Ok::<_, ClientError>(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Every namespace change sent to meta is durable on a Raft majority before it is
        // acknowledged; what delegations made here is sent first.
        match self.runtime.block_on(self.settle_delegations()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.runtime.block_on(self.client.meta.statfs()) {
            Ok(s) => {
                let bsize = s.block_size.max(512) as u64;
                reply.statfs(
                    s.total_bytes / bsize,
                    s.free_bytes / bsize,
                    s.free_bytes / bsize,
                    s.files + s.free_files,
                    s.free_files,
                    bsize as u32,
                    s.name_max,
                    bsize as u32,
                )
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if position != 0 {
            reply.error(Errno::EINVAL);
            return;
        }
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let op = pb::SetXattrOp {
                target: Some(self.handle_of(ino)?),
                name: name.as_bytes().to_vec(),
                value: value.to_vec(),
                flags: flags as u32 & 3,
            };
            self.client.meta.mutate(&who, Op::SetXattr(op)).await
        });
        match result {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let result = if name.as_bytes() == METRICS_XATTR && self.meta_ino(ino) == self.client.meta.root().ino {
            Ok(self.metrics().into_bytes())
        } else {
            self.xattr_reads.fetch_add(1, Ordering::Relaxed);
            let who = caller(req.uid(), req.gid(), req.pid());
            self.runtime
                .block_on(async { self.client.meta.getxattr(&who, self.handle_of(ino)?, name.as_bytes()).await })
        };
        match result {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) if value.len() <= size as usize => reply.data(&value),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async { self.client.meta.listxattr(&who, self.handle_of(ino)?).await });
        match result {
            Ok(names) => {
                let mut list = Vec::new();
                for name in names {
                    list.extend_from_slice(&name);
                    list.push(0);
                }
                if size == 0 {
                    reply.size(list.len() as u32)
                } else if list.len() <= size as usize {
                    reply.data(&list)
                } else {
                    reply.error(Errno::ERANGE)
                }
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let op = pb::RemoveXattrOp { target: Some(self.handle_of(ino)?), name: name.as_bytes().to_vec() };
            self.client.meta.mutate(&who, Op::RemoveXattr(op)).await
        });
        match result {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permission bits itself (default_permissions); here only existence.
        match self.runtime.block_on(async { self.client.meta.getattr(self.handle_of(ino)?).await }) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let op = pb::CreateOp {
            name: name.as_bytes().to_vec(),
            kind: pb::FileKind::Regular as i32,
            perm: mode & !umask & 0o7777,
            exclusive: flags & libc::O_EXCL != 0,
            ..Default::default()
        };
        let ids = (req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            let who = caller(ids.0, ids.1, ids.2);
            let attr = match self.create_delegated(self.meta_ino(parent), &op.name, op.perm, &who).await {
                Some(attr) => attr,
                None => self.create_node(ids, parent, op).await?,
            };
            let fattr = self.attr_of(&attr).await;
            Ok::<_, ClientError>((attr, fattr))
        });
        match result {
            Ok((attr, fattr)) => {
                self.remember(&attr);
                let tracked = self.remember_name(self.meta_ino(parent), name.as_bytes(), attr.ino);
                let file =
                    self.client.files.open(pb::FileHandle { ino: attr.ino, generation: attr.generation }, attr.size);
                let Some(mode) = self.io.created(attr.ino, self.options.strict) else {
                    // Another name of a file this mount reads from its copy, made meanwhile:
                    // the kernel cannot open it beside those without passthrough.
                    if let Err(e) = self.runtime.block_on(self.client.files.release(attr.ino)) {
                        tracing::warn!(ino = attr.ino, error = %e, "closing a refused create");
                    }
                    return reply.error(Errno::EBUSY);
                };
                let fh = self.new_handle(Handle::File { ino: attr.ino, file, mode });
                // One time to live for the name and the attributes.
                let ttl = self
                    .entry_ttl(self.meta_ino(parent), name.as_bytes(), attr.ino, tracked)
                    .min(self.attr_ttl_for(&attr));
                reply.created(
                    &ttl,
                    &fattr,
                    Generation(attr.generation),
                    FileHandle(fh),
                    self.file_open_flags(attr.ino, mode),
                );
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let who = caller(req.uid(), req.gid(), req.pid());
        let result = self.runtime.block_on(async {
            if let Ok((_, file)) = self.open_file(fh) {
                self.client.files.flush(&file).await?;
            }
            let op = pb::FallocateOp { target: Some(self.handle_of(ino)?), offset, len: length, mode: mode as u32 };
            let change = async || self.client.meta.mutate(&who, Op::Fallocate(op)).await;
            let apply = |copy: &std::fs::File| whole_copies::fallocate(copy, mode, offset, length);
            let rebase = |base: &mut Base| base.fallocated(mode, offset, length);
            let reply = self.change_copies(self.meta_ino(ino), &who, change, apply, rebase).await?;
            if let Some(attr) = reply.attr {
                self.client.files.invalidate(self.meta_ino(ino), attr.size).await;
            }
            if let Some(copies) = &self.client.copies {
                copies.fallocate(self.meta_ino(ino), mode, offset, length);
            }
            Ok::<_, ClientError>(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }
}

/// A read-only attribute of the mount's root that reports this client's counters (never stored,
/// never listed): `getfattr -n user.cairn.metrics MOUNT`.
pub const METRICS_XATTR: &[u8] = b"user.cairn.metrics";

impl CairnFs {
    /// This client's counters, as one line of JSON.
    fn metrics(&self) -> String {
        let callbacks = &self.client.meta.callbacks;
        let delegations = &self.client.meta.delegations;
        let copies = self.client.copies.as_ref().map_or((0, 0), |c| c.usage());
        format!(
            "{{\"meta_rpcs\":{},\"block_bytes_fetched\":{},\"breaks\":{},\"promise_ttl_ms\":{},\"kernel_names\":{},\"kernel_inodes\":{},\"delegated_batches\":{},\"delegated_entries\":{},\"delegated_pending\":{},\"delegated_lost\":{},\"xattr_reads\":{},\"dir_reads\":{},\"file_reads\":{},\"data_map_bytes\":{},\"passthrough_opens\":{},\"whole_copies\":{},\"whole_copy_bytes\":{}}}",
            self.client.meta.rpcs.load(Ordering::Relaxed),
            self.client.blocks.bytes_fetched.load(Ordering::Relaxed),
            callbacks.breaks.load(Ordering::Relaxed),
            callbacks.ttl().as_millis(),
            self.names.lock().expect("name cache poisoned").len(),
            self.inodes.lock().expect("inode table poisoned").len(),
            delegations.batches_sent.load(Ordering::Relaxed),
            delegations.entries_sent.load(Ordering::Relaxed),
            delegations.pending(),
            delegations.lost_total.load(Ordering::Relaxed),
            self.xattr_reads.load(Ordering::Relaxed),
            self.dir_reads.load(Ordering::Relaxed),
            self.file_reads.load(Ordering::Relaxed),
            callbacks.data_map_bytes(),
            self.io.passthrough_opens.load(Ordering::Relaxed),
            copies.0,
            copies.1,
        )
    }

    /// Waits until what delegations made here reached meta; `EIO` if some of it was lost
    /// since the last time this was reported.
    async fn settle_delegations(&self) -> Result<(), ClientError> {
        let delegations = &self.client.meta.delegations;
        delegations.settle().await;
        if delegations.take_lost() {
            return Err(cairn_client::delegations::lost_error());
        }
        Ok(())
    }

    /// Creates regular file `name` in `dir` under the directory's delegation, asking meta for
    /// one when this looks like a run of creates there: None when the create must go to meta.
    /// Only in a directory whose every name this client knows (so the name is known free) and
    /// only files without setuid or setgid (whose rules need the caller's groups).
    async fn create_delegated(&self, dir: u64, name: &[u8], perm: u32, who: &pb::Caller) -> Option<pb::Attr> {
        let meta = &self.client.meta;
        if self.options.strict || meta.read_only || perm & 0o6000 != 0 {
            return None;
        }
        if !meta.callbacks.knows_whole(dir) || meta.callbacks.entry(dir, name) != Some(None) {
            return None;
        }
        let delegations = &meta.delegations;
        let ask = match delegations.can_make(dir, who) {
            Some(room) => !room,
            None => delegations.worth_asking(dir),
        };
        if ask {
            let dir_attr = meta.callbacks.attr(dir)?;
            let handle = pb::FileHandle { ino: dir, generation: dir_attr.generation };
            let op = pb::DelegateOp { dir: Some(handle), inodes: cairn_client::delegations::INODES_PER_GRANT };
            let reply = meta.mutate(who, Op::Delegate(op)).await;
            if let Err(e) = &reply {
                tracing::debug!(dir, error = %e, "no delegation");
            }
            delegations.granted(handle, who, reply.ok().and_then(|r| r.delegation).as_ref());
        }
        delegations.wait_for_room(dir).await;
        // The directory as cached now (a grant changes nothing in it).
        let dir_attr = meta.callbacks.attr(dir)?;
        if !meta.callbacks.knows_whole(dir) || meta.callbacks.entry(dir, name) != Some(None) {
            return None;
        }
        let made = delegations.make(&dir_attr, name, perm, who)?;
        meta.callbacks.note_made(&made.dir, name, &made.file);
        Some(made.file)
    }

    /// Removes `name` from `dir` under the directory's delegation, when it names a file made
    /// under it that nothing here holds open: false when the removal must go to meta.
    fn remove_delegated(&self, dir: u64, name: &[u8], who: &pb::Caller) -> bool {
        let meta = &self.client.meta;
        if self.options.strict {
            return false;
        }
        let Some(Some(child)) = meta.callbacks.entry(dir, name) else { return false };
        if !meta.delegations.is_made(child.ino) || self.client.files.is_open(child.ino) || self.may_hold(dir, name) {
            return false;
        }
        let Some(mut dir_attr) = meta.callbacks.attr(dir) else { return false };
        let Some(time) = meta.delegations.defer_unlink(dir, name, child.ino, who) else { return false };
        dir_attr.mtime = Some(time);
        dir_attr.ctime = Some(time);
        meta.callbacks.note_removed(&dir_attr, name, child.ino);
        self.forget_name(dir, name);
        true
    }

    fn file_open_flags(&self, ino: u64, mode: IoMode) -> FopenFlags {
        if mode == IoMode::Direct {
            return FopenFlags::FOPEN_DIRECT_IO;
        }
        // Pages the kernel cached stay only while one promise covered them all along.
        if self.client.meta.callbacks.kernel_pages_current(ino) {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }

    fn remove(&self, req: &Request, parent: INodeNo, name: &OsStr, directory: bool, reply: ReplyEmpty) {
        let who = caller(req.uid(), req.gid(), req.pid());
        if !directory && self.remove_delegated(self.meta_ino(parent), name.as_bytes(), &who) {
            reply.ok();
            return;
        }
        let result = self.runtime.block_on(async {
            let op = pb::UnlinkOp {
                parent: Some(self.handle_of(parent)?),
                name: name.as_bytes().to_vec(),
                directory,
                caller_not_holding: !self.may_hold(self.meta_ino(parent), name.as_bytes()),
            };
            let reply = self.client.meta.mutate(&who, Op::Unlink(op)).await?;
            let removed = self.forget_name(self.meta_ino(parent), name.as_bytes());
            if let (Some(ino), Some(copies)) = (removed, &self.client.copies) {
                // Most often the last link: its copy would only take room (opens keep theirs).
                copies.discard(ino);
            }
            if reply.orphaned
                && let Some(attr) = &reply.attr
            {
                self.note_orphan(attr).await;
            }
            Ok::<_, ClientError>(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }
}

/// A kernel lock request (fcntl types) as a call to meta.
fn lock_call(
    target: pb::FileHandle,
    owner: LockOwner,
    start: u64,
    end: u64,
    typ: i32,
    pid: u32,
) -> Result<cairn_client::locks::LockCall, ClientError> {
    let kind = match typ {
        libc::F_RDLCK => pb::LockKind::LockRead,
        libc::F_WRLCK => pb::LockKind::LockWrite,
        libc::F_UNLCK => pb::LockKind::LockUnlock,
        _ => return Err(ClientError::Errno(errno::EINVAL)),
    };
    if start > end {
        return Err(ClientError::Errno(errno::EINVAL));
    }
    Ok(cairn_client::locks::LockCall { target, owner: owner.0, kind, start, end, pid })
}

/// Makes the kernel forget what a break names: an inode's attributes and cached pages, and the
/// names it holds in a directory.
struct KernelForget {
    io: Arc<KernelIo>,
    client: Arc<Client>,
    runtime: tokio::runtime::Handle,
    inodes: Arc<Mutex<HashMap<u64, KnownInode>>>,
    names: Arc<Mutex<KernelNames>>,
    notifier: Arc<OnceLock<fuser::Notifier>>,
    root_ino: u64,
}

impl KernelCaches for KernelForget {
    fn forget_attributes(&self, inodes: &[u64]) {
        for &ino in inodes {
            self.forget_inode_in_kernel(ino, false);
        }
    }

    fn forget(&self, what: &Forget) {
        let inodes: Vec<u64> = match what {
            Forget::Inodes(inodes) => inodes.clone(),
            Forget::All => self.inodes.lock().expect("inode table poisoned").keys().copied().collect(),
        };
        if let Some(copies) = &self.client.copies {
            // First: a refresh of a shared copy under way must not be taken for current.
            self.io.note_breaks(matches!(what, Forget::Inodes(_)).then_some(&inodes[..]));
            match what {
                Forget::Inodes(_) => inodes.iter().for_each(|&ino| copies.discard(ino)),
                // Opens already reading a copy must stop too: the copies' volume goes down,
                // once what writers have in them and did not commit is out.
                Forget::All => {
                    self.io.revoke();
                    copies.revoke_all();
                }
            }
        }
        for &ino in &inodes {
            self.runtime.block_on(self.client.files.forget_window(ino));
        }
        // Every inode first, then names: a name's invalidation waits for its directory's lock,
        // which the kernel may hold until one of this client's own changes returns.
        for &ino in &inodes {
            self.forget_inode_in_kernel(ino, true);
        }
        if matches!(what, Forget::Inodes(_)) {
            for ino in inodes {
                self.forget_names_in_kernel(ino);
            }
        }
    }
}

impl KernelForget {
    /// Before an open of `ino` the kernel is behind on (see `CairnFs::catch_up_kernel`): the
    /// shared copy and open data map go, and the kernel forgets the inode's attributes. Its
    /// pages go with the open's reply, which does not keep them (this client's cache forgot the
    /// inode); dropping them here could wait for reads that need this very thread.
    fn catch_up(&self, ino: u64) {
        if let Some(copies) = &self.client.copies {
            self.io.note_breaks(Some(&[ino]));
            copies.discard(ino);
        }
        self.runtime.block_on(self.client.files.forget_window(ino));
        self.forget_inode_in_kernel(ino, false);
    }

    /// The kernel forgets `ino`'s attributes, and its cached pages too if `pages`.
    fn forget_inode_in_kernel(&self, ino: u64, pages: bool) {
        let Some(notifier) = self.notifier.get() else { return };
        // Never a panic here: this runs on the callback stream's loop too.
        let known = self.inodes.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&ino);
        // ENOENT: the kernel had already forgotten it.
        if known {
            let _ = notifier.inval_inode(INodeNo(swap_root(ino, self.root_ino)), if pages { 0 } else { -1 }, 0);
        }
    }

    /// The kernel forgets the names the mount gave it in directory `dir`.
    fn forget_names_in_kernel(&self, dir: u64) {
        let Some(notifier) = self.notifier.get() else { return };
        let names = self.names.lock().expect("name cache poisoned").take_dir(dir);
        for name in names {
            let _ = notifier.inval_entry(INodeNo(swap_root(dir, self.root_ino)), OsStr::from_bytes(&name));
        }
    }
}

/// The kernel's root is inode 1. A mount whose root is another directory (a credential's
/// subtree) swaps the two numbers at the kernel boundary; inode 1 itself lies outside such a
/// mount, so the swap never shows it. With the file system's root, the swap changes nothing.
fn swap_root(ino: u64, root: u64) -> u64 {
    const KERNEL_ROOT: u64 = 1;
    if ino == KERNEL_ROOT {
        root
    } else if ino == root {
        KERNEL_ROOT
    } else {
        ino
    }
}
