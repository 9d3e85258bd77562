//! This client's side of byte-range locks: asking meta for them (waiting when asked to), the
//! fencing tokens its commits carry, and dropping an owner's locks when its file is closed.
//!
//! Meta holds the locks; this keeps only what the kernel cannot tell it: which owners hold
//! locks on which inode (so a close costs a round trip only when there is something to drop)
//! and the write token of each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cairn_proto::{self as pb, errno, mutate_request::Op};
use tokio::sync::Semaphore;

use crate::error::{ClientError, ClientResult};
use crate::meta::MetaConnection;

/// Blocking lock waits (F_SETLKW, flock without LOCK_NB) at once; each holds a FUSE thread.
const WAITS_MAX: usize = 2;
/// How often a blocked lock request asks again, at most.
const WAIT_POLL_MAX: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Held {
    /// ino → owner → the owner's write token on it (0 when it holds only read locks).
    owners: HashMap<u64, HashMap<u64, u64>>,
    /// (ino, owner) → that owner's blocked requests on the inode.
    waiting: HashMap<(u64, u64), Waiting>,
}

#[derive(Default)]
struct Waiting {
    requests: u32,
    /// The owner's file was closed: its waits end with EINTR.
    called_off: bool,
}

/// Registers a blocked request while it lives.
struct WaitGuard<'a> {
    locks: &'a Locks,
    key: (u64, u64),
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held();
        if let Some(waiting) = held.waiting.get_mut(&self.key) {
            waiting.requests -= 1;
            if waiting.requests == 0 {
                held.waiting.remove(&self.key);
            }
        }
    }
}

pub struct Locks {
    meta: std::sync::Arc<MetaConnection>,
    held: Mutex<Held>,
    waits: Semaphore,
}

/// One lock request from the kernel.
#[derive(Clone, Copy, Debug)]
pub struct LockCall {
    pub target: pb::FileHandle,
    pub owner: u64,
    pub kind: pb::LockKind,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

impl LockCall {
    fn op(&self) -> pb::LockOp {
        pb::LockOp {
            target: Some(self.target),
            owner: self.owner,
            kind: self.kind as i32,
            start: self.start,
            end: self.end,
            pid: self.pid,
        }
    }
}

impl Locks {
    pub fn new(meta: std::sync::Arc<MetaConnection>) -> Self {
        Locks { meta, held: Mutex::new(Held::default()), waits: Semaphore::new(WAITS_MAX) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("lock table poisoned")
    }

    /// F_SETLK (or F_SETLKW with `wait`): EAGAIN when another owner holds a conflicting lock
    /// and `wait` is off; with `wait`, asks again until granted or until the owner's file is
    /// closed (EINTR).
    pub async fn set(&self, call: LockCall, wait: bool) -> ClientResult<()> {
        let ino = call.target.ino;
        let mut guard = None;
        let mut permit = None;
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.meta.mutate(&pb::Caller::default(), Op::Lock(call.op())).await {
                Ok(reply) => {
                    let token = reply.lock.map(|l| l.token).unwrap_or(0);
                    let called_off = self.held().waiting.get(&(ino, call.owner)).is_some_and(|w| w.called_off);
                    if called_off {
                        // Granted after the owner's file was closed: nobody would ever unlock it.
                        drop(guard);
                        self.held().owners.entry(ino).or_default().insert(call.owner, token);
                        self.release_owner(call.target, call.owner).await?;
                        return Err(ClientError::Errno(errno::EINTR));
                    }
                    let mut held = self.held();
                    let owners = held.owners.entry(ino).or_default();
                    if call.kind == pb::LockKind::LockUnlock && token == 0 {
                        // The owner may still hold read locks elsewhere in the file: keep it
                        // listed so that its close drops them.
                        owners.insert(call.owner, 0);
                    } else {
                        owners.insert(call.owner, token);
                    }
                    return Ok(());
                }
                Err(ClientError::Errno(errno::EAGAIN)) if wait => {}
                Err(e) => return Err(e),
            }
            if permit.is_none() {
                permit = Some(self.waits.try_acquire().map_err(|_| {
                    tracing::warn!(ino, "too many blocked lock requests on this mount");
                    ClientError::Errno(errno::ENOLCK)
                })?);
                self.held().waiting.entry((ino, call.owner)).or_default().requests += 1;
                guard = Some(WaitGuard { locks: self, key: (ino, call.owner) });
            }
            let called_off = self.held().waiting.get(&(ino, call.owner)).is_some_and(|w| w.called_off);
            if called_off {
                drop(guard);
                return Err(ClientError::Errno(errno::EINTR));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(WAIT_POLL_MAX);
        }
    }

    /// F_GETLK: a lock of another owner that the described one would conflict with.
    pub async fn get(&self, call: LockCall) -> ClientResult<Option<pb::LockInfo>> {
        self.meta.get_lock(call.op()).await
    }

    /// The write token this client's commits to `ino` carry (0: it holds no write lock).
    pub fn write_token(&self, ino: u64) -> u64 {
        self.held().owners.get(&ino).and_then(|owners| owners.values().max().copied()).unwrap_or(0)
    }

    /// Whether `owner` may hold locks on `ino`.
    pub fn holds(&self, ino: u64, owner: u64) -> bool {
        self.held().owners.get(&ino).is_some_and(|owners| owners.contains_key(&owner))
    }

    /// Drops every lock `owner` holds on the file (its file was closed) and calls off its
    /// waits there.
    pub async fn release_owner(&self, target: pb::FileHandle, owner: u64) -> ClientResult<()> {
        {
            let mut held = self.held();
            if let Some(waiting) = held.waiting.get_mut(&(target.ino, owner)) {
                waiting.called_off = true;
            }
            let holds = held.owners.get(&target.ino).is_some_and(|o| o.contains_key(&owner));
            if !holds {
                return Ok(());
            }
        }
        let call = LockCall { target, owner, kind: pb::LockKind::LockUnlock, start: 0, end: u64::MAX, pid: 0 };
        let result = self.meta.mutate(&pb::Caller::default(), Op::Lock(call.op())).await;
        let mut held = self.held();
        if let Some(owners) = held.owners.get_mut(&target.ino) {
            owners.remove(&owner);
            if owners.is_empty() {
                held.owners.remove(&target.ino);
            }
        }
        result.map(|_| ())
    }
}
