//! The client's side of callback promises: what it caches about inodes under a promise, the
//! stream to the meta leader that renews the promise lease and carries breaks, and what
//! happens when the lease runs out.
//!
//! Trust rule: cached metadata is used only until `trusted_until`, which is the moment the
//! last confirmed renewal was *sent* plus the promise lease, less a margin. The leader counts
//! the same lease from when it *received* that renewal, so it never stops waiting for this
//! client before this client stops trusting.
//!
//! Race rule: every break (and every loss of trust, and this client's own mutations) moves
//! `epoch`. A read notes the epoch before it asks meta and caches its answer only if the epoch
//! did not move meanwhile: a break that overtook a reply is never undone by that reply. The one
//! exception is a break the reply is known to be newer than: each break names the leader's
//! change that made it, and each promised reply the count of changes the leader had made before
//! it read (`pb::PromisePoint`), so a break for a change the read already saw does not stop the
//! reply from being cached (`settled`). That is the common case of a read that made the leader
//! recall a delegation: the return breaks this client's promise on the directory, and is
//! acknowledged, before the leader reads for the reply.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cairn_proto::{self as pb, callback_down, callback_up};
use lru::LruCache;
use tokio::sync::{Semaphore, mpsc};

use crate::data_maps::{DataMaps, DataWindow};
use crate::meta::MetaConnection;

/// Inodes whose attributes (and names, for directories) are cached at most.
const CACHED_INODES_MAX: usize = 131_072;
/// Names cached per directory at most.
const NAMES_PER_DIR_MAX: usize = 65_536;
/// Extended attributes cached per inode at most, and the largest value cached.
const XATTRS_PER_INODE_MAX: usize = 32;
const XATTR_VALUE_CACHED_MAX: usize = 4096;
/// Search (execute) permission for owner, group and others.
const SEARCHABLE_BY_ALL: u32 = 0o111;
/// Read permission for owner, group and others.
const READABLE_BY_ALL: u32 = 0o444;
/// Inodes one registration message names (the leader takes up to 4,096).
const REGISTER_BATCH: usize = 4096;
/// Breaks whose kernel part runs at once (each may wait for the kernel).
const BREAKS_IN_PARALLEL: usize = 16;
/// Breaks whose kernel part waits or runs, at most: past this the stream is opened again.
const KERNEL_STEPS_MAX: usize = 4096;
/// Messages queued to the leader (two acknowledgements per break, renewals): past this the
/// stream is opened again.
const UP_QUEUE: usize = 2 * KERNEL_STEPS_MAX;
/// Moves of the epoch remembered with the change that made them (see `settled`).
const NUMBERED_MOVES_MAX: usize = 256;

/// A move of the epoch by a break for change `change` of the leader's `term`.
#[derive(Debug, Clone, Copy)]
struct NumberedMove {
    epoch: u64,
    term: u64,
    change: u64,
}

/// What a break or a lapse makes the mount forget.
#[derive(Debug, Clone)]
pub enum Forget {
    /// These inodes changed elsewhere.
    Inodes(Vec<u64>),
    /// The lease ran out: nothing cached can be trusted.
    All,
}

/// How the mount makes the kernel forget what a break names, in two steps (see `run_stream`).
pub trait KernelCaches: Send + Sync {
    /// The kernel forgets these inodes' attributes. This must never wait for a kernel lock or
    /// a request: it runs on the callback stream's loop, before this client says its cache
    /// forgot. A `stat` here then sees a change once the change returns, even on a client the
    /// leader waits for no further (one with a change of its own to the inode in flight).
    fn forget_attributes(&self, inodes: &[u64]);
    /// The kernel forgets all `what` names: attributes, cached pages and names. It runs on a
    /// blocking thread, may wait for kernel locks, and returns only once the kernel forgot.
    fn forget(&self, what: &Forget);
}

/// A name this client itself added to or removed from a directory, as meta answered.
#[derive(Debug, Clone, Copy)]
pub struct OwnEntry<'a> {
    pub name: &'a [u8],
    pub removed: bool,
    /// What the change created under the name, if it created something.
    pub created: Option<pb::FileKind>,
}

/// What a client does when it cannot reach meta and its lease ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PartitionPolicy {
    /// Keep retrying each request until its deadline (60 s unless the mount sets another), then EIO.
    #[default]
    Wait,
    /// Fail each request with EIO at once.
    Eio,
}

#[derive(Default)]
struct CachedInode {
    attr: Option<pb::Attr>,
    /// Name to child inode (0: no such name), in meta's listing order (bytewise).
    names: BTreeMap<Vec<u8>, u64>,
    /// `names` holds every name of this directory: it was made empty here, or listed whole
    /// under one promise, and every change since was this client's own. A name it lacks does
    /// not exist, and the directory can be listed from here.
    complete: bool,
    /// A listing under way: every name up to and including this one is in `names` (the pages
    /// read so far came one after another with no break of the directory between them),
    /// and how many names they held.
    listed_through: Option<(Vec<u8>, usize)>,
    /// Extended attribute name to value, or the errno meta answered (ENODATA, EOPNOTSUPP).
    xattrs: HashMap<Vec<u8>, Result<Vec<u8>, i32>>,
    /// The inode has no extended attributes: meta said so in attributes it promised, or this
    /// client made it. Holds until a break drops the entry (changing one breaks the promise).
    no_xattrs: bool,
    /// The kernel's cached pages of this file were filled under this promise.
    pages_valid: bool,
    /// The mount's whole-file copy of this file was started under this promise, which held
    /// since (this client's own changes, applied to the copy too, carry it over).
    copy_covered: bool,
    /// The serial of the data maps kept of this file under this promise (0: none); see
    /// `crate::data_maps`.
    map_serial: u64,
}

impl CachedInode {
    /// Holds `attr` as the inode's current attributes; another generation is another file.
    fn hold(&mut self, attr: &pb::Attr) {
        if self.attr.is_some_and(|old| old.generation != attr.generation) {
            *self = CachedInode::default();
        }
        // Data maps describe the file as of the attributes they came with.
        if self.attr.is_some_and(|old| (old.size, old.mtime, old.ctime) != (attr.size, attr.mtime, attr.ctime)) {
            self.map_serial = 0;
        }
        self.no_xattrs |= attr.no_xattrs;
        self.attr = Some(*attr);
    }

    /// Records `name` (child inode, 0 for absent). Past the bound a name is not kept, and the
    /// directory is no longer known whole.
    fn set_name(&mut self, name: &[u8], child: u64) {
        if self.names.len() < NAMES_PER_DIR_MAX || self.names.contains_key(name) {
            self.names.insert(name.to_vec(), child);
        } else {
            self.names.remove(name);
            self.complete = false;
            self.listed_through = None;
        }
    }

