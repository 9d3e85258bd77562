//! The block-token check on a data server: a client's read or upload passes only with a token
//! meta issued for it (see `cairn_trust::block_token`); other servers (repair, the write
//! pipeline, the scrubber's peers) are trusted by their certificates.

use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_trust::Peer;
use cairn_trust::block_token::{BlockAccess, BlockTokenError, BlockTokenKey, verify};
use tonic::Status;

/// The keys this server checks tokens with, as meta last sent them (the current epoch's and
/// the one before).
#[derive(Default)]
pub struct BlockTokenKeys {
    keys: RwLock<Vec<BlockTokenKey>>,
}

impl BlockTokenKeys {
    /// Takes the keys one meta server sent, keeping the newest two epochs of all heard: a
    /// member that has not applied a rotation yet cannot bring back a retired key.
    pub fn merge(&self, keys: Vec<BlockTokenKey>) {
        if let Ok(mut held) = self.keys.write() {
            held.extend(keys);
            held.sort_by_key(|k| std::cmp::Reverse(k.epoch));
            held.dedup_by_key(|k| k.epoch);
            held.truncate(2);
        }
    }

    /// Refuses a client's request for `access` to `subject` without a valid token. A token of
    /// a newer key than this server holds is answered as unavailable (meta rotated and this
    /// server hears of it within a report): the client retries.
    pub fn check(&self, peer: Option<&Peer>, token: &[u8], access: BlockAccess, subject: u128) -> Result<(), Status> {
        if peer.is_some_and(|p| p.role.is_server()) {
            return Ok(());
        }
        let keys = self.keys.read().map(|k| k.clone()).unwrap_or_default();
        let newest = keys.iter().map(|k| k.epoch).max();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let who = peer.map_or_else(|| "a caller without a certificate".to_string(), Peer::to_string);
        match verify(&keys, token, access, subject, now_ms) {
            Ok(()) => Ok(()),
            Err(BlockTokenError::UnknownKey(epoch)) if newest.is_none_or(|n| epoch > n) => {
                Err(Status::unavailable(format!("block token of key epoch {epoch}, not yet heard of here")))
            }
            Err(e) => {
                tracing::warn!(caller = %who, ?access, subject = format!("{subject:032x}"), "refused a block request: {e}");
                Err(Status::permission_denied(e.to_string()))
            }
        }
    }
}
