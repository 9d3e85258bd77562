//! The connection to the meta group: leader discovery, retries with backoff until a deadline,
//! and the session that makes mutations exactly-once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cairn_proto::meta_client::MetaClient;
use cairn_proto::{self as pb, mutate_request::Op};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::callbacks::{Callbacks, OwnEntry, PartitionPolicy};
use crate::delegations::Delegations;
use crate::error::{ClientError, ClientResult, check};

/// gRPC metadata key naming the leader on a "not leader" answer (see cairn-meta).
const LEADER_HEADER: &str = "cairn-leader";
const SESSION_EXPIRED_MESSAGE: &str = "session expired";
/// How long one try may take once the promise lease ran out and requests fail fast.
const FAIL_FAST_ATTEMPT: Duration = Duration::from_millis(500);
/// Meta server addresses remembered at most (a group has a handful).
const META_ADDRESSES_MAX: usize = 16;
/// How much older than one heartbeat period a usage report may be and still answer `statfs`.
const USAGE_FRESH_MARGIN: Duration = Duration::from_secs(1);

/// How often a client renews its session: three times a lease, so one lost heartbeat is
/// harmless.
pub fn heartbeat_period(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(500))
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// How long one operation keeps trying before it gives up with EIO.
    pub deadline: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long one attempt may take.
    pub attempt_timeout: Duration,
}

impl RetryPolicy {
    /// The default policy with another deadline (one attempt never outlasts it).
    pub fn with_deadline(deadline: Duration) -> Self {
        let default = RetryPolicy::default();
        RetryPolicy { deadline, attempt_timeout: default.attempt_timeout.min(deadline), ..default }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(60),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            attempt_timeout: Duration::from_secs(15),
        }
    }
}

/// Whether a failed call may succeed if sent again (possibly elsewhere).
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted
    )
}

pub fn endpoint(address: &str, policy: &RetryPolicy) -> ClientResult<Endpoint> {
    Ok(pb::net::endpoint(address)
        .map_err(|e| ClientError::Refused { what: "address", status: format!("{address}: {e}") })?
        .timeout(policy.attempt_timeout)
        .initial_stream_window_size(pb::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(pb::CONNECTION_WINDOW_BYTES)
        .max_frame_size(pb::FRAME_BYTES_MAX))
}

struct Current {
    address: String,
    client: MetaClient<Channel>,
}

/// Counts one mutation in flight while alive (also when the request is abandoned).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct MetaConnection {
    addresses: RwLock<Vec<String>>,
    current: RwLock<Current>,
    pub policy: RetryPolicy,
    session: AtomicU64,
    seq: AtomicU64,
    /// Mutations sent and not yet answered. A directory's cached names are updated with this
    /// client's own change only when no other was in flight: one applied before it but
    /// answered after would be missing from them.
    mutations_in_flight: AtomicU64,
    root: RwLock<pb::FileHandle>,
    pub replication: u32,
    /// The session's credential allows no change: the mount is read-only.
    pub read_only: bool,
    pub lease: Duration,
    /// The file system's id, as meta reported it at connect.
    pub fs_id: String,
    client_name: String,
    /// What this client caches under callback promises.
    pub callbacks: Arc<Callbacks>,
    /// Directories this client creates in on its own, and what it made there not sent yet.
    pub delegations: Arc<Delegations>,
    /// Requests for file system operations sent to meta (every attempt counts; the session
    /// heartbeat and the callback stream do not), for metrics.
    pub rpcs: AtomicU64,
    /// The newest usage meta reported (with each heartbeat) and when it arrived.
    usage: Mutex<Option<(Instant, pb::StatFsReply)>>,
}

fn meta_client(address: &str, policy: &RetryPolicy) -> ClientResult<MetaClient<Channel>> {
    Ok(MetaClient::new(pb::net::lazy_channel(&endpoint(address, policy)?))
        .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(pb::MAX_MESSAGE_BYTES))
}

impl MetaConnection {
    /// Connects to any of `addresses` and opens a session.
    pub async fn connect(
        addresses: Vec<String>,
        client_name: String,
        policy: RetryPolicy,
        partition: PartitionPolicy,
    ) -> ClientResult<Arc<Self>> {
        let first = addresses
            .first()
            .cloned()
            .ok_or(ClientError::Refused { what: "connect", status: "no meta address".into() })?;
        let connection = MetaConnection {
            current: RwLock::new(Current { client: meta_client(&first, &policy)?, address: first }),
            addresses: RwLock::new(addresses),
            policy,
            session: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            mutations_in_flight: AtomicU64::new(0),
            root: RwLock::new(pb::FileHandle::default()),
            replication: 1,
            read_only: false,
            lease: Duration::from_secs(60),
            fs_id: String::new(),
            client_name,
            callbacks: Arc::new(Callbacks::new(partition)),
            delegations: Arc::new(Delegations::default()),
            rpcs: AtomicU64::new(0),
            usage: Mutex::new(None),
        };
        let reply = connection.open_session_rpc().await?;
        let connection = MetaConnection {
            read_only: reply.read_only,
            replication: reply.replication.max(1),
            lease: Duration::from_millis(reply.lease_ms.max(1000)),
            fs_id: reply.fs_id.clone(),
            ..connection
        };
        Ok(Arc::new(connection))
    }

