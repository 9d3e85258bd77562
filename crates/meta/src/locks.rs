//! Byte-range locks with POSIX `fcntl` semantics, as pure functions over the locks held on one
//! file. A lock belongs to a (session, owner): setting one replaces whatever that owner held
//! over the range (upgrading, downgrading or splitting it), and conflicts only with other
//! owners' locks: a write lock with any overlapping lock, a read lock with an overlapping write
//! lock.

use crate::model::LockRecord;

/// Locks one file may carry at once.
pub const LOCKS_PER_FILE_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Unlock,
    Read,
    Write,
}

/// A request of one owner over bytes `start..=end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRequest {
    pub session: u64,
    pub owner: u64,
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

impl LockRecord {
    fn same_owner(&self, session: u64, owner: u64) -> bool {
        self.session == session && self.owner == owner
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// The first lock of another owner that `request` conflicts with.
pub fn conflict<'a>(held: &'a [LockRecord], request: &LockRequest) -> Option<&'a LockRecord> {
    if request.kind == LockKind::Unlock {
        return None;
    }
    held.iter().find(|lock| {
        !lock.same_owner(request.session, request.owner)
            && lock.overlaps(request.start, request.end)
            && (request.kind == LockKind::Write || lock.write)
    })
}

/// The locks after `request` (which must not conflict) is applied: the owner's locks over the
/// range are cut away, the new lock (with `token`) is added, and the owner's touching locks of
/// the same kind are merged into it.
pub fn apply(held: &[LockRecord], request: &LockRequest, token: u64) -> Vec<LockRecord> {
    debug_assert!(request.start <= request.end);
    debug_assert!(conflict(held, request).is_none());
    let mut out = Vec::with_capacity(held.len() + 2);
    let mut new = (request.kind != LockKind::Unlock).then(|| LockRecord {
        session: request.session,
        owner: request.owner,
        write: request.kind == LockKind::Write,
        start: request.start,
        end: request.end,
        pid: request.pid,
        token,
    });
    for lock in held {
        if !lock.same_owner(request.session, request.owner) {
            out.push(lock.clone());
            continue;
        }
        // Same kind, overlapping or adjacent: absorbed into the new lock.
        if let Some(new) = new.as_mut()
            && lock.write == new.write
            && lock.start <= new.end.saturating_add(1)
            && new.start <= lock.end.saturating_add(1)
        {
            new.start = new.start.min(lock.start);
            new.end = new.end.max(lock.end);
            continue;
        }
        if !lock.overlaps(request.start, request.end) {
            out.push(lock.clone());
            continue;
        }
        // The parts outside the range stay.
        if lock.start < request.start {
            out.push(LockRecord { end: request.start - 1, ..lock.clone() });
        }
        if lock.end > request.end {
            out.push(LockRecord { start: request.end + 1, ..lock.clone() });
        }
    }
    out.extend(new);
    out.sort_by_key(|lock| (lock.start, lock.session, lock.owner));
    out
}

