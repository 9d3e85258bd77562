//! Create delegations, the client's side. A client that creates files one after another in a
//! directory it knows whole asks meta for the directory's delegation: meta reserves inode
//! numbers for it and recalls the delegation before any other session may read or change the
//! directory. While it holds it, the client creates regular files there, writes their small
//! data and removes them again on its own, answering the kernel at once, and sends what it did
//! in the background, in batches of up to `BATCH_ENTRIES_MAX` (each batch one Raft entry).
//!
//! What this keeps: everything in order (any other request to meta first waits until every
//! batch is applied, `settle`), close-to-open across clients (another client's request naming
//! the directory waits for the recall, which sends the batch first), and `fsync` (of a file or
//! the directory) returns once the batches are durable. What it changes: a file closed here is
//! durable a few milliseconds later rather than at `close()`, as on a local file system; if this
//! client dies (or is cut off past its lease) with a batch unsent, that batch is lost, and the
//! next `fsync` here reports `EIO`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_proto::{self as pb, mutate_request::Op};
use tokio::sync::Notify;

use crate::error::ClientError;
use crate::meta::MetaConnection;

/// Inode numbers asked for per grant.
pub const INODES_PER_GRANT: u32 = 16_384;
/// Entries sent in one batch at most (meta takes up to 4,096).
const BATCH_ENTRIES_MAX: usize = 1024;
/// Inline bytes sent in one batch at most (a message is at most 8 MiB).
const BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Entries waiting per directory at most; past that, changes go to meta one by one.
const PENDING_ENTRIES_MAX: usize = 4096;
/// Files remembered as made under one delegation (their later changes may be batched too).
const MADE_MAX: usize = 65_536;
/// A directory whose delegation was refused or recalled is not asked for again before this.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(5);
/// A delegation is asked for at the second create in a directory within this time.
const CREATES_CLOSE: Duration = Duration::from_secs(1);
/// Directories tracked for `CREATES_CLOSE` and `ASK_AGAIN_AFTER` at most.
const TRACKED_DIRS_MAX: usize = 4096;

/// The caller a delegation was granted for: files are made for it alone (another caller's
/// creates go to meta, which applies its own identity and permissions).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claimed {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Claimed {
    fn of(caller: &pb::Caller) -> Self {
        Claimed { uid: caller.uid, gid: caller.gid, groups: caller.groups.clone() }
    }
}

struct Held {
    dir: pb::FileHandle,
    claimed: Claimed,
    caller: pb::Caller,
    /// Identity meta applies (the credential's): owner and group of the files.
    effective: pb::Caller,
    first_ino: u64,
    next_ino: u64,
    end_ino: u64,
    first_generation: u64,
    /// Files made under this delegation (and not changed through meta since).
    made: HashSet<u64>,
    pending: Vec<pb::DelegatedEntry>,
    pending_bytes: usize,
    /// Meta asked for it back: nothing more is made under it, and the next batch returns it.
    recalled: bool,
}

impl Held {
    fn has_room(&self) -> bool {
        self.pending.len() < PENDING_ENTRIES_MAX && !self.recalled
    }

    /// Room for a file and the commit of its data.
    fn has_room_for_file(&self) -> bool {
        self.pending.len() + 2 <= PENDING_ENTRIES_MAX && !self.recalled
    }
}

#[derive(Default)]
struct State {
    held: HashMap<u64, Held>,
    /// Directories not to ask for before the instant.
    not_before: HashMap<u64, Instant>,
    /// The last create this client sent to meta in each directory.
    last_create: HashMap<u64, Instant>,
    /// Batches being sent.
    sending: usize,
    /// Recalled directories this client does not hold (a grant whose answer it never got):
    /// an empty batch returns each.
    returns: Vec<u64>,
}

/// The attributes of a file made under a delegation and its directory after the change.
pub struct Made {
    pub file: pb::Attr,
    pub dir: pb::Attr,
}

pub struct Delegations {
    state: Mutex<State>,
    /// Wakes the sender.
    wake: Notify,
    /// Signalled whenever a batch was answered (or given up).
    sent: Notify,
    /// Changes meta refused or that were lost since the last `fsync` reported it.
    lost: AtomicBool,
    /// Changes lost in all (metrics).
    pub lost_total: AtomicU64,
    /// Entries and batches sent (metrics).
    pub entries_sent: AtomicU64,
    pub batches_sent: AtomicU64,
}

impl Default for Delegations {
    fn default() -> Self {
        Delegations {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            sent: Notify::new(),
            lost: AtomicBool::new(false),
            lost_total: AtomicU64::new(0),
            entries_sent: AtomicU64::new(0),
            batches_sent: AtomicU64::new(0),
        }
    }
}

