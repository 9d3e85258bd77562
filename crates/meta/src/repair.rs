//! Keeping R copies of every block: the leader declares data servers dead after missed
//! heartbeats, copies their blocks from surviving replicas onto other servers, and drops
//! copies that readers report as corrupt.
//!
//! A repair copies first and records after: the new copy is durable on its server before the
//! Raft command that names it commits, so the block never has fewer good copies on record than
//! on disk. Repairs are throttled (a few blocks at a time, a bounded scan per pass) so client
//! traffic keeps flowing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cairn_proto as pb;
use futures::StreamExt;

use crate::model::{BlockRecord, Standing};
use crate::node::{MetaError, MetaNode};
use crate::raft_types::Command;

/// Blocks looked at per pass.
const SCAN_PER_PASS: usize = 20_000;
/// Blocks copied at once.
const REPAIRS_IN_FLIGHT: usize = 4;
/// Blocks copied per pass at most, so a pass ends and the scan moves on.
const REPAIRS_PER_PASS: usize = 1024;
/// How long one block copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(60);
/// Blocks moved per pass by balancing (after repairs, which come first).
const MOVES_PER_PASS: usize = 8;
/// Servers count as balanced when their stored bytes differ by less than this many blocks'
/// worth (of the largest size).
const BALANCE_SLACK_BLOCKS: u64 = 4;

/// The leader's repair state: where the scan is and since when this server leads.
#[derive(Default)]
pub struct Repairer {
    cursor: Option<u128>,
    leader_since: Option<Instant>,
    /// Blocks short of copies seen so far in this scan of all blocks.
    short_in_scan: u64,
    /// Bytes of blocks each server holds according to meta's records, so far in this scan.
    stored_in_scan: HashMap<u64, u64>,
    /// The same, from the last complete scan, kept up to date with the moves made since.
    stored: HashMap<u64, u64>,
}

impl Repairer {
    /// Called on every tick; `leading` says whether this server leads now.
    pub async fn tick(&mut self, node: &MetaNode, leading: bool) -> Result<usize, MetaError> {
        if !leading {
            self.leader_since = None;
            self.cursor = None;
            self.short_in_scan = 0;
            self.stored_in_scan.clear();
            self.stored.clear();
            return Ok(0);
        }
        let leader_since = *self.leader_since.get_or_insert_with(Instant::now);
        self.pass(node, leader_since).await
    }

