//! Client credentials on the meta side: which peer a request comes from, what its credential
//! lets it do (the scope recorded in the replicated state when the credential was issued), and
//! the binding of sessions to the peer that opened them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cairn_proto as pb;
use cairn_trust::Peer;
use tonic::Status;

use crate::node::now_ms;
use crate::query::Query;

/// The credential id of the administrator, made with the file system: unrestricted.
pub const ADMIN_CREDENTIAL: &str = "admin";
/// The longest a credential may be valid (as long as the authority).
const EXPIRY_MAX_MS: u64 = 20 * 365 * 24 * 3600 * 1000;
/// Session owners remembered (owners never change, so a full table is simply emptied).
const SESSION_OWNERS_MAX: usize = 65_536;

/// What the peer of one request may do.
#[derive(Clone, Debug)]
pub struct Access {
    /// The peer as its certificate names it ("client 7", "meta 1"); empty without TLS.
    pub owner: String,
    /// The client credential's record; None for servers, the administrator and plaintext
    /// file systems, which act as whoever they say.
    pub credential: Option<Arc<pb::Credential>>,
}

impl Access {
    pub fn full(owner: String) -> Access {
        Access { owner, credential: None }
    }

    fn scope(&self) -> Option<&pb::CredentialScope> {
        self.credential.as_ref().and_then(|c| c.scope.as_ref())
    }

    /// The identity a request claiming `claimed` acts as.
    pub fn caller(&self, claimed: Option<pb::Caller>) -> pb::Caller {
        let claimed = claimed.unwrap_or_default();
        match &self.credential {
            None => claimed,
            Some(credential) => crate::access::effective_caller(&credential.scope.clone().unwrap_or_default(), claimed),
        }
    }

    pub fn read_only(&self) -> bool {
        self.scope().is_some_and(|s| s.read_only)
    }

    /// The directory the credential is confined to (0: none).
    pub fn confined_to(&self) -> u64 {
        self.credential.as_ref().and_then(|c| c.subtree_root.as_ref()).map_or(0, |h| h.ino)
    }

    pub fn subtree_root(&self) -> Option<pb::FileHandle> {
        self.credential.as_ref().and_then(|c| c.subtree_root)
    }
}

/// Resolves the peer of a request (as the TLS layer verified it) to what it may do. A client
/// credential must be recorded, unrevoked and unexpired; a refusal is logged.
pub fn access_of(peer: Option<&Peer>, query: impl FnOnce() -> Result<Query, Status>) -> Result<Access, Status> {
    let Some(peer) = peer else {
        return Ok(Access::full(String::new()));
    };
    if peer.role.is_server() || peer.id == ADMIN_CREDENTIAL {
        return Ok(Access::full(peer.to_string()));
    }
    let refuse = |why: String| {
        tracing::warn!(caller = %peer, "refused a request: {why}");
        Status::permission_denied(why)
    };
    let Ok(id) = peer.id.parse::<u64>() else {
        return Err(refuse(format!("credential {:?} is not one this file system issued", peer.id)));
    };
    let credential = query()?
        .credential(id)
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| refuse(format!("credential {id} is not one this file system issued")))?;
    if credential.revoked {
        return Err(refuse(format!("credential {id} ({}) was revoked", credential.name)));
    }
    let expires_ms = credential.scope.as_ref().map_or(0, |s| s.expires_ms);
    if expires_ms != 0 && now_ms() >= expires_ms {
        return Err(refuse(format!("credential {id} ({}) expired", credential.name)));
    }
    Ok(Access { owner: peer.to_string(), credential: Some(Arc::new(credential)) })
}

/// Which peer opened each session, so that no other may use it (its promises, its orphans, its
/// locks, its stored replies).
#[derive(Default)]
pub struct SessionOwners {
    known: Mutex<HashMap<u64, String>>,
}