/// The time now, as a timestamp.
pub fn now() -> pb::Timestamp {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    pb::Timestamp { sec: since.as_secs() as i64, nsec: since.subsec_nanos() }
}

impl Delegations {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a create in `dir` by `caller` should ask for the directory's delegation first:
    /// this is the second create there within `CREATES_CLOSE`, and it was not refused or
    /// recalled lately.
    pub fn worth_asking(&self, dir: u64) -> bool {
        let mut state = self.state();
        if state.held.contains_key(&dir) {
            return false;
        }
        let now = Instant::now();
        if state.not_before.get(&dir).is_some_and(|t| *t > now) {
            return false;
        }
        if state.last_create.len() >= TRACKED_DIRS_MAX {
            state.last_create.clear();
        }
        state.last_create.insert(dir, now).is_some_and(|t| now.duration_since(t) < CREATES_CLOSE)
    }

    /// Records meta's answer to a request for `dir`'s delegation.
    pub fn granted(&self, dir: pb::FileHandle, caller: &pb::Caller, grant: Option<&pb::Delegation>) {
        let mut state = self.state();
        let Some(grant) = grant.filter(|g| g.count > 0) else {
            Self::ask_later(&mut state, dir.ino);
            return;
        };
        let held = Held {
            dir,
            claimed: Claimed::of(caller),
            caller: caller.clone(),
            effective: grant.caller.clone().unwrap_or_else(|| caller.clone()),
            first_ino: grant.first_ino,
            next_ino: grant.first_ino,
            end_ino: grant.first_ino + u64::from(grant.count),
            first_generation: grant.first_generation,
            made: HashSet::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            recalled: false,
        };
        match state.held.get_mut(&dir.ino) {
            // A fresh range for a delegation held already: what was made stays made.
            Some(old) if old.claimed == held.claimed && !old.recalled => {
                old.first_ino = held.first_ino;
                old.next_ino = held.next_ino;
                old.end_ino = held.end_ino;
                old.first_generation = held.first_generation;
            }
            Some(_) => {}
            None => {
                state.held.insert(dir.ino, held);
            }
        }
    }

    fn ask_later(state: &mut State, dir: u64) {
        if state.not_before.len() >= TRACKED_DIRS_MAX {
            let now = Instant::now();
            state.not_before.retain(|_, t| *t > now);
        }
        state.not_before.insert(dir, Instant::now() + ASK_AGAIN_AFTER);
    }

    /// Whether `dir` is held for `caller` and can take another file, or needs a fresh range
    /// (`Some(false)`); None when it is not held for this caller.
    pub fn can_make(&self, dir: u64, caller: &pb::Caller) -> Option<bool> {
        let state = self.state();
        let held = state.held.get(&dir).filter(|h| h.claimed == Claimed::of(caller) && h.has_room())?;
        Some(held.next_ino < held.end_ino)
    }

    /// Waits while `dir` is held with no room for another file: the sender makes room as
    /// meta applies batches (so a long run of creates goes at the pace meta applies them).
    pub async fn wait_for_room(&self, dir: u64) {
        loop {
            let sent = self.sent.notified();
            tokio::pin!(sent);
            sent.as_mut().enable();
            match self.state().held.get(&dir) {
                Some(held) if !held.recalled && !held.has_room_for_file() => {}
                _ => return,
            }
            self.wake.notify_one();
            sent.await;
        }
    }

    /// Makes regular file `name` in `dir` (whose current attributes are `dir_attr`) for
    /// `caller`, under the delegation: None when it is not held for this caller, is out of
    /// numbers or has too much waiting.
    pub fn make(&self, dir_attr: &pb::Attr, name: &[u8], perm: u32, caller: &pb::Caller) -> Option<Made> {
        let mut state = self.state();
        let held =
            state.held.get_mut(&dir_attr.ino).filter(|h| h.claimed == Claimed::of(caller) && h.has_room_for_file())?;
        if held.next_ino >= held.end_ino || held.made.len() >= MADE_MAX || dir_attr.generation != held.dir.generation {
            return None;
        }
        let ino = held.next_ino;
        held.next_ino += 1;
        let time = now();
        let perm = perm & 0o1777;
        let gid = if dir_attr.perm & 0o2000 != 0 { dir_attr.gid } else { held.effective.gid };
        let file = pb::Attr {
            ino,
            generation: held.first_generation + (ino - held.first_ino),
            kind: pb::FileKind::Regular as i32,
            perm,
            uid: held.effective.uid,
            gid,
            nlink: 1,
            size: 0,
            atime: Some(time),
            mtime: Some(time),
            ctime: Some(time),
            btime: Some(time),
            rdev: 0,
            allocated: 0,
            no_xattrs: true,
        };
        let mut dir = *dir_attr;
        dir.mtime = Some(time);
        dir.ctime = Some(time);
        held.made.insert(ino);
        let create = pb::DelegatedCreate { name: name.to_vec(), ino, perm };
        held.pending.push(pb::DelegatedEntry { time: Some(time), op: Some(pb::delegated_entry::Op::Create(create)) });
        drop(state);
        self.wake.notify_one();
        Some(Made { file, dir })
    }