    /// Takes in one page of a listing that went on from `after` (empty: from the start), whose
    /// names were just recorded. The directory is known whole once pages from the start reach
    /// the end with every name kept.
    fn listed(&mut self, after: &[u8], page: &[pb::DirEntry], eof: bool) {
        let so_far = match &self.listed_through {
            _ if after.is_empty() => Some(0),
            Some((through, count)) if through.as_slice() == after => Some(*count),
            _ => None,
        };
        let kept = page.iter().all(|e| self.names.get(&e.name).is_some_and(|&ino| ino != 0));
        self.listed_through = None;
        let (Some(so_far), true) = (so_far, kept) else { return };
        let count = so_far + page.len();
        if !eof {
            let through = page.last().map_or_else(|| after.to_vec(), |e| e.name.clone());
            self.listed_through = Some((through, count));
            return;
        }
        // A name learned before the listing and missing from it would contradict the promise:
        // such a directory is not taken as whole.
        if self.names.values().filter(|&&ino| ino != 0).count() == count {
            self.complete = true;
        }
    }
}
struct Trust {
    until: Option<Instant>,
    /// `until` passed and everything was forgotten; set again by the next renewal.
    lapsed: bool,
}

pub struct Callbacks {
    cache: Mutex<LruCache<u64, CachedInode>>,
    epoch: AtomicU64,
    /// The latest epoch moves made by numbered breaks; taken only under `cache`, as the
    /// epoch moves only under it.
    numbered_moves: Mutex<VecDeque<NumberedMove>>,
    trust: Mutex<Trust>,
    kernel: OnceLock<Arc<dyn KernelCaches>>,
    pub policy: PartitionPolicy,
    /// Breaks received, for metrics and tests.
    pub breaks: AtomicU64,
    /// Files' data maps kept under their promises (valid per `CachedInode::map_serial`).
    data_maps: DataMaps,
    map_serials: AtomicU64,
    /// Inodes a break made this cache forget and the kernel not yet, with the count of such
    /// breaks (see `kernel_behind`).
    kernel_behind: Mutex<HashMap<u64, u32>>,
    /// Kernel steps of breaks that run at once, and those waiting or running, for the client
    /// as a whole: a stream opened again does not start afresh while the old steps wait.
    kernel_step_permits: Arc<Semaphore>,
    kernel_steps: Arc<AtomicUsize>,
}

