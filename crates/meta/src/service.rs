//! The Meta gRPC service: client requests become Raft commands (mutations) or leader-lease
//! reads; Raft's own messages are handed to the local member.

use std::sync::Arc;
use std::time::Instant;

use cairn_proto::meta_server::{Meta, MetaServer};
use cairn_proto::{self as pb, errno};
use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::access::{MAY_EXEC, MAY_READ, require, require_data_access};
use crate::credentials::{Access, SessionOwners, access_of};
use crate::model::{Inode, Standing, decode, encode};
use crate::node::{DataServerState, MetaError, MetaNode, now_ms, now_time};
use crate::query::{Query, QueryError, READDIR_PAGE_MAX};
use crate::raft_types::{Command, DELEGATED_ELSEWHERE, SESSION_EXPIRED, TypeConfig};
use cairn_trust::block_token::{BlockAccess, BlockTokenKey};

/// gRPC metadata key naming the leader's address on a "not leader" answer.
pub const LEADER_HEADER: &str = "cairn-leader";
/// Message of the status returned for an unknown or expired session.
pub const SESSION_EXPIRED_MESSAGE: &str = "session expired";
/// Orphans reported per heartbeat at most.
const ORPHANS_PER_HEARTBEAT_MAX: usize = 1024;
/// Blocks one orphan question may name.
pub const ORPHAN_QUERY_MAX: usize = 4096;
/// Blocks placed per request at most.
const PLACEMENTS_PER_REQUEST_MAX: u32 = 1024;
/// Delegations one request waits to be returned before it gives up (each recall is bounded by
/// the holder's lease).
const RECALLS_PER_REQUEST_MAX: usize = 8;
/// A recall looks again this often even without news (a return applied elsewhere wakes it).
const RECALL_POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// How long a recall waits, once the delegation is gone, for the change that returned it to be
/// counted (it is not, when another leader applied it).
const RETURN_COUNTED_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a server's certificate is valid.
pub const SERVER_CERT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
/// The largest certificate request taken.
const CERT_REQUEST_BYTES_MAX: usize = 16 * 1024;

/// How long a block token meta issues is valid. A client holding a block map longer (it is
/// cached while its promise lasts) is refused by the data server and fetches the map again.
pub const BLOCK_TOKEN_VALIDITY: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a meta server signs new servers' certificates and block tokens with.
pub struct Signer {
    pub authority: cairn_trust::Authority,
    pub token: cairn_trust::JoinToken,
    /// The authority's key, which block-token keys derive from.
    authority_key_pem: String,
}

impl Signer {
    pub fn new(authority: cairn_trust::Authority, token: cairn_trust::JoinToken) -> Signer {
        let authority_key_pem = authority.key_pem();
        Signer { authority, token, authority_key_pem }
    }

    pub fn block_key(&self, epoch: u32) -> BlockTokenKey {
        BlockTokenKey::derive(&self.authority_key_pem, epoch)
    }
}

fn token_expiry() -> u64 {
    now_ms() + BLOCK_TOKEN_VALIDITY.as_millis() as u64
}

pub struct MetaService {
    node: Arc<MetaNode>,
    signer: Option<Arc<Signer>>,
    session_owners: SessionOwners,
}

impl MetaService {
    pub fn new(node: Arc<MetaNode>) -> Self {
        MetaService { node, signer: None, session_owners: SessionOwners::default() }
    }

    /// Lets servers holding the join token enroll (with TLS; without, there is nothing to sign).
    pub fn with_signer(self, signer: Option<Arc<Signer>>) -> Self {
        MetaService { signer, ..self }
    }

    fn meta_addresses(&self) -> Vec<String> {
        self.node.members().into_iter().map(|(_, address, _)| address).collect()
    }

    fn members_pb(&self) -> Vec<pb::MetaMember> {
        self.node.members().into_iter().map(|(id, address, voter)| pb::MetaMember { id, address, voter }).collect()
    }

    pub fn into_server(self) -> MetaServer<Self> {
        MetaServer::new(self)
            .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(pb::MAX_MESSAGE_BYTES)
    }
}

impl MetaService {
    /// The block-token key epoch as this member applied it.
    fn block_token_epoch(&self) -> Result<u32, Status> {
        let query = self.node.local_read().map_err(status_of)?;
        Ok(query.counter(crate::model::BLOCK_TOKEN_EPOCH).map_err(|e| status_of(e.into()))? as u32)
    }

    /// What the peer of `request` may do (see `credentials`).
    fn access<T>(&self, request: &Request<T>) -> Result<Access, Status> {
        access_of(request.extensions().get::<cairn_trust::Peer>(), || self.node.local_read().map_err(status_of))
    }

    /// `access`, and that the session named (0: none) is the peer's own.
    fn access_to_session<T>(&self, request: &Request<T>, session: u64) -> Result<Access, Status> {
        let access = self.access(request)?;
        self.session_owners.check(&access, session, || self.node.local_read().map_err(status_of))?;
        Ok(access)
    }

    /// Before a read: the target must lie in the credential's subtree and pass `rule`. A
    /// handle that names nothing passes, and the read itself reports it.
    fn check_read(
        query: &Query,
        access: &Access,
        handle: Option<&pb::FileHandle>,
        rule: impl FnOnce(&Inode) -> Result<(), i32>,
    ) -> Result<(), MetaError> {
        let Ok((ino, inode)) = query.by_handle(handle) else {
            return Ok(());
        };
        let confined_to = access.confined_to();
        if confined_to != 0 && !query.within(confined_to, &[ino])? {
            return Err(MetaError::Errno(errno::EACCES));
        }
        rule(&inode).map_err(MetaError::Errno)
    }

    /// Before a read that may promise: the term and the count of changes so far, which the
    /// promise is checked against once the read is done.
    fn promise_point(&self, session: u64) -> Option<(u64, u64)> {
        if session == 0 {
            return None;
        }
        let term = self.node.leader_term()?;
        Some((term, self.node.promises.changes(term)))
    }

    /// Promises `inodes` to `session` as read at `point`: the point, for the reply, if promised.
    fn promise(&self, point: Option<(u64, u64)>, session: u64, inodes: &[u64]) -> Option<pb::PromisePoint> {
        let (term, changes) = point?;
        self.node.promises.promise(term, session, inodes, changes).then_some(pb::PromisePoint { term, changes })
    }

    /// A consistent read for `session` of what names `inos`, with its promise point (see
    /// `promise_point`): if another session holds one of them delegated, the delegation is
    /// recalled first, so the read sees what the holder made.
    async fn read_settled(&self, session: u64, inos: &[u64]) -> Result<(Option<(u64, u64)>, Query), Status> {
        for _ in 0..RECALLS_PER_REQUEST_MAX {
            let point = self.promise_point(session);
            let query = self.node.read().await.map_err(status_of)?;
            match query.delegated_elsewhere(session, inos).map_err(|e| status_of(e.into()))? {
                None => return Ok((point, query)),
                Some((dir, holder)) => {
                    drop(query);
                    self.recall(dir, holder).await.map_err(status_of)?;
                }
            }
        }
        Err(Status::unavailable("the directory kept being delegated; try again"))
    }

