//! The wire protocol shared by every Cairn process, generated from `proto/cairn.proto`.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod net;
pub mod tcp;
pub mod tls;

/// gRPC metadata key naming the replica (address) whose failure broke a block upload chain.
pub const FAILED_REPLICA_HEADER: &str = "cairn-failed-replica";
/// Replicas a block upload may be forwarded to after its first.
pub const FORWARD_MAX: usize = 8;

pub mod pb {
    tonic::include_proto!("cairn.v1");
}

pub use pb::*;

impl mutate_request::Op {
    /// The inodes this mutation names: its directories and its target. Meta breaks other
    /// clients' promises on them (with the inodes the reply adds); the caller forgets its own
    /// cached copies of them.
    pub fn named_inodes(&self) -> Vec<u64> {
        use mutate_request::Op;
        let ino = |h: &Option<FileHandle>| h.as_ref().map(|h| h.ino);
        let named = match self {
            Op::Create(op) => vec![ino(&op.parent)],
            Op::Link(op) => vec![ino(&op.target), ino(&op.new_parent)],
            Op::Unlink(op) => vec![ino(&op.parent)],
            Op::Rename(op) => vec![ino(&op.parent), ino(&op.new_parent)],
            Op::SetAttr(op) => vec![ino(&op.target)],
            Op::SetXattr(op) => vec![ino(&op.target)],
            Op::RemoveXattr(op) => vec![ino(&op.target)],
            Op::Commit(op) => vec![ino(&op.target)],
            Op::Fallocate(op) => vec![ino(&op.target)],
            Op::Release(op) => vec![ino(&op.target)],
            Op::Lock(op) => vec![ino(&op.target)],
            // Everything a batch changes lies in the directory or was made in it under the
            // delegation (the state machine checks): the directory stands for all of it.
            Op::Delegate(op) => vec![ino(&op.dir)],
            Op::Batch(op) => vec![ino(&op.dir)],
        };
        let mut named: Vec<u64> = named.into_iter().flatten().collect();
        named.dedup();
        named
    }

    /// Whether the mutation can change what clients cache (releases and locks do not).
    pub fn changes_cached_state(&self) -> bool {
        !matches!(self, mutate_request::Op::Release(_) | mutate_request::Op::Lock(_))
    }
}

/// Largest gRPC message any Cairn endpoint accepts or sends: a block travels in chunks well
/// under this, and directory listings are paged.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Bytes of a Raft snapshot sent per stream message.
pub const SNAPSHOT_PIECE_BYTES: usize = 4 * 1024 * 1024;
/// Largest Raft snapshot a meta server accepts (the whole metadata of a file system).
pub const SNAPSHOT_BYTES_MAX: usize = 16 * 1024 * 1024 * 1024;

/// HTTP/2 flow-control windows: large enough that a block streams without waiting for window
/// updates on a fast link.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 frame a peer may send us (the protocol's maximum is 16 MiB - 1): fewer,
/// larger frames cost fewer system calls on the data path.
pub const FRAME_BYTES_MAX: u32 = 1024 * 1024;

/// Size of the pieces a block digest is built from.
pub const PIECE_BYTES: usize = 64 * 1024;

/// Largest block: files are cut into blocks of at most this size.
pub const BLOCK_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Extents in one `GetExtents` reply at most; a longer map is read in several windows.
pub const EXTENTS_PER_REPLY_MAX: usize = 65_536;

/// Longest name in a directory, as on ext4.
pub const NAME_BYTES_MAX: usize = 255;

/// Longest extended attribute name, as on ext4.
pub const XATTR_NAME_MAX: usize = 255;

/// The security label SELinux keeps in an xattr, which Cairn does not store (`EOPNOTSUPP`, as
/// NFS without labeled NFS). A host running SELinux labels a FUSE mount by its policy and answers
/// reads of the label itself, so a stored label would never be used. On any other host, the one
/// reader is `ls -l`, once per file; the refusal makes it stop asking the mount.
pub const SELINUX_LABEL_XATTR: &[u8] = b"security.selinux";