impl Callbacks {
    pub fn new(policy: PartitionPolicy) -> Self {
        Callbacks {
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(CACHED_INODES_MAX).expect("non-zero"))),
            epoch: AtomicU64::new(0),
            numbered_moves: Mutex::new(VecDeque::new()),
            trust: Mutex::new(Trust { until: None, lapsed: false }),
            kernel: OnceLock::new(),
            policy,
            breaks: AtomicU64::new(0),
            data_maps: DataMaps::default(),
            map_serials: AtomicU64::new(0),
            kernel_behind: Mutex::new(HashMap::new()),
            kernel_step_permits: Arc::new(Semaphore::new(BREAKS_IN_PARALLEL)),
            kernel_steps: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Sets how the kernel is told to forget (once, by the mount).
    pub fn set_kernel_caches(&self, kernel: Arc<dyn KernelCaches>) {
        let _ = self.kernel.set(kernel);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<u64, CachedInode>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn trust(&self) -> std::sync::MutexGuard<'_, Trust> {
        self.trust.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn numbered_moves(&self) -> std::sync::MutexGuard<'_, VecDeque<NumberedMove>> {
        self.numbered_moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch under which a reply promised at `point`, to a read sent at `epoch`, may be
    /// cached: the current one if every move since `epoch` was a break for a change the read
    /// saw (numbered at most `point.changes` in the same term), else `epoch` itself (so the
    /// reply is cached only if nothing moved).
    pub fn settled(&self, epoch: u64, point: Option<&pb::PromisePoint>) -> u64 {
        let Some(point) = point else { return epoch };
        let _cache = self.cache();
        let now = self.epoch();
        if now == epoch || now - epoch > NUMBERED_MOVES_MAX as u64 {
            return epoch;
        }
        let moves = self.numbered_moves();
        let seen = |e: u64| moves.iter().any(|m| m.epoch == e && m.term == point.term && m.change <= point.changes);
        if (epoch + 1..=now).all(seen) { now } else { epoch }
    }

    /// How long what is cached may still be trusted (zero: not at all).
    pub fn ttl(&self) -> Duration {
        self.trust().until.map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
    }

    pub fn trusted(&self) -> bool {
        !self.ttl().is_zero()
    }

    /// The lease ran out and was not renewed since: with `PartitionPolicy::Eio`, requests to
    /// meta then fail at once.
    pub fn fail_fast(&self) -> bool {
        self.policy == PartitionPolicy::Eio && self.trust().lapsed
    }

    /// Cached attributes of `ino`, while trusted.
    pub fn attr(&self, ino: u64) -> Option<pb::Attr> {
        if !self.trusted() {
            return None;
        }
        self.cache().get(&ino).and_then(|c| c.attr)
    }

    /// A cached name in `parent`: Some(Some(attr)) names a child whose attributes are cached,
    /// Some(None) is known not to exist; None: not cached.
    pub fn entry(&self, parent: u64, name: &[u8]) -> Option<Option<pb::Attr>> {
        if !self.trusted() {
            return None;
        }
        let mut cache = self.cache();
        let dir = cache.get(&parent)?;
        // An answer from here skips meta's check that the caller may search the directory, and
        // the kernel keeps the names it is given for every caller: only a directory anyone may
        // search is answered from here.
        if dir.attr.is_none_or(|a| a.perm & SEARCHABLE_BY_ALL != SEARCHABLE_BY_ALL) {
            return None;
        }
        let child = match dir.names.get(name) {
            Some(&child) => child,
            None if dir.complete => 0,
            None => return None,
        };
        if child == 0 {
            return Some(None);
        }
        cache.get(&child).and_then(|c| c.attr).map(Some)
    }

    /// Caches attributes read under a promise, if nothing was broken since `epoch`.
    pub fn note_attr(&self, attr: &pb::Attr, epoch: u64) {
        let mut cache = self.cache();
        if self.epoch() != epoch {
            return;
        }
        cache.get_or_insert_mut(attr.ino, CachedInode::default).hold(attr);
    }

    /// Caches a name (with its child's attributes, or its absence) read under a promise.
    pub fn note_entry(&self, parent: u64, name: &[u8], child: Option<&pb::Attr>, epoch: u64) {
        let mut cache = self.cache();
        if self.epoch() != epoch {
            return;
        }
        if let Some(attr) = child {
            cache.get_or_insert_mut(attr.ino, CachedInode::default).hold(attr);
        }
        cache.get_or_insert_mut(parent, CachedInode::default).set_name(name, child.map_or(0, |a| a.ino));
    }

    /// Caches one page of `dir`'s listing read under a promise (the names after `after`, to the
    /// end if `eof`), if nothing was broken since `epoch`. Pages read one after another from
    /// the start make the directory known whole: it is listed from here until it changes.
    pub fn note_listing(&self, dir: u64, after: &[u8], page: &[pb::DirEntry], eof: bool, epoch: u64) {
        let mut cache = self.cache();
        if self.epoch() != epoch {
            return;
        }
        for entry in page {
            if let Some(attr) = &entry.attr {
                cache.get_or_insert_mut(attr.ino, CachedInode::default).hold(attr);
            }
        }
        let dir = cache.get_or_insert_mut(dir, CachedInode::default);
        for entry in page {
            dir.set_name(&entry.name, entry.attr.map_or(0, |a| a.ino));
        }
        dir.listed(after, page, eof);
    }

    /// Up to `limit` entries of `dir` after `after`, and whether they reach its end, from a
    /// listing known whole under a promise: None when it is not (or a child's attributes are
    /// no longer cached). Like the kernel's cached listing, this skips meta's check that the
    /// caller may read the directory, so only a directory anyone may read is answered here.
    pub fn listing(&self, dir: u64, after: &[u8], limit: usize) -> Option<(Vec<pb::DirEntry>, bool)> {
        if !self.trusted() {
            return None;
        }
        let mut cache = self.cache();
        let cached = cache.get(&dir)?;
        if !cached.complete || cached.attr.is_none_or(|a| a.perm & READABLE_BY_ALL != READABLE_BY_ALL) {
            return None;
        }
        let from = if after.is_empty() { Bound::Unbounded } else { Bound::Excluded(after) };
        let mut names = cached.names.range::<[u8], _>((from, Bound::Unbounded)).filter(|(_, ino)| **ino != 0);
        let page: Vec<(Vec<u8>, u64)> = names.by_ref().take(limit).map(|(name, ino)| (name.clone(), *ino)).collect();
        let eof = names.next().is_none();
        let mut entries = Vec::with_capacity(page.len());
        for (name, ino) in page {
            let attr = cache.get(&ino)?.attr?;
            entries.push(pb::DirEntry { name, attr: Some(attr) });
        }
        Some((entries, eof))
    }

    /// A cached extended attribute of `target`, or the errno it was answered with.
    pub fn xattr(&self, target: pb::FileHandle, name: &[u8]) -> Option<Result<Vec<u8>, i32>> {
        if !self.trusted() {
            return None;
        }
        let mut cache = self.cache();
        let entry = cache.get(&target.ino)?;
        if entry.attr?.generation != target.generation {
            return None;
        }
        if let Some(answer) = entry.xattrs.get(name) {
            return Some(answer.clone());
        }
        // It has none: any name meta keeps is absent.
        (entry.no_xattrs && pb::xattr_name_errno(name).is_none()).then_some(Err(pb::errno::ENODATA))
    }

    /// Whether the promised cache knows that `target` has no extended attributes.
    pub fn xattrs_none(&self, target: pb::FileHandle) -> bool {
        if !self.trusted() {
            return false;
        }
        let mut cache = self.cache();
        cache.get(&target.ino).is_some_and(|e| e.no_xattrs && e.attr.is_some_and(|a| a.generation == target.generation))
    }

    /// Caches an extended attribute (or meta's errno for it) read under a promise. Only beside
    /// cached attributes: those are what a new leader is told this client holds.
    pub fn note_xattr(&self, target: pb::FileHandle, name: &[u8], answer: Result<&Vec<u8>, i32>, epoch: u64) {
        if answer.is_ok_and(|v| v.len() > XATTR_VALUE_CACHED_MAX) {
            return;
        }
        let mut cache = self.cache();
        if self.epoch() != epoch {
            return;
        }
        let Some(entry) = cache.get_mut(&target.ino) else { return };
        if entry.attr.is_none_or(|a| a.generation != target.generation) {
            return;
        }
        if entry.xattrs.len() < XATTRS_PER_INODE_MAX || entry.xattrs.contains_key(name) {
            entry.xattrs.insert(name.to_vec(), answer.cloned());
        }
    }

    /// This client changed these inodes itself: its own cache of them is dropped (the kernel
    /// updates its own view from the replies). `promised` is the new state of the inodes meta
    /// promised, kept if nothing moved `epoch` since the request was sent; with `entry`, the
    /// second promised is the directory the change named, which keeps its names with this one
    /// change applied.
    pub fn forget_own(&self, inodes: &[u64], promised: &[pb::Attr], entry: Option<OwnEntry<'_>>, epoch: u64) {
        let mut cache = self.cache();
        let unchanged = self.epoch.fetch_add(1, Ordering::SeqCst) == epoch;
        let kept_dir = match (&entry, promised.get(1)) {
            (Some(_), Some(dir)) if unchanged => Some(dir.ino),
            _ => None,
        };
        let mut copies_covered = Vec::new();
        for &ino in inodes {
            if Some(ino) != kept_dir
                && let Some(gone) = cache.pop(&ino)
                && gone.copy_covered
            {
                copies_covered.push((ino, gone.attr.map(|a| a.generation)));
            }
        }
        if !unchanged {
            return;
        }
        for attr in promised {
            let entry = cache.get_or_insert_mut(attr.ino, CachedInode::default);
            entry.hold(attr);
            // No break came between the change and its promised reply: the copy, which the
            // mount changed alike, is still covered.
            entry.copy_covered |= copies_covered.contains(&(attr.ino, Some(attr.generation)));
        }
        let (Some(entry), Some(dir), Some(child)) = (entry, kept_dir, promised.first()) else { return };
        if let Some(dir) = cache.get_mut(&dir) {
            dir.set_name(entry.name, if entry.removed { 0 } else { child.ino });
        }
        if let Some(created) = cache.get_mut(&child.ino).filter(|_| !entry.removed) {
            // A new inode has no extended attributes (what the kernel asks of each write,
            // `security.capability`, needs no request).
            created.no_xattrs |= entry.created.is_some();
            if entry.created == Some(pb::FileKind::Directory) {
                created.complete = true;
            }
        }
    }

    /// This client made file `file` (named `name` in `dir`, shown as `dir_attr` after) under a
    /// delegation: both are cached as the kernel is told, `dir`'s names with `name` added.
    /// Replies to requests in flight meanwhile are not cached (the epoch moves).
    pub fn note_made(&self, dir_attr: &pb::Attr, name: &[u8], file: &pb::Attr) {
        let mut cache = self.cache();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let created = cache.get_or_insert_mut(file.ino, CachedInode::default);
        created.hold(file);
        created.no_xattrs = true;
        Self::note_name(&mut cache, dir_attr, name, file.ino);
    }

    /// This client removed `name` (file `ino`) from `dir` under a delegation.
    pub fn note_removed(&self, dir_attr: &pb::Attr, name: &[u8], ino: u64) {
        let mut cache = self.cache();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        cache.pop(&ino);
        Self::note_name(&mut cache, dir_attr, name, 0);
    }

    /// This client changed a file it made under a delegation (its data).
    pub fn note_changed(&self, attr: &pb::Attr) {
        let mut cache = self.cache();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(entry) = cache.get_mut(&attr.ino) {
            entry.map_serial = 0;
            entry.hold(attr);
        }
    }

    /// This client changed `ino` in a way it cannot apply to what it caches: that is dropped,
    /// and replies in flight are not cached.
    pub fn forget_cached(&self, ino: u64) {
        let mut cache = self.cache();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        cache.pop(&ino);
        self.data_maps.forget(ino);
    }

    fn note_name(cache: &mut LruCache<u64, CachedInode>, dir_attr: &pb::Attr, name: &[u8], child: u64) {
        let Some(dir) = cache.get_mut(&dir_attr.ino) else { return };
        dir.hold(dir_attr);
        dir.set_name(name, child);
    }

    /// Whether every name of directory `dir` is cached (a name missing does not exist).
    pub fn knows_whole(&self, dir: u64) -> bool {
        self.trusted() && self.cache().peek(&dir).is_some_and(|d| d.complete && d.attr.is_some())
    }

    /// Forgets `inodes` here and then in the kernel, on a thread of its own: the caller may be
    /// one a kernel request waits on.
    pub fn forget_later(self: &Arc<Self>, inodes: Vec<u64>) {
        let callbacks = self.clone();
        tokio::task::spawn_blocking(move || callbacks.forget(&Forget::Inodes(inodes)));
    }

    /// Whether the pages the kernel cached of `ino` are current (every one was read under the
    /// promise held now), asked at an open; records for the next open whether pages read from
    /// now on are covered by a promise.
    pub fn kernel_pages_current(&self, ino: u64) -> bool {
        let trusted = self.trusted();
        let mut cache = self.cache();
        match cache.get_mut(&ino) {
            Some(entry) if trusted && entry.attr.is_some() => {
                let keep = entry.pages_valid;
                entry.pages_valid = true;
                keep
            }
            Some(entry) => {
                entry.pages_valid = false;
                false
            }
            None => false,
        }
    }

    /// Records that the mount starts (or brought up to date) a whole-file copy of `ino` under
    /// the promise held now; false if none is.
    pub fn cover_copy(&self, ino: u64) -> bool {
        let trusted = self.trusted();
        match self.cache().peek_mut(&ino) {
            Some(entry) if trusted && entry.attr.is_some() => {
                entry.copy_covered = true;
                true
            }
            _ => false,
        }
    }

    /// Whether the promise `ino`'s whole-file copy was started under still holds.
    pub fn copy_covered(&self, ino: u64) -> bool {
        self.trusted() && self.cache().peek(&ino).is_some_and(|entry| entry.attr.is_some() && entry.copy_covered)
    }

    /// Keeps `window` of file `ino`, fetched with a promise by a request sent at `epoch`, for
    /// later opens: only if nothing moved the epoch since, and the cached attributes are those
    /// the window came with.
    pub fn keep_data_window(&self, ino: u64, window: Arc<DataWindow>, epoch: u64) {
        let mut cache = self.cache();
        if self.epoch() != epoch {
            return;
        }
        let Some(entry) = cache.peek_mut(&ino) else { return };
        if entry.attr.is_none_or(|attr| attr.size != window.size) {
            return;
        }
        if entry.map_serial == 0 {
            entry.map_serial = self.map_serials.fetch_add(1, Ordering::Relaxed) + 1;
        }
        // Under the cache's lock, so that a break, which drops the serial under it, comes
        // wholly before or after.
        self.data_maps.keep(ino, entry.map_serial, window);
    }

    /// A data map of `ino` kept under the promise held now that answers a read of
    /// `offset..end`.
    pub fn data_window(&self, ino: u64, offset: u64, end: u64) -> Option<Arc<DataWindow>> {
        if !self.trusted() {
            return None;
        }
        let cache = self.cache();
        let serial = cache.peek(&ino).filter(|entry| entry.attr.is_some()).map(|entry| entry.map_serial)?;
        if serial == 0 {
            return None;
        }
        self.data_maps.get(ino, serial, offset, end)
    }

    /// Drops the data maps kept of `ino` (a read through one failed).
    pub fn forget_data_windows(&self, ino: u64) {
        let _cache = self.cache();
        self.data_maps.forget(ino);
    }

    /// Bytes of data maps kept, for metrics.
    pub fn data_map_bytes(&self) -> usize {
        self.data_maps.bytes()
    }

    /// Forgets what a break names, in this cache and then in the kernel.
    fn forget(&self, what: &Forget) {
        self.forget_cached_numbered(what, None);
        self.forget_in_kernel(what);
    }

    /// Whether a break made this cache forget `ino` and the kernel has not yet: the kernel may
    /// still hold the inode's old attributes and pages, so an open makes it forget them first.
    /// (The leader waits for the kernel too, unless this client has a change of its own to the
    /// inode in flight: its kernel may hold a lock the invalidation needs until that returns.)
    pub fn kernel_behind(&self, ino: u64) -> bool {
        self.kernel_behind.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&ino)
    }