    /// Waits until `holder` returned its delegation of `dir` (asked over its callback stream),
    /// or revokes it once the holder can no longer trust it (its lease ran out).
    async fn recall(&self, dir: u64, holder: u64) -> Result<(), MetaError> {
        let Some(term) = self.node.leader_term() else {
            return Err(MetaError::NotLeader { leader: self.node.leader_address() });
        };
        let lease = self.node.promises.lease();
        let mut events = self.node.promises.subscribe();
        let mut sent_on = None;
        let returns = self.node.promises.returns(dir);
        let started = Instant::now();
        // A holder that renews but never answers is revoked after this.
        let give_up = started + lease * 3;
        let mut gone_at = None;
        loop {
            let held = self.node.local_read()?.delegation_holder(dir)? == Some(holder);
            if !held {
                // Returned: wait (briefly) for the returning change to be counted, so a read
                // after it is not refused a promise for having raced it.
                let gone = *gone_at.get_or_insert_with(Instant::now);
                if self.node.promises.returns(dir) > returns || gone.elapsed() >= RETURN_COUNTED_WAIT {
                    tracing::debug!(
                        dir,
                        holder,
                        waited_us = started.elapsed().as_micros() as u64,
                        "delegation returned"
                    );
                    return Ok(());
                }
                let _ = tokio::time::timeout(RECALL_POLL, events.changed()).await;
                continue;
            }
            let silent_after = self.node.promises.recall(term, holder, dir, &mut sent_on);
            let now = Instant::now();
            if now >= silent_after.min(give_up) {
                tracing::warn!(dir, holder, "revoking a delegation: its holder did not return it within its lease");
                self.node.propose(Command::RevokeDelegation { dir, session: holder }).await?;
                return Ok(());
            }
            let wait = silent_after.min(give_up).saturating_duration_since(now).min(RECALL_POLL);
            let _ = tokio::time::timeout(wait, events.changed()).await;
        }
    }

    /// The file system's size and use, for `statfs`.
    fn usage(&self, query: &Query) -> Result<pb::StatFsReply, Status> {
        let files = query.counter("inodes").map_err(|e| status_of(e.into()))?;
        let servers = self.node.live_data_servers();
        let replication = u64::from(self.node.replication().map_err(status_of)?);
        let total: u64 = servers.iter().map(|(_, s)| s.capacity_bytes).sum::<u64>() / replication;
        let free: u64 = servers.iter().map(|(_, s)| s.free_bytes).sum::<u64>() / replication;
        Ok(pb::StatFsReply {
            total_bytes: total,
            free_bytes: free,
            files,
            free_files: u32::MAX as u64,
            block_size: 4096,
            name_max: pb::NAME_BYTES_MAX as u32,
        })
    }

    /// Breaks other sessions' promises on `changed` and waits for them (see `Promises`). A
    /// member that no longer leads answers "not leader": the new leader breaks them when the
    /// client retries (the stored reply names the same inodes) or when holders re-register.
    async fn break_promises(&self, mutator: u64, changed: &[u64]) -> Result<u64, MetaError> {
        let Some(term) = self.node.leader_term() else {
            return Err(MetaError::NotLeader { leader: None });
        };
        let live = if self.node.promises.in_grace(term) { self.node.local_read()?.session_ids()? } else { Vec::new() };
        Ok(self.node.promises.break_and_wait(term, mutator, changed, &live).await)
    }
}

fn status_of(e: MetaError) -> Status {
    match e {
        MetaError::NotLeader { leader } => {
            let mut status = Status::unavailable("not the meta leader");
            if let Some(leader) = leader
                && let Ok(value) = leader.parse()
            {
                status.metadata_mut().insert(LEADER_HEADER, value);
            }
            status
        }
        MetaError::Errno(code) => Status::internal(format!("unexpected errno {code}")),
        MetaError::Store(s) => Status::internal(format!("metadata store: {s}")),
        MetaError::Raft(s) => Status::unavailable(format!("raft: {s}")),
        MetaError::Invalid(s) => Status::invalid_argument(s),
    }
}

/// Splits a query result into (errno, value) for replies that carry an errno.
fn split<T: Default>(result: Result<T, MetaError>) -> Result<(i32, T), Status> {
    match result {
        Ok(value) => Ok((0, value)),
        Err(MetaError::Errno(code)) => Ok((code, T::default())),
        Err(e) => Err(status_of(e)),
    }
}

/// The directory at `path` (from the root), for a credential's subtree.
fn resolve_directory(query: &Query, path: &str) -> Result<pb::FileHandle, Status> {
    let mut at = query.root().map_err(|e| status_of(e.into()))?;
    for component in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let attr = query.lookup(Some(&at), component.as_bytes()).map_err(|e| match e {
            QueryError::Errno(_) => Status::not_found(format!("no directory {path} in the file system")),
            other => status_of(other.into()),
        })?;
        at = pb::FileHandle { ino: attr.ino, generation: attr.generation };
        if attr.kind != pb::FileKind::Directory as i32 {
            return Err(Status::invalid_argument(format!("{path} is not a directory")));
        }
    }
    Ok(at)
}

/// The files a delegated batch created (the entries that succeeded).
fn created_by(batch: &pb::DelegatedBatchOp, errnos: &[i32]) -> Vec<u64> {
    batch
        .entries
        .iter()
        .zip(errnos)
        .filter(|(_, errno)| **errno == 0)
        .filter_map(|(entry, _)| match &entry.op {
            Some(pb::delegated_entry::Op::Create(create)) => Some(create.ino),
            _ => None,
        })
        .collect()
}

/// What a read-only credential may still ask for: letting go of an orphan, and read locks.
fn read_only_may(op: &pb::mutate_request::Op) -> bool {
    use pb::mutate_request::Op;
    match op {
        Op::Release(_) => true,
        Op::Lock(lock) => lock.kind != pb::LockKind::LockWrite as i32,
        _ => false,
    }
}

