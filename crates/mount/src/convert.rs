//! Conversions between the wire types and what the kernel wants: attributes, file types,
//! times and the identity of the calling process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto as pb;
use fuser::{FileAttr, FileType, INodeNo};

pub fn file_type(kind: i32) -> FileType {
    match pb::FileKind::try_from(kind).unwrap_or(pb::FileKind::Regular) {
        pb::FileKind::Directory => FileType::Directory,
        pb::FileKind::Symlink => FileType::Symlink,
        pb::FileKind::Fifo => FileType::NamedPipe,
        pb::FileKind::Socket => FileType::Socket,
        pb::FileKind::CharDevice => FileType::CharDevice,
        pb::FileKind::BlockDevice => FileType::BlockDevice,
        pb::FileKind::Regular | pb::FileKind::Unspecified => FileType::RegularFile,
    }
}

/// The file kind named by the S_IFMT bits of a mode.
pub fn kind_of_mode(mode: u32) -> Option<pb::FileKind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Some(pb::FileKind::Regular),
        libc::S_IFDIR => Some(pb::FileKind::Directory),
        libc::S_IFIFO => Some(pb::FileKind::Fifo),
        libc::S_IFSOCK => Some(pb::FileKind::Socket),
        libc::S_IFCHR => Some(pb::FileKind::CharDevice),
        libc::S_IFBLK => Some(pb::FileKind::BlockDevice),
        libc::S_IFLNK => Some(pb::FileKind::Symlink),
        _ => None,
    }
}

pub fn system_time(t: Option<&pb::Timestamp>) -> SystemTime {
    match t {
        Some(t) if t.sec >= 0 => UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec),
        Some(t) => {
            UNIX_EPOCH.checked_sub(Duration::new(t.sec.unsigned_abs(), 0)).unwrap_or(UNIX_EPOCH)
                + Duration::new(0, t.nsec)
        }
        None => UNIX_EPOCH,
    }
}

pub fn timestamp(t: SystemTime) -> pb::Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => pb::Timestamp { sec: d.as_secs() as i64, nsec: d.subsec_nanos() },
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                pb::Timestamp { sec: -(d.as_secs() as i64), nsec: 0 }
            } else {
                pb::Timestamp { sec: -(d.as_secs() as i64) - 1, nsec: 1_000_000_000 - d.subsec_nanos() }
            }
        }
    }
}

pub fn file_attr(attr: &pb::Attr, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size,
        blocks: attr.allocated.div_ceil(512),
        atime: system_time(attr.atime.as_ref()),
        mtime: system_time(attr.mtime.as_ref()),
        ctime: system_time(attr.ctime.as_ref()),
        crtime: system_time(attr.btime.as_ref()),
        kind: file_type(attr.kind),
        perm: (attr.perm & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: 64 * 1024,
        flags: 0,
    }
}

/// The calling process's identity, with its supplementary groups read from /proc (FUSE
/// passes only the primary ids).
pub fn caller(uid: u32, gid: u32, pid: u32) -> pb::Caller {
    let mut groups = Vec::new();
    if uid != 0
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        groups = line["Groups:".len()..].split_whitespace().filter_map(|g| g.parse().ok()).take(65_536).collect();
    }
    pb::Caller { uid, gid, groups }
}
