//! Raft storage on redb: the log, the vote and the state machine live in one database file.
//!
//! Log appends commit with `Durability::Immediate`, so an entry is on disk before Raft counts
//! it. State-machine applies commit with `Durability::None`: they become durable with the next
//! log append, and after a crash the state rolls back to a point that the log replays from
//! (the applied index is stored in the same transaction as the state it describes).

use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::model::{BLOCK_TOKEN_EPOCH, SM_META, STATE_TABLES, decode, encode};
use crate::namespace::{ApplyError, Tables};
use crate::raft_types::{Command, CommandReply, SESSION_EXPIRED, TypeConfig};
use cairn_proto as pb;

const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Opens (or creates) the metadata database in `dir`.
pub fn open_database(dir: &Path) -> Result<Arc<Database>, redb::Error> {
    std::fs::create_dir_all(dir).map_err(redb::Error::Io)?;
    with_tables(Database::create(dir.join("meta.redb"))?)
}

/// A metadata database in memory, for fuzzing and tests of the state machine alone.
pub fn open_memory_database() -> Result<Arc<Database>, redb::Error> {
    with_tables(Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?)
}

fn with_tables(db: Database) -> Result<Arc<Database>, redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(RAFT_LOG)?;
    txn.open_table(RAFT_META)?;
    for table in STATE_TABLES {
        txn.open_table(table)?;
    }
    txn.commit()?;
    Ok(Arc::new(db))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

/// Runs short storage work on the current worker thread, telling the runtime to move its other
/// tasks elsewhere meanwhile: cheaper than a hop to the blocking pool and back, which costs
/// more than the work on the per-operation path (log append, apply).
async fn inline<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }

    fn meta_value<T: for<'de> Deserialize<'de>>(&self, name: &str) -> io::Result<Option<T>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(RAFT_META).map_err(io_err)?;
        match table.get(name).map_err(io_err)? {
            Some(value) => Ok(Some(decode(value.value()).map_err(io_err)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, name: &str, value: &T, durability: Durability) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(durability).map_err(io_err)?;
        {
            let mut table = txn.open_table(RAFT_META).map_err(io_err)?;
            table.insert(name, encode(value).as_slice()).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Some(i + 1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(io_err)?;
            let table = txn.open_table(RAFT_LOG).map_err(io_err)?;
            let mut entries = Vec::new();
            let iter = match end {
                Some(end) => table.range(start..end),
                None => table.range(start..),
            }
            .map_err(io_err)?;
            for item in iter {
                let (_, value) = item.map_err(io_err)?;
                entries.push(decode(value.value()).map_err(io_err)?);
            }
            Ok(entries)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.meta_value("vote")
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogIdOf<TypeConfig>> = self.meta_value("last_purged")?;
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(RAFT_LOG).map_err(io_err)?;
        let last = match table.last().map_err(io_err)? {
            Some((_, value)) => Some(decode::<EntryOf<TypeConfig>>(value.value()).map_err(io_err)?.log_id),
            None => None,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        let store = self.clone();
        let vote = *vote;
        blocking(move || store.put_meta("vote", &vote, Durability::Immediate)).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        let store = self.clone();
        blocking(move || store.put_meta("committed", &committed, Durability::None)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self.meta_value::<Option<LogIdOf<TypeConfig>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries.into_iter().map(|e| (e.log_id.index, encode(&e))).collect();
        let db = self.db.clone();
        let started = std::time::Instant::now();
        let result = inline(move || {
            let txn = db.begin_write().map_err(io_err)?;
            {
                let mut table = txn.open_table(RAFT_LOG).map_err(io_err)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice()).map_err(io_err)?;
                }
            }
            txn.commit().map_err(io_err)
        })
        .await;
        tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "log entries on disk");
        match result {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|id| id.index + 1).unwrap_or(0);
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(io_err)?;
            {
                let mut table = txn.open_table(RAFT_LOG).map_err(io_err)?;
                table.retain_in(from.., |_, _| false).map_err(io_err)?;
            }
            txn.commit().map_err(io_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(io_err)?;
            {
                let mut table = txn.open_table(RAFT_LOG).map_err(io_err)?;
                table.retain_in(..=log_id.index, |_, _| false).map_err(io_err)?;
                let mut meta = txn.open_table(RAFT_META).map_err(io_err)?;
                meta.insert("last_purged", encode(&log_id).as_slice()).map_err(io_err)?;
            }
            txn.commit().map_err(io_err)
        })
        .await
    }
}

