//! A meta server: the Raft member, its store and the leader's background duties (session
//! expiry, deleting unreferenced blocks).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_proto as pb;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ReadPolicy, SnapshotPolicy};
use redb::{Database, ReadableDatabase};
use tokio::sync::watch;

use crate::model::{Standing, Time};
use crate::network::NetworkFactory;
use crate::query::{Query, QueryError};
use crate::raft_types::{Command, CommandReply, MetaRaft, TypeConfig};
use crate::store::{LogStore, STATE_FILE, StateMachineStore, open_databases};

#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub node_id: u64,
    /// The address other processes reach this server at (host:port).
    pub address: String,
    pub dir: PathBuf,
    /// How long a client session lives without a heartbeat.
    pub session_lease: Duration,
    /// A data server not heard from for this long gets no new blocks, and its copies are
    /// made again elsewhere.
    pub data_server_timeout: Duration,
    /// Raft log entries between snapshots (the log before a snapshot is then purged).
    pub snapshot_every: u64,
}

/// Longest promise lease: a client cut off from the leader stops trusting its cache, and
/// writers stop waiting for it, after this long at most.
pub const PROMISE_LEASE_MAX: Duration = Duration::from_secs(5);

impl MetaConfig {
    pub fn new(node_id: u64, address: String, dir: PathBuf) -> Self {
        MetaConfig {
            node_id,
            address,
            dir,
            session_lease: Duration::from_secs(60),
            data_server_timeout: Duration::from_secs(10),
            snapshot_every: 20_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Store(String),
    #[error("raft: {0}")]
    Raft(String),
    /// This server is not the leader; the client should ask `leader` (if known).
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<String> },
    #[error("errno {0}")]
    Errno(i32),
    /// A request that can never succeed as given.
    #[error("{0}")]
    Invalid(String),
}

impl From<QueryError> for MetaError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Errno(code) => MetaError::Errno(code),
            QueryError::Store(s) => MetaError::Store(s),
        }
    }
}

/// What the leader knows of a data server from its last heartbeat.
#[derive(Clone, Debug)]
pub struct DataServerState {
    pub address: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub domain: String,
    pub last_seen: Instant,
}

/// What a new file system starts with.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    pub fs_id: String,
    /// Copies of each block.
    pub replication: u32,
}

pub struct MetaNode {
    pub config: MetaConfig,
    pub raft: MetaRaft,
    db: Arc<Database>,
    pub data_servers: RwLock<HashMap<u64, DataServerState>>,
    /// One membership change at a time: concurrent changes computed from the same starting
    /// membership could undo each other.
    membership_changes: tokio::sync::Mutex<()>,
    /// Blocks with fewer live copies than the file system keeps, as of the leader's last full
    /// repair scan.
    pub under_replicated: AtomicU64,
    /// Full repair scans this leader completed (a scan that starts after an event and ends
    /// reflects it).
    pub repair_scans: AtomicU64,
    /// Callback promises held by client sessions (meaningful on the leader only).
    pub promises: crate::promises::Promises,
}

/// Copies of a block a file system may ask for.
pub const REPLICATION_MAX: u32 = 7;

/// Chooses up to `copies` servers from `live` (sorted most free first): first one per unused
/// failure domain, then, when domains run out, the freest of the rest.
pub fn place_on(live: Vec<(u64, DataServerState)>, copies: usize) -> Vec<(u64, DataServerState)> {
    let mut chosen: Vec<(u64, DataServerState)> = Vec::with_capacity(copies);
    let mut rest = Vec::new();
    for candidate in live {
        if chosen.len() < copies && !chosen.iter().any(|(_, s)| s.domain == candidate.1.domain) {
            chosen.push(candidate);
        } else {
            rest.push(candidate);
        }
    }
    for candidate in rest {
        if chosen.len() >= copies {
            break;
        }
        chosen.push(candidate);
    }
    debug_assert!(chosen.len() <= copies);
    chosen
}

pub fn now_time() -> Time {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Time { sec: since.as_secs() as i64, nsec: since.subsec_nanos() }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn raft_config(snapshot_every: u64) -> Result<Arc<Config>, MetaError> {
    let config = Config {
        cluster_name: "cairn-meta".into(),
        // A follower stands for election once the leader's lease (election_timeout_max) and
        // then its own random election timeout have passed without a heartbeat: 0.75 to 1 s
        // after a leader dies, which bounds the failover pause.
        heartbeat_interval: 50,
        election_timeout_min: 250,
        election_timeout_max: 500,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every.max(1)),
        // A follower a little behind catches up from the log; one further behind gets the
        // snapshot.
        max_in_snapshot_log_to_keep: snapshot_every.clamp(1, 1_000),
        ..Default::default()
    };
    Ok(Arc::new(config.validate().map_err(|e| MetaError::Raft(e.to_string()))?))
}

