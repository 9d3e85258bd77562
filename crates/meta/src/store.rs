//! Raft storage on redb, in two database files: `raft-log.redb` holds the log and the vote,
//! `meta.redb` the state machine (the namespace and its applied position).
//!
//! Log appends commit with `Durability::Immediate`, so an entry is on disk before Raft counts
//! it; as the log has a file of its own, that sync writes only the log's few pages. Applies
//! commit with `Durability::None`, and every [`CHECKPOINT_ENTRIES`] entries or
//! [`CHECKPOINT_INTERVAL`] one of them is made durable. After a crash the state rolls back to
//! its last durable apply (the applied index is stored in the same transaction as the state it
//! describes) and the log replays from there; the state is made durable before the log is
//! purged, so that replay never has to fall back on the last snapshot.

use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use serde::{Deserialize, Serialize};

use crate::model::{BLOCK_TOKEN_EPOCH, SM_META, STATE_TABLES, decode, encode};
use crate::namespace::{ApplyError, Tables};
use crate::raft_types::{Command, CommandReply, DELEGATED_ELSEWHERE, SESSION_EXPIRED, TypeConfig};
use cairn_proto as pb;

const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// The state machine's file (its name predates the split, so older stores open as they are).
pub const STATE_FILE: &str = "meta.redb";
/// The log's file.
pub const LOG_FILE: &str = "raft-log.redb";

/// At most this many applied entries are replayed from the log after a crash...
pub const CHECKPOINT_ENTRIES: u64 = 1_000;
/// ... and at most this much time's worth.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The two databases of a meta member.
pub struct Databases {
    pub log: Arc<Database>,
    pub state: Arc<Database>,
}

/// Opens (or creates) the databases in `dir`. A store from before the split keeps its log in
/// `meta.redb`; it is moved to a file of its own first.
pub fn open_databases(dir: &Path) -> Result<Databases, redb::Error> {
    std::fs::create_dir_all(dir).map_err(redb::Error::Io)?;
    let state = Database::create(dir.join(STATE_FILE))?;
    let log_path = dir.join(LOG_FILE);
    if !log_path.exists() {
        move_log_out(&state, dir)?;
    }
    // Also clears what a move that crashed after its rename left behind.
    let txn = state.begin_write()?;
    txn.delete_table(RAFT_LOG)?;
    txn.delete_table(RAFT_META)?;
    txn.commit()?;
    let log = Database::create(log_path)?;
    let txn = log.begin_write()?;
    txn.open_table(RAFT_LOG)?;
    txn.open_table(RAFT_META)?;
    txn.commit()?;
    Ok(Databases { log: Arc::new(log), state: with_state_tables(state)? })
}

/// Copies the log tables of `state` (if any) into a new log file, made durable and then put in
/// place by a rename, so a crash leaves either no log file (and the move starts again) or a
/// whole one.
fn move_log_out(state: &Database, dir: &Path) -> Result<(), redb::Error> {
    let temp = dir.join(format!("{LOG_FILE}.tmp"));
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(redb::Error::Io(e)),
        _ => {}
    }
    {
        let log = Database::create(&temp)?;
        let txn = log.begin_write()?;
        let read = state.begin_read()?;
        copy_table(&read, &txn, RAFT_LOG)?;
        copy_table(&read, &txn, RAFT_META)?;
        txn.commit()?;
    }
    std::fs::rename(&temp, dir.join(LOG_FILE)).map_err(redb::Error::Io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(redb::Error::Io)
}

