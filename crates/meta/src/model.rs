//! What the namespace stores: the records, the redb tables they live in and the key encodings.
//!
//! Every state-machine table maps bytes to bytes, with big-endian keys so that ranges sort as
//! numbers, and postcard-encoded values. That keeps snapshots generic: a snapshot is the
//! contents of these tables.

use cairn_proto as pb;
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

pub type Table = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// ino → [`Inode`]
pub const INODES: Table = TableDefinition::new("inodes");
/// (parent ino, name) → child ino
pub const DENTRIES: Table = TableDefinition::new("dentries");
/// (ino, name) → value
pub const XATTRS: Table = TableDefinition::new("xattrs");
/// (ino, chunk index) → `Vec<Extent>`
pub const EXTENTS: Table = TableDefinition::new("extents");
/// block id → [`BlockRecord`]
pub const BLOCKS: Table = TableDefinition::new("blocks");
/// block id → [`BlockRecord`] of blocks no file references any more, waiting to be deleted
pub const GARBAGE: Table = TableDefinition::new("garbage");
/// session id → [`Session`]
pub const SESSIONS: Table = TableDefinition::new("sessions");
/// (session id, seq) → encoded `MutateReply`
pub const RESULTS: Table = TableDefinition::new("results");
/// ino → [`Orphan`]
pub const ORPHANS: Table = TableDefinition::new("orphans");
/// data server id → [`DataServerRecord`]
pub const DATA_SERVERS: Table = TableDefinition::new("data_servers");
/// name → value: counters and the applied Raft state
pub const SM_META: Table = TableDefinition::new("sm_meta");
/// ino → `Vec<`[`LockRecord`]`>`: the byte-range locks held on the file
pub const LOCKS: Table = TableDefinition::new("locks");
/// credential id → protobuf-encoded `pb::Credential` (client credentials and their scopes)
pub const CREDENTIALS: Table = TableDefinition::new("credentials");
/// directory ino → [`DelegationRecord`]: the session that creates files in it on its own
pub const DELEGATIONS: Table = TableDefinition::new("delegations");

/// Every state-machine table, in the order a snapshot lists them (new tables go at the end).
pub const STATE_TABLES: [Table; 14] = [
    INODES,
    DENTRIES,
    XATTRS,
    EXTENTS,
    BLOCKS,
    GARBAGE,
    SESSIONS,
    RESULTS,
    ORPHANS,
    DATA_SERVERS,
    SM_META,
    LOCKS,
    CREDENTIALS,
    DELEGATIONS,
];

pub const ROOT_INO: u64 = 1;
/// The counter holding the current block-token key epoch.
pub const BLOCK_TOKEN_EPOCH: &str = "block_token_epoch";
/// Links a file may have, as on ext4.
pub const LINKS_MAX: u32 = 65_000;
/// Results kept per session for replies to retried requests; a client never has more than
/// this many mutations outstanding.
pub const RESULTS_PER_SESSION: u64 = 4096;
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
pub const SYMLINK_MAX: usize = 4095;
/// Largest file offset, as on ext4 with 4 KiB blocks (16 TiB).
pub const FILE_SIZE_MAX: u64 = 16 * 1024 * 1024 * 1024 * 1024;
/// Bytes of data a commit may carry inline.
pub const INLINE_BYTES_MAX: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn to_pb(self) -> pb::Timestamp {
        pb::Timestamp { sec: self.sec, nsec: self.nsec }
    }
    pub fn from_pb(t: &pb::Timestamp) -> Time {
        Time { sec: t.sec, nsec: t.nsec.min(999_999_999) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub generation: u64,
    pub kind: i32,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub btime: Time,
    pub rdev: u32,
    /// Bytes covered by extents (what `st_blocks` reports).
    pub allocated: u64,
    /// Parent directory: for a directory its only one; for another file the directory it was
    /// created or last renamed in (a hard link elsewhere does not change it). Used to refuse
    /// moving a directory into itself and to confine a credential to a subtree.
    pub parent: u64,
    pub symlink_target: Vec<u8>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.kind == pb::FileKind::Directory as i32
    }
    pub fn is_regular(&self) -> bool {
        self.kind == pb::FileKind::Regular as i32
    }
    pub fn to_attr(&self, ino: u64) -> pb::Attr {
        pb::Attr {
            ino,
            generation: self.generation,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            size: self.size,
            atime: Some(self.atime.to_pb()),
            mtime: Some(self.mtime.to_pb()),
            ctime: Some(self.ctime.to_pb()),
            btime: Some(self.btime.to_pb()),
            rdev: self.rdev,
            allocated: self.allocated,
            // Unknown here; reads and mutations that looked say (`Query::attr_read`,
            // `Tables::mutate`).
            no_xattrs: false,
        }
    }
}

/// A directory delegated to one session (see `delegation.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegationRecord {
    pub session: u64,
    /// The first number reserved since the session has held the directory without a break:
    /// a file of the directory numbered from here on was made by the holder while it held it,
    /// so no other session can have seen it.
    pub origin_ino: u64,
    /// The inode numbers reserved for it: `first_ino..end_ino`, of which those below
    /// `next_ino` were used (a number is used once, even if its file is gone again).
    pub first_ino: u64,
    pub next_ino: u64,
    pub end_ino: u64,
    /// Generation of `first_ino`; the others follow in step.
    pub first_generation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub len: u32,
    pub digest: [u8; 32],
    pub servers: Vec<u64>,
    /// Extents that point into this block.
    pub refs: u64,
}