    async fn open_session_rpc(&self) -> ClientResult<pb::OpenSessionReply> {
        let name = self.client_name.clone();
        let reply = self
            .call("open session", move |mut c| {
                let name = name.clone();
                async move { c.open_session(pb::OpenSessionRequest { client_name: name }).await }
            })
            .await?;
        self.session.store(reply.session, Ordering::SeqCst);
        self.seq.store(0, Ordering::SeqCst);
        let forget = self.delegations.drop_all();
        if !forget.is_empty() {
            self.callbacks.forget_later(forget);
        }
        self.learn_addresses(&reply.meta_addresses);
        if let (Ok(mut root), Some(new_root)) = (self.root.write(), reply.root) {
            *root = new_root;
        }
        Ok(reply)
    }

    pub fn session(&self) -> u64 {
        self.session.load(Ordering::SeqCst)
    }

    pub fn root(&self) -> pb::FileHandle {
        self.root.read().map(|r| *r).unwrap_or_default()
    }

    pub fn current_address(&self) -> String {
        self.current.read().map(|c| c.address.clone()).unwrap_or_default()
    }

    fn client(&self) -> MetaClient<Channel> {
        self.current.read().map(|c| c.client.clone()).expect("meta connection lock poisoned")
    }

    fn switch_to(&self, address: &str) {
        if self.current_address() == address {
            return;
        }
        if let Ok(client) = meta_client(address, &self.policy)
            && let Ok(mut current) = self.current.write()
        {
            tracing::info!(address, "switching to meta server");
            *current = Current { address: address.to_string(), client };
            if let Ok(mut addresses) = self.addresses.write()
                && !addresses.iter().any(|a| a == address)
            {
                addresses.push(address.to_string());
            }
        }
    }

    /// Adds meta servers the group reported, so that any one address given at start is enough
    /// to fail over later. Addresses are only added: one that left the group fails and is
    /// rotated past.
    fn learn_addresses(&self, reported: &[String]) {
        if let Ok(mut addresses) = self.addresses.write() {
            for address in reported.iter().take(META_ADDRESSES_MAX) {
                if addresses.len() < META_ADDRESSES_MAX && !addresses.contains(address) {
                    addresses.push(address.clone());
                }
            }
        }
    }

    /// Moves to the next known address (after a transport failure).
    fn rotate(&self) {
        let addresses = self.addresses.read().map(|a| a.clone()).unwrap_or_default();
        if addresses.len() < 2 {
            return;
        }
        let current = self.current_address();
        let at = addresses.iter().position(|a| *a == current).unwrap_or(0);
        let next = addresses[(at + 1) % addresses.len()].clone();
        self.switch_to(&next);
    }