fn raft_status(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft message: {e}"))
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
        use cairn_trust::{Role, Subject};
        let peer = request.remote_addr();
        let Some(signer) = &self.signer else {
            return Err(Status::failed_precondition("this file system runs without TLS: there is nothing to enroll"));
        };
        let request = request.into_inner();
        if !signer.token.admits(&request.secret) {
            tracing::warn!(?peer, role = %request.role, "refused to enroll a server: its join token is not this file system's");
            return Err(Status::permission_denied("the join token is not this file system's"));
        }
        let role = match request.role.as_str() {
            "meta" => Role::Meta,
            "data" => Role::Data,
            other => return Err(Status::invalid_argument(format!("no server role {other:?}"))),
        };
        if request.request_pem.len() > CERT_REQUEST_BYTES_MAX {
            return Err(Status::invalid_argument("certificate request too large"));
        }
        let subject = Subject::Server { role, id: request.id };
        let cert = signer
            .authority
            .sign(&request.request_pem, &subject, SERVER_CERT_VALIDITY)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(?peer, server = %subject.common_name(), "enrolled a server");
        let authority_pem = signer.authority.cert_pem().to_string();
        let (authority_key_pem, join_token) = match role {
            Role::Meta => (signer.authority.key_pem(), signer.token.to_string()),
            _ => (String::new(), String::new()),
        };
        Ok(Response::new(pb::EnrollReply {
            chain_pem: format!("{cert}{authority_pem}"),
            authority_pem,
            authority_key_pem,
            join_token,
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateReply>, Status> {
        use cairn_trust::Subject;
        let Some(signer) = &self.signer else {
            return Err(Status::failed_precondition("this file system runs without TLS: there is nothing to renew"));
        };
        let peer = request.extensions().get::<cairn_trust::Peer>().cloned();
        let Some(peer) = peer.filter(|p| p.role.is_server()) else {
            return Err(Status::permission_denied("only a server renews its certificate"));
        };
        let id: u64 = peer.id.parse().map_err(|_| Status::invalid_argument("the certificate names no server id"))?;
        let request = request.into_inner();
        if request.request_pem.len() > CERT_REQUEST_BYTES_MAX {
            return Err(Status::invalid_argument("certificate request too large"));
        }
        let subject = Subject::Server { role: peer.role, id };
        let cert = signer
            .authority
            .sign(&request.request_pem, &subject, SERVER_CERT_VALIDITY)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(server = %peer, "renewed a server's certificate");
        Ok(Response::new(pb::RenewCertificateReply { chain_pem: format!("{cert}{}", signer.authority.cert_pem()) }))
    }

    async fn issue_credential(
        &self,
        request: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::IssueCredentialReply>, Status> {
        use cairn_trust::Subject;
        let Some(signer) = &self.signer else {
            return Err(Status::failed_precondition("this file system runs without TLS: credentials need it"));
        };
        let request = request.into_inner();
        let scope = request.scope.ok_or_else(|| Status::invalid_argument("a credential needs a scope"))?;
        crate::credentials::validate_scope(&scope)?;
        if request.name.is_empty() || request.name.len() > 128 {
            return Err(Status::invalid_argument("a credential needs a name of 1 to 128 bytes"));
        }
        if request.request_pem.len() > CERT_REQUEST_BYTES_MAX {
            return Err(Status::invalid_argument("certificate request too large"));
        }
        let now = now_ms();
        let valid_for = std::time::Duration::from_millis(scope.expires_ms.saturating_sub(now).max(1_000));
        // The request is checked before anything is recorded.
        let probe = Subject::Client { credential: "0".into() };
        signer
            .authority
            .sign(&request.request_pem, &probe, valid_for)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let query = self.node.read().await.map_err(status_of)?;
        let taken = query.credentials().map_err(|e| status_of(e.into()))?;
        drop(query);
        if taken.iter().any(|c| c.name == request.name && !c.revoked) {
            return Err(Status::invalid_argument(format!(
                "a credential named {:?} exists: revoke it first",
                request.name
            )));
        }
        let subtree_root = if scope.subtree.trim_matches('/').is_empty() {
            None
        } else {
            let query = self.node.read().await.map_err(status_of)?;
            Some(resolve_directory(&query, &scope.subtree)?)
        };
        let mut credential = pb::Credential {
            id: 0,
            name: request.name,
            scope: Some(scope),
            issued_ms: now,
            revoked: false,
            subtree_root,
        };
        let reply = self
            .node
            .propose(Command::IssueCredential { credential: credential.encode_to_vec() })
            .await
            .map_err(status_of)?;
        credential.id = reply.value;
        let subject = Subject::Client { credential: credential.id.to_string() };
        let cert = signer
            .authority
            .sign(&request.request_pem, &subject, valid_for)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(id = credential.id, name = %credential.name, "issued a client credential");
        let authority_pem = signer.authority.cert_pem().to_string();
        Ok(Response::new(pb::IssueCredentialReply {
            credential: Some(credential),
            chain_pem: format!("{cert}{authority_pem}"),
            authority_pem,
        }))
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialReply>, Status> {
        let request = request.into_inner();
        let query = self.node.read().await.map_err(status_of)?;
        let all = query.credentials().map_err(|e| status_of(e.into()))?;
        drop(query);
        // By name, the active one (names are unique among active credentials).
        let found = all
            .into_iter()
            .filter(|c| if request.id != 0 { c.id == request.id } else { c.name == request.name })
            .min_by_key(|c| c.revoked)
            .ok_or_else(|| Status::not_found("no such credential"))?;
        self.node.propose(Command::RevokeCredential { id: found.id }).await.map_err(status_of)?;
        tracing::info!(id = found.id, name = %found.name, "revoked a client credential");
        Ok(Response::new(pb::RevokeCredentialReply { credential: Some(pb::Credential { revoked: true, ..found }) }))
    }

    async fn rotate_block_token_key(
        &self,
        _request: Request<pb::RotateBlockTokenKeyRequest>,
    ) -> Result<Response<pb::RotateBlockTokenKeyReply>, Status> {
        if self.signer.is_none() {
            return Err(Status::failed_precondition("this file system runs without TLS: it issues no block tokens"));
        }
        let reply = self.node.propose(Command::RotateBlockTokenKey).await.map_err(status_of)?;
        tracing::info!(epoch = reply.value, "rotated the block-token key");
        Ok(Response::new(pb::RotateBlockTokenKeyReply { epoch: reply.value as u32 }))
    }

    async fn list_credentials(
        &self,
        _request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsReply>, Status> {
        let query = self.node.read().await.map_err(status_of)?;
        let credentials = query.credentials().map_err(|e| status_of(e.into()))?;
        Ok(Response::new(pb::ListCredentialsReply { credentials }))
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionReply>, Status> {
        let access = self.access(&request)?;
        let mut name = request.into_inner().client_name;
        name.truncate(256);
        let lease_ms = self.node.config.session_lease.as_millis() as u64;
        let command =
            Command::OpenSessionOf { client_name: name, owner: access.owner.clone(), now_ms: now_ms(), lease_ms };
        let reply = self.node.propose(command).await.map_err(status_of)?;
        let query = self.node.local_read().map_err(status_of)?;
        // A confined credential's mount sees its subtree as the root.
        let root = match access.subtree_root() {
            Some(root) => root,
            None => query.root().map_err(|e| status_of(e.into()))?,
        };
        let fs_id = query.fs_id().map_err(|e| status_of(e.into()))?.unwrap_or_default();
        drop(query);
        Ok(Response::new(pb::OpenSessionReply {
            fs_id,
            session: reply.value,
            lease_ms,
            root: Some(root),
            replication: self.node.replication().map_err(status_of)?,
            meta_addresses: self.meta_addresses(),
            read_only: access.read_only(),
        }))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let session = request.get_ref().session;
        self.access_to_session(&request, session)?;
        let lease_ms = self.node.config.session_lease.as_millis() as u64;
        let reply = self
            .node
            .propose(Command::RenewSession { session, now_ms: now_ms(), lease_ms })
            .await
            .map_err(status_of)?;
        if reply.errno == SESSION_EXPIRED {
            return Err(Status::failed_precondition(SESSION_EXPIRED_MESSAGE));
        }
        let orphans = self
            .node
            .local_read()
            .and_then(|q| Ok(q.orphans_held_by(session, ORPHANS_PER_HEARTBEAT_MAX)?))
            .map_err(status_of)?;
        // The renewal just committed through this leader, so its own state is current enough.
        let usage = Some(self.usage(&self.node.local_read().map_err(status_of)?)?);
        Ok(Response::new(pb::HeartbeatReply { errno: 0, orphans, meta_addresses: self.meta_addresses(), usage }))
    }

    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<Response<pb::AttrReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let mut request = request.into_inner();
        let caller = access.caller(request.caller.take());
        let parent_ino = request.parent.map(|h| h.ino).unwrap_or_default();
        let parent = request.parent.as_ref();
        // A confined mount's root has no parent it may see: its ".." is itself, as in a chroot.
        let to_root =
            request.name == b".." && access.confined_to() != 0 && parent.map(|h| h.ino) == Some(access.confined_to());
        let mut recalls = 0;
        let (point, errno, attr) = loop {
            let (point, query) = self.read_settled(request.session, &[parent_ino]).await?;
            let (errno, attr) =
                split(Self::check_read(&query, &access, parent, |dir| require(dir, &caller, MAY_EXEC)).and_then(
                    |()| match to_root {
                        true => query.getattr(parent).map(Some).map_err(MetaError::from),
                        false => query.lookup(parent, &request.name).map(Some).map_err(MetaError::from),
                    },
                ))?;
            // A directory found delegated elsewhere: its attributes are the holder's to give.
            let found = attr.as_ref().map(|a| a.ino).unwrap_or_default();
            let elsewhere = query.delegated_elsewhere(request.session, &[found]).map_err(|e| status_of(e.into()))?;
            drop(query);
            match elsewhere {
                Some((dir, holder)) if recalls < RECALLS_PER_REQUEST_MAX => {
                    recalls += 1;
                    self.recall(dir, holder).await.map_err(status_of)?;
                }
                _ => break (point, errno, attr),
            }
        };
        let parent = request.parent.map(|h| h.ino).unwrap_or_default();
        // A negative answer is promised too: the directory's names cover it.
        let inodes: Vec<u64> = std::iter::once(parent).chain(attr.as_ref().map(|a| a.ino)).collect();
        let point =
            (errno == 0 || errno == errno::ENOENT).then(|| self.promise(point, request.session, &inodes)).flatten();
        Ok(Response::new(pb::AttrReply { errno, attr, promised: point.is_some(), point }))
    }

    async fn get_attr(&self, request: Request<pb::GetAttrRequest>) -> Result<Response<pb::AttrReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let request = request.into_inner();
        let target = request.target.map(|h| h.ino).unwrap_or_default();
        let (point, query) = self.read_settled(request.session, &[target]).await?;
        let (errno, attr) = split(
            Self::check_read(&query, &access, request.target.as_ref(), |_| Ok(()))
                .and_then(|()| query.getattr(request.target.as_ref()).map(Some).map_err(MetaError::from)),
        )?;
        drop(query);
        let point = attr.as_ref().filter(|_| errno == 0).and_then(|a| self.promise(point, request.session, &[a.ino]));
        Ok(Response::new(pb::AttrReply { errno, attr, promised: point.is_some(), point }))
    }

    async fn read_dir(&self, request: Request<pb::ReadDirRequest>) -> Result<Response<pb::ReadDirReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let mut request = request.into_inner();
        if request.after.len() > pb::NAME_BYTES_MAX {
            return Err(Status::invalid_argument("resume name longer than a name can be"));
        }
        let caller = access.caller(request.caller.take());
        let dir = request.dir.map(|h| h.ino).unwrap_or_default();
        let limit = (request.limit as usize).clamp(1, READDIR_PAGE_MAX);
        let mut rounds = 0;
        let (point, errno, entries, eof) = loop {
            let (point, query) = self.read_settled(request.session, &[dir]).await?;
            let (errno, (entries, eof)) = split(
                Self::check_read(&query, &access, request.dir.as_ref(), |dir| require(dir, &caller, MAY_READ))
                    .and_then(|()| query.readdir(request.dir.as_ref(), &request.after, limit).map_err(MetaError::from)),
            )?;
            // A listed directory delegated elsewhere: its attributes (mtime, ctime) are the
            // holder's to give, as in a lookup that finds it.
            let subdirs: Vec<u64> = entries
                .iter()
                .filter_map(|e| e.attr.as_ref())
                .filter(|a| a.kind == pb::FileKind::Directory as i32)
                .map(|a| a.ino)
                .collect();
            let elsewhere = query.delegations_elsewhere(request.session, &subdirs).map_err(|e| status_of(e.into()))?;
            drop(query);
            if elsewhere.is_empty() || rounds == RECALLS_PER_REQUEST_MAX {
                break (point, errno, entries, eof);
            }
            rounds += 1;
            // All at once: a page of directories filled elsewhere (by a client that just made a
            // tree) costs one wait for their holders, and none is listed as meta had it.
            let recalls = elsewhere.into_iter().map(|(held, holder)| self.recall(held, holder));
            futures::future::try_join_all(recalls).await.map_err(status_of)?;
        };
        let dir = request.dir.map(|h| h.ino).unwrap_or_default();
        let inodes: Vec<u64> =
            std::iter::once(dir).chain(entries.iter().filter_map(|e| e.attr.as_ref().map(|a| a.ino))).collect();
        let point = (errno == 0).then(|| self.promise(point, request.session, &inodes)).flatten();
        Ok(Response::new(pb::ReadDirReply { errno, entries, eof, promised: point.is_some(), point }))
    }

    async fn read_link(&self, request: Request<pb::GetAttrRequest>) -> Result<Response<pb::ReadLinkReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let request = request.into_inner();
        let target = request.target.map(|h| h.ino).unwrap_or_default();
        let (_, query) = self.read_settled(request.session, &[target]).await?;
        let (errno, target) = split(
            Self::check_read(&query, &access, request.target.as_ref(), |_| Ok(()))
                .and_then(|()| query.readlink(request.target.as_ref()).map_err(MetaError::from)),
        )?;
        Ok(Response::new(pb::ReadLinkReply { errno, target }))
    }

    async fn get_xattr(&self, request: Request<pb::GetXattrRequest>) -> Result<Response<pb::GetXattrReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let mut request = request.into_inner();
        let caller = access.caller(request.caller.take());
        let target = request.target.map(|h| h.ino).unwrap_or_default();
        let (point, query) = self.read_settled(request.session, &[target]).await?;
        let name = request.name.clone();
        let (errno, value) = split(
            Self::check_read(&query, &access, request.target.as_ref(), |inode| {
                crate::namespace::check_xattr_access(inode, &name, &caller, MAY_READ)
            })
            .and_then(|()| query.getxattr(request.target.as_ref(), &request.name).map_err(MetaError::from)),
        )?;
        drop(query);
        // An absent name is promised too (setting it changes the inode's ctime and breaks), and
        // so is a refused namespace (the answer depends on the name alone).
        let ino = request.target.map(|h| h.ino).unwrap_or_default();
        let answer_holds = matches!(errno, 0 | errno::ENODATA | errno::EOPNOTSUPP);
        let point = answer_holds.then(|| self.promise(point, request.session, &[ino])).flatten();
        Ok(Response::new(pb::GetXattrReply { errno, value, promised: point.is_some(), point }))
    }

    async fn list_xattr(&self, request: Request<pb::GetAttrRequest>) -> Result<Response<pb::ListXattrReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let mut request = request.into_inner();
        let caller = access.caller(request.caller.take());
        let target = request.target.map(|h| h.ino).unwrap_or_default();
        let (_, query) = self.read_settled(request.session, &[target]).await?;
        let (errno, mut names) = split(
            Self::check_read(&query, &access, request.target.as_ref(), |_| Ok(()))
                .and_then(|()| query.listxattr(request.target.as_ref()).map_err(MetaError::from)),
        )?;
        // Only root sees trusted.* names, as on Linux.
        if caller.uid != 0 {
            names.retain(|name| !name.starts_with(b"trusted."));
        }
        Ok(Response::new(pb::ListXattrReply { errno, names }))
    }

    async fn stat_fs(&self, request: Request<pb::StatFsRequest>) -> Result<Response<pb::StatFsReply>, Status> {
        self.access(&request)?;
        let query = self.node.read().await.map_err(status_of)?;
        Ok(Response::new(self.usage(&query)?))
    }

    async fn get_extents(
        &self,
        request: Request<pb::GetExtentsRequest>,
    ) -> Result<Response<pb::GetExtentsReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let mut request = request.into_inner();
        let caller = access.caller(request.caller.take());
        let target = request.target.map(|h| h.ino).unwrap_or_default();
        let (point, query) = self.read_settled(request.session, &[target]).await?;
        let (errno, (attr, extents)) = split(
            Self::check_read(&query, &access, request.target.as_ref(), |file| {
                require_data_access(file, &caller, MAY_READ)
            })
            .and_then(|()| {
                query
                    .extents(request.target.as_ref(), request.offset, request.len)
                    .map(|(a, e)| (Some(a), e))
                    .map_err(MetaError::from)
            }),
        )?;
        let mut extents = extents;
        if let Some(signer) = &self.signer {
            let epoch = query.counter(crate::model::BLOCK_TOKEN_EPOCH).map_err(|e| status_of(e.into()))?;
            let key = signer.block_key(epoch as u32);
            let expires = token_expiry();
            for block in extents.iter_mut().filter_map(|e| e.block.as_mut()) {
                block.token = key.issue(BlockAccess::Read, pb::BlockId::of(block).0, expires);
            }
        }
        let servers = if extents.iter().any(|e| e.block.is_some()) {
            query
                .data_servers()
                .map_err(|e| status_of(e.into()))?
                .into_iter()
                .map(|(id, address)| pb::DataServer { id, address, ..Default::default() })
                .collect()
        } else {
            Vec::new()
        };
        drop(query);
        let point = attr.as_ref().filter(|_| errno == 0).and_then(|a| self.promise(point, request.session, &[a.ino]));
        Ok(Response::new(pb::GetExtentsReply { errno, attr, extents, servers, promised: point.is_some(), point }))
    }

    async fn place_blocks(
        &self,
        request: Request<pb::PlaceBlocksRequest>,
    ) -> Result<Response<pb::PlaceBlocksReply>, Status> {
        let access = self.access(&request)?;
        let session = request.get_ref().session;
        self.session_owners.check_existing(&access, session, || self.node.local_read().map_err(status_of))?;
        if access.read_only() {
            tracing::warn!(caller = %access.owner, "refused a block placement: the credential is read-only");
            return Err(Status::permission_denied("the credential is read-only"));
        }
        let request = request.into_inner();
        let count = request.count;
        if request.exclude.len() > PLACEMENTS_PER_REQUEST_MAX as usize {
            return Err(Status::invalid_argument("too many servers to exclude"));
        }
        if count == 0 || count > PLACEMENTS_PER_REQUEST_MAX {
            return Err(Status::invalid_argument(format!("count must be 1..={PLACEMENTS_PER_REQUEST_MAX}")));
        }
        if !self.node.is_leader().await {
            return Err(status_of(MetaError::NotLeader { leader: None }));
        }
        let replication = self.node.replication().map_err(status_of)? as usize;
        // Servers the client saw fail are avoided while there are enough others; with too few
        // left they are tried again (they may be back), rather than failing the write.
        let mut chosen = self.node.place(replication, &request.exclude).map_err(status_of)?;
        if chosen.len() < replication {
            chosen = self.node.place(replication, &[]).map_err(status_of)?;
        }
        if chosen.len() < replication {
            return Err(Status::unavailable(format!(
                "{} live data servers, {replication} needed for a new block",
                chosen.len()
            )));
        }
        let servers = chosen
            .into_iter()
            .map(|(id, s)| pb::DataServer {
                id,
                address: s.address,
                capacity_bytes: s.capacity_bytes,
                used_bytes: s.used_bytes,
                domain: s.domain,
                draining: false,
            })
            .collect();
        let write_token = match &self.signer {
            Some(signer) => {
                let epoch = self.block_token_epoch()?;
                signer.block_key(epoch).issue(BlockAccess::Write, u128::from(request.session) << 64, token_expiry())
            }
            None => Vec::new(),
        };
        Ok(Response::new(pb::PlaceBlocksReply { servers, replication: replication as u32, write_token }))
    }

    async fn mutate(&self, request: Request<pb::MutateRequest>) -> Result<Response<pb::MutateReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let mut request = request.into_inner();
        let Some(op) = &request.op else {
            return Err(Status::invalid_argument("mutation without an operation"));
        };
        if access.read_only() && !read_only_may(op) {
            tracing::warn!(caller = %access.owner, "refused a change: the credential is read-only");
            return Ok(Response::new(pb::MutateReply { errno: errno::EROFS, ..Default::default() }));
        }
        // The state machine applies permissions to this identity, never to the one claimed.
        request.caller = Some(access.caller(request.caller.take()));
        request.confined_to = access.confined_to();
        let encoded = request.encode_to_vec();
        let named = request.op.as_ref().map(pb::mutate_request::Op::named_inodes).unwrap_or_default();
        let breaks = request.op.as_ref().is_some_and(pb::mutate_request::Op::changes_cached_state);
        let mut in_flight =
            self.node.leader_term().map(|term| self.node.promises.begin_mutation(term, request.session, named.clone()));
        // Changes counted before the proposal are in the reply; a later one may not be.
        let since = self.node.leader_term().map(|term| self.node.promises.changes(term));
        let proposed = std::time::Instant::now();
        let mut recalls = 0;
        let reply = loop {
            let reply = self
                .node
                .propose(Command::Mutate { now: now_time(), request: encoded.clone() })
                .await
                .map_err(status_of)?;
            if reply.errno != DELEGATED_ELSEWHERE {
                break reply;
            }
            // Nothing was applied or stored: the same request goes again once the holder let go.
            recalls += 1;
            if recalls > RECALLS_PER_REQUEST_MAX {
                return Err(Status::unavailable("the directory kept being delegated; try again"));
            }
            self.recall(reply.value, reply.holder).await.map_err(status_of)?;
        };
        tracing::trace!(elapsed_us = proposed.elapsed().as_micros() as u64, "mutation committed");
        if reply.errno == SESSION_EXPIRED {
            return Err(Status::failed_precondition(SESSION_EXPIRED_MESSAGE));
        }
        if reply.errno != 0 {
            return Ok(Response::new(pb::MutateReply { errno: reply.errno, ..Default::default() }));
        }
        let replayed = reply.replayed;
        let mut reply = pb::MutateReply::decode(reply.mutate.as_slice())
            .map_err(|e| Status::internal(format!("stored reply undecodable: {e}")))?;
        debug_assert!(!reply.promised, "the state machine never promises; the leader does");
        if breaks && reply.errno == 0 {
            let mut changed = named;
            changed.extend(reply.attr.as_ref().map(|a| a.ino));
            changed.extend(reply.changed.iter().copied());
            changed.sort_unstable();
            changed.dedup();
            let change = self.break_promises(request.session, &changed).await.map_err(status_of)?;
            // From here on, another session's change waits for this one's acknowledgement of
            // its break again (nothing below waits on others, so this client's kernel, which
            // may hold the directory locked until this reply, cannot hold that up for long). A
            // break sent before is still unacknowledged below, and keeps the promise off.
            drop(in_flight.take());
            // The writer may cache what it just changed, as of its own change; a replayed reply
            // is as of the first time, and whatever changed since is not in it.
            reply.promised = match (&reply.attr, self.node.leader_term(), since) {
                _ if replayed => false,
                (Some(attr), Some(term), Some(since)) => {
                    let mut promised = vec![attr.ino];
                    promised.extend(reply.parent.as_ref().map(|p| p.ino));
                    // A batch: the files it made, which the holder caches as it made them.
                    if let Some(pb::mutate_request::Op::Batch(batch)) = &request.op {
                        promised.extend(created_by(batch, &reply.batch_errnos));
                    }
                    self.node.promises.promise_own(term, request.session, &promised, since, change)
                }
                _ => false,
            };
        }
        drop(in_flight);
        if let Some(pb::mutate_request::Op::Batch(batch)) = &request.op
            && batch.release
        {
            // Recalls waiting for this directory go on (after the change was counted, so
            // what they read next may be promised).
            self.node.promises.returned(batch.dir.map(|h| h.ino).unwrap_or_default());
        }
        Ok(Response::new(reply))
    }

    type CallbacksStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::CallbackDown, Status>> + Send>>;

    async fn callbacks(
        &self,
        request: Request<tonic::Streaming<pb::CallbackUp>>,
    ) -> Result<Response<Self::CallbacksStream>, Status> {
        let access = self.access(&request)?;
        let mut inbound = request.into_inner();
        let Some(term) = self.node.leader_term() else {
            return Err(status_of(MetaError::NotLeader { leader: self.node.leader_address() }));
        };
        let first = inbound.message().await?.and_then(|m| m.msg);
        let Some(pb::callback_up::Msg::Register(register)) = first else {
            return Err(Status::invalid_argument("a callback stream starts with a registration"));
        };
        let session = register.session;
        self.session_owners.check(&access, session, || self.node.local_read().map_err(status_of))?;
        if !self.node.local_read().map_err(status_of)?.session_exists(session).map_err(|e| status_of(e.into()))? {
            return Err(Status::failed_precondition(SESSION_EXPIRED_MESSAGE));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(crate::promises::STREAM_QUEUE);
        let stream = self.node.promises.attach(term, session, tx.clone(), register.sends_forgotten);
        let callbacks = CallbackStream { node: self.node.clone(), term, session, stream, tx };
        tokio::spawn(async move {
            let mut next = Some(register);
            loop {
                let result = match next.take() {
                    Some(register) => callbacks.register(register).await,
                    None => match inbound.message().await {
                        Ok(Some(pb::CallbackUp { msg: Some(msg) })) => callbacks.handle(msg).await,
                        Ok(Some(_)) => Ok(()),
                        Ok(None) | Err(_) => Err(()),
                    },
                };
                if result.is_err() {
                    break;
                }
            }
            callbacks.node.promises.detach(session, stream);
        });
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn get_lock(&self, request: Request<pb::GetLockRequest>) -> Result<Response<pb::GetLockReply>, Status> {
        let access = self.access_to_session(&request, request.get_ref().session)?;
        let request = request.into_inner();
        let op = request.lock.unwrap_or_default();
        let Some(lock) = crate::lock_table::request_of(&op, request.session) else {
            return Ok(Response::new(pb::GetLockReply { errno: errno::EINVAL, ..Default::default() }));
        };
        let target = op.target.unwrap_or_default();
        let (_, query) = self.read_settled(request.session, &[target.ino]).await?;
        if let Err(MetaError::Errno(code)) = Self::check_read(&query, &access, Some(&target), |_| Ok(())) {
            return Ok(Response::new(pb::GetLockReply { errno: code, ..Default::default() }));
        }
        match query.by_handle(Some(&target)) {
            Ok(_) => {}
            Err(QueryError::Errno(code)) => {
                return Ok(Response::new(pb::GetLockReply { errno: code, ..Default::default() }));
            }
            Err(e) => return Err(status_of(e.into())),
        }
        let held = query.locks(target.ino).map_err(|e| status_of(e.into()))?;
        let conflict = crate::locks::conflict(&held, &lock).map(crate::lock_table::info_of);
        Ok(Response::new(pb::GetLockReply { errno: 0, conflict }))
    }

    /// Every member hears each data server's reports and keeps them in memory, so that a new
    /// leader can place blocks at once instead of waiting for the data servers to find it. A
    /// server the group has not recorded yet is recorded through the leader (followers answer
    /// "not leader").
    async fn register_data_server(
        &self,
        request: Request<pb::RegisterDataServerRequest>,
    ) -> Result<Response<pb::RegisterDataServerReply>, Status> {
        let request = request.into_inner();
        if request.id == 0 || request.address.is_empty() || request.address.len() > 256 || request.domain.len() > 256 {
            return Err(Status::invalid_argument(
                "data server needs an id and an address (and a domain of at most 256 bytes)",
            ));
        }
        // The file system id never changes once set and the registration is only a hint for
        // this member's memory, so this member's own state is current enough.
        let query = self.node.local_read().map_err(status_of)?;
        let fs_id = query.fs_id().map_err(|e| status_of(e.into()))?.unwrap_or_default();
        if !request.fs_id.is_empty() && request.fs_id != fs_id {
            return Err(Status::permission_denied(format!(
                "data server belongs to file system {}, this is {fs_id}",
                request.fs_id
            )));
        }
        let known = query.data_server_records().map_err(|e| status_of(e.into()))?;
        drop(query);
        let record = known.into_iter().find(|(id, _)| *id == request.id).map(|(_, record)| record);
        if record.as_ref().is_some_and(|r| r.standing == Standing::Removed) {
            return Err(Status::permission_denied(format!(
                "data server {} was removed from this file system; to serve it again, start it on an empty directory",
                request.id
            )));
        }
        // A server is placed on only once the group has recorded its address (readers find it
        // there), so the report is noted in memory after that.
        if record.is_none_or(|r| r.address != request.address) {
            self.node
                .propose(Command::RegisterDataServer { id: request.id, address: request.address.clone() })
                .await
                .map_err(status_of)?;
        }
        let free = request.capacity_bytes.saturating_sub(request.used_bytes);
        if let Ok(mut servers) = self.node.data_servers.write() {
            servers.insert(
                request.id,
                DataServerState {
                    address: request.address,
                    capacity_bytes: request.capacity_bytes,
                    used_bytes: request.used_bytes,
                    free_bytes: free,
                    domain: request.domain,
                    last_seen: Instant::now(),
                },
            );
        }
        // The current key and the one before it: a token issued just before a rotation still
        // passes until it expires.
        let block_token_keys = match &self.signer {
            Some(signer) => {
                let epoch = self.block_token_epoch()?;
                let epochs = if epoch == 0 { vec![0] } else { vec![epoch, epoch - 1] };
                epochs
                    .into_iter()
                    .map(|epoch| pb::BlockTokenKey { epoch, key: signer.block_key(epoch).key.to_vec() })
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(Response::new(pb::RegisterDataServerReply {
            fs_id,
            meta_addresses: self.meta_addresses(),
            block_token_keys,
        }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let access = self.access(&request)?;
        // Hashing the whole state is for servers and the administrator.
        let with_digest = request.into_inner().with_digest && access.credential.is_none();
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let query = self.node.local_read().map_err(status_of)?;
        let role = match metrics.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        };
        let live = self.node.live_data_servers();
        let data_servers = query
            .data_server_records()
            .map_err(|e| status_of(e.into()))?
            .into_iter()
            .filter(|(_, record)| record.standing != Standing::Removed)
            .map(|(id, record)| {
                let state = live.iter().find(|(live_id, _)| *live_id == id).map(|(_, s)| s.clone());
                pb::DataServer {
                    id,
                    address: record.address,
                    capacity_bytes: state.as_ref().map(|s| s.capacity_bytes).unwrap_or(0),
                    used_bytes: state.as_ref().map(|s| s.used_bytes).unwrap_or(0),
                    domain: state.map(|s| s.domain).unwrap_or_default(),
                    draining: record.standing == Standing::Draining,
                }
            })
            .collect();
        let state_digest =
            if with_digest { query.state_digest().map_err(|e| status_of(e.into()))?.to_vec() } else { Vec::new() };
        // The applied index read in the same transaction as the digest, not from metrics.
        let last_applied = query.last_applied_index().map_err(|e| status_of(e.into()))?;
        Ok(Response::new(pb::StatusReply {
            fs_id: query.fs_id().map_err(|e| status_of(e.into()))?.unwrap_or_default(),
            node_id: self.node.config.node_id,
            address: self.node.config.address.clone(),
            role: role.into(),
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            last_applied,
            inodes: query.counter("inodes").map_err(|e| status_of(e.into()))?,
            sessions: query.session_count().map_err(|e| status_of(e.into()))?,
            data_servers,
            members: self.members_pb(),
            pid: std::process::id(),
            state_digest,
            under_replicated_blocks: self.node.under_replicated.load(std::sync::atomic::Ordering::Relaxed),
            repair_scans: self.node.repair_scans.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    async fn report_bad_block(
        &self,
        request: Request<pb::ReportBadBlockRequest>,
    ) -> Result<Response<pb::ReportBadBlockReply>, Status> {
        let access = self.access(&request)?;
        let from_server = request.extensions().get::<cairn_trust::Peer>().is_some_and(|p| p.role.is_server());
        let request = request.into_inner();
        let block = request.block.ok_or_else(|| Status::invalid_argument("no block named"))?;
        if request.what.len() > 4096 {
            return Err(Status::invalid_argument("report too long"));
        }
        let id = pb::BlockId::of(&block);
        // A client reports only a block it was given to read (its read token), so nobody can
        // have good copies dropped by naming ids.
        if let Some(signer) = &self.signer
            && !from_server
        {
            let epoch = self.block_token_epoch()?;
            let keys = [signer.block_key(epoch), signer.block_key(epoch.saturating_sub(1))];
            if let Err(e) = cairn_trust::block_token::verify(&keys, &block.token, BlockAccess::Read, id.0, now_ms()) {
                tracing::warn!(caller = %access.owner, block = %id, "refused a bad-copy report: {e}");
                return Err(Status::permission_denied(e.to_string()));
            }
        }
        self.node.drop_bad_copy(id.0, request.server).await.map_err(status_of)?;
        tracing::warn!(block = %id, server = request.server, what = %request.what, "bad copy reported and dropped");
        Ok(Response::new(pb::ReportBadBlockReply {}))
    }

    async fn find_orphans(
        &self,
        request: Request<pb::FindOrphansRequest>,
    ) -> Result<Response<pb::FindOrphansReply>, Status> {
        let request = request.into_inner();
        if request.blocks.len() > ORPHAN_QUERY_MAX {
            return Err(Status::invalid_argument(format!("at most {ORPHAN_QUERY_MAX} blocks per question")));
        }
        let ids: Vec<u128> = request.blocks.iter().map(|b| pb::BlockId::of(b).0).collect();
        // A linearizable read: a copy a commit just made live must not look orphaned.
        let query = self.node.read().await.map_err(status_of)?;
        let orphans = query.orphan_copies(request.server, &ids).map_err(|e| status_of(e.into()))?;
        let orphans = orphans
            .into_iter()
            .map(|id| {
                let id = pb::BlockId(id);
                pb::BlockRef { id_hi: id.hi(), id_lo: id.lo(), ..Default::default() }
            })
            .collect();
        Ok(Response::new(pb::FindOrphansReply { orphans }))
    }

    async fn add_meta_server(
        &self,
        request: Request<pb::AddMetaServerRequest>,
    ) -> Result<Response<pb::AddMetaServerReply>, Status> {
        let request = request.into_inner();
        if request.address.is_empty() || request.address.len() > 256 {
            return Err(Status::invalid_argument("a meta server address is host:port, at most 256 bytes"));
        }
        tracing::info!(id = request.id, address = %request.address, "adding a meta server");
        self.node.add_member(request.id, request.address).await.map_err(status_of)?;
        let fs_id = self.node.local_read().and_then(|q| Ok(q.fs_id()?)).map_err(status_of)?.unwrap_or_default();
        Ok(Response::new(pb::AddMetaServerReply { fs_id, members: self.members_pb() }))
    }

    async fn remove_meta_server(
        &self,
        request: Request<pb::RemoveMetaServerRequest>,
    ) -> Result<Response<pb::RemoveMetaServerReply>, Status> {
        let id = request.into_inner().id;
        tracing::info!(id, "removing a meta server");
        self.node.remove_member(id).await.map_err(status_of)?;
        Ok(Response::new(pb::RemoveMetaServerReply { members: self.members_pb() }))
    }

    async fn remove_data_server(
        &self,
        request: Request<pb::RemoveDataServerRequest>,
    ) -> Result<Response<pb::RemoveDataServerReply>, Status> {
        let request = request.into_inner();
        let query = self.node.read().await.map_err(status_of)?;
        let known = query.data_server_records().map_err(|e| status_of(e.into()))?;
        drop(query);
        let Some((_, record)) = known.into_iter().find(|(id, _)| *id == request.id) else {
            return Err(Status::not_found(format!("no data server {} in this file system", request.id)));
        };
        if record.standing == Standing::Active {
            tracing::info!(id = request.id, address = %record.address, "draining a data server");
        }
        if record.standing != Standing::Removed {
            let command = if request.force {
                tracing::warn!(id = request.id, "removing a data server at once; copies only it held are lost");
                Command::SetDataServerStanding { id: request.id, standing: Standing::Removed, force: true }
            } else {
                Command::SetDataServerStanding { id: request.id, standing: Standing::Draining, force: false }
            };
            self.node.propose(command).await.map_err(status_of)?;
        }
        let query = self.node.local_read().map_err(status_of)?;
        let removed = query
            .data_server_records()
            .map_err(|e| status_of(e.into()))?
            .iter()
            .any(|(id, r)| *id == request.id && r.standing == Standing::Removed);
        let blocks_left = query.blocks_on(request.id).map_err(|e| status_of(e.into()))?;
        Ok(Response::new(pb::RemoveDataServerReply { removed, blocks_left }))
    }

    async fn raft_append(&self, request: Request<pb::RaftBytes>) -> Result<Response<pb::RaftBytes>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&request.into_inner().payload).map_err(raft_status)?;
        let result = self.node.raft.append_entries(rpc).await;
        Ok(Response::new(pb::RaftBytes { payload: encode(&result) }))
    }

    async fn raft_vote(&self, request: Request<pb::RaftBytes>) -> Result<Response<pb::RaftBytes>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode(&request.into_inner().payload).map_err(raft_status)?;
        let result = self.node.raft.vote(rpc).await;
        Ok(Response::new(pb::RaftBytes { payload: encode(&result) }))
    }

    async fn raft_snapshot(
        &self,
        request: Request<tonic::Streaming<pb::RaftBytes>>,
    ) -> Result<Response<pb::RaftBytes>, Status> {
        let mut stream = request.into_inner();
        let mut encoded = Vec::new();
        while let Some(piece) = stream.message().await? {
            if encoded.len() + piece.payload.len() > pb::SNAPSHOT_BYTES_MAX {
                return Err(Status::invalid_argument("snapshot larger than a meta server accepts"));
            }
            encoded.extend_from_slice(&piece.payload);
        }
        let (vote, meta, data): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>, Vec<u8>) =
            decode(&encoded).map_err(raft_status)?;
        let snapshot = SnapshotOf::<TypeConfig, Vec<u8>> { meta, snapshot: data };
        let result = self.node.raft.install_full_snapshot(vote, snapshot).await;
        Ok(Response::new(pb::RaftBytes { payload: encode(&result) }))
    }
}

/// One session's callback stream on the leader.
struct CallbackStream {
    node: Arc<MetaNode>,
    term: u64,
    session: u64,
    stream: u64,
    tx: tokio::sync::mpsc::Sender<pb::CallbackDown>,
}

impl CallbackStream {
    async fn send(&self, msg: pb::callback_down::Msg) -> Result<(), ()> {
        self.tx.send(pb::CallbackDown { msg: Some(msg) }).await.map_err(|_| ())
    }

    async fn handle(&self, msg: pb::callback_up::Msg) -> Result<(), ()> {
        let promises = &self.node.promises;
        match msg {
            pb::callback_up::Msg::Register(register) => self.register(register).await,
            pb::callback_up::Msg::Ack(ack) => {
                promises.ack(self.term, self.session, self.stream, ack.seq);
                Ok(())
            }
            pb::callback_up::Msg::Forgotten(forgotten) => {
                promises.forgotten(self.term, self.session, self.stream, forgotten.seq);
                Ok(())
            }
            pb::callback_up::Msg::Renew(renew) => {
                // A renewal counts only once this member confirmed it still leads in this term.
                if self.node.read().await.is_err() || self.node.leader_term() != Some(self.term) {
                    return Err(());
                }
                if !promises.renew(self.term, self.session, self.stream) {
                    return Err(());
                }
                self.send(pb::callback_down::Msg::Renewed(pb::CallbackRenewed { nonce: renew.nonce })).await
            }
        }
    }

    /// Promises again what the client still caches, where it is current; breaks the rest.
    async fn register(&self, register: pb::CallbackRegister) -> Result<(), ()> {
        if register.cached.len() > REGISTER_BATCH_MAX {
            return Err(());
        }
        let promises = &self.node.promises;
        if !register.cached.is_empty() {
            let since = promises.changes(self.term);
            let query = self.node.read().await.map_err(|_| ())?;
            let mut current = Vec::new();
            let mut stale = Vec::new();
            for cached in &register.cached {
                let handle = pb::FileHandle { ino: cached.ino, generation: cached.generation };
                match query.getattr(Some(&handle)) {
                    Ok(attr) if crate::promises::same_version(cached, &attr) => current.push(cached.ino),
                    _ => stale.push(cached.ino),
                }
            }
            drop(query);
            if !current.is_empty() && !promises.promise(self.term, self.session, &current, since) {
                stale.extend(current);
            }
            if !stale.is_empty() {
                promises.break_one(self.term, self.session, stale);
            }
        }
        if register.done {
            if !promises.registered(self.term, self.session, self.stream) {
                return Err(());
            }
            let lease_ms = promises.lease().as_millis() as u64;
            self.send(pb::callback_down::Msg::Registered(pb::CallbackRegistered { lease_ms })).await?;
        }
        Ok(())
    }
}

/// Cached inodes one registration message may name.
pub const REGISTER_BATCH_MAX: usize = 4096;