    /// Queues a commit of inline data to a file made under a delegation, and returns its time:
    /// None when it is not one (or the commit needs meta: blocks, a lock token).
    pub fn defer_commit(&self, commit: &pb::CommitOp, caller: &pb::Caller) -> Option<pb::Timestamp> {
        let ino = commit.target.map(|h| h.ino).unwrap_or_default();
        if commit.lock_token != 0 || commit.extents.iter().any(|e| e.block.is_some()) {
            return None;
        }
        let bytes: usize = commit.extents.iter().map(|e| e.inline_data.len()).sum();
        let mut state = self.state();
        let held = state
            .held
            .values_mut()
            .find(|h| h.made.contains(&ino) && h.claimed == Claimed::of(caller) && h.has_room())?;
        if held.pending_bytes + bytes > BATCH_BYTES_MAX {
            return None;
        }
        let time = now();
        held.pending_bytes += bytes;
        held.pending
            .push(pb::DelegatedEntry { time: Some(time), op: Some(pb::delegated_entry::Op::Commit(commit.clone())) });
        drop(state);
        self.wake.notify_one();
        Some(time)
    }

    /// Queues the removal of `name` (file `ino`) from `dir`: false unless the file was made
    /// under the delegation.
    pub fn defer_unlink(&self, dir: u64, name: &[u8], ino: u64, caller: &pb::Caller) -> Option<pb::Timestamp> {
        let mut state = self.state();
        let held = state.held.get_mut(&dir).filter(|h| h.claimed == Claimed::of(caller) && h.has_room())?;
        if !held.made.remove(&ino) {
            return None;
        }
        let time = now();
        let unlink =
            pb::UnlinkOp { parent: Some(held.dir), name: name.to_vec(), directory: false, caller_not_holding: true };
        held.pending.push(pb::DelegatedEntry { time: Some(time), op: Some(pb::delegated_entry::Op::Unlink(unlink)) });
        drop(state);
        self.wake.notify_one();
        Some(time)
    }

    /// A change made through meta touched `ino`: its later changes go to meta too.
    pub fn forget_made(&self, ino: u64) {
        let mut state = self.state();
        for held in state.held.values_mut() {
            held.made.remove(&ino);
        }
    }

    /// Whether `ino` was made here under a delegation and may not be known to meta yet.
    pub fn is_made(&self, ino: u64) -> bool {
        self.state().held.values().any(|h| h.made.contains(&ino))
    }

    /// Meta asked for `dir` back.
    pub fn recall(&self, dir: u64) {
        {
            let mut state = self.state();
            let state = &mut *state;
            match state.held.get_mut(&dir) {
                Some(held) => held.recalled = true,
                None if state.returns.len() < TRACKED_DIRS_MAX && !state.returns.contains(&dir) => {
                    state.returns.push(dir)
                }
                None => {}
            }
            Self::ask_later(state, dir);
        }
        self.wake.notify_one();
    }

    fn idle(&self) -> bool {
        let state = self.state();
        state.sending == 0
            && state.returns.is_empty()
            && state.held.values().all(|h| h.pending.is_empty() && !h.recalled)
    }

    /// Waits until everything made under delegations reached meta (or was given up).
    pub async fn settle(&self) {
        loop {
            let sent = self.sent.notified();
            tokio::pin!(sent);
            sent.as_mut().enable();
            if self.idle() {
                return;
            }
            self.wake.notify_one();
            sent.await;
        }
    }

    /// Whether changes were lost since the last call (which `fsync` reports as `EIO`).
    pub fn take_lost(&self) -> bool {
        self.lost.swap(false, Ordering::SeqCst)
    }