    async fn pass(&mut self, node: &MetaNode, leader_since: Instant) -> Result<usize, MetaError> {
        let replication = node.replication()? as usize;
        let query = node.local_read()?;
        let page = query.blocks_after(self.cursor, SCAN_PER_PASS)?;
        let standings: HashMap<u64, (String, Standing)> =
            query.data_server_records()?.into_iter().map(|(id, r)| (id, (r.address, r.standing))).collect();
        drop(query);
        let addresses: HashMap<u64, String> = standings
            .iter()
            .filter(|(_, (_, standing))| *standing != Standing::Removed)
            .map(|(id, (address, _))| (*id, address.clone()))
            .collect();
        let scan_done = page.len() < SCAN_PER_PASS;
        self.cursor = if scan_done { None } else { page.last().map(|(id, _)| *id) };
        let copies = Copies { node, leader_since, standings: &standings };
        let mut work = Vec::new();
        for (id, record) in page {
            let plan = copies.plan(&record, replication);
            if plan.staying < replication {
                self.short_in_scan += 1;
            }
            for server in &record.servers {
                *self.stored_in_scan.entry(*server).or_default() += u64::from(record.len);
            }
            if plan.is_idle() || work.len() >= REPAIRS_PER_PASS {
                continue;
            }
            work.push((id, record, plan));
        }
        if scan_done {
            node.under_replicated.store(std::mem::take(&mut self.short_in_scan), Ordering::Relaxed);
            node.repair_scans.fetch_add(1, Ordering::Relaxed);
            self.stored = std::mem::take(&mut self.stored_in_scan);
            self.remove_drained(node, &standings).await;
        }
        if work.is_empty() {
            // Nothing to repair: even out how much each live server stores.
            return self.balance(node, leader_since).await;
        }
        let results: Vec<Result<bool, MetaError>> = futures::stream::iter(work)
            .map(|(id, record, plan)| {
                let addresses = &addresses;
                async move {
                    match plan.action {
                        Action::Idle => Ok(false),
                        Action::Drop(dropped) => {
                            node.propose(Command::ReplaceCopies { id, added: None, dropped }).await?;
                            Ok(false)
                        }
                        Action::Copy { source, dropped } => {
                            let added = copy_block(node, id, &record, source, addresses).await?;
                            node.propose(Command::ReplaceCopies { id, added: Some(added), dropped }).await?;
                            Ok(true)
                        }
                    }
                }
            })
            .buffer_unordered(REPAIRS_IN_FLIGHT)
            .collect()
            .await;
        let mut copied = 0;
        for result in results {
            match result {
                Ok(true) => copied += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "block repair failed; will retry"),
            }
        }
        if copied > 0 {
            tracing::info!(copied, "re-replicated blocks");
        }
        Ok(copied)
    }

    /// Removes draining servers that the scan just completed found on no block. The state
    /// machine checks again when applying, so a block recorded on the server meanwhile keeps
    /// it draining.
    async fn remove_drained(&self, node: &MetaNode, standings: &HashMap<u64, (String, Standing)>) {
        for (id, (_, standing)) in standings {
            if *standing != Standing::Draining || self.stored.get(id).is_some_and(|bytes| *bytes > 0) {
                continue;
            }
            let command = Command::SetDataServerStanding { id: *id, standing: Standing::Removed, force: false };
            match node.propose(command).await {
                Ok(reply) if reply.value == 1 => tracing::info!(server = id, "data server drained and removed"),
                Ok(_) => tracing::debug!(server = id, "data server still holds blocks"),
                Err(e) => tracing::warn!(server = id, error = %e, "could not remove a drained data server"),
            }
        }
    }
}

/// How the copies of one block stand.
struct Copies<'a> {
    node: &'a MetaNode,
    leader_since: Instant,
    standings: &'a HashMap<u64, (String, Standing)>,
}

/// What to do about one block.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Idle,
    /// Enough copies stay: forget these.
    Drop(Vec<u64>),
    /// Make one more copy from `source`, then forget `dropped`.
    Copy {
        source: u64,
        dropped: Vec<u64>,
    },
}

struct Plan {
    /// Copies on live, active servers: the ones that count.
    staying: usize,
    action: Action,
}

impl Plan {
    fn is_idle(&self) -> bool {
        self.action == Action::Idle
    }
}

impl Copies<'_> {
    fn standing(&self, server: u64) -> Standing {
        // A server missing from the records is as good as removed.
        self.standings.get(&server).map_or(Standing::Removed, |(_, standing)| *standing)
    }

    fn plan(&self, record: &BlockRecord, replication: usize) -> Plan {
        let alive = |s: u64| self.standing(s) != Standing::Removed && !self.node.is_dead(s, self.leader_since);
        let staying: Vec<u64> =
            record.servers.iter().copied().filter(|s| alive(*s) && self.standing(*s) == Standing::Active).collect();
        // Copies that no longer count: lost (dead or removed servers) or leaving (draining).
        let lost: Vec<u64> = record.servers.iter().copied().filter(|s| !alive(*s)).collect();
        let draining: Vec<u64> =
            record.servers.iter().copied().filter(|s| alive(*s) && self.standing(*s) == Standing::Draining).collect();
        let action = if staying.len() >= replication {
            let dropped: Vec<u64> = lost.iter().chain(&draining).copied().collect();
            if dropped.is_empty() { Action::Idle } else { Action::Drop(dropped) }
        } else {
            // Copy from a copy that stays if there is one, else from a draining server.
            match staying.first().or(draining.first()) {
                Some(&source) => {
                    let mut dropped = lost;
                    if staying.len() + 1 >= replication {
                        dropped.extend(&draining);
                    }
                    Action::Copy { source, dropped }
                }
                // Nothing to copy from (a copy may come back with its server).
                None => Action::Idle,
            }
        };
        Plan { staying: staying.len(), action }
    }
}