    fn kernel_behind_on(&self, inodes: &[u64], behind: bool) {
        let mut counts = self.kernel_behind.lock().unwrap_or_else(|p| p.into_inner());
        for &ino in inodes {
            if behind {
                *counts.entry(ino).or_insert(0) += 1;
            } else if let Some(count) = counts.get_mut(&ino) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&ino);
                }
            }
        }
    }

    /// The kernel's part of forgetting (the mount's): it may wait for kernel locks.
    fn forget_in_kernel(&self, what: &Forget) {
        if let Some(kernel) = self.kernel.get() {
            kernel.forget(what);
        }
    }

    /// The kernel forgets the attributes of `inodes`, never waiting (see `KernelCaches`).
    fn forget_attributes_in_kernel(&self, inodes: &[u64]) {
        if let Some(kernel) = self.kernel.get() {
            kernel.forget_attributes(inodes);
        }
    }

    /// Forgets what a break made by change `(term, change)` of the leader (see `settled`)
    /// names, in this cache only: this never waits for the kernel.
    fn forget_cached_numbered(&self, what: &Forget, made_by: Option<(u64, u64)>) {
        {
            let mut cache = self.cache();
            let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some((term, change)) = made_by.filter(|&(_, change)| change > 0) {
                let mut moves = self.numbered_moves();
                if moves.len() == NUMBERED_MOVES_MAX {
                    moves.pop_front();
                }
                moves.push_back(NumberedMove { epoch, term, change });
            }
            match what {
                Forget::Inodes(inodes) => {
                    for ino in inodes {
                        cache.pop(ino);
                        // Never valid again (their serial went with the entry): memory back.
                        self.data_maps.forget(*ino);
                    }
                }
                Forget::All => {
                    cache.clear();
                    self.data_maps.clear();
                }
            }
        }
    }

    /// What to re-register with a new leader: the cached attributes. Names and extended
    /// attributes cached without their inode's attributes cannot be checked by the leader
    /// and are dropped.
    fn cached_attrs(&self) -> Vec<pb::Attr> {
        let mut cache = self.cache();
        let unregistrable: Vec<u64> = cache.iter().filter(|(_, c)| c.attr.is_none()).map(|(ino, _)| *ino).collect();
        for ino in unregistrable {
            cache.pop(&ino);
        }
        cache.iter().filter_map(|(_, c)| c.attr).collect()
    }

    fn renewed(&self, sent: Instant, lease: Duration) {
        let mut trust = self.trust();
        let until = sent + lease - lease / 10;
        trust.until = Some(trust.until.map_or(until, |old| old.max(until)));
        trust.lapsed = false;
    }

    /// Forgets everything once the lease ran out; returns whether it just did.
    fn lapse_if_due(&self) -> bool {
        {
            let mut trust = self.trust();
            if trust.lapsed || trust.until.is_none_or(|until| until > Instant::now()) {
                return false;
            }
            trust.lapsed = true;
            trust.until = None;
        }
        self.forget(&Forget::All);
        true
    }

    /// Keeps a callback stream to the leader, re-registering after every reconnect, until the
    /// returned task is aborted.
    pub fn spawn(self: &Arc<Self>, meta: Arc<MetaConnection>) -> tokio::task::JoinHandle<()> {
        let callbacks = self.clone();
        let watchdog = self.clone();
        tokio::spawn(async move {
            let lapse = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let check = watchdog.clone();
                    let lapsed = tokio::task::spawn_blocking(move || check.lapse_if_due()).await.unwrap_or(false);
                    if lapsed {
                        tracing::warn!("callback lease ran out: cached metadata and data dropped");
                    }
                }
            });
            let _lapse = AbortOnDrop(lapse);
            let mut backoff = Duration::from_millis(10);
            loop {
                match callbacks.run_stream(&meta).await {
                    Ok(()) => backoff = Duration::from_millis(10),
                    Err(e) => tracing::debug!(error = %e, "callback stream failed"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        })
    }

    /// One stream: registers, then renews and handles breaks until it fails.
    async fn run_stream(self: &Arc<Self>, meta: &MetaConnection) -> Result<(), String> {
        let session = meta.session();
        let cached = self.cached_attrs();
        let mut batches: Vec<Vec<pb::Attr>> = cached.chunks(REGISTER_BATCH).map(<[pb::Attr]>::to_vec).collect();
        if batches.is_empty() {
            batches.push(Vec::new());
        }
        let first = batches.remove(0);
        let first_done = batches.is_empty();
        let up_tx = Arc::new(Mutex::new(None::<mpsc::Sender<pb::CallbackUp>>));
        let slot = up_tx.clone();
        let mut inbound = meta
            .call("callbacks", |mut c| {
                let (tx, rx) = mpsc::channel(UP_QUEUE);
                let register =
                    pb::CallbackRegister { session, cached: first.clone(), done: first_done, sends_forgotten: true };
                let _ = tx.try_send(pb::CallbackUp { msg: Some(callback_up::Msg::Register(register)) });
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
                async move { c.callbacks(tokio_stream::wrappers::ReceiverStream::new(rx)).await }
            })
            .await
            .map_err(|e| e.to_string())?;
        let up = up_tx.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or("no outbound stream")?;
        let count = batches.len();
        for (i, cached) in batches.into_iter().enumerate() {
            let register = pb::CallbackRegister { session, cached, done: i + 1 == count, sends_forgotten: true };
            up.send(pb::CallbackUp { msg: Some(callback_up::Msg::Register(register)) })
                .await
                .map_err(|_| "stream closed")?;
        }
        let mut lease = None;
        let mut nonce = 0u64;
        let mut sent: HashMap<u64, Instant> = HashMap::new();
        let mut renew = tokio::time::interval(Duration::from_millis(250));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let message = message.map_err(|e| e.to_string())?.ok_or("stream ended")?;
                    match message.msg {
                        Some(callback_down::Msg::Registered(registered)) => {
                            let period = Duration::from_millis(registered.lease_ms.max(400));
                            lease = Some(period);
                            renew = tokio::time::interval(period / 4);
                            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        Some(callback_down::Msg::Renewed(renewed)) => {
                            if let (Some(at), Some(lease)) = (sent.remove(&renewed.nonce), lease) {
                                self.renewed(at, lease);
                            }
                        }
                        Some(callback_down::Msg::Recall(recall)) => {
                            meta.delegations.recall(recall.dir);
                        }
                        Some(callback_down::Msg::Broken(broken)) => {
                            self.breaks.fetch_add(1, Ordering::Relaxed);
                            // This cache forgets at once, in the order breaks come, then the
                            // kernel's cached attributes (that never waits), and says so: a
                            // writer waits for no more from a client whose own change to the
                            // inode is in flight (see `kernel_behind`). The rest of the kernel's
                            // part (pages, names) runs on a task of its own, as it may wait for
                            // kernel locks: this loop never waits, so the leader always hears.
                            let inodes = broken.inodes;
                            self.kernel_behind_on(&inodes, true);
                            let what = Forget::Inodes(inodes.clone());
                            self.forget_cached_numbered(&what, Some((broken.term, broken.change)));
                            self.forget_attributes_in_kernel(&inodes);
                            let (callbacks, up_ack) = (self.clone(), up.clone());
                            let (permits, steps) = (self.kernel_step_permits.clone(), self.kernel_steps.clone());
                            steps.fetch_add(1, Ordering::SeqCst);
                            tokio::spawn(async move {
                                let permit = permits.acquire_owned().await;
                                let forgot = {
                                    let callbacks = callbacks.clone();
                                    tokio::task::spawn_blocking(move || callbacks.forget_in_kernel(&what)).await
                                };
                                drop(permit);
                                callbacks.kernel_behind_on(&inodes, false);
                                steps.fetch_sub(1, Ordering::SeqCst);
                                if forgot.is_ok() {
                                    let ack = pb::CallbackAck { seq: broken.seq };
                                    let _ = up_ack.send(pb::CallbackUp { msg: Some(callback_up::Msg::Ack(ack)) }).await;
                                }
                            });
                            let forgotten = pb::CallbackForgotten { seq: broken.seq };
                            queue_up(&up, callback_up::Msg::Forgotten(forgotten))?;
                            if self.kernel_steps.load(Ordering::SeqCst) > KERNEL_STEPS_MAX {
                                return Err("breaks backed up in the kernel".into());
                            }
                        }
                        None => {}
                    }
                }
                _ = renew.tick() => {
                    let Some(lease) = lease else { continue };
                    if meta.session() != session {
                        return Err("session changed".into());
                    }
                    // A leader that stopped answering (paused, or cut off behind a silent
                    // connection) is left for another: the stream is opened again.
                    if sent.values().any(|at| at.elapsed() > lease / 2) {
                        return Err("renewals unanswered".into());
                    }
                    nonce += 1;
                    sent.insert(nonce, Instant::now());
                    queue_up(&up, callback_up::Msg::Renew(pb::CallbackRenew { nonce }))?;
                }
            }
        }
    }
}