/// A snapshot: the applied position and every state table's rows.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    tables: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    snapshot_path: PathBuf,
}

impl StateMachineStore {
    pub fn new(db: Arc<Database>, dir: &Path) -> Self {
        StateMachineStore { db, snapshot_path: dir.join("snapshot.bin") }
    }

    fn applied(&self) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(SM_META).map_err(io_err)?;
        let applied = match table.get(b"last_applied".as_slice()).map_err(io_err)? {
            Some(v) => decode(v.value()).map_err(io_err)?,
            None => None,
        };
        let membership = match table.get(b"last_membership".as_slice()).map_err(io_err)? {
            Some(v) => decode(v.value()).map_err(io_err)?,
            None => StoredMembershipOf::<TypeConfig>::default(),
        };
        Ok((applied, membership))
    }

    fn apply_batch(&self, entries: Vec<EntryOf<TypeConfig>>) -> io::Result<Vec<CommandReply>> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::None).map_err(io_err)?;
        let mut replies = Vec::with_capacity(entries.len());
        {
            let tables = Tables::new(&txn);
            let mut membership = None;
            let mut last = None;
            for entry in entries {
                last = Some(entry.log_id);
                let reply = match entry.payload {
                    EntryPayload::Blank => CommandReply::default(),
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembershipOf::<TypeConfig>::new(Some(entry.log_id), m));
                        CommandReply::default()
                    }
                    EntryPayload::Normal(command) => apply_command(&tables, command).map_err(io_err)?,
                };
                replies.push(reply);
            }
            let mut table = txn.open_table(SM_META).map_err(io_err)?;
            table.insert(b"last_applied".as_slice(), encode(&last).as_slice()).map_err(io_err)?;
            if let Some(membership) = membership {
                table.insert(b"last_membership".as_slice(), encode(&membership).as_slice()).map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)?;
        Ok(replies)
    }

    fn build(&self) -> io::Result<SnapshotOf<TypeConfig, Vec<u8>>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let mut tables = Vec::with_capacity(STATE_TABLES.len());
        for definition in STATE_TABLES {
            let table = txn.open_table(definition).map_err(io_err)?;
            let mut rows = Vec::new();
            for item in table.iter().map_err(io_err)? {
                let (key, value) = item.map_err(io_err)?;
                rows.push((key.value().to_vec(), value.value().to_vec()));
            }
            tables.push(rows);
        }
        let sm_meta = txn.open_table(SM_META).map_err(io_err)?;
        let last_log_id = match sm_meta.get(b"last_applied".as_slice()).map_err(io_err)? {
            Some(v) => decode(v.value()).map_err(io_err)?,
            None => None,
        };
        let last_membership = match sm_meta.get(b"last_membership".as_slice()).map_err(io_err)? {
            Some(v) => decode(v.value()).map_err(io_err)?,
            None => StoredMembershipOf::<TypeConfig>::default(),
        };
        let data = encode(&SnapshotBody { tables });
        let meta = SnapshotMetaOf::<TypeConfig> { last_log_id, last_membership };
        self.save_snapshot(&meta, &data)?;
        Ok(SnapshotOf::<TypeConfig, Vec<u8>> { meta, snapshot: data })
    }

    fn save_snapshot(&self, meta: &SnapshotMetaOf<TypeConfig>, data: &[u8]) -> io::Result<()> {
        let stored = encode(&StoredSnapshot { meta: meta.clone(), data: data.to_vec() });
        let temp = self.snapshot_path.with_extension("tmp");
        std::fs::write(&temp, stored)?;
        std::fs::File::open(&temp)?.sync_all()?;
        std::fs::rename(&temp, &self.snapshot_path)?;
        if let Some(dir) = self.snapshot_path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn install(&self, meta: &SnapshotMetaOf<TypeConfig>, data: &[u8]) -> io::Result<()> {
        let body: SnapshotBody = decode(data).map_err(io_err)?;
        // Tables are only ever appended to the list, so a snapshot from an older version has
        // a prefix of them; the rest start empty.
        if body.tables.is_empty() || body.tables.len() > STATE_TABLES.len() {
            return Err(io_err("snapshot has the wrong number of tables"));
        }
        let txn = self.db.begin_write().map_err(io_err)?;
        for (index, definition) in STATE_TABLES.iter().enumerate() {
            let mut table = txn.open_table(*definition).map_err(io_err)?;
            table.retain(|_, _| false).map_err(io_err)?;
            for (key, value) in body.tables.get(index).into_iter().flatten() {
                table.insert(key.as_slice(), value.as_slice()).map_err(io_err)?;
            }
        }
        {
            let mut table = txn.open_table(SM_META).map_err(io_err)?;
            table.insert(b"last_applied".as_slice(), encode(&meta.last_log_id).as_slice()).map_err(io_err)?;
            table.insert(b"last_membership".as_slice(), encode(&meta.last_membership).as_slice()).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)?;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = data.len(), "installed a snapshot from the leader");
        self.save_snapshot(meta, data)
    }
}