impl BlockRecord {
    /// How block `id` is named to a data server: id, length and digest (servers are meta's
    /// business).
    pub fn block_ref(&self, id: u128) -> pb::BlockRef {
        let block = pb::BlockId(id);
        pb::BlockRef {
            id_hi: block.hi(),
            id_lo: block.lo(),
            len: self.len,
            digest: self.digest.to_vec(),
            servers: Vec::new(),
            token: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub client_name: String,
    pub opened_ms: u64,
    pub expires_ms: u64,
    /// Who opened it (the peer its certificate names, e.g. "client 7"; empty without TLS): only
    /// that peer may use the session.
    pub owner: String,
}

/// A session as written before sessions had owners.
#[derive(Deserialize)]
struct SessionV1 {
    client_name: String,
    opened_ms: u64,
    expires_ms: u64,
}

impl Session {
    /// Decodes a session in either form (an older one has no owner, like every session of a
    /// file system without TLS: any peer may use it).
    pub fn decode(bytes: &[u8]) -> Result<Session, postcard::Error> {
        decode::<Session>(bytes).or_else(|e| match decode::<SessionV1>(bytes) {
            Ok(old) => Ok(Session {
                client_name: old.client_name,
                opened_ms: old.opened_ms,
                expires_ms: old.expires_ms,
                owner: String::new(),
            }),
            Err(_) => Err(e),
        })
    }
}

/// An inode with no links left, kept while some session may still hold it open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    pub generation: u64,
    pub holders: Vec<u64>,
}

/// One byte-range lock: held by (session, owner) on bytes `start..=end`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub session: u64,
    pub owner: u64,
    pub write: bool,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
    /// Fencing token: the value of a counter that every grant raises.
    pub token: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataServerRecord {
    pub address: String,
    pub standing: Standing,
}

/// Where a data server stands in the file system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Standing {
    /// Takes new blocks and counts as a copy.
    #[default]
    Active,
    /// Being removed: takes no new blocks, and its copies are made again elsewhere (from it
    /// while it lives, else from other copies). Removed once no block lists it.
    Draining,
    /// Gone for good: its reports are refused, and a copy still listed on it counts as lost.
    Removed,
}

/// A data server record as written before standings existed.
#[derive(Deserialize)]
struct DataServerRecordV1 {
    address: String,
}

impl DataServerRecord {
    /// Decodes a record in either form (older stores hold records without a standing).
    pub fn decode(bytes: &[u8]) -> Result<DataServerRecord, postcard::Error> {
        decode::<DataServerRecord>(bytes).or_else(|e| match decode::<DataServerRecordV1>(bytes) {
            Ok(old) => Ok(DataServerRecord { address: old.address, standing: Standing::Active }),
            Err(_) => Err(e),
        })
    }
}

/// Why a pass over a table stopped.
#[derive(Debug)]
pub enum ScanError {
    Storage(redb::StorageError),
    Corrupt(postcard::Error),
}

/// How many records of the block table `blocks` list a copy on data server `server` (a pass
/// over them all: only a data server's removal asks). Works in a read or a write transaction.
pub fn count_blocks_on(
    blocks: &impl redb::ReadableTable<&'static [u8], &'static [u8]>,
    server: u64,
) -> Result<u64, ScanError> {
    let mut count = 0;
    for item in blocks.iter().map_err(ScanError::Storage)? {
        let (_, value) = item.map_err(ScanError::Storage)?;
        let record: BlockRecord = decode(value.value()).map_err(ScanError::Corrupt)?;
        if record.servers.contains(&server) {
            count += 1;
        }
    }
    Ok(count)
}

pub fn key_u64(a: u64) -> [u8; 8] {
    a.to_be_bytes()
}

pub fn key_u64_u64(a: u64, b: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&a.to_be_bytes());
    key[8..].copy_from_slice(&b.to_be_bytes());
    key
}

pub fn key_u64_name(a: u64, name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + name.len());
    key.extend_from_slice(&a.to_be_bytes());
    key.extend_from_slice(name);
    key
}

pub fn key_u128(a: u128) -> [u8; 16] {
    a.to_be_bytes()
}

pub fn u64_of_key(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key[..8]);
    u64::from_be_bytes(bytes)
}

pub fn u128_of_key(key: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&key[..16]);
    u128::from_be_bytes(bytes)
}

/// The first key after every key that starts with `prefix` (for range scans).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding into memory cannot fail")
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_server_records_of_both_forms_decode() {
        #[derive(Serialize)]
        struct Old {
            address: String,
        }
        let old = encode(&Old { address: "127.0.0.1:7430".into() });
        let record = DataServerRecord::decode(&old).expect("old form");
        assert_eq!(record, DataServerRecord { address: "127.0.0.1:7430".into(), standing: Standing::Active });
        let new = DataServerRecord { address: "10.0.0.2:7430".into(), standing: Standing::Draining };
        assert_eq!(DataServerRecord::decode(&encode(&new)).expect("new form"), new);
        assert!(DataServerRecord::decode(&[0xff]).is_err());
    }
}
