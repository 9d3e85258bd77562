//! The Raft type configuration: what a log entry carries and what applying it answers.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Standing, Time};

/// One state-machine command. The proposing leader stamps the time, so every member applies
/// the same change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    InitFs {
        fs_id: String,
        now: Time,
    },
    OpenSession {
        client_name: String,
        now_ms: u64,
        lease_ms: u64,
    },
    RenewSession {
        session: u64,
        now_ms: u64,
        lease_ms: u64,
    },
    ExpireSessions {
        now_ms: u64,
    },
    /// A client mutation: an encoded `MutateRequest`.
    Mutate {
        now: Time,
        request: Vec<u8>,
    },
    RegisterDataServer {
        id: u64,
        address: String,
    },
    ForgetGarbage {
        ids: Vec<u128>,
    },
    /// Copies of each new block (set when the file system is created).
    SetReplication {
        copies: u32,
    },
    /// A repair stored a new copy of block `id` on `added`; copies on `dropped` (dead or
    /// corrupt) no longer count.
    ReplaceCopies {
        id: u128,
        added: Option<u64>,
        dropped: Vec<u64>,
    },
    /// Moves data server `id` to `standing` (see [`Standing`]); `force` removes it even with
    /// copies still listed on it.
    SetDataServerStanding {
        id: u64,
        standing: Standing,
        force: bool,
    },
    /// A session opened by `owner` (the peer its certificate names).
    OpenSessionOf {
        client_name: String,
        owner: String,
        now_ms: u64,
        lease_ms: u64,
    },
    /// Records a new client credential: a protobuf-encoded `Credential` whose id is assigned
    /// here (the reply's value).
    IssueCredential {
        credential: Vec<u8>,
    },
    /// Revokes credential `id` for good (the reply's value is 1 if it existed).
    RevokeCredential {
        id: u64,
    },
    /// Starts the next block-token key epoch (the reply's value).
    RotateBlockTokenKey,
    /// Takes back `session`'s delegation of directory `dir`: the holder did not answer a recall
    /// within its lease (the reply's value is 1 if it held it).
    RevokeDelegation {
        dir: u64,
        session: u64,
    },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::InitFs { fs_id, .. } => write!(f, "init-fs({fs_id})"),
            Command::OpenSession { client_name, .. } => write!(f, "open-session({client_name})"),
            Command::RenewSession { session, .. } => write!(f, "renew-session({session})"),
            Command::ExpireSessions { now_ms } => write!(f, "expire-sessions({now_ms})"),
            Command::Mutate { request, .. } => write!(f, "mutate({} bytes)", request.len()),
            Command::RegisterDataServer { id, address } => write!(f, "register-data-server({id}, {address})"),
            Command::ForgetGarbage { ids } => write!(f, "forget-garbage({})", ids.len()),
            Command::SetReplication { copies } => write!(f, "set-replication({copies})"),
            Command::OpenSessionOf { client_name, owner, .. } => write!(f, "open-session({client_name}, {owner})"),
            Command::IssueCredential { credential } => write!(f, "issue-credential({} bytes)", credential.len()),
            Command::RevokeCredential { id } => write!(f, "revoke-credential({id})"),
            Command::RotateBlockTokenKey => write!(f, "rotate-block-token-key"),
            Command::RevokeDelegation { dir, session } => write!(f, "revoke-delegation({dir}, {session})"),
            Command::ReplaceCopies { id, added, dropped } => {
                write!(f, "replace-copies({id:032x}, +{added:?}, -{dropped:?})")
            }
            Command::SetDataServerStanding { id, standing, force } => {
                write!(f, "set-data-server-standing({id}, {standing:?}, force={force})")
            }
        }
    }
}

/// What applying a command answers: an errno, a number (a session id), or an encoded
/// `MutateReply`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    pub errno: i32,
    pub value: u64,
    pub mutate: Vec<u8>,
    /// `mutate` is the stored reply of a request applied before (a retry): what it says is as
    /// of then, so nothing in it may be promised as current.
    #[serde(default)]
    pub replayed: bool,
    /// With `DELEGATED_ELSEWHERE`: the session holding the directory `value`.
    #[serde(default)]
    pub holder: u64,
}

/// Returned in `CommandReply::errno` (and to clients) when a session is unknown or expired.
pub const SESSION_EXPIRED: i32 = 10_001;
/// Returned in `CommandReply::errno` (never to clients) when a mutation names a directory
/// another session holds a delegation of: nothing was applied or stored, and the leader
/// proposes it again once the holder let go.
pub const DELEGATED_ELSEWHERE: i32 = 10_002;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = CommandReply,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type MetaRaft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;