/// Whether `dir` already holds a meta store.
pub fn store_exists(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists()
}

impl MetaNode {
    /// Opens the store in `config.dir` and starts the Raft member. With `bootstrap`, a new
    /// store becomes a one-member group and gets a fresh file system with id `fs_id`.
    pub async fn start(config: MetaConfig, bootstrap: Option<Bootstrap>) -> Result<Arc<MetaNode>, MetaError> {
        let fresh = !store_exists(&config.dir);
        let databases = open_databases(&config.dir).map_err(|e| MetaError::Store(e.to_string()))?;
        let log_store = LogStore::new(&databases);
        let state_machine = StateMachineStore::new(&databases, &config.dir);
        let raft = MetaRaft::new(
            config.node_id,
            raft_config(config.snapshot_every)?,
            NetworkFactory,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| MetaError::Raft(e.to_string()))?;
        let promises = crate::promises::Promises::new(config.session_lease.min(PROMISE_LEASE_MAX));
        let node = Arc::new(MetaNode {
            config,
            raft,
            db: databases.state.clone(),
            data_servers: RwLock::new(HashMap::new()),
            membership_changes: tokio::sync::Mutex::new(()),
            under_replicated: AtomicU64::new(0),
            repair_scans: AtomicU64::new(0),
            promises,
        });
        if let Some(bootstrap) = bootstrap
            && fresh
        {
            let members = BTreeMap::from([(node.config.node_id, BasicNode::new(node.config.address.clone()))]);
            node.raft.initialize(members).await.map_err(|e| MetaError::Raft(e.to_string()))?;
            node.wait_for_leader(Duration::from_secs(30)).await?;
            node.propose(Command::InitFs { fs_id: bootstrap.fs_id, now: now_time() }).await?;
            node.propose(Command::SetReplication { copies: bootstrap.replication.max(1) }).await?;
        }
        Ok(node)
    }

