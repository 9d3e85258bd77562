//! Create delegations in the state machine. A session may hold a directory: it then creates
//! regular files there on its own, with inode numbers (and generations) reserved for it here,
//! and sends what it did in batches (`DelegatedBatchOp`), each one Raft entry. While it holds
//! the directory, a mutation of any other session naming it is not applied: the leader recalls
//! the delegation first (`DELEGATED_ELSEWHERE`), so the holder's view of the directory stays
//! the whole truth until it sends its changes and lets go.
//!
//! What a batch may do is narrow, and checked here rather than trusted: create a regular file
//! with a reserved number not used before, commit inline data to a file this delegation
//! created, and remove the name of such a file. Each entry is applied on its own (as a separate
//! mutation would be) with the holder's clock, which is what it showed its own kernel.

use cairn_proto::{self as pb, errno, mutate_request::Op};

use crate::access::{self, MAY_EXEC, MAY_WRITE};
use crate::model::*;
use crate::namespace::{ApplyError, ApplyResult, Tables, check, fail};

/// Inode numbers one grant reserves at most.
pub const DELEGATED_INODES_MAX: u32 = 65_536;
/// Entries one batch carries at most.
pub const BATCH_ENTRIES_MAX: usize = 4096;

impl Tables<'_> {
    pub fn delegation(&self, dir: u64) -> ApplyResult<Option<DelegationRecord>> {
        self.decoded(DELEGATIONS, &key_u64(dir))
    }

    /// A directory `op` names, removes or replaces that a live session other than `session`
    /// holds: (directory, holder). Such a mutation waits for the holder to let go. A request for a delegation is
    /// answered instead (`EBUSY`).
    pub fn delegated_elsewhere(&self, session: u64, op: &Op) -> ApplyResult<Option<(u64, u64)>> {
        let mut inos = match op {
            Op::Delegate(_) => return Ok(None),
            _ => op.named_inodes(),
        };
        // A directory removed, or replaced by a rename, is named only by its parent: it must
        // not go while its holder may still be filling it.
        match op {
            Op::Unlink(unlink) if unlink.directory => {
                let parent = unlink.parent.map(|h| h.ino).unwrap_or_default();
                inos.extend(self.dentry(parent, &unlink.name)?);
            }
            Op::Rename(rename) => {
                let parent = rename.parent.map(|h| h.ino).unwrap_or_default();
                let new_parent = rename.new_parent.map(|h| h.ino).unwrap_or_default();
                inos.extend(self.dentry(parent, &rename.name)?);
                inos.extend(self.dentry(new_parent, &rename.new_name)?);
            }
            _ => {}
        }
        for ino in inos {
            if let Some(held) = self.delegation(ino)?
                && held.session != session
                && self.session(held.session)?.is_some()
            {
                return Ok(Some((ino, held.session)));
            }
        }
        Ok(None)
    }

    /// Grants `session` the delegation of a directory the caller may create in, or gives its
    /// holder a fresh range of numbers.
    pub(crate) fn delegate(
        &self,
        op: &pb::DelegateOp,
        caller: &pb::Caller,
        session: u64,
    ) -> ApplyResult<pb::MutateReply> {
        let dir_ino = op.dir.as_ref().map(|h| h.ino).unwrap_or_default();
        let dir = self.by_handle(op.dir.as_ref())?;
        if !dir.is_dir() {
            return fail(errno::ENOTDIR);
        }
        if dir.nlink == 0 {
            return fail(errno::ENOENT);
        }
        check(access::require(&dir, caller, MAY_WRITE | MAY_EXEC))?;
        if op.inodes == 0 || op.inodes > DELEGATED_INODES_MAX {
            return fail(errno::EINVAL);
        }
        let held = self.delegation(dir_ino)?;
        if let Some(held) = &held
            && held.session != session
            && self.session(held.session)?.is_some()
        {
            return fail(errno::EBUSY);
        }
        let count = u64::from(op.inodes);
        let first_ino = self.counter("next_ino")? + 1;
        self.set_counter("next_ino", first_ino + count - 1)?;
        let first_generation = self.counter("next_generation")? + 1;
        self.set_counter("next_generation", first_generation + count - 1)?;
        let origin_ino = held.filter(|h| h.session == session).map_or(first_ino, |h| h.origin_ino);
        let record = DelegationRecord {
            session,
            origin_ino,
            first_ino,
            next_ino: first_ino,
            end_ino: first_ino + count,
            first_generation,
        };
        self.put(DELEGATIONS, &key_u64(dir_ino), &encode(&record))?;
        Ok(pb::MutateReply {
            attr: Some(dir.to_attr(dir_ino)),
            delegation: Some(pb::Delegation {
                first_ino,
                first_generation,
                count: op.inodes,
                caller: Some(caller.clone()),
            }),
            ..Default::default()
        })
    }

    /// Applies what the holder of a directory's delegation did there, entry by entry.
    pub(crate) fn apply_batch(
        &self,
        op: &pb::DelegatedBatchOp,
        caller: &pb::Caller,
        session: u64,
    ) -> ApplyResult<pb::MutateReply> {
        let dir_handle = op.dir.ok_or(ApplyError::Errno(errno::EINVAL))?;
        let dir_ino = dir_handle.ino;
        let Some(mut record) = self.delegation(dir_ino)?.filter(|d| d.session == session) else {
            // Revoked (the holder was silent past its lease) or never granted: what was made
            // under it is lost, and the holder is told so.
            return fail(errno::EIO);
        };
        if op.entries.len() > BATCH_ENTRIES_MAX {
            return fail(errno::EINVAL);
        }
        let mut errnos = Vec::with_capacity(op.entries.len());
        for entry in &op.entries {
            let now = entry.time.as_ref().map(Time::from_pb).unwrap_or_default();
            let result = match &entry.op {
                Some(pb::delegated_entry::Op::Create(create)) => {
                    self.delegated_create(&mut record, dir_handle, create, caller, now)
                }
                Some(pb::delegated_entry::Op::Commit(commit)) => {
                    self.delegated_commit(&record, dir_ino, commit, caller, session, now)
                }
                Some(pb::delegated_entry::Op::Unlink(unlink)) => {
                    self.delegated_unlink(&record, dir_handle, unlink, caller, session, now)
                }
                None => fail(errno::EINVAL),
            };
            errnos.push(match result {
                Ok(()) => 0,
                Err(ApplyError::Errno(code)) => code,
                Err(e) => return Err(e),
            });
        }
        if op.release {
            self.delete(DELEGATIONS, &key_u64(dir_ino))?;
        } else {
            self.put(DELEGATIONS, &key_u64(dir_ino), &encode(&record))?;
        }
        let attr = match self.inode(dir_ino)? {
            Some(dir) if dir.generation == dir_handle.generation => Some(dir.to_attr(dir_ino)),
            _ => None,
        };
        Ok(pb::MutateReply { attr, batch_errnos: errnos, ..Default::default() })
    }

    /// Drops `session`'s delegation of `dir` (the leader revokes it when the holder stayed
    /// silent past its lease); whether it held one.
    pub fn revoke_delegation(&self, dir: u64, session: u64) -> ApplyResult<bool> {
        if self.delegation(dir)?.is_some_and(|d| d.session == session) {
            self.delete(DELEGATIONS, &key_u64(dir))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Drops the delegations of sessions that ended.
    pub(crate) fn drop_delegations_of(&self, sessions: &[u64]) -> ApplyResult<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let dirs: Vec<u64> = {
            let table = self.txn().open_table(DELEGATIONS)?;
            let mut dirs = Vec::new();
            for item in redb::ReadableTable::iter(&table)? {
                let (key, value) = item?;
                let record: DelegationRecord = decode(value.value())
                    .map_err(|e| ApplyError::Corrupt { table: "delegations".into(), detail: e.to_string() })?;
                if sessions.contains(&record.session) {
                    dirs.push(u64_of_key(key.value()));
                }
            }
            dirs
        };
        for dir in dirs {
            self.delete(DELEGATIONS, &key_u64(dir))?;
        }
        Ok(())
    }

    fn delegated_create(
        &self,
        record: &mut DelegationRecord,
        dir: pb::FileHandle,
        create: &pb::DelegatedCreate,
        caller: &pb::Caller,
        now: Time,
    ) -> ApplyResult<()> {
        if create.ino < record.next_ino || create.ino >= record.end_ino {
            return fail(errno::EINVAL);
        }
        // Used once, whatever the outcome.
        record.next_ino = create.ino + 1;
        let generation = record.first_generation + (create.ino - record.first_ino);
        let op = pb::CreateOp {
            parent: Some(dir),
            name: create.name.clone(),
            kind: pb::FileKind::Regular as i32,
            perm: create.perm & 0o1777,
            rdev: 0,
            exclusive: true,
            symlink_target: Vec::new(),
        };
        self.create_as(&op, caller, now, Some((create.ino, generation))).map(|_| ())
    }

    /// Whether `ino` is a file made in the directory while the holder held it (and still
    /// there): no other session can have seen it.
    fn made_here(&self, record: &DelegationRecord, dir: u64, ino: u64) -> ApplyResult<bool> {
        if ino < record.origin_ino {
            return Ok(false);
        }
        Ok(self.inode(ino)?.is_some_and(|inode| inode.parent == dir && !inode.is_dir()))
    }

    fn delegated_commit(
        &self,
        record: &DelegationRecord,
        dir: u64,
        commit: &pb::CommitOp,
        caller: &pb::Caller,
        session: u64,
        now: Time,
    ) -> ApplyResult<()> {
        let target = commit.target.map(|h| h.ino).unwrap_or_default();
        if !self.made_here(record, dir, target)? || commit.lock_token != 0 {
            return fail(errno::EINVAL);
        }
        if commit.extents.iter().any(|e| e.block.is_some()) {
            return fail(errno::EINVAL);
        }
        self.commit(commit, caller, session, now).map(|_| ())
    }

    fn delegated_unlink(
        &self,
        record: &DelegationRecord,
        dir: pb::FileHandle,
        unlink: &pb::UnlinkOp,
        caller: &pb::Caller,
        session: u64,
        now: Time,
    ) -> ApplyResult<()> {
        if unlink.parent != Some(dir) || unlink.directory {
            return fail(errno::EINVAL);
        }
        let child = self.dentry(dir.ino, &unlink.name)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
        if !self.made_here(record, dir.ino, child)? {
            return fail(errno::EINVAL);
        }
        self.unlink(unlink, caller, session, now).map(|_| ())
    }
}
