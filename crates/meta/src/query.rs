//! Reads of the namespace from one consistent redb read transaction: lookups, attributes,
//! listings and data maps. Nothing here writes.

use cairn_proto::{self as pb, errno};
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, TableHandle};

use crate::extents::{CHUNK_BYTES, Extent, Source};
use crate::model::*;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("errno {0}")]
    Errno(i32),
    #[error("metadata store: {0}")]
    Store(String),
}

impl<E: Into<redb::Error>> From<E> for QueryError {
    fn from(e: E) -> Self {
        QueryError::Store(e.into().to_string())
    }
}

pub type QueryResult<T> = Result<T, QueryError>;

/// Directory entries returned in one page at most.
pub const READDIR_PAGE_MAX: usize = 1024;
pub use cairn_proto::EXTENTS_PER_REPLY_MAX;

pub struct Query {
    txn: ReadTransaction,
}

fn corrupt(table: &str, e: impl std::fmt::Display) -> QueryError {
    QueryError::Store(format!("corrupt record in {table}: {e}"))
}

impl Query {
    pub fn new(txn: ReadTransaction) -> Self {
        Query { txn }
    }

    fn get(&self, table: Table, key: &[u8]) -> QueryResult<Option<Vec<u8>>> {
        let table = self.txn.open_table(table)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn decoded<T: for<'de> serde::Deserialize<'de>>(&self, table: Table, key: &[u8]) -> QueryResult<Option<T>> {
        match self.get(table, key)? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some).map_err(|e| corrupt(table.name(), e)),
        }
    }

    pub fn inode(&self, ino: u64) -> QueryResult<Option<Inode>> {
        self.decoded(INODES, &key_u64(ino))
    }

    pub fn by_handle(&self, handle: Option<&pb::FileHandle>) -> QueryResult<(u64, Inode)> {
        let handle = handle.ok_or(QueryError::Errno(errno::EINVAL))?;
        match self.inode(handle.ino)? {
            Some(inode) if inode.generation == handle.generation => Ok((handle.ino, inode)),
            _ => Err(QueryError::Errno(errno::ESTALE)),
        }
    }

    pub fn root(&self) -> QueryResult<pb::FileHandle> {
        let root = self.inode(ROOT_INO)?.ok_or_else(|| QueryError::Store("file system not initialised".into()))?;
        Ok(pb::FileHandle { ino: ROOT_INO, generation: root.generation })
    }

    pub fn getattr(&self, handle: Option<&pb::FileHandle>) -> QueryResult<pb::Attr> {
        let (ino, inode) = self.by_handle(handle)?;
        self.attr_read(ino, &inode, &self.txn.open_table(XATTRS)?)
    }

    /// An inode's attributes as a read answers them: with whether it has no extended
    /// attributes, so that `ls -l` asking each file for one needs no request of its own.
    fn attr_read(
        &self,
        ino: u64,
        inode: &Inode,
        xattrs: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    ) -> QueryResult<pb::Attr> {
        let mut names = xattrs.range(key_u64(ino).as_slice()..key_u64(ino + 1).as_slice())?;
        Ok(pb::Attr { no_xattrs: names.next().is_none(), ..inode.to_attr(ino) })
    }

    pub fn lookup(&self, parent: Option<&pb::FileHandle>, name: &[u8]) -> QueryResult<pb::Attr> {
        if name.len() > pb::NAME_BYTES_MAX {
            return Err(QueryError::Errno(errno::ENAMETOOLONG));
        }
        if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
            return Err(QueryError::Errno(errno::EINVAL));
        }
        let (parent_ino, parent) = self.by_handle(parent)?;
        if !parent.is_dir() {
            return Err(QueryError::Errno(errno::ENOTDIR));
        }
        let child = if name == b"." {
            Some(parent_ino)
        } else if name == b".." {
            Some(parent.parent)
        } else {
            self.decoded::<u64>(DENTRIES, &key_u64_name(parent_ino, name))?
        };
        let child = child.ok_or(QueryError::Errno(errno::ENOENT))?;
        let inode = self.inode(child)?.ok_or(QueryError::Errno(errno::ENOENT))?;
        self.attr_read(child, &inode, &self.txn.open_table(XATTRS)?)
    }

    pub fn readdir(
        &self,
        dir: Option<&pb::FileHandle>,
        after: &[u8],
        limit: usize,
    ) -> QueryResult<(Vec<pb::DirEntry>, bool)> {
        let (dir_ino, inode) = self.by_handle(dir)?;
        if !inode.is_dir() {
            return Err(QueryError::Errno(errno::ENOTDIR));
        }
        let limit = limit.clamp(1, READDIR_PAGE_MAX);
        let dentries = self.txn.open_table(DENTRIES)?;
        let xattrs = self.txn.open_table(XATTRS)?;
        let start = if after.is_empty() { key_u64(dir_ino).to_vec() } else { key_u64_name(dir_ino, after) };
        let end = key_u64(dir_ino + 1);
        let mut entries = Vec::new();
        let mut eof = true;
        for item in dentries.range(start.as_slice()..end.as_slice())? {
            let (key, value) = item?;
            let name = &key.value()[8..];
            if !after.is_empty() && name == after {
                continue;
            }
            if entries.len() == limit {
                eof = false;
                break;
            }
            let child: u64 = decode(value.value()).map_err(|e| corrupt("dentries", e))?;
            let Some(child_inode) = self.inode(child)? else { continue };
            let attr = self.attr_read(child, &child_inode, &xattrs)?;
            entries.push(pb::DirEntry { name: name.to_vec(), attr: Some(attr) });
        }
        Ok((entries, eof))
    }

    pub fn readlink(&self, handle: Option<&pb::FileHandle>) -> QueryResult<Vec<u8>> {
        let (_, inode) = self.by_handle(handle)?;
        if inode.kind != pb::FileKind::Symlink as i32 {
            return Err(QueryError::Errno(errno::EINVAL));
        }
        Ok(inode.symlink_target)
    }

    pub fn getxattr(&self, handle: Option<&pb::FileHandle>, name: &[u8]) -> QueryResult<Vec<u8>> {
        crate::namespace::check_xattr_name(name).map_err(|e| match e {
            crate::namespace::ApplyError::Errno(code) => QueryError::Errno(code),
            other => QueryError::Store(other.to_string()),
        })?;
        let (ino, _) = self.by_handle(handle)?;
        self.get(XATTRS, &key_u64_name(ino, name))?.ok_or(QueryError::Errno(errno::ENODATA))
    }

    pub fn listxattr(&self, handle: Option<&pb::FileHandle>) -> QueryResult<Vec<Vec<u8>>> {
        let (ino, _) = self.by_handle(handle)?;
        let table = self.txn.open_table(XATTRS)?;
        let start = key_u64(ino);
        let end = key_u64(ino + 1);
        let mut names = Vec::new();
        for item in table.range(start.as_slice()..end.as_slice())? {
            let key = item?.0;
            let name = &key.value()[8..];
            // A name no longer kept (a label stored before Cairn refused it) is not listed.
            if pb::xattr_name_errno(name).is_none() {
                names.push(name.to_vec());
            }
        }
        Ok(names)
    }

    /// The data map of `[offset, offset + len)` with each block's record joined in.
    pub fn extents(
        &self,
        handle: Option<&pb::FileHandle>,
        offset: u64,
        len: u64,
    ) -> QueryResult<(pb::Attr, Vec<pb::Extent>)> {
        let (ino, inode) = self.by_handle(handle)?;
        if inode.is_dir() {
            return Err(QueryError::Errno(errno::EISDIR));
        }
        let end = offset.saturating_add(len).min(inode.size);
        let mut out = Vec::new();
        if offset < end {
            let table = self.txn.open_table(EXTENTS)?;
            let first = key_u64_u64(ino, offset / CHUNK_BYTES);
            let last = key_u64_u64(ino, (end - 1) / CHUNK_BYTES);
            for item in table.range(first.as_slice()..=last.as_slice())? {
                let (_, value) = item?;
                let extents: Vec<Extent> = decode(value.value()).map_err(|e| corrupt("extents", e))?;
                for extent in extents.iter().filter_map(|e| e.slice(offset, end)) {
                    if out.len() >= EXTENTS_PER_REPLY_MAX {
                        break;
                    }
                    out.push(self.extent_to_pb(&extent)?);
                }
            }
        }
        Ok((inode.to_attr(ino), out))
    }

    fn extent_to_pb(&self, extent: &Extent) -> QueryResult<pb::Extent> {
        Ok(match &extent.source {
            Source::Inline(data) => pb::Extent {
                offset: extent.offset,
                len: extent.len,
                block: None,
                block_offset: 0,
                inline_data: data.clone(),
            },
            Source::Block { id, offset } => {
                let record: BlockRecord = self
                    .decoded(BLOCKS, &key_u128(*id))?
                    .ok_or_else(|| QueryError::Store(format!("extent names unknown block {id:032x}")))?;
                let block_id = pb::BlockId(*id);
                pb::Extent {
                    offset: extent.offset,
                    len: extent.len,
                    block: Some(pb::BlockRef {
                        id_hi: block_id.hi(),
                        id_lo: block_id.lo(),
                        len: record.len,
                        digest: record.digest.to_vec(),
                        servers: record.servers,
                        token: Vec::new(),
                    }),
                    block_offset: *offset,
                    inline_data: Vec::new(),
                }
            }
        })
    }

    /// Unlinked inodes that `session` may still hold open.
    pub fn orphans_held_by(&self, session: u64, limit: usize) -> QueryResult<Vec<pb::FileHandle>> {
        let table = self.txn.open_table(ORPHANS)?;
        let mut handles = Vec::new();
        for item in table.iter()? {
            let (key, value) = item?;
            let orphan: Orphan = decode(value.value()).map_err(|e| corrupt("orphans", e))?;
            if orphan.holders.contains(&session) {
                handles.push(pb::FileHandle { ino: u64_of_key(key.value()), generation: orphan.generation });
                if handles.len() >= limit {
                    break;
                }
            }
        }
        Ok(handles)
    }

    /// The byte-range locks held on `ino`.
    pub fn locks(&self, ino: u64) -> QueryResult<Vec<LockRecord>> {
        let table = self.txn.open_table(LOCKS)?;
        match table.get(key_u64(ino).as_slice())? {
            None => Ok(Vec::new()),
            Some(value) => decode(value.value()).map_err(|e| corrupt("locks", e)),
        }
    }

    /// The data servers not removed: (id, address).
    pub fn data_servers(&self) -> QueryResult<Vec<(u64, String)>> {
        Ok(self
            .data_server_records()?
            .into_iter()
            .filter(|(_, record)| record.standing != Standing::Removed)
            .map(|(id, record)| (id, record.address))
            .collect())
    }

    /// Every data server ever recorded, removed ones included.
    pub fn data_server_records(&self) -> QueryResult<Vec<(u64, DataServerRecord)>> {
        let table = self.txn.open_table(DATA_SERVERS)?;
        let mut servers = Vec::new();
        for item in table.iter()? {
            let (key, value) = item?;
            let record = DataServerRecord::decode(value.value()).map_err(|e| corrupt("data_servers", e))?;
            servers.push((u64_of_key(key.value()), record));
        }
        Ok(servers)
    }

    /// How many live blocks list a copy on data server `id` (a pass over all blocks).
    pub fn blocks_on(&self, id: u64) -> QueryResult<u64> {
        let table = self.txn.open_table(BLOCKS)?;
        count_blocks_on(&table, id).map_err(|e| match e {
            ScanError::Storage(e) => e.into(),
            ScanError::Corrupt(e) => corrupt("blocks", e),
        })
    }

    /// Up to `limit` live blocks with ids above `after`, in id order (a page of a scan).
    pub fn blocks_after(&self, after: Option<u128>, limit: usize) -> QueryResult<Vec<(u128, BlockRecord)>> {
        let table = self.txn.open_table(BLOCKS)?;
        let start = after.map(key_u128);
        let range = match &start {
            Some(key) => {
                table.range::<&[u8]>((std::ops::Bound::Excluded(key.as_slice()), std::ops::Bound::Unbounded))?
            }
            None => table.range::<&[u8]>(..)?,
        };
        let mut blocks = Vec::new();
        for item in range.take(limit) {
            let (key, value) = item?;
            blocks.push((u128_of_key(key.value()), decode(value.value()).map_err(|e| corrupt("blocks", e))?));
        }
        Ok(blocks)
    }

    /// Which of `ids`, held by data server `server`, no longer need to be there: meta's record
    /// of the block does not list that server, or meta has no record and the session that
    /// uploaded it is gone (so no commit can ever name it).
    pub fn orphan_copies(&self, server: u64, ids: &[u128]) -> QueryResult<Vec<u128>> {
        let mut orphans = Vec::new();
        for &id in ids {
            let key = key_u128(id);
            let record = match self.decoded::<BlockRecord>(BLOCKS, &key)? {
                Some(record) => Some(record),
                None => self.decoded::<BlockRecord>(GARBAGE, &key)?,
            };
            let orphan = match record {
                Some(record) => !record.servers.contains(&server),
                None => self.get(SESSIONS, &key_u64((id >> 64) as u64))?.is_none(),
            };
            if orphan {
                orphans.push(id);
            }
        }
        Ok(orphans)
    }

    pub fn block(&self, id: u128) -> QueryResult<Option<BlockRecord>> {
        self.decoded(BLOCKS, &key_u128(id))
    }

    pub fn garbage(&self, limit: usize) -> QueryResult<Vec<(u128, BlockRecord)>> {
        let table = self.txn.open_table(GARBAGE)?;
        let mut blocks = Vec::new();
        for item in table.iter()?.take(limit) {
            let (key, value) = item?;
            blocks.push((u128_of_key(key.value()), decode(value.value()).map_err(|e| corrupt("garbage", e))?));
        }
        Ok(blocks)
    }

    pub fn counter(&self, name: &str) -> QueryResult<u64> {
        Ok(self.decoded::<u64>(SM_META, name.as_bytes())?.unwrap_or(0))
    }

    /// The index of the last log entry applied to this state.
    pub fn last_applied_index(&self) -> QueryResult<u64> {
        let applied: Option<openraft::type_config::alias::LogIdOf<crate::raft_types::TypeConfig>> =
            self.decoded::<Option<_>>(SM_META, b"last_applied")?.flatten();
        Ok(applied.map(|log_id| log_id.index).unwrap_or(0))
    }

    /// BLAKE3 over every state-machine table, in a fixed order: two members that applied the
    /// same log prefix hash the same.
    pub fn state_digest(&self) -> QueryResult<[u8; 32]> {
        let mut hasher = blake3::Hasher::new();
        for definition in STATE_TABLES {
            hasher.update(definition.name().as_bytes());
            let table = self.txn.open_table(definition)?;
            for item in table.iter()? {
                let (key, value) = item?;
                for part in [key.value(), value.value()] {
                    hasher.update(&(part.len() as u64).to_le_bytes());
                    hasher.update(part);
                }
            }
        }
        Ok(*hasher.finalize().as_bytes())
    }

    pub fn fs_id(&self) -> QueryResult<Option<String>> {
        Ok(self.get(SM_META, b"fs_id")?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    pub fn session_count(&self) -> QueryResult<u64> {
        Ok(self.txn.open_table(SESSIONS)?.len()?)
    }

    /// Every session that has not expired yet (as of the last expiry applied).
    pub fn session_ids(&self) -> QueryResult<Vec<u64>> {
        let table = self.txn.open_table(SESSIONS)?;
        let mut ids = Vec::new();
        for item in table.iter()? {
            ids.push(crate::model::u64_of_key(item?.0.value()));
        }
        Ok(ids)
    }

    pub fn session_exists(&self, session: u64) -> QueryResult<bool> {
        Ok(self.get(SESSIONS, &key_u64(session))?.is_some())
    }

    /// Who opened `session`, None for no such session.
    pub fn session_owner(&self, session: u64) -> QueryResult<Option<String>> {
        match self.get(SESSIONS, &key_u64(session))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(Session::decode(&bytes).map_err(|e| corrupt("sessions", e))?.owner)),
        }
    }

    pub fn credential(&self, id: u64) -> QueryResult<Option<pb::Credential>> {
        use prost::Message;
        match self.get(CREDENTIALS, &key_u64(id))? {
            None => Ok(None),
            Some(bytes) => pb::Credential::decode(bytes.as_slice()).map(Some).map_err(|e| corrupt("credentials", e)),
        }
    }

    pub fn credentials(&self) -> QueryResult<Vec<pb::Credential>> {
        use prost::Message;
        let table = self.txn.open_table(CREDENTIALS)?;
        let mut all = Vec::new();
        for item in table.iter()? {
            let (_, value) = item?;
            all.push(pb::Credential::decode(value.value()).map_err(|e| corrupt("credentials", e))?);
        }
        Ok(all)
    }

    /// Whether every inode of `inos` lies under directory `root` (see `access::within`).
    pub fn within(&self, root: u64, inos: &[u64]) -> QueryResult<bool> {
        crate::access::all_within(root, inos, |at| Ok(self.inode(at)?.map(|i| i.parent)))
    }

    /// The session holding directory `ino` delegated, if it lives.
    pub fn delegation_holder(&self, ino: u64) -> QueryResult<Option<u64>> {
        let Some(record) = self.decoded::<DelegationRecord>(DELEGATIONS, &key_u64(ino))? else { return Ok(None) };
        Ok(self.session_exists(record.session)?.then_some(record.session))
    }

    /// A directory among `inos` that a live session other than `session` holds delegated:
    /// (directory, holder). A read of it waits until the holder let go.
    pub fn delegated_elsewhere(&self, session: u64, inos: &[u64]) -> QueryResult<Option<(u64, u64)>> {
        for &ino in inos {
            if let Some(holder) = self.delegation_holder(ino)?.filter(|h| *h != session) {
                return Ok(Some((ino, holder)));
            }
        }
        Ok(None)
    }

    /// Every directory among `inos` that a live session other than `session` holds delegated,
    /// with its holder.
    pub fn delegations_elsewhere(&self, session: u64, inos: &[u64]) -> QueryResult<Vec<(u64, u64)>> {
        let mut held = Vec::new();
        for &ino in inos {
            if let Some(holder) = self.delegation_holder(ino)?.filter(|h| *h != session) {
                held.push((ino, holder));
            }
        }
        Ok(held)
    }

    pub fn stored_result(&self, session: u64, seq: u64) -> QueryResult<Option<Vec<u8>>> {
        self.get(RESULTS, &key_u64_u64(session, seq))
    }
}

impl Query {
    /// Whether any session's lease ran out by `now_ms`.
    pub fn any_session_expired(&self, now_ms: u64) -> QueryResult<bool> {
        let table = self.txn.open_table(SESSIONS)?;
        for item in table.iter()? {
            let (_, value) = item?;
            let session = Session::decode(value.value()).map_err(|e| corrupt("sessions", e))?;
            if session.expires_ms <= now_ms {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