impl Repairer {
    /// Moves a few blocks from the live server storing the most to the one storing the least
    /// (by meta's records), when they differ by more than the slack: copy, then record the new
    /// copy in place of the old one. The old copy becomes an orphan that its server deletes
    /// after the grace period.
    async fn balance(&mut self, node: &MetaNode, leader_since: Instant) -> Result<usize, MetaError> {
        let active = node.active_data_servers()?;
        let live: Vec<(u64, u64)> = node
            .live_data_servers()
            .into_iter()
            .filter(|(id, _)| active.contains(id) && !node.is_dead(*id, leader_since))
            .map(|(id, _)| (id, self.stored.get(&id).copied().unwrap_or(0)))
            .collect();
        let (Some(&(from, most)), Some(&(to, least))) =
            (live.iter().max_by_key(|(_, b)| *b), live.iter().min_by_key(|(_, b)| *b))
        else {
            return Ok(0);
        };
        let slack = BALANCE_SLACK_BLOCKS * pb::BLOCK_BYTES_MAX as u64;
        if from == to || most < least + slack {
            return Ok(0);
        }
        let query = node.local_read()?;
        let addresses: HashMap<u64, String> = query.data_servers()?.into_iter().collect();
        let mut candidates = Vec::new();
        let mut after = None;
        // Blocks on the full server that the empty one lacks.
        while candidates.len() < MOVES_PER_PASS {
            let page = query.blocks_after(after, SCAN_PER_PASS)?;
            let last = page.last().map(|(id, _)| *id);
            candidates.extend(
                page.into_iter()
                    .filter(|(_, r)| r.servers.contains(&from) && !r.servers.contains(&to))
                    .take(MOVES_PER_PASS - candidates.len()),
            );
            if last.is_none() || after == last {
                break;
            }
            after = last;
        }
        drop(query);
        let (Some(from_address), Some(to_address)) = (addresses.get(&from), addresses.get(&to)) else {
            return Ok(0);
        };
        let mut moved = 0;
        for (id, record) in candidates {
            let block = pb::BlockId(id);
            let request = pb::ReplicateBlockRequest { block: Some(record.block_ref(id)), source: from_address.clone() };
            if let Err(e) = replicate(to_address, request).await {
                tracing::warn!(block = %block, error = %e, "balancing copy failed");
                break;
            }
            node.propose(Command::ReplaceCopies { id, added: Some(to), dropped: vec![from] }).await?;
            moved += 1;
            let len = u64::from(record.len);
            let held = self.stored.entry(from).or_default();
            *held = held.saturating_sub(len);
            *self.stored.entry(to).or_default() += len;
        }
        if moved > 0 {
            tracing::info!(moved, from, to, "moved blocks to balance data servers");
        }
        Ok(moved)
    }
}

/// Asks the data server at `target` to copy a block from its source.
async fn replicate(
    target: &str,
    request: pb::ReplicateBlockRequest,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = pb::net::connect(&pb::net::endpoint(target)?.timeout(COPY_TIMEOUT)).await?;
    pb::data_client::DataClient::new(channel).replicate_block(request).await?;
    Ok(())
}

/// Copies block `id` from the copy on `source` onto an active server that holds none;
/// returns that server.
async fn copy_block(
    node: &MetaNode,
    id: u128,
    record: &BlockRecord,
    source: u64,
    addresses: &HashMap<u64, String>,
) -> Result<u64, MetaError> {
    let source = addresses
        .get(&source)
        .ok_or_else(|| MetaError::Store(format!("block {id:032x} has no live copy to repair from")))?;
    let (target, target_state) = node
        .place(1, &record.servers)?
        .into_iter()
        .next()
        .ok_or_else(|| MetaError::Store(format!("no live data server can take a copy of block {id:032x}")))?;
    let request = pb::ReplicateBlockRequest { block: Some(record.block_ref(id)), source: source.clone() };
    replicate(&target_state.address, request)
        .await
        .map_err(|e| MetaError::Store(format!("copying block {id:032x} to {}: {e}", target_state.address)))?;
    Ok(target)
}