/// Why an extended attribute name is refused, if it is: it must be 1 to 255 bytes without NUL,
/// in a namespace Cairn keeps (`user.`, `trusted.`, `security.`) and name something in it other
/// than [`SELINUX_LABEL_XATTR`].
pub fn xattr_name_errno(name: &[u8]) -> Option<i32> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Some(errno::ERANGE);
    }
    if name.contains(&0) {
        return Some(errno::EINVAL);
    }
    let known = [b"user.".as_slice(), b"trusted.", b"security."];
    if !known.iter().any(|prefix| name.starts_with(prefix) && name.len() > prefix.len()) || name == SELINUX_LABEL_XATTR
    {
        return Some(errno::EOPNOTSUPP);
    }
    None
}

/// A block's id: 128 bits made of the writing session and a per-session counter, unique
/// without a round trip to meta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u128);

impl BlockId {
    pub fn new(session: u64, counter: u64) -> Self {
        BlockId(((session as u128) << 64) | counter as u128)
    }
    pub fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }
    pub fn lo(self) -> u64 {
        self.0 as u64
    }
    pub fn from_parts(hi: u64, lo: u64) -> Self {
        BlockId(((hi as u128) << 64) | lo as u128)
    }
    pub fn of(block: &BlockRef) -> Self {
        Self::from_parts(block.id_hi, block.id_lo)
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The BLAKE3 hash of one piece.
pub fn piece_hash(piece: &[u8]) -> [u8; 32] {
    *blake3::hash(piece).as_bytes()
}

/// The digest of a block from its piece hashes: BLAKE3 over their concatenation.
pub fn digest_of_pieces<'a>(piece_hashes: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for hash in piece_hashes {
        hasher.update(hash);
    }
    *hasher.finalize().as_bytes()
}

/// Piece hashes and digest of a whole block held in memory.
pub fn block_digest(data: &[u8]) -> (Vec<[u8; 32]>, [u8; 32]) {
    let pieces: Vec<[u8; 32]> = data.chunks(PIECE_BYTES).map(piece_hash).collect();
    let digest = digest_of_pieces(&pieces);
    (pieces, digest)
}

/// Linux errno values used across the crates, named once.
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EINTR: i32 = 4;
    pub const EIO: i32 = 5;
    pub const EBUSY: i32 = 16;
    pub const EBADF: i32 = 9;
    pub const EAGAIN: i32 = 11;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const EXDEV: i32 = 18;
    pub const ENODEV: i32 = 19;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EMLINK: i32 = 31;
    pub const ERANGE: i32 = 34;
    pub const EDEADLK: i32 = 35;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOLCK: i32 = 37;
    pub const ENOSYS: i32 = 38;
    pub const ENOTEMPTY: i32 = 39;
    pub const ENODATA: i32 = 61;
    pub const EOVERFLOW: i32 = 75;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESTALE: i32 = 116;
    pub const E2BIG: i32 = 7;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_names_are_checked_for_size_namespace_and_the_selinux_label() {
        assert_eq!(xattr_name_errno(b"user.a"), None);
        assert_eq!(xattr_name_errno(b"trusted.a"), None);
        assert_eq!(xattr_name_errno(b"security.capability"), None);
        assert_eq!(xattr_name_errno(SELINUX_LABEL_XATTR), Some(errno::EOPNOTSUPP));
        assert_eq!(xattr_name_errno(b"security.selinux.x"), None);
        assert_eq!(xattr_name_errno(b"system.posix_acl_access"), Some(errno::EOPNOTSUPP));
        assert_eq!(xattr_name_errno(b"user."), Some(errno::EOPNOTSUPP));
        assert_eq!(xattr_name_errno(b""), Some(errno::ERANGE));
        assert_eq!(xattr_name_errno(&[b'u'; XATTR_NAME_MAX + 1]), Some(errno::ERANGE));
        assert_eq!(xattr_name_errno(b"user.a\0b"), Some(errno::EINVAL));
    }
}
