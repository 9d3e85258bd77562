//! Who may do what: the POSIX permission rules meta applies itself (the kernel of an honest
//! client checks them too, but meta never relies on that), and what a client credential's scope
//! makes of the identity a client claims.

use cairn_proto::{self as pb, errno};

use crate::model::{Inode, ROOT_INO};

pub const MAY_READ: u32 = 4;
pub const MAY_WRITE: u32 = 2;
pub const MAY_EXEC: u32 = 1;

const S_ISVTX: u32 = 0o1000;

/// Steps a walk up the directory tree takes at most (a path of PATH_MAX bytes has at most 2,048
/// levels); a deeper walk counts as outside.
const DEPTH_MAX: usize = 4096;

pub fn in_group(caller: &pb::Caller, gid: u32) -> bool {
    caller.gid == gid || caller.groups.contains(&gid)
}

pub fn is_root(caller: &pb::Caller) -> bool {
    caller.uid == 0
}

/// Owner of the inode, or root (CAP_FOWNER).
pub fn owns(inode: &Inode, caller: &pb::Caller) -> bool {
    is_root(caller) || caller.uid == inode.uid
}

/// Whether the mode bits grant `want` (a mask of MAY_*) to the caller. Root may do anything,
/// except execute a file that nobody may execute.
pub fn permits(inode: &Inode, caller: &pb::Caller, want: u32) -> bool {
    if is_root(caller) {
        return want & MAY_EXEC == 0 || inode.is_dir() || inode.perm & 0o111 != 0;
    }
    let bits = if caller.uid == inode.uid {
        inode.perm >> 6
    } else if in_group(caller, inode.gid) {
        inode.perm >> 3
    } else {
        inode.perm
    } & 7;
    bits & want == want
}

/// `permits`, as the errno a refused caller gets.
pub fn require(inode: &Inode, caller: &pb::Caller, want: u32) -> Result<(), i32> {
    if permits(inode, caller, want) { Ok(()) } else { Err(errno::EACCES) }
}

/// The check of a data access through a file that may have been opened before its mode
/// changed: the owner passes regardless (as NFS servers allow), anyone else needs the bits.
pub fn require_data_access(inode: &Inode, caller: &pb::Caller, want: u32) -> Result<(), i32> {
    if owns(inode, caller) { Ok(()) } else { require(inode, caller, want) }
}

/// May the caller remove (or rename away) `child` from `dir`: write and search on the
/// directory, and in a sticky directory, own the child or the directory.
pub fn may_delete(dir: &Inode, child: &Inode, caller: &pb::Caller) -> Result<(), i32> {
    require(dir, caller, MAY_WRITE | MAY_EXEC)?;
    if dir.perm & S_ISVTX != 0 && !is_root(caller) && caller.uid != dir.uid && caller.uid != child.uid {
        return Err(errno::EPERM);
    }
    Ok(())
}

/// Whether `ino` lies in the tree under `root` (or is it). `parent_of` gives an inode's parent
/// directory (for a file, the one it was created or last renamed in), None for an unknown inode;
/// an unknown inode is let through (the operation then fails on its handle).
pub fn within(root: u64, ino: u64, mut parent_of: impl FnMut(u64) -> Option<u64>) -> bool {
    if root == ROOT_INO || root == 0 {
        return true;
    }
    let mut at = ino;
    for _ in 0..DEPTH_MAX {
        if at == root {
            return true;
        }
        if at == ROOT_INO {
            return false;
        }
        match parent_of(at) {
            Some(parent) if parent != at => at = parent,
            Some(_) => return false,
            None => return at == ino,
        }
    }
    false
}