/// Applies one command to the tables of an open write transaction.
pub fn apply_command(tables: &Tables<'_>, command: Command) -> Result<CommandReply, ApplyError> {
    let reply = match command {
        Command::InitFs { fs_id, now } => {
            tables.init_fs(&fs_id, now)?;
            CommandReply::default()
        }
        Command::OpenSession { client_name, now_ms, lease_ms } => CommandReply {
            value: tables.open_session(client_name, String::new(), now_ms, lease_ms)?,
            ..Default::default()
        },
        Command::OpenSessionOf { client_name, owner, now_ms, lease_ms } => {
            CommandReply { value: tables.open_session(client_name, owner, now_ms, lease_ms)?, ..Default::default() }
        }
        Command::IssueCredential { credential } => {
            CommandReply { value: tables.issue_credential(&credential)?, ..Default::default() }
        }
        Command::RotateBlockTokenKey => {
            let epoch = tables.counter(BLOCK_TOKEN_EPOCH)? + 1;
            tables.set_counter(BLOCK_TOKEN_EPOCH, epoch)?;
            CommandReply { value: epoch, ..Default::default() }
        }
        Command::RevokeCredential { id } => {
            CommandReply { value: u64::from(tables.revoke_credential(id)?), ..Default::default() }
        }
        Command::RenewSession { session, now_ms, lease_ms } => {
            let known = tables.renew_session(session, now_ms, lease_ms)?;
            CommandReply { errno: if known { 0 } else { SESSION_EXPIRED }, ..Default::default() }
        }
        Command::ExpireSessions { now_ms } => {
            CommandReply { value: tables.expire_sessions(now_ms)?.len() as u64, ..Default::default() }
        }
        Command::Mutate { now, request } => {
            let Ok(request) = pb::MutateRequest::decode(request.as_slice()) else {
                return Ok(CommandReply { errno: pb::errno::EINVAL, ..Default::default() });
            };
            if tables.session(request.session)?.is_none() {
                return Ok(CommandReply { errno: SESSION_EXPIRED, ..Default::default() });
            }
            if let Some(stored) = tables.stored_result(request.session, request.seq)? {
                return Ok(CommandReply { mutate: stored, replayed: true, ..Default::default() });
            }
            let reply = tables.mutate(&request, now)?.encode_to_vec();
            tables.store_result(request.session, request.seq, &reply)?;
            CommandReply { mutate: reply, ..Default::default() }
        }
        Command::RegisterDataServer { id, address } => {
            CommandReply { value: u64::from(tables.register_data_server(id, address)?), ..Default::default() }
        }
        Command::ForgetGarbage { ids } => {
            tables.forget_garbage(&ids)?;
            CommandReply::default()
        }
        Command::SetReplication { copies } => {
            tables.set_counter("replication", u64::from(copies.max(1)))?;
            CommandReply::default()
        }
        Command::ReplaceCopies { id, added, dropped } => {
            CommandReply { value: u64::from(tables.replace_copies(id, added, &dropped)?), ..Default::default() }
        }
        Command::SetDataServerStanding { id, standing, force } => CommandReply {
            value: u64::from(tables.set_data_server_standing(id, standing, force)?),
            ..Default::default()
        },
    };
    Ok(reply)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        let store = self.clone();
        blocking(move || store.build()).await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        self.applied()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            batch.push(entry);
            responders.push(responder);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let store = self.clone();
        let replies = inline(move || store.apply_batch(batch)).await?;
        for (reply, responder) in replies.into_iter().zip(responders) {
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let store = self.clone();
        let meta = meta.clone();
        blocking(move || store.install(&meta, &snapshot)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        let bytes = match std::fs::read(&self.snapshot_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let stored: StoredSnapshot = decode(&bytes).map_err(io_err)?;
        Ok(Some(SnapshotOf::<TypeConfig, Vec<u8>> { meta: stored.meta, snapshot: stored.data }))
    }
}