/// Copies every row of `table` from `from` (where it may not exist) into `to`.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &redb::WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<(), redb::Error> {
    let mut target = to.open_table(table)?;
    match from.open_table(table) {
        Ok(source) => {
            for row in source.iter()? {
                let (key, value) = row?;
                target.insert(key.value(), value.value())?;
            }
            Ok(())
        }
        Err(TableError::TableDoesNotExist(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A state-machine database in memory, for fuzzing and tests of the state machine alone.
pub fn open_memory_database() -> Result<Arc<Database>, redb::Error> {
    with_state_tables(Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?)
}

fn with_state_tables(db: Database) -> Result<Arc<Database>, redb::Error> {
    let txn = db.begin_write()?;
    for table in STATE_TABLES {
        txn.open_table(table)?;
    }
    txn.commit()?;
    Ok(Arc::new(db))
}

/// Makes every apply so far durable (an empty durable commit carries the ones before it).
fn checkpoint(state: &Database) -> io::Result<()> {
    let txn = state.begin_write().map_err(io_err)?;
    txn.commit().map_err(io_err)
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
    /// The state machine's database, made durable before the log that rebuilds it is purged.
    state: Arc<Database>,
}

impl LogStore {
    pub fn new(databases: &Databases) -> Self {
        LogStore { db: databases.log.clone(), state: databases.state.clone() }
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
        inline(move || store.put_meta("committed", &committed, Durability::None)).await
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
        let state = self.state.clone();
        blocking(move || {
            // Purged entries can no longer be replayed. The snapshot covering them is on disk,
            // but restoring it after a crash rewrites the whole namespace: with the state they
            // built on disk too, a restart replays only the entries after it.
            checkpoint(&state)?;
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

/// How much applied state is not yet durable.
struct Undurable {
    entries: u64,
    since: Instant,
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    snapshot_path: PathBuf,
    undurable: Arc<Mutex<Undurable>>,
}

impl StateMachineStore {
    pub fn new(databases: &Databases, dir: &Path) -> Self {
        StateMachineStore {
            db: databases.state.clone(),
            snapshot_path: dir.join("snapshot.bin"),
            undurable: Arc::new(Mutex::new(Undurable { entries: 0, since: Instant::now() })),
        }
    }

    /// How to commit an apply of `count` entries: durably once enough has piled up.
    fn durability_for(&self, count: usize) -> Durability {
        let mut undurable = self.undurable.lock().unwrap_or_else(|e| e.into_inner());
        undurable.entries += count as u64;
        if undurable.entries >= CHECKPOINT_ENTRIES || undurable.since.elapsed() >= CHECKPOINT_INTERVAL {
            undurable.entries = 0;
            undurable.since = Instant::now();
            Durability::Immediate
        } else {
            Durability::None
        }
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
        txn.set_durability(self.durability_for(entries.len())).map_err(io_err)?;
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
            if let Some(op) = &request.op
                && let Some((dir, holder)) = tables.delegated_elsewhere(request.session, op)?
            {
                return Ok(CommandReply { errno: DELEGATED_ELSEWHERE, value: dir, holder, ..Default::default() });
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
        Command::RevokeDelegation { dir, session } => {
            CommandReply { value: u64::from(tables.revoke_delegation(dir, session)?), ..Default::default() }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> EntryOf<TypeConfig> {
        EntryOf::<TypeConfig> {
            log_id: LogIdOf::<TypeConfig>::new(openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 }, index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_with_its_log_inside_the_state_file_moves_it_out_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout before the split: log, vote and state in one file.
            let old = Database::create(dir.path().join(STATE_FILE)).unwrap();
            let txn = old.begin_write().unwrap();
            {
                let mut log = txn.open_table(RAFT_LOG).unwrap();
                for index in 1..=5 {
                    log.insert(index, encode(&entry(index)).as_slice()).unwrap();
                }
                let mut values = txn.open_table(RAFT_META).unwrap();
                values.insert("vote", b"a vote".as_slice()).unwrap();
                let mut state = txn.open_table(SM_META).unwrap();
                state.insert(b"marker".as_slice(), b"kept".as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        // A move that crashed before its rename left a partial file; it is started again.
        std::fs::write(dir.path().join(format!("{LOG_FILE}.tmp")), b"torn").unwrap();

        let databases = open_databases(dir.path()).unwrap();
        let mut store = LogStore::new(&databases);
        let entries = store.try_get_log_entries(0..100).await.unwrap();
        assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(entry(5).log_id));
        let raw: Option<Vec<u8>> = {
            let txn = databases.log.begin_read().unwrap();
            let table = txn.open_table(RAFT_META).unwrap();
            table.get("vote").unwrap().map(|v| v.value().to_vec())
        };
        assert_eq!(raw.as_deref(), Some(b"a vote".as_slice()));

        let txn = databases.state.begin_read().unwrap();
        assert!(matches!(txn.open_table(RAFT_LOG), Err(TableError::TableDoesNotExist(_))), "the old log is gone");
        let state = txn.open_table(SM_META).unwrap();
        assert_eq!(state.get(b"marker".as_slice()).unwrap().unwrap().value(), b"kept");
        assert!(!dir.path().join(format!("{LOG_FILE}.tmp")).exists());
    }

    #[test]
    fn applies_become_durable_after_enough_entries_or_time() {
        let dir = tempfile::tempdir().unwrap();
        let databases = open_databases(dir.path()).unwrap();
        let store = StateMachineStore::new(&databases, dir.path());
        assert!(matches!(store.durability_for(1), Durability::None));
        assert!(matches!(store.durability_for(CHECKPOINT_ENTRIES as usize - 2), Durability::None));
        assert!(matches!(store.durability_for(1), Durability::Immediate), "the thousandth entry checkpoints");
        assert!(matches!(store.durability_for(1), Durability::None), "and the count starts again");
        store.undurable.lock().unwrap().since = Instant::now() - CHECKPOINT_INTERVAL;
        assert!(matches!(store.durability_for(1), Durability::Immediate), "so does a second's worth");
    }
}