/// Queues `msg` to the leader without waiting: the stream's loop must go on reading what the
/// leader sends (a leader waiting to send to a client that waits to send to it would hold
/// both). A queue that full means the leader stopped reading: the stream is opened again.
fn queue_up(up: &mpsc::Sender<pb::CallbackUp>, msg: callback_up::Msg) -> Result<(), String> {
    up.try_send(pb::CallbackUp { msg: Some(msg) }).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => "the leader stopped reading the callback stream".to_string(),
        mpsc::error::TrySendError::Closed(_) => "stream closed".to_string(),
    })
}

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel asks of each write to a file (whether to drop its capabilities).
    const SECURITY_CAPABILITY: &[u8] = b"security.capability";

    fn attr(ino: u64) -> pb::Attr {
        pb::Attr { ino, generation: 1, size: ino, perm: 0o755, ..Default::default() }
    }

    fn trusting() -> Callbacks {
        let callbacks = Callbacks::new(PartitionPolicy::Wait);
        callbacks.renewed(Instant::now(), Duration::from_secs(30));
        callbacks
    }

    #[test]
    fn answers_come_from_the_cache_only_while_trusted() {
        let callbacks = Callbacks::new(PartitionPolicy::Wait);
        let epoch = callbacks.epoch();
        callbacks.note_attr(&attr(1), epoch);
        callbacks.note_entry(1, b"a", Some(&attr(2)), epoch);
        assert_eq!(callbacks.attr(2), None, "never renewed: nothing is trusted");
        callbacks.renewed(Instant::now(), Duration::from_secs(30));
        assert_eq!(callbacks.attr(2), Some(attr(2)));
        assert_eq!(callbacks.entry(1, b"a"), Some(Some(attr(2))));
        assert_eq!(callbacks.entry(1, b"b"), None);
    }

    #[test]
    fn a_break_during_a_read_keeps_its_answer_out_of_the_cache() {
        let callbacks = trusting();
        let epoch = callbacks.epoch();
        callbacks.forget(&Forget::Inodes(vec![7]));
        callbacks.note_attr(&attr(2), epoch);
        callbacks.note_entry(1, b"x", None, epoch);
        assert_eq!(callbacks.attr(2), None);
        assert_eq!(callbacks.entry(1, b"x"), None);
        let epoch = callbacks.epoch();
        callbacks.note_attr(&attr(1), epoch);
        callbacks.note_entry(1, b"x", None, epoch);
        assert_eq!(callbacks.entry(1, b"x"), Some(None));
    }

    #[test]
    fn a_break_for_a_change_the_read_already_saw_does_not_keep_its_answer_out() {
        let callbacks = trusting();
        let point = |term, changes| Some(pb::PromisePoint { term, changes });
        // Changes 4 and 5 of term 2 broke promises while the read was out; it read after 5.
        let epoch = callbacks.epoch();
        callbacks.forget_cached_numbered(&Forget::Inodes(vec![7]), Some((2, 4)));
        callbacks.forget_cached_numbered(&Forget::Inodes(vec![2]), Some((2, 5)));
        let settled = callbacks.settled(epoch, point(2, 5).as_ref());
        assert_eq!(settled, callbacks.epoch());
        callbacks.note_attr(&attr(2), settled);
        assert_eq!(callbacks.attr(2), Some(attr(2)));
        // A read that began before change 5 may predate it.
        assert_eq!(callbacks.settled(epoch, point(2, 4).as_ref()), epoch);
        // Another term counts changes afresh; a reply without a point says nothing.
        assert_eq!(callbacks.settled(epoch, point(3, 9).as_ref()), epoch);
        assert_eq!(callbacks.settled(epoch, None), epoch);
        // A move that no counted change made (a lapse, this client's own change, a break of a
        // re-registered inode) always keeps the answer out.
        let epoch = callbacks.epoch();
        callbacks.forget_cached_numbered(&Forget::Inodes(vec![7]), Some((2, 0)));
        assert_eq!(callbacks.settled(epoch, point(2, 9).as_ref()), epoch);
        let epoch = callbacks.epoch();
        callbacks.forget(&Forget::Inodes(vec![7]));
        assert_eq!(callbacks.settled(epoch, point(2, 9).as_ref()), epoch);
        let epoch = callbacks.epoch();
        callbacks.note_changed(&attr(3));
        assert_eq!(callbacks.settled(epoch, point(2, 9).as_ref()), epoch);
        // Too many moves to check: kept out.
        let epoch = callbacks.epoch();
        for change in 1..=NUMBERED_MOVES_MAX as u64 + 1 {
            callbacks.forget_cached_numbered(&Forget::Inodes(vec![7]), Some((2, change)));
        }
        assert_eq!(callbacks.settled(epoch, point(2, 1000).as_ref()), epoch);
    }

    #[test]
    fn a_break_drops_the_inode_and_its_names() {
        let callbacks = trusting();
        let epoch = callbacks.epoch();
        callbacks.note_attr(&attr(1), epoch);
        callbacks.note_entry(1, b"a", Some(&attr(2)), epoch);
        callbacks.forget(&Forget::Inodes(vec![1]));
        assert_eq!(callbacks.entry(1, b"a"), None);
        assert_eq!(callbacks.attr(2), Some(attr(2)));
    }

    #[test]
    fn extended_attributes_are_cached_beside_attributes_and_dropped_with_them() {
        let callbacks = trusting();
        let handle = pb::FileHandle { ino: 4, generation: 1 };
        let value = b"v".to_vec();
        callbacks.note_xattr(handle, b"user.a", Ok(&value), callbacks.epoch());
        assert_eq!(callbacks.xattr(handle, b"user.a"), None, "no attributes cached: not kept");
        callbacks.note_attr(&attr(4), callbacks.epoch());
        callbacks.note_xattr(handle, b"user.a", Ok(&value), callbacks.epoch());
        callbacks.note_xattr(handle, b"user.b", Err(pb::errno::ENODATA), callbacks.epoch());
        assert_eq!(callbacks.xattr(handle, b"user.a"), Some(Ok(value)));
        assert_eq!(callbacks.xattr(handle, b"user.b"), Some(Err(pb::errno::ENODATA)));
        assert_eq!(callbacks.xattr(pb::FileHandle { ino: 4, generation: 2 }, b"user.a"), None);
        callbacks.forget_own(&[4], &[], None, callbacks.epoch());
        assert_eq!(callbacks.xattr(handle, b"user.a"), None);
    }

    #[test]
    fn an_inode_meta_found_without_extended_attributes_answers_every_name_absent() {
        let callbacks = trusting();
        let handle = pb::FileHandle { ino: 5, generation: 1 };
        callbacks.note_entry(1, b"f", Some(&pb::Attr { no_xattrs: true, ..attr(5) }), callbacks.epoch());
        assert_eq!(callbacks.xattr(handle, b"security.capability"), Some(Err(pb::errno::ENODATA)));
        assert_eq!(callbacks.xattr(handle, b"user.anything"), Some(Err(pb::errno::ENODATA)));
        assert!(callbacks.xattrs_none(handle));
        // Names meta refuses (unknown namespace, empty, too long) are not the cache's to answer:
        // the client refuses them before it looks.
        assert_eq!(callbacks.xattr(handle, b"system.posix_acl_access"), None);
        assert_eq!(callbacks.xattr(handle, b"user."), None);
        assert_eq!(callbacks.xattr(handle, &[b'u'; 300]), None);
        // Later attributes (an open's, a read's) do not say, and change nothing: a change of
        // extended attributes would have broken the promise and dropped the inode.
        callbacks.note_attr(&attr(5), callbacks.epoch());
        assert_eq!(callbacks.xattr(handle, b"user.a"), Some(Err(pb::errno::ENODATA)));
        callbacks.forget(&Forget::Inodes(vec![5]));
        assert_eq!(callbacks.xattr(handle, b"user.a"), None);
        // Another generation is another file.
        callbacks.note_attr(&pb::Attr { no_xattrs: true, ..attr(5) }, callbacks.epoch());
        callbacks.note_attr(&pb::Attr { generation: 2, ..attr(5) }, callbacks.epoch());
        assert_eq!(callbacks.xattr(pb::FileHandle { ino: 5, generation: 2 }, b"user.a"), None);
        assert!(!callbacks.xattrs_none(pb::FileHandle { ino: 5, generation: 2 }));
        // Not trusted once the lease runs out.
        let callbacks = Callbacks::new(PartitionPolicy::Wait);
        callbacks.note_attr(&pb::Attr { no_xattrs: true, ..attr(5) }, callbacks.epoch());
        assert_eq!(callbacks.xattr(handle, b"user.a"), None);
        assert!(!callbacks.xattrs_none(handle));
    }

    #[test]
    fn a_promised_change_keeps_the_directory_with_the_change_applied() {
        let callbacks = trusting();
        let dir = attr(1);
        callbacks.note_attr(&dir, callbacks.epoch());
        callbacks.note_entry(1, b"old", Some(&attr(2)), callbacks.epoch());
        let made = OwnEntry { name: b"new", removed: false, created: Some(pb::FileKind::Regular) };
        callbacks.forget_own(&[1, 5], &[attr(5), dir], Some(made), callbacks.epoch());
        assert_eq!(callbacks.attr(5), Some(attr(5)));
        assert_eq!(callbacks.attr(1), Some(dir));
        assert_eq!(callbacks.entry(1, b"new"), Some(Some(attr(5))));
        assert_eq!(callbacks.entry(1, b"old"), Some(Some(attr(2))));
        assert_eq!(callbacks.entry(1, b"other"), None, "not known complete: ask meta");
        let created = pb::FileHandle { ino: 5, generation: 1 };
        assert_eq!(callbacks.xattr(created, SECURITY_CAPABILITY), Some(Err(pb::errno::ENODATA)));
        let gone = OwnEntry { name: b"old", removed: true, created: None };
        callbacks.forget_own(&[1, 2], &[attr(2), dir], Some(gone), callbacks.epoch());
        assert_eq!(callbacks.entry(1, b"old"), Some(None));
        // Without the directory promised, it is dropped.
        callbacks.forget_own(&[1, 6], &[attr(6)], Some(made), callbacks.epoch());
        assert_eq!(callbacks.attr(1), None);
        // A change that raced with a break keeps nothing.
        callbacks.note_attr(&dir, callbacks.epoch());
        let epoch = callbacks.epoch();
        callbacks.forget(&Forget::Inodes(vec![9]));
        callbacks.forget_own(&[1, 7], &[attr(7), dir], Some(made), epoch);
        assert_eq!(callbacks.attr(7), None);
        assert_eq!(callbacks.attr(1), None);
    }

    #[test]
    fn names_of_a_directory_not_everyone_may_search_are_asked_of_meta() {
        let callbacks = trusting();
        let private = pb::Attr { perm: 0o710, ..attr(1) };
        callbacks.note_attr(&private, callbacks.epoch());
        callbacks.note_entry(1, b"a", Some(&attr(2)), callbacks.epoch());
        assert_eq!(callbacks.entry(1, b"a"), None);
        callbacks.note_attr(&attr(1), callbacks.epoch());
        assert_eq!(callbacks.entry(1, b"a"), Some(Some(attr(2))));
    }

    #[test]
    fn a_directory_made_here_answers_absent_names_until_it_changes_elsewhere() {
        let callbacks = trusting();
        let parent = attr(1);
        callbacks.note_attr(&parent, callbacks.epoch());
        let made = OwnEntry { name: b"d", removed: false, created: Some(pb::FileKind::Directory) };
        callbacks.forget_own(&[1, 3], &[attr(3), parent], Some(made), callbacks.epoch());
        assert_eq!(callbacks.entry(3, b"x"), Some(None));
        let file = OwnEntry { name: b"x", removed: false, created: Some(pb::FileKind::Regular) };
        callbacks.forget_own(&[3, 4], &[attr(4), attr(3)], Some(file), callbacks.epoch());
        assert_eq!(callbacks.entry(3, b"x"), Some(Some(attr(4))));
        assert_eq!(callbacks.entry(3, b"y"), Some(None));
        callbacks.forget(&Forget::Inodes(vec![3]));
        assert_eq!(callbacks.entry(3, b"y"), None);
    }

    fn entries(inos: std::ops::Range<u64>) -> Vec<pb::DirEntry> {
        inos.map(|ino| pb::DirEntry { name: format!("n{ino:03}").into_bytes(), attr: Some(attr(ino)) }).collect()
    }

    fn names(page: &[pb::DirEntry]) -> Vec<&[u8]> {
        page.iter().map(|e| e.name.as_slice()).collect()
    }

    #[test]
    fn a_directory_listed_whole_is_listed_from_the_cache_until_it_changes() {
        let callbacks = trusting();
        callbacks.note_attr(&attr(1), callbacks.epoch());
        let (first, second) = (entries(10..20), entries(20..25));
        callbacks.note_listing(1, b"", &first, false, callbacks.epoch());
        assert_eq!(callbacks.listing(1, b"", 100), None, "half listed");
        // A lookup between the pages changes nothing.
        callbacks.note_entry(1, b"n012", Some(&attr(12)), callbacks.epoch());
        callbacks.note_listing(1, b"n019", &second, true, callbacks.epoch());
        let (page, eof) = callbacks.listing(1, b"", 8).unwrap();
        assert_eq!((names(&page), eof), (names(&first[..8]), false));
        let (page, eof) = callbacks.listing(1, b"n017", 8).unwrap();
        assert_eq!((page, eof), ([&first[8..], &second[..]].concat(), true));
        assert_eq!(callbacks.listing(1, b"n024", 8), Some((Vec::new(), true)));
        // A name the whole listing lacks does not exist.
        assert_eq!(callbacks.entry(1, b"n999"), Some(None));
        // This client's own change is applied to it.
        let gone = OwnEntry { name: b"n010", removed: true, created: None };
        callbacks.forget_own(&[1, 10], &[attr(10), attr(1)], Some(gone), callbacks.epoch());
        assert_eq!(names(&callbacks.listing(1, b"", 1).unwrap().0), vec![b"n011".as_slice()]);
        // A child whose promise broke: listed by meta again.
        callbacks.forget(&Forget::Inodes(vec![21]));
        assert_eq!(callbacks.listing(1, b"", 100), None);
        assert_eq!(callbacks.listing(1, b"n022", 100).map(|(page, _)| page.len()), Some(2));
        // The directory's own promise broke: nothing of it is left.
        callbacks.forget(&Forget::Inodes(vec![1]));
        assert_eq!(callbacks.listing(1, b"n022", 100), None);
        assert_eq!(callbacks.entry(1, b"n999"), None);
    }

    #[test]
    fn pages_that_do_not_follow_one_another_under_one_promise_do_not_make_a_directory_whole() {
        let callbacks = trusting();
        callbacks.note_attr(&attr(1), callbacks.epoch());
        // A page that does not start where the last one ended.
        callbacks.note_listing(1, b"", &entries(10..20), false, callbacks.epoch());
        callbacks.note_listing(1, b"n018", &entries(19..25), true, callbacks.epoch());
        assert_eq!(callbacks.listing(1, b"", 100), None);
        // A break of the directory between two pages cuts the chain.
        callbacks.note_listing(1, b"", &entries(10..20), false, callbacks.epoch());
        callbacks.forget(&Forget::Inodes(vec![1]));
        callbacks.note_attr(&attr(1), callbacks.epoch());
        callbacks.note_listing(1, b"n019", &entries(20..25), true, callbacks.epoch());
        assert_eq!(callbacks.listing(1, b"", 100), None, "the chain was cut");
        // A break elsewhere while a page was out keeps that page out; read again, it counts.
        callbacks.note_listing(1, b"", &entries(10..20), false, callbacks.epoch());
        let epoch = callbacks.epoch();
        callbacks.forget(&Forget::Inodes(vec![99]));
        callbacks.note_listing(1, b"n019", &entries(20..25), true, epoch);
        assert_eq!(callbacks.listing(1, b"", 100), None);
        callbacks.note_listing(1, b"n019", &entries(20..25), true, callbacks.epoch());
        assert_eq!(callbacks.listing(1, b"", 100).map(|(page, _)| page.len()), Some(15));
        callbacks.forget(&Forget::Inodes(vec![1]));
        callbacks.note_attr(&attr(1), callbacks.epoch());
        // A name known before that the listing lacks contradicts it.
        callbacks.note_entry(1, b"stray", Some(&attr(50)), callbacks.epoch());
        callbacks.note_listing(1, b"", &entries(10..25), true, callbacks.epoch());
        assert_eq!(callbacks.listing(1, b"", 100), None);
        // One whole page from the start is enough.
        callbacks.forget(&Forget::Inodes(vec![1]));
        callbacks.note_attr(&attr(1), callbacks.epoch());
        callbacks.note_listing(1, b"", &entries(10..25), true, callbacks.epoch());
        assert_eq!(callbacks.listing(1, b"", 100).map(|(page, eof)| (page.len(), eof)), Some((15, true)));
        // An empty directory too.
        callbacks.note_attr(&attr(2), callbacks.epoch());
        callbacks.note_listing(2, b"", &[], true, callbacks.epoch());
        assert_eq!(callbacks.listing(2, b"", 100), Some((Vec::new(), true)));
    }

    #[test]
    fn only_a_directory_anyone_may_read_is_listed_from_the_cache() {
        let callbacks = trusting();
        callbacks.note_attr(&pb::Attr { perm: 0o711, ..attr(1) }, callbacks.epoch());
        callbacks.note_listing(1, b"", &entries(10..12), true, callbacks.epoch());
        assert_eq!(callbacks.listing(1, b"", 100), None);
        callbacks.note_attr(&attr(1), callbacks.epoch());
        assert!(callbacks.listing(1, b"", 100).is_some());
        let untrusted = Callbacks::new(PartitionPolicy::Wait);
        untrusted.note_attr(&attr(1), untrusted.epoch());
        untrusted.note_listing(1, b"", &entries(10..12), true, untrusted.epoch());
        assert_eq!(untrusted.listing(1, b"", 100), None, "never renewed");
    }

    #[test]
    fn re_registration_drops_what_the_leader_could_not_check() {
        let callbacks = trusting();
        callbacks.note_entry(1, b"a", Some(&attr(2)), callbacks.epoch());
        assert_eq!(callbacks.cached_attrs(), vec![attr(2)]);
        assert_eq!(callbacks.entry(1, b"a"), None, "directory 1's attributes were not cached");
    }

    #[test]
    fn pages_are_kept_only_from_the_second_open_under_one_promise() {
        let callbacks = trusting();
        callbacks.note_attr(&attr(3), callbacks.epoch());
        assert!(!callbacks.kernel_pages_current(3));
        assert!(callbacks.kernel_pages_current(3));
        callbacks.forget(&Forget::Inodes(vec![3]));
        callbacks.note_attr(&attr(3), callbacks.epoch());
        assert!(!callbacks.kernel_pages_current(3));
    }

    #[test]
    fn a_lapsed_lease_forgets_everything_once() {
        let callbacks = Callbacks::new(PartitionPolicy::Wait);
        callbacks.renewed(Instant::now() - Duration::from_secs(60), Duration::from_secs(30));
        callbacks.note_attr(&attr(2), callbacks.epoch());
        assert!(callbacks.lapse_if_due());
        assert!(!callbacks.lapse_if_due());
        callbacks.renewed(Instant::now(), Duration::from_secs(30));
        assert_eq!(callbacks.attr(2), None);
    }
}
