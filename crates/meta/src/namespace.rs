//! The namespace state machine: applies one mutation to the tables inside a redb write
//! transaction, deterministically (the time comes with the command), and answers reads.
//!
//! Every operation checks everything before it writes anything, so a request that fails with an
//! errno leaves the tables as they were and the transaction can still commit the other
//! requests of the batch.

use std::collections::HashMap;

use cairn_proto::{self as pb, errno, mutate_request::Op};
use redb::{ReadableTable, TableHandle, WriteTransaction};

use crate::extents::{self, CHUNK_BYTES, Extent, Source};
use crate::model::*;

/// Why an operation did not apply: a file system error for the caller, or a storage failure
/// that stops the state machine.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("errno {0}")]
    Errno(i32),
    #[error("metadata store: {0}")]
    Storage(#[from] redb::Error),
    #[error("corrupt record in {table}: {detail}")]
    Corrupt { table: String, detail: String },
}

impl From<redb::StorageError> for ApplyError {
    fn from(e: redb::StorageError) -> Self {
        ApplyError::Storage(e.into())
    }
}
impl From<redb::TableError> for ApplyError {
    fn from(e: redb::TableError) -> Self {
        ApplyError::Storage(e.into())
    }
}

pub type ApplyResult<T> = Result<T, ApplyError>;

pub(crate) fn fail<T>(code: i32) -> ApplyResult<T> {
    Err(ApplyError::Errno(code))
}

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o0010;

/// Validates a directory entry name the way Linux does.
pub fn check_name(name: &[u8]) -> ApplyResult<()> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
        return fail(errno::EINVAL);
    }
    if name.len() > pb::NAME_BYTES_MAX {
        return fail(errno::ENAMETOOLONG);
    }
    Ok(())
}

use crate::access::{self, MAY_EXEC, MAY_WRITE, in_group as caller_in_group};

/// The ownership and permission rules of chmod, chown, truncate and utimes (checked before
/// anything changes, in the kernel's order).
fn may_set_attr(inode: &Inode, op: &pb::SetAttrOp, caller: &pb::Caller) -> Result<(), i32> {
    let owner = access::owns(inode, caller);
    if op.uid.is_some_and(|uid| uid != inode.uid) && !access::is_root(caller) {
        return Err(errno::EPERM);
    }
    if let Some(gid) = op.gid
        && gid != inode.gid
        && !(access::is_root(caller) || (caller.uid == inode.uid && caller_in_group(caller, gid)))
    {
        return Err(errno::EPERM);
    }
    if (op.uid.is_some() || op.gid.is_some()) && !owner {
        return Err(errno::EPERM);
    }
    if let Some(perm) = op.perm
        && !owner
    {
        // The kernel drops setuid/setgid itself when someone else writes or truncates: a
        // change that only clears those bits is allowed to whoever may write.
        let dropped_only =
            perm & 0o7777 == inode.perm & !(S_ISUID | S_ISGID) & 0o7777 || perm & 0o7777 == inode.perm & !S_ISUID;
        if !dropped_only {
            return Err(errno::EPERM);
        }
        access::require(inode, caller, MAY_WRITE)?;
    }
    if op.size.is_some() && !inode.is_dir() {
        access::require_data_access(inode, caller, MAY_WRITE)?;
    }
    if op.kill_suid {
        access::require_data_access(inode, caller, MAY_WRITE)?;
    }
    let explicit =
        |set: &Option<pb::TimeSet>| set.as_ref().is_some_and(|t| matches!(t.value, Some(pb::time_set::Value::At(_))));
    if explicit(&op.atime) || explicit(&op.mtime) {
        if !owner {
            return Err(errno::EPERM);
        }
    } else if (op.atime.is_some() || op.mtime.is_some()) && !owner {
        access::require(inode, caller, MAY_WRITE)?;
    }
    Ok(())
}

/// `access` checks as apply results.
pub(crate) fn check(result: Result<(), i32>) -> ApplyResult<()> {
    result.map_err(ApplyError::Errno)
}

/// What the rules for extended attributes of one namespace ask of a caller.
pub fn check_xattr_access(inode: &Inode, name: &[u8], caller: &pb::Caller, want: u32) -> Result<(), i32> {
    if name.starts_with(b"trusted.") {
        return match access::is_root(caller) {
            true => Ok(()),
            false if want & MAY_WRITE != 0 => Err(errno::EPERM),
            false => Err(errno::ENODATA),
        };
    }
    // security.* holds file capabilities and security labels: only root sets them.
    if name.starts_with(b"security.") {
        return if want & MAY_WRITE == 0 || access::is_root(caller) { Ok(()) } else { Err(errno::EPERM) };
    }
    // user.*: only on files and directories, and the data's own permission bits apply.
    if !inode.is_regular() && !inode.is_dir() {
        return Err(if want & MAY_WRITE != 0 { errno::EPERM } else { errno::ENODATA });
    }
    if want & MAY_WRITE != 0 && inode.is_dir() && inode.perm & 0o1000 != 0 && !access::owns(inode, caller) {
        return Err(errno::EPERM);
    }
    access::require(inode, caller, want)
}

/// The tables of one write transaction, with typed accessors.
pub struct Tables<'t> {
    txn: &'t WriteTransaction,
}

impl<'t> Tables<'t> {
    pub fn new(txn: &'t WriteTransaction) -> Self {
        Tables { txn }
    }