/// The locks left once every lock of `session` (and of `owner` in it, if given) is gone.
pub fn release(held: &[LockRecord], session: u64, owner: Option<u64>) -> Vec<LockRecord> {
    held.iter().filter(|lock| lock.session != session || owner.is_some_and(|o| lock.owner != o)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(owner: u64, kind: LockKind, start: u64, end: u64) -> LockRequest {
        LockRequest { session: 1, owner, kind, start, end, pid: owner as u32 }
    }

    fn ranges(held: &[LockRecord], owner: u64) -> Vec<(bool, u64, u64)> {
        held.iter().filter(|l| l.owner == owner).map(|l| (l.write, l.start, l.end)).collect()
    }

    #[test]
    fn readers_share_and_a_writer_excludes() {
        let held = apply(&[], &request(1, LockKind::Read, 0, 99), 1);
        assert!(conflict(&held, &request(2, LockKind::Read, 50, 150)).is_none());
        assert_eq!(conflict(&held, &request(2, LockKind::Write, 99, 99)).map(|l| l.owner), Some(1));
        assert!(conflict(&held, &request(2, LockKind::Write, 100, 200)).is_none());
        // The owner itself never conflicts with its own locks.
        assert!(conflict(&held, &request(1, LockKind::Write, 0, 99)).is_none());
    }

    #[test]
    fn unlocking_the_middle_splits_a_lock() {
        let held = apply(&[], &request(1, LockKind::Write, 0, 99), 1);
        let held = apply(&held, &request(1, LockKind::Unlock, 40, 59), 2);
        assert_eq!(ranges(&held, 1), [(true, 0, 39), (true, 60, 99)]);
        assert_eq!(held.iter().map(|l| l.token).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn downgrading_part_of_a_write_lock_leaves_three_pieces() {
        let held = apply(&[], &request(1, LockKind::Write, 0, 99), 1);
        let held = apply(&held, &request(1, LockKind::Read, 10, 19), 2);
        assert_eq!(ranges(&held, 1), [(true, 0, 9), (false, 10, 19), (true, 20, 99)]);
        // Upgrading it back merges everything into one write lock.
        let held = apply(&held, &request(1, LockKind::Write, 10, 19), 3);
        assert_eq!(ranges(&held, 1), [(true, 0, 99)]);
        assert_eq!(held[0].token, 3);
    }

    #[test]
    fn adjacent_locks_of_one_kind_merge() {
        let held = apply(&[], &request(1, LockKind::Read, 0, 9), 1);
        let held = apply(&held, &request(1, LockKind::Read, 10, 19), 2);
        assert_eq!(ranges(&held, 1), [(false, 0, 19)]);
        let held = apply(&held, &request(1, LockKind::Read, 30, u64::MAX), 3);
        assert_eq!(ranges(&held, 1), [(false, 0, 19), (false, 30, u64::MAX)]);
    }

    #[test]
    fn release_drops_an_owner_or_a_whole_session() {
        let held = apply(&[], &request(1, LockKind::Read, 0, 9), 1);
        let held = apply(&held, &request(2, LockKind::Read, 0, 9), 2);
        let other = LockRequest { session: 7, ..request(1, LockKind::Read, 0, 9) };
        let held = apply(&held, &other, 3);
        assert_eq!(release(&held, 1, Some(2)).len(), 2);
        assert_eq!(release(&held, 1, None).len(), 1);
    }

    /// Which owner holds byte `at`, and how, according to a list of locks.
    fn holder(held: &[LockRecord], owner: u64, at: u64) -> Option<bool> {
        held.iter().find(|l| l.owner == owner && l.start <= at && at <= l.end).map(|l| l.write)
    }

    proptest! {
        /// Against a byte-by-byte model: every byte ends up held as the last request covering
        /// it said, the locks of one owner never overlap, and no two owners conflict.
        #[test]
        fn locks_match_a_byte_model(ops in proptest::collection::vec((1u64..4, 0u8..3, 0u64..64, 0u64..16), 1..40)) {
            let mut held = Vec::new();
            let mut model = vec![[None::<bool>; 4]; 80];
            for (token, (owner, kind, start, len)) in ops.into_iter().enumerate() {
                let kind = [LockKind::Unlock, LockKind::Read, LockKind::Write][kind as usize];
                let req = request(owner, kind, start, start + len);
                if conflict(&held, &req).is_some() {
                    continue;
                }
                held = apply(&held, &req, token as u64 + 1);
                for byte in start..=start + len {
                    model[byte as usize][owner as usize] = match kind {
                        LockKind::Unlock => None,
                        LockKind::Read => Some(false),
                        LockKind::Write => Some(true),
                    };
                }
            }
            for byte in 0..80u64 {
                for owner in 1..4u64 {
                    prop_assert_eq!(holder(&held, owner, byte), model[byte as usize][owner as usize]);
                }
                let writers = (1..4u64).filter(|o| holder(&held, *o, byte) == Some(true)).count();
                let readers = (1..4u64).filter(|o| holder(&held, *o, byte) == Some(false)).count();
                prop_assert!(writers == 0 || (writers == 1 && readers == 0));
            }
            for a in &held {
                for b in &held {
                    if !std::ptr::eq(a, b) && a.owner == b.owner {
                        prop_assert!(!a.overlaps(b.start, b.end));
                    }
                }
            }
        }
    }
}