    /// Calls the meta leader, following redirects and retrying transport failures with
    /// exponential backoff until the policy's deadline.
    pub async fn call<T, F, Fut>(&self, what: &'static str, mut f: F) -> ClientResult<T>
    where
        F: FnMut(MetaClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        // Whatever this client made under delegations reaches meta before anything it asks
        // after: its requests are answered in the order it made them. (A batch may itself need
        // a new session: that request must not wait for it.)
        if !matches!(what, "heartbeat" | "callbacks" | "batch" | "open session") {
            self.delegations.settle().await;
        }
        let started = Instant::now();
        let mut backoff = self.policy.backoff_min;
        loop {
            if what != "heartbeat" && what != "callbacks" {
                self.rpcs.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(what, "meta call");
            }
            let attempt = f(self.client());
            let result = if self.callbacks.fail_fast() {
                // Cut off past the promise lease with `PartitionPolicy::Eio`: one short try.
                tokio::time::timeout(FAIL_FAST_ATTEMPT, attempt)
                    .await
                    .unwrap_or_else(|_| Err(Status::unavailable("no answer from meta")))
            } else {
                attempt.await
            };
            let status = match result {
                Ok(response) => {
                    tracing::trace!(what, elapsed_us = started.elapsed().as_micros() as u64, "meta answered");
                    return Ok(response.into_inner());
                }
                Err(status) => status,
            };
            if status.code() == Code::FailedPrecondition && status.message() == SESSION_EXPIRED_MESSAGE {
                return Err(ClientError::Refused { what, status: SESSION_EXPIRED_MESSAGE.into() });
            }
            if !retryable(&status) {
                return Err(ClientError::Refused { what, status: status.to_string() });
            }
            let leader = status.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
            match leader {
                Some(leader) if leader != self.current_address() => {
                    self.switch_to(&leader);
                    continue;
                }
                Some(_) => {}
                None => self.rotate(),
            }
            if self.callbacks.fail_fast() {
                return Err(ClientError::Refused {
                    what,
                    status: format!("meta unreachable past the promise lease (--on-partition eio): {status}"),
                });
            }
            if started.elapsed() >= self.policy.deadline {
                return Err(ClientError::Timeout {
                    what,
                    seconds: self.policy.deadline.as_secs(),
                    last: status.to_string(),
                });
            }
            tracing::debug!(what, %status, ?backoff, "meta call failed; retrying");
            tokio::time::sleep(backoff.min(self.policy.deadline.saturating_sub(started.elapsed()))).await;
            backoff = (backoff * 2).min(self.policy.backoff_max);
        }
    }

    /// Applies a mutation exactly once: retries reuse the same (session, seq).
    pub async fn mutate(&self, caller: &pb::Caller, op: Op) -> ClientResult<pb::MutateReply> {
        let _in_flight = InFlight::enter(&self.mutations_in_flight);
        for _ in 0..3 {
            let epoch = self.callbacks.epoch();
            let request = pb::MutateRequest {
                session: self.session(),
                seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
                caller: Some(caller.clone()),
                op: Some(op.clone()),
                confined_to: 0,
            };
            let what = if matches!(op, Op::Batch(_)) { "batch" } else { "mutate" };
            let result = self
                .call(what, |mut c| {
                    let request = request.clone();
                    async move { c.mutate(request).await }
                })
                .await;
            match result {
                Ok(reply) => {
                    check(reply.errno)?;
                    // What a delegation made is cached as it was made, and a grant changes
                    // nothing this client sees.
                    if matches!(op, Op::Batch(_) | Op::Delegate(_)) {
                        return Ok(reply);
                    }
                    for ino in reply.attr.iter().map(|a| a.ino).chain(reply.changed.iter().copied()) {
                        self.delegations.forget_made(ino);
                    }
                    let mut changed = if op.changes_cached_state() { op.named_inodes() } else { Vec::new() };
                    changed.extend(reply.attr.as_ref().map(|a| a.ino));
                    changed.extend(reply.changed.iter().copied());
                    let promised: Vec<pb::Attr> = if reply.promised {
                        reply.attr.iter().chain(reply.parent.iter()).copied().collect()
                    } else {
                        Vec::new()
                    };
                    // A create that found the name taken answers without the directory.
                    let alone = self.mutations_in_flight.load(Ordering::SeqCst) == 1;
                    let entry = match &op {
                        _ if reply.parent.is_none() || !alone => None,
                        Op::Create(c) => Some(OwnEntry {
                            name: &c.name,
                            removed: false,
                            created: pb::FileKind::try_from(c.kind).ok(),
                        }),
                        Op::Unlink(u) => Some(OwnEntry { name: &u.name, removed: true, created: None }),
                        _ => None,
                    };
                    self.callbacks.forget_own(&changed, &promised, entry, epoch);
                    return Ok(reply);
                }
                Err(ClientError::Refused { status, .. }) if status == SESSION_EXPIRED_MESSAGE => {
                    tracing::warn!("session expired; opening a new one");
                    self.open_session_rpc().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Refused { what: "mutate", status: "session kept expiring".into() })
    }

    /// Renews the session; returns unlinked inodes this session may still hold open.
    pub async fn heartbeat(&self) -> ClientResult<Vec<pb::FileHandle>> {
        let session = self.session();
        let result = self
            .call("heartbeat", move |mut c| async move { c.heartbeat(pb::HeartbeatRequest { session }).await })
            .await;
        match result {
            Ok(reply) => {
                self.learn_addresses(&reply.meta_addresses);
                if let Some(usage) = reply.usage {
                    self.note_usage(usage);
                }
                Ok(reply.orphans)
            }
            Err(ClientError::Refused { status, .. }) if status == SESSION_EXPIRED_MESSAGE => {
                tracing::warn!("session expired; opening a new one");
                self.open_session_rpc().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// A name in `parent`, answered from the promised cache when it can be. ENOENT is an error
    /// here too, cached like any answer.
    pub async fn lookup(&self, caller: &pb::Caller, parent: pb::FileHandle, name: &[u8]) -> ClientResult<pb::Attr> {
        if let Some(cached) = self.callbacks.entry(parent.ino, name) {
            return cached.ok_or(ClientError::Errno(pb::errno::ENOENT));
        }
        let epoch = self.callbacks.epoch();
        let session = self.session();
        let name = name.to_vec();
        let reply = self
            .call("lookup", |mut c| {
                let request = pb::LookupRequest {
                    parent: Some(parent),
                    name: name.clone(),
                    session,
                    caller: Some(caller.clone()),
                };
                async move { c.lookup(request).await }
            })
            .await?;
        if reply.promised && (reply.errno == 0 || reply.errno == pb::errno::ENOENT) {
            let epoch = self.callbacks.settled(epoch, reply.point.as_ref());
            self.callbacks.note_entry(parent.ino, &name, reply.attr.as_ref(), epoch);
        }
        check(reply.errno)?;
        reply.attr.ok_or(ClientError::Errno(pb::errno::EIO))
    }

    /// An inode's attributes, from the promised cache when it holds them.
    pub async fn getattr(&self, target: pb::FileHandle) -> ClientResult<pb::Attr> {
        if let Some(attr) = self.callbacks.attr(target.ino).filter(|a| a.generation == target.generation) {
            return Ok(attr);
        }
        self.getattr_fresh(target).await
    }

    /// An inode's attributes as meta has them now (open and close-to-open checks).
    pub async fn getattr_fresh(&self, target: pb::FileHandle) -> ClientResult<pb::Attr> {
        let epoch = self.callbacks.epoch();
        let session = self.session();
        let reply = self
            .call("getattr", |mut c| async move {
                c.get_attr(pb::GetAttrRequest { target: Some(target), session, caller: None }).await
            })
            .await?;
        check(reply.errno)?;
        let attr = reply.attr.ok_or(ClientError::Errno(pb::errno::EIO))?;
        if reply.promised {
            self.callbacks.note_attr(&attr, self.callbacks.settled(epoch, reply.point.as_ref()));
        }
        Ok(attr)
    }

    /// A page of a directory's entries with their attributes (which the cache keeps when they
    /// come with a promise).
    pub async fn readdir(
        &self,
        caller: &pb::Caller,
        dir: pb::FileHandle,
        after: &[u8],
        limit: u32,
    ) -> ClientResult<(Vec<pb::DirEntry>, bool)> {
        // A directory listed whole under a promise is listed again from the cache (the
        // kernel's own copy of a listing can be dropped at any time, under memory pressure).
        if let Some(cached) = self.callbacks.listing(dir.ino, after, limit as usize) {
            return Ok(cached);
        }
        let epoch = self.callbacks.epoch();
        let session = self.session();
        let after = after.to_vec();
        let reply = self
            .call("readdir", |mut c| {
                let request = pb::ReadDirRequest {
                    dir: Some(dir),
                    after: after.clone(),
                    limit,
                    session,
                    caller: Some(caller.clone()),
                };
                async move { c.read_dir(request).await }
            })
            .await?;
        check(reply.errno)?;
        if reply.promised {
            let epoch = self.callbacks.settled(epoch, reply.point.as_ref());
            self.callbacks.note_listing(dir.ino, &after, &reply.entries, reply.eof, epoch);
        }
        Ok((reply.entries, reply.eof))
    }

    pub async fn readlink(&self, target: pb::FileHandle) -> ClientResult<Vec<u8>> {
        let reply = self
            .call("readlink", |mut c| async move {
                c.read_link(pb::GetAttrRequest { target: Some(target), session: 0, caller: None }).await
            })
            .await?;
        check(reply.errno)?;
        Ok(reply.target)
    }

    /// An extended attribute, answered from the promised cache when it can be (`ls -l` asks
    /// for one per file).
    pub async fn getxattr(&self, caller: &pb::Caller, target: pb::FileHandle, name: &[u8]) -> ClientResult<Vec<u8>> {
        // A name meta refuses whatever the file: the rule is shared, so no request is needed.
        if let Some(code) = pb::xattr_name_errno(name) {
            return Err(ClientError::Errno(code));
        }
        if let Some(cached) = self.callbacks.xattr(target, name) {
            return cached.map_err(ClientError::Errno);
        }
        let epoch = self.callbacks.epoch();
        let session = self.session();
        let name = name.to_vec();
        let reply = self
            .call("getxattr", |mut c| {
                let request = pb::GetXattrRequest {
                    target: Some(target),
                    name: name.clone(),
                    session,
                    caller: Some(caller.clone()),
                };
                async move { c.get_xattr(request).await }
            })
            .await?;
        if reply.promised {
            let answer = if reply.errno == 0 { Ok(&reply.value) } else { Err(reply.errno) };
            self.callbacks.note_xattr(target, &name, answer, self.callbacks.settled(epoch, reply.point.as_ref()));
        }
        check(reply.errno)?;
        Ok(reply.value)
    }

    pub async fn listxattr(&self, caller: &pb::Caller, target: pb::FileHandle) -> ClientResult<Vec<Vec<u8>>> {
        if self.callbacks.xattrs_none(target) {
            return Ok(Vec::new());
        }
        let reply = self
            .call("listxattr", |mut c| {
                let request = pb::GetAttrRequest { target: Some(target), session: 0, caller: Some(caller.clone()) };
                async move { c.list_xattr(request).await }
            })
            .await?;
        check(reply.errno)?;
        Ok(reply.names)
    }

    /// F_GETLK: the lock of another owner in the way of `lock`, if any.
    pub async fn get_lock(&self, lock: pb::LockOp) -> ClientResult<Option<pb::LockInfo>> {
        let session = self.session();
        let reply = self
            .call("getlk", |mut c| {
                let request = pb::GetLockRequest { session, lock: Some(lock) };
                async move { c.get_lock(request).await }
            })
            .await?;
        check(reply.errno)?;
        Ok(reply.conflict)
    }

    /// The file system's usage. Usage is advisory (data servers report free space once a
    /// second), so an answer up to `USAGE_FRESH` old, as the heartbeat brings it, serves without
    /// a request: tools like `find` call `statfs` on every walk.
    pub async fn statfs(&self) -> ClientResult<pb::StatFsReply> {
        let known = self.usage.lock().ok().and_then(|u| *u);
        if let Some((at, usage)) = known
            && at.elapsed() < self.usage_fresh()
        {
            return Ok(usage);
        }
        let usage = self.call("statfs", |mut c| async move { c.stat_fs(pb::StatFsRequest {}).await }).await?;
        self.note_usage(usage);
        Ok(usage)
    }

    fn note_usage(&self, usage: pb::StatFsReply) {
        if let Ok(mut known) = self.usage.lock() {
            *known = Some((Instant::now(), usage));
        }
    }

    /// How long a usage report answers `statfs`: one heartbeat period and a margin.
    fn usage_fresh(&self) -> Duration {
        heartbeat_period(self.lease) + USAGE_FRESH_MARGIN
    }

    /// Part of a file's data map; with the epoch under which it may be kept (see
    /// `Callbacks::keep_data_window`) when meta promised it.
    pub async fn extents(
        &self,
        caller: &pb::Caller,
        target: pb::FileHandle,
        offset: u64,
        len: u64,
    ) -> ClientResult<(pb::GetExtentsReply, Option<u64>)> {
        let epoch = self.callbacks.epoch();
        let session = self.session();
        let reply = self
            .call("extents", |mut c| {
                let request =
                    pb::GetExtentsRequest { target: Some(target), offset, len, session, caller: Some(caller.clone()) };
                async move { c.get_extents(request).await }
            })
            .await?;
        check(reply.errno)?;
        let mut cacheable = None;
        if reply.promised
            && let Some(attr) = &reply.attr
        {
            let settled = self.callbacks.settled(epoch, reply.point.as_ref());
            self.callbacks.note_attr(attr, settled);
            cacheable = Some(settled);
        }
        Ok((reply, cacheable))
    }

    /// Data servers for `count` new blocks, none of them in `exclude`.
    pub async fn place_blocks(&self, count: u32, exclude: &[u64]) -> ClientResult<pb::PlaceBlocksReply> {
        let request = pb::PlaceBlocksRequest { count, exclude: exclude.to_vec(), session: self.session() };
        self.call("place blocks", |mut c| {
            let request = request.clone();
            async move { c.place_blocks(request).await }
        })
        .await
    }

    /// Tells meta that the copy of `block` on `server` failed verification.
    pub async fn report_bad_block(&self, block: pb::BlockRef, server: u64, what: String) -> ClientResult<()> {
        let request = pb::ReportBadBlockRequest { block: Some(block), server, what };
        self.call("report bad block", |mut c| {
            let request = request.clone();
            async move { c.report_bad_block(request).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn status(&self) -> ClientResult<pb::StatusReply> {
        self.call("status", |mut c| async move { c.status(pb::StatusRequest::default()).await }).await
    }
}
