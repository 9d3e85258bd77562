//! Locks in the state machine: granting and releasing them (Raft commands, so they survive a
//! leader change), dropping a session's locks when it expires, and fencing: a commit that names
//! a lock token is applied only while its session still holds that write lock.

use cairn_proto::{self as pb, errno};
use redb::ReadableTable;

use crate::locks::{self, LOCKS_PER_FILE_MAX, LockKind, LockRequest};
use crate::model::{LOCKS, LockRecord, decode, encode, key_u64, u64_of_key};
use crate::namespace::{ApplyError, ApplyResult, Tables, fail};

pub fn kind_of(kind: i32) -> Option<LockKind> {
    match pb::LockKind::try_from(kind).ok()? {
        pb::LockKind::LockUnlock => Some(LockKind::Unlock),
        pb::LockKind::LockRead => Some(LockKind::Read),
        pb::LockKind::LockWrite => Some(LockKind::Write),
    }
}

/// The request a `LockOp` of `session` makes, if it is well formed.
pub fn request_of(op: &pb::LockOp, session: u64) -> Option<LockRequest> {
    let kind = kind_of(op.kind)?;
    (op.start <= op.end).then_some(LockRequest {
        session,
        owner: op.owner,
        kind,
        start: op.start,
        end: op.end,
        pid: op.pid,
    })
}

pub fn info_of(lock: &LockRecord) -> pb::LockInfo {
    pb::LockInfo {
        kind: if lock.write { pb::LockKind::LockWrite } else { pb::LockKind::LockRead } as i32,
        start: lock.start,
        end: lock.end,
        pid: lock.pid,
        token: lock.token,
    }
}

/// The highest token of a write lock `owner` of `session` holds (0: none): the token its
/// writes are fenced with.
pub fn write_token(held: &[LockRecord], session: u64, owner: u64) -> u64 {
    held.iter().filter(|l| l.session == session && l.owner == owner && l.write).map(|l| l.token).max().unwrap_or(0)
}

fn corrupt(e: postcard::Error) -> ApplyError {
    ApplyError::Corrupt { table: "locks".into(), detail: e.to_string() }
}

impl Tables<'_> {
    pub fn locks(&self, ino: u64) -> ApplyResult<Vec<LockRecord>> {
        Ok(self.decoded(LOCKS, &key_u64(ino))?.unwrap_or_default())
    }

    fn put_locks(&self, ino: u64, held: &[LockRecord]) -> ApplyResult<()> {
        if held.is_empty() { self.delete(LOCKS, &key_u64(ino)) } else { self.put(LOCKS, &key_u64(ino), &encode(&held)) }
    }

    /// Sets, changes or removes a lock (F_SETLK). A conflict answers EAGAIN with the lock in
    /// the way; a grant answers with the owner's write token on the file.
    pub fn lock(&self, op: &pb::LockOp, caller: &pb::Caller, session: u64) -> ApplyResult<pb::MutateReply> {
        let inode = self.by_handle(op.target.as_ref())?;
        // A lock is taken through an open file: the caller must be able to open it for reading
        // or for writing (flock takes either kind through either), or own it.
        if op.kind != pb::LockKind::LockUnlock as i32 {
            use crate::access::{MAY_READ, MAY_WRITE, owns, permits};
            if !(owns(&inode, caller) || permits(&inode, caller, MAY_READ) || permits(&inode, caller, MAY_WRITE)) {
                return fail(errno::EACCES);
            }
        }
        let ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        let request = request_of(op, session).ok_or(ApplyError::Errno(errno::EINVAL))?;
        let held = self.locks(ino)?;
        if let Some(conflict) = locks::conflict(&held, &request) {
            return Ok(pb::MutateReply { errno: errno::EAGAIN, lock: Some(info_of(conflict)), ..Default::default() });
        }
        let token = if request.kind == LockKind::Unlock { 0 } else { self.next("next_lock_token")? };
        let after = locks::apply(&held, &request, token);
        if after.len() > LOCKS_PER_FILE_MAX {
            return fail(errno::ENOLCK);
        }
        self.put_locks(ino, &after)?;
        let granted = pb::LockInfo {
            kind: op.kind,
            start: op.start,
            end: op.end,
            pid: op.pid,
            token: write_token(&after, session, op.owner),
        };
        Ok(pb::MutateReply { lock: Some(granted), ..Default::default() })
    }

    /// Drops every lock the given (expired) sessions held: one pass over the lock table.
    pub fn release_session_locks(&self, sessions: &[u64]) -> ApplyResult<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let changed: Vec<(u64, Vec<LockRecord>)> = {
            let table = self.txn().open_table(LOCKS)?;
            let mut changed = Vec::new();
            for item in table.iter()? {
                let (key, value) = item?;
                let held: Vec<LockRecord> = decode(value.value()).map_err(corrupt)?;
                if held.iter().any(|l| sessions.contains(&l.session)) {
                    let kept = held.into_iter().filter(|l| !sessions.contains(&l.session)).collect();
                    changed.push((u64_of_key(key.value()), kept));
                }
            }
            changed
        };
        for (ino, kept) in changed {
            self.put_locks(ino, &kept)?;
        }
        Ok(())
    }

    /// Fencing: a commit carrying `token` goes through only if `session` holds a write lock
    /// with that token on `ino` (a lock lost with an expired session fails the commit).
    pub fn check_lock_token(&self, ino: u64, session: u64, token: u64) -> ApplyResult<()> {
        if token == 0 {
            return Ok(());
        }
        let held = self.locks(ino)?;
        if held.iter().any(|l| l.session == session && l.write && l.token == token) {
            Ok(())
        } else {
            fail(errno::ENOLCK)
        }
    }
}