/// Whether every inode of `inos` lies under `root` (see [`within`]), with `inode_parent`
/// reading an inode's parent from a store that can fail: its first error is returned.
pub fn all_within<E>(
    root: u64,
    inos: &[u64],
    mut inode_parent: impl FnMut(u64) -> Result<Option<u64>, E>,
) -> Result<bool, E> {
    let mut failure = None;
    let all = inos.iter().all(|&ino| {
        within(root, ino, |at| match inode_parent(at) {
            Ok(parent) => parent,
            Err(e) => {
                failure = Some(e);
                None
            }
        })
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(all),
    }
}

/// The identity a client credential lets a request act as: ids outside the credential's
/// ranges, and root unless it is allowed, become the squash identity; supplementary groups
/// outside the ranges are dropped.
pub fn effective_caller(scope: &pb::CredentialScope, claimed: pb::Caller) -> pb::Caller {
    let allowed =
        |ranges: &[pb::IdRange], id: u32| ranges.is_empty() || ranges.iter().any(|r| (r.first..=r.last).contains(&id));
    let squash = |id: u32, ranges: &[pb::IdRange]| (id == 0 && !scope.allow_root) || !allowed(ranges, id);
    if squash(claimed.uid, &scope.uids) {
        return pb::Caller { uid: scope.squash_uid, gid: scope.squash_gid, groups: Vec::new() };
    }
    let gid = if squash(claimed.gid, &scope.gids) { scope.squash_gid } else { claimed.gid };
    let groups = claimed.groups.into_iter().filter(|&g| !squash(g, &scope.gids)).collect();
    pb::Caller { uid: claimed.uid, gid, groups }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Time;

    fn inode(perm: u32, uid: u32, gid: u32, dir: bool) -> Inode {
        let kind = if dir { pb::FileKind::Directory } else { pb::FileKind::Regular };
        Inode {
            generation: 1,
            kind: kind as i32,
            perm,
            uid,
            gid,
            nlink: 1,
            size: 0,
            atime: Time::default(),
            mtime: Time::default(),
            ctime: Time::default(),
            btime: Time::default(),
            rdev: 0,
            allocated: 0,
            parent: 1,
            symlink_target: Vec::new(),
        }
    }

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> pb::Caller {
        pb::Caller { uid, gid, groups: groups.to_vec() }
    }

    #[test]
    fn mode_bits_pick_owner_then_group_then_other() {
        let file = inode(0o640, 1000, 100, false);
        assert!(permits(&file, &caller(1000, 1, &[]), MAY_READ | MAY_WRITE));
        assert!(permits(&file, &caller(2000, 100, &[]), MAY_READ));
        assert!(!permits(&file, &caller(2000, 100, &[]), MAY_WRITE));
        assert!(permits(&file, &caller(2000, 1, &[100]), MAY_READ));
        assert!(!permits(&file, &caller(2000, 1, &[]), MAY_READ));
        // The owner's bits apply to the owner even when the group's would allow more.
        let odd = inode(0o070, 1000, 100, false);
        assert!(!permits(&odd, &caller(1000, 100, &[]), MAY_READ));
        assert!(permits(&file, &caller(0, 0, &[]), MAY_READ | MAY_WRITE));
        assert!(!permits(&file, &caller(0, 0, &[]), MAY_EXEC));
        assert!(permits(&inode(0o000, 1, 1, true), &caller(0, 0, &[]), MAY_EXEC));
    }

    #[test]
    fn sticky_directories_keep_others_files() {
        let tmp = inode(0o1777, 0, 0, true);
        let mine = inode(0o644, 1000, 1000, false);
        assert_eq!(may_delete(&tmp, &mine, &caller(1000, 1000, &[])), Ok(()));
        assert_eq!(may_delete(&tmp, &mine, &caller(2000, 2000, &[])), Err(errno::EPERM));
        assert_eq!(may_delete(&tmp, &mine, &caller(0, 0, &[])), Ok(()));
        let closed = inode(0o755, 0, 0, true);
        assert_eq!(may_delete(&closed, &mine, &caller(1000, 1000, &[])), Err(errno::EACCES));
    }

    #[test]
    fn scopes_squash_root_and_ids_outside_their_ranges() {
        let range = |first, last| pb::IdRange { first, last };
        let scope = pb::CredentialScope {
            uids: vec![range(1000, 1999)],
            gids: vec![range(1000, 1999)],
            squash_uid: 65534,
            squash_gid: 65534,
            ..Default::default()
        };
        let nobody = caller(65534, 65534, &[]);
        assert_eq!(effective_caller(&scope, caller(0, 0, &[1000])), nobody);
        assert_eq!(effective_caller(&scope, caller(5000, 1000, &[])), nobody);
        assert_eq!(effective_caller(&scope, caller(1000, 0, &[1001, 3])), caller(1000, 65534, &[1001]));
        let open = pb::CredentialScope { squash_uid: 65534, squash_gid: 65534, ..Default::default() };
        assert_eq!(effective_caller(&open, caller(0, 0, &[])), nobody);
        assert_eq!(effective_caller(&open, caller(7, 0, &[0, 9])), caller(7, 65534, &[9]));
        let root = pb::CredentialScope { allow_root: true, ..open };
        assert_eq!(effective_caller(&root, caller(0, 0, &[0])), caller(0, 0, &[0]));
    }

    #[test]
    fn subtrees_follow_parents_up_to_the_root() {
        // 1 ─ 2 ─ 3 ─ 4, and 1 ─ 5
        let parents = |ino| match ino {
            2 => Some(1),
            3 => Some(2),
            4 => Some(3),
            5 => Some(1),
            _ => None,
        };
        assert!(within(ROOT_INO, 5, parents));
        assert!(within(2, 4, parents));
        assert!(within(2, 2, parents));
        assert!(!within(2, 5, parents));
        assert!(!within(3, 2, parents));
        assert!(!within(2, ROOT_INO, parents));
    }
}