    pub(crate) fn txn(&self) -> &'t WriteTransaction {
        self.txn
    }

    pub(crate) fn get(&self, table: Table, key: &[u8]) -> ApplyResult<Option<Vec<u8>>> {
        let table = self.txn.open_table(table)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    pub(crate) fn put(&self, table: Table, key: &[u8], value: &[u8]) -> ApplyResult<()> {
        let mut table = self.txn.open_table(table)?;
        table.insert(key, value)?;
        Ok(())
    }

    pub(crate) fn delete(&self, table: Table, key: &[u8]) -> ApplyResult<()> {
        let mut table = self.txn.open_table(table)?;
        table.remove(key)?;
        Ok(())
    }

    pub(crate) fn decoded<T: for<'de> serde::Deserialize<'de>>(
        &self,
        table: Table,
        key: &[u8],
    ) -> ApplyResult<Option<T>> {
        match self.get(table, key)? {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|e| ApplyError::Corrupt { table: table.name().to_string(), detail: e.to_string() }),
        }
    }

    pub fn counter(&self, name: &str) -> ApplyResult<u64> {
        Ok(self.decoded::<u64>(SM_META, name.as_bytes())?.unwrap_or(0))
    }

    pub fn set_counter(&self, name: &str, value: u64) -> ApplyResult<()> {
        self.put(SM_META, name.as_bytes(), &encode(&value))
    }

    pub(crate) fn next(&self, name: &str) -> ApplyResult<u64> {
        let value = self.counter(name)? + 1;
        self.set_counter(name, value)?;
        Ok(value)
    }

    pub fn inode(&self, ino: u64) -> ApplyResult<Option<Inode>> {
        self.decoded(INODES, &key_u64(ino))
    }

    pub fn put_inode(&self, ino: u64, inode: &Inode) -> ApplyResult<()> {
        self.put(INODES, &key_u64(ino), &encode(inode))
    }

    /// The inode a handle names; ESTALE when it is gone or was reused.
    pub fn by_handle(&self, handle: Option<&pb::FileHandle>) -> ApplyResult<Inode> {
        let handle = handle.ok_or(ApplyError::Errno(errno::EINVAL))?;
        match self.inode(handle.ino)? {
            Some(inode) if inode.generation == handle.generation => Ok(inode),
            _ => fail(errno::ESTALE),
        }
    }

    pub fn dentry(&self, parent: u64, name: &[u8]) -> ApplyResult<Option<u64>> {
        self.decoded::<u64>(DENTRIES, &key_u64_name(parent, name))
    }

    fn put_dentry(&self, parent: u64, name: &[u8], child: u64) -> ApplyResult<()> {
        self.put(DENTRIES, &key_u64_name(parent, name), &encode(&child))
    }

    fn remove_dentry(&self, parent: u64, name: &[u8]) -> ApplyResult<()> {
        self.delete(DENTRIES, &key_u64_name(parent, name))
    }

    fn dir_is_empty(&self, ino: u64) -> ApplyResult<bool> {
        let table = self.txn.open_table(DENTRIES)?;
        let start = key_u64(ino);
        let end = key_u64(ino + 1);
        Ok(table.range(start.as_slice()..end.as_slice())?.next().is_none())
    }

    fn chunk(&self, ino: u64, chunk: u64) -> ApplyResult<Vec<Extent>> {
        Ok(self.decoded(EXTENTS, &key_u64_u64(ino, chunk))?.unwrap_or_default())
    }

    fn chunk_indexes(&self, ino: u64) -> ApplyResult<Vec<u64>> {
        let table = self.txn.open_table(EXTENTS)?;
        let start = key_u64_u64(ino, 0);
        let end = key_u64(ino + 1);
        let mut chunks = Vec::new();
        for item in table.range(start.as_slice()..end.as_slice())? {
            let (key, _) = item?;
            chunks.push(u64_of_key(&key.value()[8..]));
        }
        Ok(chunks)
    }

    /// Stores a chunk's new extent list and moves block reference counts accordingly.
    fn replace_chunk(&self, ino: u64, chunk: u64, old: &[Extent], new: &[Extent]) -> ApplyResult<i64> {
        let mut deltas: HashMap<u128, i64> = HashMap::new();
        for id in old.iter().filter_map(Extent::block_id) {
            *deltas.entry(id).or_default() -= 1;
        }
        for id in new.iter().filter_map(Extent::block_id) {
            *deltas.entry(id).or_default() += 1;
        }
        self.adjust_block_refs(&deltas)?;
        if new.is_empty() {
            self.delete(EXTENTS, &key_u64_u64(ino, chunk))?;
        } else {
            self.put(EXTENTS, &key_u64_u64(ino, chunk), &encode(&new.to_vec()))?;
        }
        let old_bytes: u64 = old.iter().map(|e| e.len).sum();
        let new_bytes: u64 = new.iter().map(|e| e.len).sum();
        Ok(new_bytes as i64 - old_bytes as i64)
    }

    fn adjust_block_refs(&self, deltas: &HashMap<u128, i64>) -> ApplyResult<()> {
        for (&id, &delta) in deltas {
            if delta == 0 {
                continue;
            }
            let key = key_u128(id);
            let Some(mut record) = self.decoded::<BlockRecord>(BLOCKS, &key)? else {
                return Err(ApplyError::Corrupt {
                    table: "blocks".into(),
                    detail: format!("extent names unknown block {id:032x}"),
                });
            };
            let refs = record.refs as i64 + delta;
            debug_assert!(refs >= 0, "block reference count went negative");
            if refs <= 0 {
                self.delete(BLOCKS, &key)?;
                record.refs = 0;
                self.put(GARBAGE, &key, &encode(&record))?;
            } else {
                record.refs = refs as u64;
                self.put(BLOCKS, &key, &encode(&record))?;
            }
        }
        Ok(())
    }

    /// Removes `[start, end)` from a file's data; returns the change in allocated bytes.
    fn cut_range(&self, ino: u64, start: u64, end: u64) -> ApplyResult<i64> {
        let mut change = 0;
        for chunk in self.chunk_indexes(ino)? {
            let chunk_start = chunk * CHUNK_BYTES;
            let chunk_end = chunk_start + CHUNK_BYTES;
            if chunk_end <= start || chunk_start >= end {
                continue;
            }
            let old = self.chunk(ino, chunk)?;
            let mut new = old.clone();
            extents::cut(&mut new, start, end);
            if new != old {
                change += self.replace_chunk(ino, chunk, &old, &new)?;
            }
        }
        Ok(change)
    }

    /// Deletes an inode and everything it owns.
    fn reclaim(&self, ino: u64) -> ApplyResult<()> {
        self.cut_range(ino, 0, u64::MAX)?;
        let names: Vec<Vec<u8>> = {
            let table = self.txn.open_table(XATTRS)?;
            let start = key_u64(ino);
            let end = key_u64(ino + 1);
            let mut keys = Vec::new();
            for item in table.range(start.as_slice()..end.as_slice())? {
                keys.push(item?.0.value().to_vec());
            }
            keys
        };
        for key in names {
            self.delete(XATTRS, &key)?;
        }
        self.delete(ORPHANS, &key_u64(ino))?;
        self.delete(INODES, &key_u64(ino))?;
        Ok(())
    }

    fn live_sessions(&self) -> ApplyResult<Vec<u64>> {
        let table = self.txn.open_table(SESSIONS)?;
        let mut ids = Vec::new();
        for item in table.iter()? {
            ids.push(u64_of_key(item?.0.value()));
        }
        Ok(ids)
    }

    /// An inode lost its last link: keep it for the sessions that may hold it open, or
    /// reclaim it now. Returns whether it was kept.
    fn orphan_or_reclaim(&self, ino: u64, inode: &Inode, session: u64, caller_not_holding: bool) -> ApplyResult<bool> {
        let holders: Vec<u64> =
            self.live_sessions()?.into_iter().filter(|&s| !(caller_not_holding && s == session)).collect();
        if holders.is_empty() || inode.is_dir() {
            self.reclaim(ino)?;
            return Ok(false);
        }
        self.put(ORPHANS, &key_u64(ino), &encode(&Orphan { generation: inode.generation, holders }))?;
        Ok(true)
    }

    /// A session no longer holds an orphan; reclaim it when nobody does.
    pub fn release_orphan(&self, ino: u64, session: u64) -> ApplyResult<()> {
        let Some(mut orphan) = self.decoded::<Orphan>(ORPHANS, &key_u64(ino))? else {
            return Ok(());
        };
        orphan.holders.retain(|&s| s != session);
        if orphan.holders.is_empty() {
            self.reclaim(ino)?;
        } else {
            self.put(ORPHANS, &key_u64(ino), &encode(&orphan))?;
        }
        Ok(())
    }

    pub fn stored_result(&self, session: u64, seq: u64) -> ApplyResult<Option<Vec<u8>>> {
        self.get(RESULTS, &key_u64_u64(session, seq))
    }

    pub fn store_result(&self, session: u64, seq: u64, reply: &[u8]) -> ApplyResult<()> {
        self.put(RESULTS, &key_u64_u64(session, seq), reply)?;
        if seq > RESULTS_PER_SESSION {
            self.delete(RESULTS, &key_u64_u64(session, seq - RESULTS_PER_SESSION))?;
        }
        Ok(())
    }

    pub fn session(&self, id: u64) -> ApplyResult<Option<Session>> {
        match self.get(SESSIONS, &key_u64(id))? {
            None => Ok(None),
            Some(bytes) => Session::decode(&bytes)
                .map(Some)
                .map_err(|e| ApplyError::Corrupt { table: "sessions".into(), detail: e.to_string() }),
        }
    }

    pub fn open_session(&self, client_name: String, owner: String, now_ms: u64, lease_ms: u64) -> ApplyResult<u64> {
        let id = self.next("next_session")?;
        let session = Session { client_name, opened_ms: now_ms, expires_ms: now_ms.saturating_add(lease_ms), owner };
        self.put(SESSIONS, &key_u64(id), &encode(&session))?;
        Ok(id)
    }

    /// Records a client credential (protobuf-encoded, its id assigned here); returns the id,
    /// or 0 for an undecodable one.
    pub fn issue_credential(&self, encoded: &[u8]) -> ApplyResult<u64> {
        use prost::Message;
        let Ok(mut credential) = pb::Credential::decode(encoded) else {
            return Ok(0);
        };
        credential.id = self.next("next_credential")?;
        credential.revoked = false;
        self.put(CREDENTIALS, &key_u64(credential.id), &credential.encode_to_vec())?;
        Ok(credential.id)
    }

    pub fn revoke_credential(&self, id: u64) -> ApplyResult<bool> {
        use prost::Message;
        let Some(bytes) = self.get(CREDENTIALS, &key_u64(id))? else {
            return Ok(false);
        };
        let mut credential = pb::Credential::decode(bytes.as_slice())
            .map_err(|e| ApplyError::Corrupt { table: "credentials".into(), detail: e.to_string() })?;
        credential.revoked = true;
        self.put(CREDENTIALS, &key_u64(id), &credential.encode_to_vec())?;
        Ok(true)
    }

    pub fn renew_session(&self, id: u64, now_ms: u64, lease_ms: u64) -> ApplyResult<bool> {
        let Some(mut session) = self.session(id)? else {
            return Ok(false);
        };
        session.expires_ms = session.expires_ms.max(now_ms.saturating_add(lease_ms));
        self.put(SESSIONS, &key_u64(id), &encode(&session))?;
        Ok(true)
    }

    /// Ends sessions whose lease ran out: their stored results go, and so does their hold on
    /// orphans.
    pub fn expire_sessions(&self, now_ms: u64) -> ApplyResult<Vec<u64>> {
        let expired: Vec<u64> = {
            let table = self.txn.open_table(SESSIONS)?;
            let mut ids = Vec::new();
            for item in table.iter()? {
                let (key, value) = item?;
                let session = Session::decode(value.value())
                    .map_err(|e| ApplyError::Corrupt { table: "sessions".into(), detail: e.to_string() })?;
                if session.expires_ms <= now_ms {
                    ids.push(u64_of_key(key.value()));
                }
            }
            ids
        };
        for &id in &expired {
            self.delete(SESSIONS, &key_u64(id))?;
            let keys: Vec<Vec<u8>> = {
                let table = self.txn.open_table(RESULTS)?;
                let start = key_u64(id);
                let end = key_u64(id + 1);
                let mut keys = Vec::new();
                for item in table.range(start.as_slice()..end.as_slice())? {
                    keys.push(item?.0.value().to_vec());
                }
                keys
            };
            for key in keys {
                self.delete(RESULTS, &key)?;
            }
            let orphans: Vec<u64> = {
                let table = self.txn.open_table(ORPHANS)?;
                let mut inos = Vec::new();
                for item in table.iter()? {
                    let (key, value) = item?;
                    let orphan: Orphan = decode(value.value())
                        .map_err(|e| ApplyError::Corrupt { table: "orphans".into(), detail: e.to_string() })?;
                    if orphan.holders.contains(&id) {
                        inos.push(u64_of_key(key.value()));
                    }
                }
                inos
            };
            for ino in orphans {
                self.release_orphan(ino, id)?;
            }
        }
        self.release_session_locks(&expired)?;
        self.drop_delegations_of(&expired)?;
        Ok(expired)
    }

    fn data_server(&self, id: u64) -> ApplyResult<Option<DataServerRecord>> {
        match self.get(DATA_SERVERS, &key_u64(id))? {
            None => Ok(None),
            Some(bytes) => DataServerRecord::decode(&bytes)
                .map(Some)
                .map_err(|e| ApplyError::Corrupt { table: DATA_SERVERS.name().to_string(), detail: e.to_string() }),
        }
    }

    /// Records a data server's address; it keeps its standing. A removed server stays removed
    /// (returns false).
    pub fn register_data_server(&self, id: u64, address: String) -> ApplyResult<bool> {
        let standing = match self.data_server(id)? {
            Some(record) if record.standing == Standing::Removed => return Ok(false),
            Some(record) => record.standing,
            None => Standing::Active,
        };
        self.put(DATA_SERVERS, &key_u64(id), &encode(&DataServerRecord { address, standing }))?;
        Ok(true)
    }

    /// Moves a data server to `standing`. Removal needs every block to be off the server,
    /// unless `force` accepts that copies still listed there are lost. Returns whether the
    /// standing is now the one asked for.
    pub fn set_data_server_standing(&self, id: u64, standing: Standing, force: bool) -> ApplyResult<bool> {
        let Some(mut record) = self.data_server(id)? else { return Ok(false) };
        if record.standing == standing {
            return Ok(true);
        }
        if record.standing == Standing::Removed {
            return Ok(false);
        }
        if standing == Standing::Removed && !force && self.blocks_on(id)? > 0 {
            return Ok(false);
        }
        record.standing = standing;
        self.put(DATA_SERVERS, &key_u64(id), &encode(&record))?;
        Ok(true)
    }

    /// How many live blocks list a copy on data server `id` (a pass over all blocks: only
    /// a removal asks).
    fn blocks_on(&self, id: u64) -> ApplyResult<u64> {
        let table = self.txn.open_table(BLOCKS)?;
        count_blocks_on(&table, id).map_err(|e| match e {
            ScanError::Storage(e) => e.into(),
            ScanError::Corrupt(e) => ApplyError::Corrupt { table: BLOCKS.name().to_string(), detail: e.to_string() },
        })
    }

    /// Records a repaired copy of a block and forgets copies that no longer count. A block that
    /// became garbage meanwhile keeps the new copy in its record, so its deletion covers it.
    /// Returns whether any copy was dropped.
    pub fn replace_copies(&self, id: u128, added: Option<u64>, dropped: &[u64]) -> ApplyResult<bool> {
        let key = key_u128(id);
        for (live, table) in [(true, BLOCKS), (false, GARBAGE)] {
            let Some(mut record) = self.decoded::<BlockRecord>(table, &key)? else { continue };
            if let Some(server) = added
                && !record.servers.contains(&server)
            {
                record.servers.push(server);
            }
            // The last copy is never dropped: a bad copy is still a lead for a reader, a lost
            // one a record of where the block was.
            let before = record.servers.len();
            if live && record.servers.iter().any(|s| !dropped.contains(s)) {
                record.servers.retain(|s| !dropped.contains(s));
            }
            self.put(table, &key, &encode(&record))?;
            return Ok(record.servers.len() < before);
        }
        Ok(false)
    }

    pub fn forget_garbage(&self, ids: &[u128]) -> ApplyResult<()> {
        for &id in ids {
            self.delete(GARBAGE, &key_u128(id))?;
        }
        Ok(())
    }

    /// Creates the root directory of a new file system.
    pub fn init_fs(&self, fs_id: &str, now: Time) -> ApplyResult<()> {
        if self.inode(ROOT_INO)?.is_some() {
            return Ok(());
        }
        self.put(SM_META, b"fs_id", fs_id.as_bytes())?;
        self.set_counter("next_ino", ROOT_INO)?;
        let generation = self.next("next_generation")?;
        let root = Inode {
            generation,
            kind: pb::FileKind::Directory as i32,
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            rdev: 0,
            allocated: 0,
            parent: ROOT_INO,
            symlink_target: Vec::new(),
        };
        self.put_inode(ROOT_INO, &root)?;
        self.set_counter("inodes", 1)
    }

    /// Applies one mutation and returns its reply (errno inside).
    pub fn mutate(&self, request: &pb::MutateRequest, now: Time) -> ApplyResult<pb::MutateReply> {
        let caller = request.caller.clone().unwrap_or_default();
        if request.confined_to != 0
            && let Some(op) = &request.op
            && !self.within(request.confined_to, &op.named_inodes())?
        {
            return Ok(pb::MutateReply { errno: errno::EACCES, ..Default::default() });
        }
        let result = match &request.op {
            Some(Op::Create(op)) => self.create(op, &caller, now),
            Some(Op::Link(op)) => self.link(op, &caller, now),
            Some(Op::Unlink(op)) => self.unlink(op, &caller, request.session, now),
            Some(Op::Rename(op)) => self.rename(op, &caller, request.session, now),
            Some(Op::SetAttr(op)) => self.set_attr(op, &caller, now),
            Some(Op::SetXattr(op)) => self.set_xattr(op, &caller, now),
            Some(Op::RemoveXattr(op)) => self.remove_xattr(op, &caller, now),
            Some(Op::Commit(op)) => self.commit(op, &caller, request.session, now),
            Some(Op::Fallocate(op)) => self.fallocate(op, &caller, now),
            Some(Op::Release(op)) => self.release(op, request.session),
            Some(Op::Lock(op)) => self.lock(op, &caller, request.session),
            Some(Op::Delegate(op)) => self.delegate(op, &caller, request.session),
            Some(Op::Batch(op)) => self.apply_batch(op, &caller, request.session),
            None => fail(errno::EINVAL),
        };
        match result {
            Ok(mut reply) => {
                // Whether each inode the reply shows has extended attributes: a writer caching
                // its file answers the `security.capability` the kernel asks at each write
                // without a request, after its own commits too.
                for attr in reply.attr.iter_mut().chain(reply.parent.iter_mut()) {
                    attr.no_xattrs = !self.has_xattrs(attr.ino)?;
                }
                Ok(reply)
            }
            Err(ApplyError::Errno(code)) => Ok(pb::MutateReply { errno: code, ..Default::default() }),
            Err(e) => Err(e),
        }
    }

    fn has_xattrs(&self, ino: u64) -> ApplyResult<bool> {
        let table = self.txn.open_table(XATTRS)?;
        let mut names = table.range(key_u64(ino).as_slice()..key_u64(ino + 1).as_slice())?;
        Ok(names.next().is_some())
    }

    /// Whether every inode of `inos` lies under directory `root` (see `access::within`).
    fn within(&self, root: u64, inos: &[u64]) -> ApplyResult<bool> {
        access::all_within(root, inos, |at| Ok(self.inode(at)?.map(|i| i.parent)))
    }

    fn touch_dir(&self, ino: u64, dir: &mut Inode, now: Time) -> ApplyResult<()> {
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(ino, dir)
    }

    fn create(&self, op: &pb::CreateOp, caller: &pb::Caller, now: Time) -> ApplyResult<pb::MutateReply> {
        self.create_as(op, caller, now, None)
    }

    /// `create`, with the inode number and generation given (a delegated create: reserved
    /// earlier for the session) instead of drawn from the counters.
    pub(crate) fn create_as(
        &self,
        op: &pb::CreateOp,
        caller: &pb::Caller,
        now: Time,
        assigned: Option<(u64, u64)>,
    ) -> ApplyResult<pb::MutateReply> {
        check_name(&op.name)?;
        let parent_handle = op.parent.as_ref();
        let mut parent = self.by_handle(parent_handle)?;
        let parent_ino = parent_handle.map(|h| h.ino).unwrap_or_default();
        if !parent.is_dir() {
            return fail(errno::ENOTDIR);
        }
        if parent.nlink == 0 {
            return fail(errno::ENOENT);
        }
        check(access::require(&parent, caller, MAY_EXEC))?;
        let kind = pb::FileKind::try_from(op.kind).map_err(|_| ApplyError::Errno(errno::EINVAL))?;
        if kind == pb::FileKind::Unspecified {
            return fail(errno::EINVAL);
        }
        if let Some(existing) = self.dentry(parent_ino, &op.name)? {
            if op.exclusive || kind != pb::FileKind::Regular {
                return fail(errno::EEXIST);
            }
            let inode = self.inode(existing)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
            if inode.is_dir() {
                return fail(errno::EISDIR);
            }
            // Without `parent`: the reply says nothing was created.
            return Ok(pb::MutateReply { attr: Some(inode.to_attr(existing)), ..Default::default() });
        }
        check(access::require(&parent, caller, MAY_WRITE | MAY_EXEC))?;
        if kind == pb::FileKind::Symlink && (op.symlink_target.is_empty() || op.symlink_target.contains(&0)) {
            return fail(errno::ENOENT);
        }
        if op.symlink_target.len() > SYMLINK_MAX {
            return fail(errno::ENAMETOOLONG);
        }
        // Device nodes open the devices of every machine that mounts the file system.
        if matches!(kind, pb::FileKind::CharDevice | pb::FileKind::BlockDevice) && !access::is_root(caller) {
            return fail(errno::EPERM);
        }
        let is_dir = kind == pb::FileKind::Directory;
        if is_dir && parent.nlink >= LINKS_MAX {
            return fail(errno::EMLINK);
        }
        let mut perm = op.perm & 0o7777;
        let gid = if parent.perm & S_ISGID != 0 {
            if is_dir {
                perm |= S_ISGID;
            }
            parent.gid
        } else {
            caller.gid
        };
        if !is_dir && perm & S_ISGID != 0 && caller.uid != 0 && !caller_in_group(caller, gid) {
            perm &= !S_ISGID;
        }
        if kind == pb::FileKind::Symlink {
            perm = 0o777;
        }
        let (ino, generation) = match assigned {
            Some(assigned) => assigned,
            None => (self.next("next_ino")?, self.next("next_generation")?),
        };
        debug_assert!(self.inode(ino)?.is_none(), "inode {ino} assigned twice");
        let inode = Inode {
            generation,
            kind: kind as i32,
            perm,
            uid: caller.uid,
            gid,
            nlink: if is_dir { 2 } else { 1 },
            size: if kind == pb::FileKind::Symlink { op.symlink_target.len() as u64 } else { 0 },
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            rdev: if matches!(kind, pb::FileKind::CharDevice | pb::FileKind::BlockDevice) { op.rdev } else { 0 },
            allocated: 0,
            parent: parent_ino,
            symlink_target: op.symlink_target.clone(),
        };
        self.put_inode(ino, &inode)?;
        self.put_dentry(parent_ino, &op.name, ino)?;
        if is_dir {
            parent.nlink += 1;
        }
        self.touch_dir(parent_ino, &mut parent, now)?;
        let inodes = self.counter("inodes")?;
        self.set_counter("inodes", inodes + 1)?;
        Ok(pb::MutateReply {
            attr: Some(inode.to_attr(ino)),
            parent: Some(parent.to_attr(parent_ino)),
            ..Default::default()
        })
    }

    fn link(&self, op: &pb::LinkOp, caller: &pb::Caller, now: Time) -> ApplyResult<pb::MutateReply> {
        check_name(&op.new_name)?;
        let target_ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut target = self.by_handle(op.target.as_ref())?;
        let parent_ino = op.new_parent.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut parent = self.by_handle(op.new_parent.as_ref())?;
        if !parent.is_dir() {
            return fail(errno::ENOTDIR);
        }
        if parent.nlink == 0 {
            return fail(errno::ENOENT);
        }
        // As link(2) reports them: an existing name first, then permission.
        if self.dentry(parent_ino, &op.new_name)?.is_some() {
            return fail(errno::EEXIST);
        }
        check(access::require(&parent, caller, MAY_WRITE | MAY_EXEC))?;
        if target.is_dir() {
            return fail(errno::EPERM);
        }
        if target.nlink == 0 {
            return fail(errno::ENOENT);
        }
        if target.nlink >= LINKS_MAX {
            return fail(errno::EMLINK);
        }
        if self.dentry(parent_ino, &op.new_name)?.is_some() {
            return fail(errno::EEXIST);
        }
        self.put_dentry(parent_ino, &op.new_name, target_ino)?;
        target.nlink += 1;
        target.ctime = now;
        self.put_inode(target_ino, &target)?;
        self.touch_dir(parent_ino, &mut parent, now)?;
        Ok(pb::MutateReply { attr: Some(target.to_attr(target_ino)), ..Default::default() })
    }

    /// Drops one link of `ino` (already removed from its directory); returns whether the inode
    /// became an orphan.
    fn drop_link(
        &self,
        ino: u64,
        inode: &mut Inode,
        session: u64,
        caller_not_holding: bool,
        now: Time,
    ) -> ApplyResult<bool> {
        inode.ctime = now;
        if inode.is_dir() {
            inode.nlink = 0;
        } else {
            inode.nlink = inode.nlink.saturating_sub(1);
        }
        self.put_inode(ino, inode)?;
        if inode.nlink > 0 {
            return Ok(false);
        }
        let inodes = self.counter("inodes")?;
        self.set_counter("inodes", inodes.saturating_sub(1))?;
        self.orphan_or_reclaim(ino, inode, session, caller_not_holding)
    }

    pub(crate) fn unlink(
        &self,
        op: &pb::UnlinkOp,
        caller: &pb::Caller,
        session: u64,
        now: Time,
    ) -> ApplyResult<pb::MutateReply> {
        if op.name.len() > pb::NAME_BYTES_MAX {
            return fail(errno::ENAMETOOLONG);
        }
        let parent_ino = op.parent.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut parent = self.by_handle(op.parent.as_ref())?;
        if !parent.is_dir() {
            return fail(errno::ENOTDIR);
        }
        check(access::require(&parent, caller, MAY_EXEC))?;
        let Some(child_ino) = self.dentry(parent_ino, &op.name)? else {
            return fail(errno::ENOENT);
        };
        let mut child = self.inode(child_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
        check(access::may_delete(&parent, &child, caller))?;
        if op.directory {
            if !child.is_dir() {
                return fail(errno::ENOTDIR);
            }
            if !self.dir_is_empty(child_ino)? {
                return fail(errno::ENOTEMPTY);
            }
        } else if child.is_dir() {
            return fail(errno::EISDIR);
        }
        self.remove_dentry(parent_ino, &op.name)?;
        if child.is_dir() {
            parent.nlink = parent.nlink.saturating_sub(1);
            // Nothing more can be created in it.
            self.delete(DELEGATIONS, &key_u64(child_ino))?;
        }
        self.touch_dir(parent_ino, &mut parent, now)?;
        // A file whose recorded directory loses its name there has no known place left (its
        // other links may be anywhere): confinement then counts it as outside.
        if !child.is_dir() && child.parent == parent_ino {
            child.parent = 0;
        }
        let orphaned = self.drop_link(child_ino, &mut child, session, op.caller_not_holding, now)?;
        Ok(pb::MutateReply {
            attr: Some(child.to_attr(child_ino)),
            orphaned,
            parent: Some(parent.to_attr(parent_ino)),
            ..Default::default()
        })
    }

    /// Whether `ancestor` is `dir` or one of its ancestors.
    fn is_ancestor(&self, ancestor: u64, mut dir: u64) -> ApplyResult<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = match self.inode(dir)? {
                Some(inode) => inode.parent,
                None => return Ok(false),
            };
        }
        Err(ApplyError::Corrupt {
            table: "inodes".into(),
            detail: "directory parent chain does not reach the root".into(),
        })
    }

    fn rename(&self, op: &pb::RenameOp, caller: &pb::Caller, session: u64, now: Time) -> ApplyResult<pb::MutateReply> {
        const NOREPLACE: u32 = 1;
        const EXCHANGE: u32 = 2;
        check_name(&op.new_name)?;
        if op.name.len() > pb::NAME_BYTES_MAX {
            return fail(errno::ENAMETOOLONG);
        }
        if op.flags & !(NOREPLACE | EXCHANGE) != 0 || op.flags == NOREPLACE | EXCHANGE {
            return fail(errno::EINVAL);
        }
        let src_parent_ino = op.parent.as_ref().map(|h| h.ino).unwrap_or_default();
        let dst_parent_ino = op.new_parent.as_ref().map(|h| h.ino).unwrap_or_default();
        let src_parent = self.by_handle(op.parent.as_ref())?;
        let dst_parent = self.by_handle(op.new_parent.as_ref())?;
        if !src_parent.is_dir() || !dst_parent.is_dir() {
            return fail(errno::ENOTDIR);
        }
        check(access::require(&src_parent, caller, MAY_EXEC))?;
        check(access::require(&dst_parent, caller, MAY_EXEC))?;
        let Some(src_ino) = self.dentry(src_parent_ino, &op.name)? else {
            return fail(errno::ENOENT);
        };
        let mut src = self.inode(src_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
        let dst_ino = self.dentry(dst_parent_ino, &op.new_name)?;
        // As renameat2(2) reports them: the flags' conditions on the names before permission.
        if op.flags & EXCHANGE != 0 && dst_ino.is_none() {
            return fail(errno::ENOENT);
        }
        if op.flags & NOREPLACE != 0 && dst_ino.is_some() {
            return fail(errno::EEXIST);
        }
        check(access::may_delete(&src_parent, &src, caller))?;
        // A directory that moves to another parent has its ".." rewritten.
        if src.is_dir() && src_parent_ino != dst_parent_ino {
            check(access::require(&src, caller, MAY_WRITE))?;
        }
        match dst_ino {
            Some(dst_ino) => {
                let dst = self.inode(dst_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
                check(access::may_delete(&dst_parent, &dst, caller))?;
                if op.flags & EXCHANGE != 0 && dst.is_dir() && src_parent_ino != dst_parent_ino {
                    check(access::require(&dst, caller, MAY_WRITE))?;
                }
            }
            None => check(access::require(&dst_parent, caller, MAY_WRITE | MAY_EXEC))?,
        }
        if op.flags & EXCHANGE != 0 {
            let Some(dst_ino) = dst_ino else {
                return fail(errno::ENOENT);
            };
            return self.exchange(op, src_ino, src, dst_ino, now);
        }
        if let Some(dst_ino) = dst_ino {
            if op.flags & NOREPLACE != 0 {
                return fail(errno::EEXIST);
            }
            if dst_ino == src_ino {
                // Two links to one inode: POSIX says do nothing.
                return Ok(pb::MutateReply { attr: Some(src.to_attr(src_ino)), ..Default::default() });
            }
            let dst = self.inode(dst_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
            match (src.is_dir(), dst.is_dir()) {
                (true, false) => return fail(errno::ENOTDIR),
                (false, true) => return fail(errno::EISDIR),
                (true, true) if !self.dir_is_empty(dst_ino)? => return fail(errno::ENOTEMPTY),
                _ => {}
            }
        }
        if src.is_dir() && src_parent_ino != dst_parent_ino && self.is_ancestor(src_ino, dst_parent_ino)? {
            return fail(errno::EINVAL);
        }
        if src.is_dir() && dst_ino.is_none() && src_parent_ino != dst_parent_ino && dst_parent.nlink >= LINKS_MAX {
            return fail(errno::EMLINK);
        }
        // Checks done; from here on every step writes.
        let mut orphaned = false;
        if let Some(dst_ino) = dst_ino {
            let mut dst = self.inode(dst_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
            self.remove_dentry(dst_parent_ino, &op.new_name)?;
            if dst.is_dir() {
                let mut parent = self.inode(dst_parent_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
                parent.nlink = parent.nlink.saturating_sub(1);
                self.put_inode(dst_parent_ino, &parent)?;
            }
            if !dst.is_dir() && dst.parent == dst_parent_ino {
                dst.parent = 0;
            }
            orphaned = self.drop_link(dst_ino, &mut dst, session, op.caller_not_holding, now)?;
        }
        self.remove_dentry(src_parent_ino, &op.name)?;
        self.put_dentry(dst_parent_ino, &op.new_name, src_ino)?;
        src.parent = dst_parent_ino;
        src.ctime = now;
        self.put_inode(src_ino, &src)?;
        let mut src_parent = self.inode(src_parent_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
        if src.is_dir() && src_parent_ino != dst_parent_ino {
            src_parent.nlink = src_parent.nlink.saturating_sub(1);
        }
        self.touch_dir(src_parent_ino, &mut src_parent, now)?;
        if src_parent_ino != dst_parent_ino {
            let mut dst_parent = self.inode(dst_parent_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
            if src.is_dir() {
                dst_parent.nlink += 1;
            }
            self.touch_dir(dst_parent_ino, &mut dst_parent, now)?;
        }
        Ok(pb::MutateReply {
            attr: Some(src.to_attr(src_ino)),
            orphaned,
            changed: dst_ino.into_iter().collect(),
            ..Default::default()
        })
    }

    fn exchange(
        &self,
        op: &pb::RenameOp,
        src_ino: u64,
        mut src: Inode,
        dst_ino: u64,
        now: Time,
    ) -> ApplyResult<pb::MutateReply> {
        let src_parent_ino = op.parent.as_ref().map(|h| h.ino).unwrap_or_default();
        let dst_parent_ino = op.new_parent.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut dst = self.inode(dst_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
        if src_parent_ino != dst_parent_ino {
            if src.is_dir() && self.is_ancestor(src_ino, dst_parent_ino)? {
                return fail(errno::EINVAL);
            }
            if dst.is_dir() && self.is_ancestor(dst_ino, src_parent_ino)? {
                return fail(errno::EINVAL);
            }
        }
        self.put_dentry(src_parent_ino, &op.name, dst_ino)?;
        self.put_dentry(dst_parent_ino, &op.new_name, src_ino)?;
        if src_parent_ino != dst_parent_ino && src.is_dir() != dst.is_dir() {
            let mut src_parent = self.inode(src_parent_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
            let mut dst_parent = self.inode(dst_parent_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
            if src.is_dir() {
                src_parent.nlink -= 1;
                dst_parent.nlink += 1;
            } else {
                src_parent.nlink += 1;
                dst_parent.nlink -= 1;
            }
            self.put_inode(src_parent_ino, &src_parent)?;
            self.put_inode(dst_parent_ino, &dst_parent)?;
        }
        src.parent = dst_parent_ino;
        dst.parent = src_parent_ino;
        src.ctime = now;
        dst.ctime = now;
        self.put_inode(src_ino, &src)?;
        self.put_inode(dst_ino, &dst)?;
        for parent_ino in [src_parent_ino, dst_parent_ino] {
            let mut parent = self.inode(parent_ino)?.ok_or(ApplyError::Errno(errno::ENOENT))?;
            self.touch_dir(parent_ino, &mut parent, now)?;
        }
        Ok(pb::MutateReply { attr: Some(src.to_attr(src_ino)), changed: vec![dst_ino], ..Default::default() })
    }

    fn set_attr(&self, op: &pb::SetAttrOp, caller: &pb::Caller, now: Time) -> ApplyResult<pb::MutateReply> {
        let ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut inode = self.by_handle(op.target.as_ref())?;
        check(may_set_attr(&inode, op, caller))?;
        if let Some(size) = op.size {
            if inode.is_dir() {
                return fail(errno::EISDIR);
            }
            if !inode.is_regular() {
                return fail(errno::EINVAL);
            }
            if size > FILE_SIZE_MAX {
                return fail(errno::EFBIG);
            }
        }
        if let Some(size) = op.size {
            if size < inode.size {
                let change = self.cut_range(ino, size, u64::MAX)?;
                inode.allocated = (inode.allocated as i64 + change).max(0) as u64;
            }
            if size != inode.size {
                inode.mtime = now;
            }
            inode.size = size;
        }
        if let Some(perm) = op.perm {
            let mut perm = perm & 0o7777;
            if caller.uid != 0 && !caller_in_group(caller, op.gid.unwrap_or(inode.gid)) {
                perm &= !S_ISGID;
            }
            inode.perm = perm;
        }
        let owner_changes = op.uid.is_some_and(|uid| uid != inode.uid) || op.gid.is_some_and(|gid| gid != inode.gid);
        if let Some(uid) = op.uid {
            inode.uid = uid;
        }
        if let Some(gid) = op.gid {
            inode.gid = gid;
        }
        if (owner_changes && op.perm.is_none() && !inode.is_dir()) || op.kill_suid {
            inode.perm &= !S_ISUID;
            if inode.perm & S_IXGRP != 0 {
                inode.perm &= !S_ISGID;
            }
        }
        let resolve = |set: &pb::TimeSet| match &set.value {
            Some(pb::time_set::Value::At(t)) => Time::from_pb(t),
            _ => now,
        };
        if let Some(atime) = &op.atime {
            inode.atime = resolve(atime);
        }
        if let Some(mtime) = &op.mtime {
            inode.mtime = resolve(mtime);
        }
        inode.ctime = now;
        self.put_inode(ino, &inode)?;
        Ok(pb::MutateReply { attr: Some(inode.to_attr(ino)), ..Default::default() })
    }

    fn set_xattr(&self, op: &pb::SetXattrOp, caller: &pb::Caller, now: Time) -> ApplyResult<pb::MutateReply> {
        const CREATE: u32 = 1;
        const REPLACE: u32 = 2;
        check_xattr_name(&op.name)?;
        if op.value.len() > XATTR_VALUE_MAX {
            return fail(errno::E2BIG);
        }
        let ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut inode = self.by_handle(op.target.as_ref())?;
        check(check_xattr_access(&inode, &op.name, caller, MAY_WRITE))?;
        let key = key_u64_name(ino, &op.name);
        let exists = self.get(XATTRS, &key)?.is_some();
        if op.flags & CREATE != 0 && exists {
            return fail(errno::EEXIST);
        }
        if op.flags & REPLACE != 0 && !exists {
            return fail(errno::ENODATA);
        }
        self.put(XATTRS, &key, &op.value)?;
        inode.ctime = now;
        self.put_inode(ino, &inode)?;
        Ok(pb::MutateReply { attr: Some(inode.to_attr(ino)), ..Default::default() })
    }

    fn remove_xattr(&self, op: &pb::RemoveXattrOp, caller: &pb::Caller, now: Time) -> ApplyResult<pb::MutateReply> {
        check_xattr_name(&op.name)?;
        let ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut inode = self.by_handle(op.target.as_ref())?;
        check(check_xattr_access(&inode, &op.name, caller, MAY_WRITE))?;
        let key = key_u64_name(ino, &op.name);
        if self.get(XATTRS, &key)?.is_none() {
            return fail(errno::ENODATA);
        }
        self.delete(XATTRS, &key)?;
        inode.ctime = now;
        self.put_inode(ino, &inode)?;
        Ok(pb::MutateReply { attr: Some(inode.to_attr(ino)), ..Default::default() })
    }

    /// A commit may name a block new to meta only if `session` uploaded it (a block id starts
    /// with the id of the session that made it): once a session has expired, nothing can make
    /// its uncommitted uploads live, so data servers may collect them.
    pub(crate) fn commit(
        &self,
        op: &pb::CommitOp,
        caller: &pb::Caller,
        session: u64,
        now: Time,
    ) -> ApplyResult<pb::MutateReply> {
        let ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut inode = self.by_handle(op.target.as_ref())?;
        check(access::require_data_access(&inode, caller, MAY_WRITE))?;
        self.check_lock_token(ino, session, op.lock_token)?;
        if inode.is_dir() {
            return fail(errno::EISDIR);
        }
        if !inode.is_regular() {
            return fail(errno::EINVAL);
        }
        if op.min_size > FILE_SIZE_MAX {
            return fail(errno::EFBIG);
        }
        let mut inline_bytes = 0usize;
        let mut new_blocks: Vec<(u128, BlockRecord)> = Vec::new();
        let mut extents_in = Vec::with_capacity(op.extents.len());
        for extent in &op.extents {
            let end = extent.offset.checked_add(extent.len).ok_or(ApplyError::Errno(errno::EINVAL))?;
            if extent.len == 0 {
                continue;
            }
            if end > FILE_SIZE_MAX {
                return fail(errno::EFBIG);
            }
            let source = match &extent.block {
                Some(block) => {
                    if block.digest.len() != 32 || block.servers.is_empty() || block.len == 0 {
                        return fail(errno::EINVAL);
                    }
                    if extent.block_offset as u64 + extent.len > block.len as u64 || !extent.inline_data.is_empty() {
                        return fail(errno::EINVAL);
                    }
                    let id = pb::BlockId::of(block).0;
                    let known: Option<BlockRecord> = self.decoded(BLOCKS, &key_u128(id))?;
                    // Naming a block some file already uses takes knowing its digest, which
                    // only a reader of that file got: a guessed id alone opens nothing.
                    if let Some(known) = &known
                        && (known.digest.as_slice() != block.digest.as_slice() || known.len != block.len)
                    {
                        return fail(errno::EINVAL);
                    }
                    if known.is_none() && !new_blocks.iter().any(|(b, _)| *b == id) {
                        if block.id_hi != session {
                            return fail(errno::ESTALE);
                        }
                        // A copy on a server removed since the placement is not recorded: it
                        // would be lost from the start.
                        let mut servers = Vec::with_capacity(block.servers.len());
                        for &server in &block.servers {
                            if !self.data_server(server)?.is_some_and(|r| r.standing == Standing::Removed) {
                                servers.push(server);
                            }
                        }
                        if servers.is_empty() {
                            return fail(errno::EIO);
                        }
                        let mut digest = [0u8; 32];
                        digest.copy_from_slice(&block.digest);
                        new_blocks.push((id, BlockRecord { len: block.len, digest, servers, refs: 0 }));
                    }
                    Source::Block { id, offset: extent.block_offset }
                }
                None => {
                    if extent.inline_data.len() as u64 != extent.len {
                        return fail(errno::EINVAL);
                    }
                    inline_bytes += extent.inline_data.len();
                    Source::Inline(extent.inline_data.clone())
                }
            };
            extents_in.push(Extent { offset: extent.offset, len: extent.len, source });
        }
        if inline_bytes > INLINE_BYTES_MAX {
            return fail(errno::EINVAL);
        }
        for (id, _) in &new_blocks {
            if self.get(GARBAGE, &key_u128(*id))?.is_some() {
                // A block already given up for deletion may not come back.
                return fail(errno::ESTALE);
            }
        }
        for (id, record) in &new_blocks {
            self.put(BLOCKS, &key_u128(*id), &encode(record))?;
        }
        let mut by_chunk: std::collections::BTreeMap<u64, Vec<Extent>> = std::collections::BTreeMap::new();
        let mut end_max = 0u64;
        for extent in extents_in {
            end_max = end_max.max(extent.end());
            for (chunk, piece) in extents::split_by_chunk(&extent) {
                by_chunk.entry(chunk).or_default().push(piece);
            }
        }
        let mut allocated = inode.allocated as i64;
        for (chunk, pieces) in by_chunk {
            let old = self.chunk(ino, chunk)?;
            let mut new = old.clone();
            for piece in pieces {
                extents::overlay(&mut new, piece);
            }
            allocated += self.replace_chunk(ino, chunk, &old, &new)?;
        }
        // Blocks named by the commit but shadowed by a later extent of the same commit.
        for (id, _) in &new_blocks {
            let key = key_u128(*id);
            if let Some(record) = self.decoded::<BlockRecord>(BLOCKS, &key)?
                && record.refs == 0
            {
                self.delete(BLOCKS, &key)?;
                self.put(GARBAGE, &key, &encode(&record))?;
            }
        }
        inode.allocated = allocated.max(0) as u64;
        inode.size = inode.size.max(op.min_size).max(end_max);
        if op.update_mtime {
            inode.mtime = now;
            inode.ctime = now;
        }
        if op.kill_suid {
            inode.perm &= !S_ISUID;
            if inode.perm & S_IXGRP != 0 {
                inode.perm &= !S_ISGID;
            }
            inode.ctime = now;
        }
        self.put_inode(ino, &inode)?;
        Ok(pb::MutateReply { attr: Some(inode.to_attr(ino)), ..Default::default() })
    }

    fn fallocate(&self, op: &pb::FallocateOp, caller: &pb::Caller, now: Time) -> ApplyResult<pb::MutateReply> {
        const KEEP_SIZE: u32 = 0x01;
        const PUNCH_HOLE: u32 = 0x02;
        const ZERO_RANGE: u32 = 0x10;
        let ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        let mut inode = self.by_handle(op.target.as_ref())?;
        check(access::require_data_access(&inode, caller, MAY_WRITE))?;
        if inode.is_dir() {
            return fail(errno::EISDIR);
        }
        if !inode.is_regular() {
            return fail(errno::ENODEV);
        }
        if op.len == 0 {
            return fail(errno::EINVAL);
        }
        let end = op.offset.checked_add(op.len).ok_or(ApplyError::Errno(errno::EFBIG))?;
        if end > FILE_SIZE_MAX {
            return fail(errno::EFBIG);
        }
        match op.mode {
            0 | KEEP_SIZE => {}
            m if m == PUNCH_HOLE | KEEP_SIZE || m == ZERO_RANGE || m == ZERO_RANGE | KEEP_SIZE => {
                let change = self.cut_range(ino, op.offset, end)?;
                inode.allocated = (inode.allocated as i64 + change).max(0) as u64;
                inode.mtime = now;
            }
            _ => return fail(errno::EOPNOTSUPP),
        }
        if op.mode & KEEP_SIZE == 0 && end > inode.size {
            inode.size = end;
            inode.mtime = now;
        }
        inode.ctime = now;
        self.put_inode(ino, &inode)?;
        Ok(pb::MutateReply { attr: Some(inode.to_attr(ino)), ..Default::default() })
    }

    fn release(&self, op: &pb::ReleaseOp, session: u64) -> ApplyResult<pb::MutateReply> {
        let ino = op.target.as_ref().map(|h| h.ino).unwrap_or_default();
        self.release_orphan(ino, session)?;
        Ok(pb::MutateReply::default())
    }
}

/// Extended attribute names: a known namespace and at most 255 bytes, as on ext4.
pub fn check_xattr_name(name: &[u8]) -> ApplyResult<()> {
    match pb::xattr_name_errno(name) {
        Some(code) => fail(code),
        None => Ok(()),
    }
}