    /// The next batch to send: a directory with entries waiting or recalled.
    fn next_batch(&self) -> Option<(pb::Caller, pb::DelegatedBatchOp, Vec<u64>)> {
        let mut state = self.state();
        if let Some(dir) = state.returns.pop() {
            state.sending += 1;
            // Meta finds the delegation by the number; the generation is not checked.
            let dir = pb::FileHandle { ino: dir, generation: 0 };
            let batch = pb::DelegatedBatchOp { dir: Some(dir), entries: Vec::new(), release: true };
            return Some((pb::Caller::default(), batch, Vec::new()));
        }
        let dir = *state.held.iter().find(|(_, h)| !h.pending.is_empty() || h.recalled)?.0;
        let held = state.held.get_mut(&dir)?;
        let take = held.pending.len().min(BATCH_ENTRIES_MAX);
        let mut bytes = 0;
        let mut count = 0;
        for entry in &held.pending[..take] {
            let size = match &entry.op {
                Some(pb::delegated_entry::Op::Commit(c)) => c.extents.iter().map(|e| e.inline_data.len()).sum(),
                _ => 0,
            };
            if count > 0 && bytes + size > BATCH_BYTES_MAX {
                break;
            }
            bytes += size;
            count += 1;
        }
        let entries: Vec<pb::DelegatedEntry> = held.pending.drain(..count).collect();
        held.pending_bytes = held.pending_bytes.saturating_sub(bytes);
        let release = held.recalled && held.pending.is_empty();
        let made: Vec<u64> = entries
            .iter()
            .filter_map(|e| match &e.op {
                Some(pb::delegated_entry::Op::Create(c)) => Some(c.ino),
                _ => None,
            })
            .collect();
        let batch = pb::DelegatedBatchOp { dir: Some(held.dir), entries, release };
        let caller = held.caller.clone();
        if release {
            state.held.remove(&dir);
        }
        state.sending += 1;
        Some((caller, batch, made))
    }

    /// Sends batches as they fill, until the task is aborted.
    pub async fn run(self: Arc<Self>, meta: Arc<MetaConnection>) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            while let Some((caller, batch, made)) = self.next_batch() {
                self.send(&meta, caller, batch, made).await;
                self.state().sending -= 1;
                self.sent.notify_waiters();
            }
            self.sent.notify_waiters();
            woken.await;
        }
    }

    async fn send(&self, meta: &MetaConnection, caller: pb::Caller, batch: pb::DelegatedBatchOp, made: Vec<u64>) {
        let dir = batch.dir.map(|h| h.ino).unwrap_or_default();
        let entries = batch.entries.len();
        let release = batch.release;
        self.batches_sent.fetch_add(1, Ordering::Relaxed);
        self.entries_sent.fetch_add(entries as u64, Ordering::Relaxed);
        let result = meta.mutate(&caller, Op::Batch(batch.clone())).await;
        let failed: Vec<u64> = match &result {
            Ok(reply) => {
                let failed: Vec<(usize, i32)> =
                    reply.batch_errnos.iter().copied().enumerate().filter(|(_, e)| *e != 0).collect();
                if !failed.is_empty() {
                    tracing::warn!(dir, entries, failed = ?failed, "meta refused changes made under a delegation");
                }
                let mut lost: Vec<u64> = failed
                    .iter()
                    .filter_map(|(i, _)| batch.entries.get(*i))
                    .filter_map(|e| match &e.op {
                        Some(pb::delegated_entry::Op::Create(c)) => Some(c.ino),
                        Some(pb::delegated_entry::Op::Commit(c)) => c.target.map(|h| h.ino),
                        _ => None,
                    })
                    .collect();
                if !failed.is_empty() || !reply.promised {
                    // What this client shows of them may not be what meta holds.
                    lost.push(dir);
                    lost.extend(&made);
                }
                if !failed.is_empty() {
                    self.note_lost(failed.len());
                }
                lost
            }
            Err(e) => {
                if entries > 0 {
                    tracing::error!(dir, entries, error = %e, "changes made under a delegation are lost");
                }
                self.note_lost(entries);
                let mut state = self.state();
                if !release && let Some(held) = state.held.remove(&dir) {
                    // Nothing more is made under a delegation meta no longer has.
                    Self::ask_later(&mut state, dir);
                    self.note_lost(held.pending.len());
                }
                let mut lost = vec![dir];
                lost.extend(&made);
                lost
            }
        };
        if !failed.is_empty() {
            meta.callbacks.forget_later(failed);
        }
    }

    /// The session changed: meta dropped the old one's delegations, and what waited under
    /// them is lost. Returns the inodes to forget (the directories and the files made).
    pub fn drop_all(&self) -> Vec<u64> {
        let mut state = self.state();
        let mut forget = Vec::new();
        let mut lost = 0;
        for (dir, held) in state.held.drain() {
            lost += held.pending.len();
            forget.push(dir);
            forget.extend(held.made);
        }
        state.returns.clear();
        drop(state);
        if lost > 0 {
            tracing::error!(lost, "session expired: changes made under delegations are lost");
        }
        self.note_lost(lost);
        forget
    }

    fn note_lost(&self, count: usize) {
        if count > 0 {
            self.lost.store(true, Ordering::SeqCst);
            self.lost_total.fetch_add(count as u64, Ordering::Relaxed);
        }
    }

    /// Entries waiting in all, for metrics.
    pub fn pending(&self) -> usize {
        self.state().held.values().map(|h| h.pending.len()).sum()
    }
}

/// The error `fsync` reports for changes lost under a delegation.
pub fn lost_error() -> ClientError {
    ClientError::Errno(pb::errno::EIO)
}