    /// Waits until this group has a leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<(), MetaError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.raft.current_leader().await.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(MetaError::Raft("no leader elected in time".into()))
    }

    fn not_leader(&self, leader: Option<&BasicNode>) -> MetaError {
        MetaError::NotLeader { leader: leader.map(|n| n.addr.clone()) }
    }

    /// Replicates a command and returns what applying it answered.
    pub async fn propose(&self, command: Command) -> Result<CommandReply, MetaError> {
        match self.raft.client_write(command).await {
            Ok(response) => Ok(response.data),
            Err(e) => match e.forward_to_leader() {
                Some(forward) => Err(self.not_leader(forward.leader_node.as_ref())),
                None => Err(MetaError::Raft(e.to_string())),
            },
        }
    }

    /// A read view that reflects every write acknowledged before the call: at once where
    /// [`MetaNode::reads_locally`], else once the leader has confirmed its lease and its state
    /// has caught up (openraft's lease read).
    pub async fn read(&self) -> Result<Query, MetaError> {
        if self.reads_locally() {
            return self.local_read();
        }
        if let Err(e) = self.raft.ensure_linearizable(ReadPolicy::LeaseRead).await {
            return Err(match e.forward_to_leader() {
                Some(forward) => self.not_leader(forward.leader_node.as_ref()),
                None => MetaError::Raft(e.to_string()),
            });
        }
        self.local_read()
    }

    /// Whether this member may serve a read from its own state without asking anyone.
    ///
    /// A leader that is the group's only voter cannot be deposed without knowing it, and it
    /// acknowledges a write only after applying it; but after a restart, entries past the last
    /// stored commit index are applied only when the new leader's first entry commits. So it
    /// reads locally once it has applied an entry of its own term: every entry logged before
    /// its term is then applied too.
    pub fn reads_locally(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        metrics.state == openraft::ServerState::Leader
            && metrics.current_leader == Some(self.config.node_id)
            && metrics.membership_config.membership().voter_ids().count() == 1
            && metrics
                .last_applied
                .as_ref()
                .is_some_and(|applied| applied.committed_leader_id().term == metrics.current_term)
    }

    /// A read view of this member's applied state, without asking whether it is current.
    pub fn local_read(&self) -> Result<Query, MetaError> {
        let txn = self.db.begin_read().map_err(|e| MetaError::Store(e.to_string()))?;
        Ok(Query::new(txn))
    }

    /// Copies this file system keeps of each block.
    pub fn replication(&self) -> Result<u32, MetaError> {
        Ok(self.local_read()?.counter("replication")?.clamp(1, u64::from(REPLICATION_MAX)) as u32)
    }

    /// Picks `copies` distinct live data servers for a new block, most free space first, and
    /// each in a failure domain not used yet while there are such domains. `exclude` are servers
    /// that must not get it (they hold it already).
    pub fn place(&self, copies: usize, exclude: &[u64]) -> Result<Vec<(u64, DataServerState)>, MetaError> {
        let active = self.active_data_servers()?;
        let live: Vec<(u64, DataServerState)> = self
            .live_data_servers()
            .into_iter()
            .filter(|(id, _)| !exclude.contains(id) && active.contains(id))
            .collect();
        Ok(place_on(live, copies))
    }

    /// Data servers that take new blocks (neither draining nor removed), alive or not.
    pub fn active_data_servers(&self) -> Result<BTreeSet<u64>, MetaError> {
        let records = self.local_read()?.data_server_records()?;
        Ok(records.into_iter().filter(|(_, r)| r.standing == Standing::Active).map(|(id, _)| id).collect())
    }

    /// Whether data server `id` missed its heartbeats for longer than the timeout. A server
    /// not heard from since this member became leader gets the timeout from that moment: a new
    /// leader knows nothing of heartbeats its predecessor received.
    pub fn is_dead(&self, id: u64, leader_since: Instant) -> bool {
        let last_seen = self.data_servers.read().ok().and_then(|s| s.get(&id).map(|s| s.last_seen));
        let since = last_seen.map_or(leader_since, |seen| seen.max(leader_since));
        since.elapsed() > self.config.data_server_timeout
    }

    /// Forgets a copy a reader found corrupt (the block is then repaired from a good copy)
    /// and asks its server to delete it.
    pub async fn drop_bad_copy(&self, id: u128, server: u64) -> Result<(), MetaError> {
        let record = self.local_read()?.block(id)?;
        let Some(record) = record else { return Ok(()) };
        if !record.servers.contains(&server) {
            return Ok(());
        }
        let reply = self.propose(Command::ReplaceCopies { id, added: None, dropped: vec![server] }).await?;
        if reply.value == 0 {
            // It was the last copy on record: better a partly bad copy than none.
            return Ok(());
        }
        let address = self.local_read()?.data_servers()?.into_iter().find(|(s, _)| *s == server).map(|(_, a)| a);
        if let Some(address) = address {
            let doomed = record.block_ref(id);
            tokio::spawn(async move {
                let result = async {
                    let mut client =
                        pb::data_client::DataClient::new(pb::net::connect(&pb::net::endpoint(&address)?).await?);
                    client.delete_blocks(pb::DeleteBlocksRequest { blocks: vec![doomed] }).await?;
                    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
                }
                .await;
                if let Err(e) = result {
                    tracing::warn!(%address, error = %e, "could not delete a corrupt copy");
                }
            });
        }
        Ok(())
    }

    /// Data servers that heartbeated recently, most free space first.
    pub fn live_data_servers(&self) -> Vec<(u64, DataServerState)> {
        let servers = self.data_servers.read().map(|s| s.clone()).unwrap_or_default();
        let mut live: Vec<(u64, DataServerState)> =
            servers.into_iter().filter(|(_, s)| s.last_seen.elapsed() < self.config.data_server_timeout).collect();
        live.sort_by(|a, b| b.1.free_bytes.cmp(&a.1.free_bytes).then(a.0.cmp(&b.0)));
        live
    }

    /// Runs the leader's periodic duties until `shutdown` flips.
    pub async fn run_background(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut repairer = crate::repair::Repairer::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let leading = self.is_leader().await;
            // Repairs run in the same loop as expiry and garbage collection, so a block is never
            // copied and deleted at once by two tasks.
            tokio::select! {
                result = repairer.tick(&self, leading) => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "block repair pass failed");
                    }
                }
                _ = shutdown.changed() => return,
            }
            if !leading {
                continue;
            }
            if let Err(e) = self.expire_sessions().await {
                tracing::warn!(error = %e, "session expiry failed");
            }
            if let Err(e) = self.collect_garbage().await {
                tracing::warn!(error = %e, "block garbage collection failed");
            }
        }
    }

    /// This member's term while it is the leader, as far as it knows.
    pub fn leader_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        (metrics.state == openraft::ServerState::Leader && metrics.current_leader == Some(self.config.node_id))
            .then_some(metrics.current_term)
    }

    pub async fn is_leader(&self) -> bool {
        self.raft.current_leader().await == Some(self.config.node_id)
    }

    async fn expire_sessions(&self) -> Result<(), MetaError> {
        let now = now_ms();
        let query = self.local_read()?;
        if query.any_session_expired(now)? {
            self.propose(Command::ExpireSessions { now_ms: now }).await?;
        }
        Ok(())
    }

    /// Deletes blocks that no file references from their data servers, then forgets them.
    async fn collect_garbage(&self) -> Result<(), MetaError> {
        const BATCH: usize = 4096;
        let query = self.local_read()?;
        let garbage = query.garbage(BATCH)?;
        if garbage.is_empty() {
            return Ok(());
        }
        let addresses: HashMap<u64, String> = query.data_servers()?.into_iter().collect();
        drop(query);
        let mut by_server: HashMap<u64, Vec<pb::BlockRef>> = HashMap::new();
        for (id, record) in &garbage {
            for &server in &record.servers {
                by_server.entry(server).or_default().push(record.block_ref(*id));
            }
        }
        let mut failed_servers = Vec::new();
        for (server, blocks) in by_server {
            let Some(address) = addresses.get(&server) else { continue };
            let result = async {
                let mut client =
                    pb::data_client::DataClient::new(pb::net::connect(&pb::net::endpoint(address)?).await?);
                let mut request = tonic::Request::new(pb::DeleteBlocksRequest { blocks });
                request.set_timeout(Duration::from_secs(30));
                client.delete_blocks(request).await?;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(server, error = %e, "could not delete blocks; will retry");
                failed_servers.push(server);
            }
        }
        let done: Vec<u128> = garbage
            .iter()
            .filter(|(_, record)| !record.servers.iter().any(|s| failed_servers.contains(s)))
            .map(|(id, _)| *id)
            .collect();
        if !done.is_empty() {
            self.propose(Command::ForgetGarbage { ids: done }).await?;
        }
        Ok(())
    }

    /// The group's members (id, address, voter) as this server knows them.
    /// The address of the leader this member knows of.
    pub fn leader_address(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        let leader = metrics.current_leader?;
        metrics.membership_config.membership().nodes().find(|(id, _)| **id == leader).map(|(_, n)| n.addr.clone())
    }

    pub fn members(&self) -> Vec<(u64, String, bool)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        membership.nodes().map(|(id, node)| (*id, node.addr.clone(), voters.contains(id))).collect()
    }

    /// Adds a meta server: it catches up as a learner first, so the group never counts on a
    /// member that is far behind, then becomes a voter. Adding a current member again with the
    /// same address is a no-op, so a retried join succeeds.
    pub async fn add_member(&self, id: u64, address: String) -> Result<(), MetaError> {
        if id == 0 {
            return Err(MetaError::Invalid("meta server id 0 is reserved".into()));
        }
        let _one_at_a_time = self.membership_changes.lock().await;
        if let Some((_, known, voter)) = self.members().into_iter().find(|(member, _, _)| *member == id) {
            if known != address {
                return Err(MetaError::Invalid(format!("meta server {id} is already a member at {known}")));
            }
            if voter {
                return Ok(());
            }
        }
        self.raft.add_learner(id, BasicNode::new(address), true).await.map_err(|e| self.management_error(e))?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.management_error(e))?;
        Ok(())
    }

    /// Removes a meta server from the group.
    pub async fn remove_member(&self, id: u64) -> Result<(), MetaError> {
        let _one_at_a_time = self.membership_changes.lock().await;
        let members = self.members();
        let Some((_, _, voter)) = members.iter().find(|(member, _, _)| *member == id) else {
            return Ok(());
        };
        if *voter && members.iter().filter(|(_, _, v)| *v).count() == 1 {
            return Err(MetaError::Invalid("cannot remove the last voting meta server".into()));
        }
        // `retain: false` drops a removed voter from the group instead of keeping it as a learner.
        let change = if *voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft.change_membership(change, false).await.map_err(|e| self.management_error(e))?;
        Ok(())
    }

    fn management_error(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> MetaError {
        match e.forward_to_leader() {
            Some(forward) => self.not_leader(forward.leader_node.as_ref()),
            None => MetaError::Raft(e.to_string()),
        }
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(domain: &str, free: u64) -> DataServerState {
        DataServerState {
            address: String::new(),
            capacity_bytes: 100,
            used_bytes: 100 - free,
            free_bytes: free,
            domain: domain.into(),
            last_seen: Instant::now(),
        }
    }

    #[test]
    fn placement_spreads_across_domains_before_doubling_up() {
        let live = vec![(1, server("a", 90)), (2, server("a", 80)), (3, server("b", 70)), (4, server("c", 10))];
        let ids: Vec<u64> = place_on(live.clone(), 3).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 4], "one copy per domain first");
        let ids: Vec<u64> = place_on(live.clone(), 4).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 4, 2], "then the freest of the rest");
        assert_eq!(place_on(live, 9).len(), 4, "never more servers than there are");
    }
}