impl SessionOwners {
    /// Refuses `access` the use of `session` unless its peer opened it. A session opened
    /// without an owner (without TLS, or before owners were recorded) is only for callers
    /// without a certificate: a credential never reaches a session it cannot be shown to own.
    /// An unknown one is left to the request itself to report as expired (see
    /// `check_existing` where it cannot be).
    pub fn check(
        &self,
        access: &Access,
        session: u64,
        query: impl FnOnce() -> Result<Query, Status>,
    ) -> Result<(), Status> {
        if session == 0 {
            return Ok(());
        }
        let cached = self.known.lock().ok().and_then(|known| known.get(&session).cloned());
        let owner = match cached {
            Some(owner) => owner,
            None => {
                let Some(owner) = query()?.session_owner(session).map_err(|e| Status::internal(e.to_string()))? else {
                    return Ok(());
                };
                if let Ok(mut known) = self.known.lock() {
                    if known.len() >= SESSION_OWNERS_MAX {
                        known.clear();
                    }
                    known.insert(session, owner.clone());
                }
                owner
            }
        };
        if owner == access.owner {
            return Ok(());
        }
        let caller = if access.owner.is_empty() { "a caller without a certificate" } else { access.owner.as_str() };
        tracing::warn!(%caller, session, "refused a request: the session belongs to another peer");
        Err(Status::permission_denied(format!("session {session} belongs to another credential")))
    }
}

impl SessionOwners {
    /// Like `check`, for a request that acts on the session's behalf without the state
    /// machine seeing it (a block placement and its write token): the session must exist.
    pub fn check_existing(
        &self,
        access: &Access,
        session: u64,
        query: impl Fn() -> Result<Query, Status>,
    ) -> Result<(), Status> {
        let exists = session != 0 && query()?.session_exists(session).map_err(|e| Status::internal(e.to_string()))?;
        if !exists {
            return Err(Status::failed_precondition("session expired"));
        }
        self.check(access, session, query)
    }
}

/// Checks a credential scope as given to `IssueCredential`.
pub fn validate_scope(scope: &pb::CredentialScope) -> Result<(), Status> {
    const RANGES_MAX: usize = 64;
    if scope.uids.len() > RANGES_MAX || scope.gids.len() > RANGES_MAX {
        return Err(Status::invalid_argument(format!("at most {RANGES_MAX} id ranges")));
    }
    if scope.uids.iter().chain(&scope.gids).any(|r| r.first > r.last) {
        return Err(Status::invalid_argument("an id range ends before it starts"));
    }
    if scope.subtree.len() > 4096 {
        return Err(Status::invalid_argument("subtree path too long"));
    }
    let now = now_ms();
    if scope.expires_ms <= now + 1_000 {
        return Err(Status::invalid_argument("the expiry is not in the future"));
    }
    if scope.expires_ms - now > EXPIRY_MAX_MS {
        return Err(Status::invalid_argument("a credential is valid for 20 years at most"));
    }
    if !scope.allow_root && (scope.squash_uid == 0 || scope.squash_gid == 0) {
        return Err(Status::invalid_argument("the squash identity cannot be root's (give --allow-root instead)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(sessions: &[(u64, &str)]) -> SessionOwners {
        let known = sessions.iter().map(|(session, owner)| (*session, owner.to_string())).collect();
        SessionOwners { known: Mutex::new(known) }
    }

    fn unused() -> Result<Query, Status> {
        unreachable!("owners of these sessions are known")
    }

    #[test]
    fn a_session_serves_only_the_peer_that_opened_it() {
        let owners = owners(&[(7, "client 3"), (8, "")]);
        assert!(owners.check(&Access::full("client 3".into()), 7, unused).is_ok());
        let other = owners.check(&Access::full("client 4".into()), 7, unused).unwrap_err();
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(owners.check(&Access::full(String::new()), 7, unused).is_err(), "no certificate, someone's session");
        // Opened without TLS: a caller without a certificate may use it, a credential may not.
        assert!(owners.check(&Access::full(String::new()), 8, unused).is_ok());
        assert!(owners.check(&Access::full("client 3".into()), 8, unused).is_err());
        // No session: nothing to own.
        assert!(owners.check(&Access::full("client 3".into()), 0, unused).is_ok());
    }
}
