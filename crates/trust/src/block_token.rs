//! Block tokens (the HDFS idea): meta's short-lived permission to read one block, or to store
//! blocks of one session, which a data server checks before it serves a client. A client that
//! guesses a block id gets nothing without the token meta gave a reader of that block's file.
//!
//! A token is `version | access | epoch | expires_ms | mac`, where the MAC is BLAKE3 keyed with
//! the key of `epoch` over those fields and the subject (the block id for a read, the session
//! for a write). Keys derive from the authority's key and an epoch: meta servers, which hold
//! the authority's key, derive them; data servers are given the current and previous ones, so
//! a data server's keys never reveal the authority's, and a rotation (a new epoch) retires a
//! leaked key while tokens issued just before it still pass.

const VERSION: u8 = 1;
const MAC_BYTES: usize = 16;
const TOKEN_BYTES: usize = 1 + 1 + 4 + 8 + MAC_BYTES;
const KEY_CONTEXT: &str = "cairn 2026-11 block token key";

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAccess {
    /// Read the block named by the subject (a block id).
    Read = 1,
    /// Store blocks whose id starts with the subject (a session id).
    Write = 2,
}

/// One epoch's key.
#[derive(Clone, PartialEq, Eq)]
pub struct BlockTokenKey {
    pub epoch: u32,
    pub key: [u8; 32],
}

impl std::fmt::Debug for BlockTokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockTokenKey(epoch {})", self.epoch)
    }
}

impl BlockTokenKey {
    /// The key of `epoch`, derived from the authority's private key (PEM).
    pub fn derive(authority_key_pem: &str, epoch: u32) -> BlockTokenKey {
        let mut hasher = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        hasher.update(authority_key_pem.as_bytes());
        hasher.update(&epoch.to_le_bytes());
        BlockTokenKey { epoch, key: *hasher.finalize().as_bytes() }
    }

    pub fn issue(&self, access: BlockAccess, subject: u128, expires_ms: u64) -> Vec<u8> {
        let mut token = Vec::with_capacity(TOKEN_BYTES);
        token.push(VERSION);
        token.push(access as u8);
        token.extend_from_slice(&self.epoch.to_le_bytes());
        token.extend_from_slice(&expires_ms.to_le_bytes());
        let mac = self.mac(&token, subject);
        token.extend_from_slice(&mac);
        token
    }

    fn mac(&self, fields: &[u8], subject: u128) -> [u8; MAC_BYTES] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(fields);
        hasher.update(&subject.to_le_bytes());
        let mut mac = [0u8; MAC_BYTES];
        mac.copy_from_slice(&hasher.finalize().as_bytes()[..MAC_BYTES]);
        mac
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockTokenError {
    #[error("block token missing")]
    Missing,
    #[error("block token malformed")]
    Malformed,
    #[error("block token of key epoch {0}, which this server does not hold (rotated out?)")]
    UnknownKey(u32),
    #[error("block token invalid: not meta's for this block and operation")]
    Forged,
    #[error("block token expired")]
    Expired,
}

/// Checks `token` for `access` to `subject` at `now_ms` against the keys held.
pub fn verify(
    keys: &[BlockTokenKey],
    token: &[u8],
    access: BlockAccess,
    subject: u128,
    now_ms: u64,
) -> Result<(), BlockTokenError> {
    if token.is_empty() {
        return Err(BlockTokenError::Missing);
    }
    if token.len() != TOKEN_BYTES || token[0] != VERSION {
        return Err(BlockTokenError::Malformed);
    }
    let (fields, mac) = token.split_at(TOKEN_BYTES - MAC_BYTES);
    let epoch = u32::from_le_bytes(fields[2..6].try_into().map_err(|_| BlockTokenError::Malformed)?);
    let expires_ms = u64::from_le_bytes(fields[6..14].try_into().map_err(|_| BlockTokenError::Malformed)?);
    let key = keys.iter().find(|k| k.epoch == epoch).ok_or(BlockTokenError::UnknownKey(epoch))?;
    let expected = key.mac(fields, subject);
    // The access byte is under the MAC: a read token never passes for a write.
    if fields[1] != access as u8 || !constant_time_eq(&expected, mac) {
        return Err(BlockTokenError::Forged);
    }
    if now_ms >= expires_ms {
        return Err(BlockTokenError::Expired);
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_block_for_its_operation_until_it_expires() {
        let key = BlockTokenKey::derive("authority key", 3);
        let keys = [key.clone()];
        let token = key.issue(BlockAccess::Read, 42, 1_000);
        assert_eq!(verify(&keys, &token, BlockAccess::Read, 42, 999), Ok(()));
        assert_eq!(verify(&keys, &token, BlockAccess::Read, 43, 999), Err(BlockTokenError::Forged));
        assert_eq!(verify(&keys, &token, BlockAccess::Write, 42, 999), Err(BlockTokenError::Forged));
        assert_eq!(verify(&keys, &token, BlockAccess::Read, 42, 1_000), Err(BlockTokenError::Expired));
        assert_eq!(verify(&keys, &[], BlockAccess::Read, 42, 0), Err(BlockTokenError::Missing));
        assert_eq!(verify(&keys, &token[1..], BlockAccess::Read, 42, 0), Err(BlockTokenError::Malformed));
        // A later expiry written over the token breaks its MAC.
        let mut stretched = token.clone();
        stretched[13] = 0xff;
        assert_eq!(verify(&keys, &stretched, BlockAccess::Read, 42, 999), Err(BlockTokenError::Forged));
    }

    #[test]
    fn keys_differ_by_epoch_and_a_rotated_out_key_is_refused() {
        let old = BlockTokenKey::derive("authority key", 1);
        let new = BlockTokenKey::derive("authority key", 2);
        assert_ne!(old.key, new.key);
        assert_ne!(BlockTokenKey::derive("another authority", 2).key, new.key);
        let token = old.issue(BlockAccess::Write, 7 << 64, u64::MAX);
        assert_eq!(verify(&[new.clone(), old.clone()], &token, BlockAccess::Write, 7 << 64, 0), Ok(()));
        assert_eq!(verify(&[new], &token, BlockAccess::Write, 7 << 64, 0), Err(BlockTokenError::UnknownKey(1)));
    }
}
