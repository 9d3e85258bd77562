//! The namespace state machine driven directly, one command at a time, against a real redb
//! database in a temporary directory.

use cairn_meta::model::{ROOT_INO, Time};
use cairn_meta::namespace::Tables;
use cairn_meta::query::Query;
use cairn_meta::raft_types::{Command, CommandReply};
use cairn_meta::store::{apply_command, open_databases};
use cairn_proto::{self as pb, errno, mutate_request::Op};
use prost::Message;
use redb::ReadableDatabase;

struct Fixture {
    _dir: tempfile::TempDir,
    db: std::sync::Arc<redb::Database>,
    session: u64,
    seq: u64,
    clock: i64,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = open_databases(dir.path()).unwrap().state;
        let mut fixture = Fixture { _dir: dir, db, session: 0, seq: 0, clock: 1_000 };
        fixture.apply(Command::InitFs { fs_id: "test".into(), now: Time { sec: 1, nsec: 0 } });
        fixture.session =
            fixture.apply(Command::OpenSession { client_name: "t".into(), now_ms: 0, lease_ms: 60_000 }).value;
        fixture
    }

    fn apply(&mut self, command: Command) -> CommandReply {
        let txn = self.db.begin_write().unwrap();
        let reply = apply_command(&Tables::new(&txn), command).unwrap();
        txn.commit().unwrap();
        reply
    }

    fn query(&self) -> Query {
        Query::new(self.db.begin_read().unwrap())
    }

    fn root(&self) -> pb::FileHandle {
        self.query().root().unwrap()
    }

    /// Sends `op` as the next request of the session.
    fn mutate(&mut self, op: Op) -> pb::MutateReply {
        self.seq += 1;
        self.mutate_as(self.seq, op)
    }

    fn mutate_as(&mut self, seq: u64, op: Op) -> pb::MutateReply {
        self.mutate_replayed(seq, op).0
    }

    /// A mutation's reply and whether it was the stored reply of an earlier application.
    fn mutate_replayed(&mut self, seq: u64, op: Op) -> (pb::MutateReply, bool) {
        self.clock += 1;
        let request = pb::MutateRequest {
            session: self.session,
            seq,
            caller: Some(pb::Caller { uid: 0, gid: 0, groups: vec![] }),
            op: Some(op),
            confined_to: 0,
        };
        let reply =
            self.apply(Command::Mutate { now: Time { sec: self.clock, nsec: 0 }, request: request.encode_to_vec() });
        assert_eq!(reply.errno, 0);
        (pb::MutateReply::decode(reply.mutate.as_slice()).unwrap(), reply.replayed)
    }

    fn create(&mut self, parent: pb::FileHandle, name: &str, kind: pb::FileKind) -> Result<pb::Attr, i32> {
        let reply = self.mutate(Op::Create(pb::CreateOp {
            parent: Some(parent),
            name: name.as_bytes().to_vec(),
            kind: kind as i32,
            perm: 0o755,
            exclusive: true,
            ..Default::default()
        }));
        if reply.errno != 0 { Err(reply.errno) } else { Ok(reply.attr.unwrap()) }
    }

    fn rename(&mut self, from: (pb::FileHandle, &str), to: (pb::FileHandle, &str), flags: u32) -> i32 {
        self.mutate(Op::Rename(pb::RenameOp {
            parent: Some(from.0),
            name: from.1.as_bytes().to_vec(),
            new_parent: Some(to.0),
            new_name: to.1.as_bytes().to_vec(),
            flags,
            caller_not_holding: true,
        }))
        .errno
    }
}

fn handle(attr: &pb::Attr) -> pb::FileHandle {
    pb::FileHandle { ino: attr.ino, generation: attr.generation }
}

#[test]
fn retried_request_returns_its_first_answer() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let create = Op::Create(pb::CreateOp {
        parent: Some(root),
        name: b"once".to_vec(),
        kind: pb::FileKind::Regular as i32,
        perm: 0o644,
        exclusive: true,
        ..Default::default()
    });
    let (first, first_replayed) = fs.mutate_replayed(7, create.clone());
    let (retry, retry_replayed) = fs.mutate_replayed(7, create.clone());
    assert_eq!(first.errno, 0);
    assert_eq!(first, retry, "the retry gets the stored answer, not EEXIST");
    assert!(!first_replayed && retry_replayed, "the leader must know the retry's answer is old");
    let (again, again_replayed) = fs.mutate_replayed(8, create);
    assert_eq!(again.errno, errno::EEXIST, "a new request is applied anew");
    assert!(!again_replayed);
}

/// A mutation's reply says whether the inodes it shows have extended attributes, so that a
/// writer keeps answering the kernel's `security.capability` questions from its cache.
#[test]
fn mutation_replies_say_whether_the_inode_has_extended_attributes() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let file = fs.create(root, "f", pb::FileKind::Regular).unwrap();
    assert!(file.no_xattrs, "a new file has none");
    let resize =
        |size| Op::SetAttr(pb::SetAttrOp { target: Some(handle(&file)), size: Some(size), ..Default::default() });
    let reply = fs.mutate(resize(10));
    assert!(reply.attr.is_some_and(|a| a.no_xattrs));
    let name = b"user.tag".to_vec();
    let set = fs.mutate(Op::SetXattr(pb::SetXattrOp {
        target: Some(handle(&file)),
        name: name.clone(),
        value: b"v".to_vec(),
        flags: 0,
    }));
    assert!(set.attr.is_some_and(|a| !a.no_xattrs), "it has one now");
    assert!(fs.mutate(resize(20)).attr.is_some_and(|a| !a.no_xattrs));
    let removed = fs.mutate(Op::RemoveXattr(pb::RemoveXattrOp { target: Some(handle(&file)), name }));
    assert!(removed.attr.is_some_and(|a| a.no_xattrs), "and none again");
}

#[test]
fn directories_count_links_and_refuse_moves_into_themselves() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let a = fs.create(root, "a", pb::FileKind::Directory).unwrap();
    let b = fs.create(handle(&a), "b", pb::FileKind::Directory).unwrap();
    assert_eq!(fs.query().getattr(Some(&root)).unwrap().nlink, 3);
    assert_eq!(fs.query().getattr(Some(&handle(&a))).unwrap().nlink, 3);
    assert_eq!(fs.rename((root, "a"), (handle(&b), "inside"), 0), errno::EINVAL);
    let f = fs.create(handle(&b), "f", pb::FileKind::Regular).unwrap();
    assert_eq!(fs.rename((handle(&a), "b"), (root, "b"), 0), 0);
    assert_eq!(fs.query().getattr(Some(&handle(&a))).unwrap().nlink, 2);
    assert_eq!(fs.query().getattr(Some(&root)).unwrap().nlink, 4);
    assert_eq!(fs.query().lookup(Some(&handle(&b)), b"..").unwrap().ino, ROOT_INO);
    // Over a non-empty directory: ENOTEMPTY; a file over a directory: EISDIR.
    let c = fs.create(root, "c", pb::FileKind::Directory).unwrap();
    assert_eq!(fs.rename((root, "c"), (root, "b"), 0), errno::ENOTEMPTY);
    assert_eq!(fs.rename((handle(&b), "f"), (root, "c"), 0), errno::EISDIR);
    assert_eq!(fs.rename((root, "c"), (handle(&b), "f"), 0), errno::ENOTDIR);
    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    assert_eq!(fs.rename((root, "c"), (root, "a"), 1), errno::EEXIST);
    assert_eq!(fs.rename((root, "c"), (handle(&b), "f"), 2), 0);
    assert_eq!(fs.query().lookup(Some(&root), b"c").unwrap().ino, f.ino);
    assert_eq!(fs.query().lookup(Some(&handle(&b)), b"f").unwrap().ino, c.ino);
    assert_eq!(fs.query().getattr(Some(&handle(&b))).unwrap().nlink, 3, "b gained a subdirectory");
}

#[test]
fn link_count_stops_at_the_limit_with_emlink() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let file = fs.create(root, "f", pb::FileKind::Regular).unwrap();
    let dir = fs.create(root, "links", pb::FileKind::Directory).unwrap();
    // Build the links inside one transaction: the limit, not the speed, is under test.
    let txn = fs.db.begin_write().unwrap();
    let mut last = 0;
    for i in 1..cairn_meta::model::LINKS_MAX {
        let request = pb::MutateRequest {
            session: fs.session,
            seq: 100 + i as u64,
            caller: None,
            confined_to: 0,
            op: Some(Op::Link(pb::LinkOp {
                target: Some(handle(&file)),
                new_parent: Some(handle(&dir)),
                new_name: format!("l{i}").into_bytes(),
            })),
        };
        last = Tables::new(&txn).mutate(&request, Time::default()).unwrap().errno;
    }
    txn.commit().unwrap();
    assert_eq!(last, 0);
    assert_eq!(fs.query().getattr(Some(&handle(&file))).unwrap().nlink, cairn_meta::model::LINKS_MAX);
    fs.seq = 1_000_000;
    let reply = fs.mutate(Op::Link(pb::LinkOp {
        target: Some(handle(&file)),
        new_parent: Some(root),
        new_name: b"one-too-many".to_vec(),
    }));
    assert_eq!(reply.errno, errno::EMLINK);
}

#[test]
fn names_are_checked_and_stale_handles_refused() {
    let mut fs = Fixture::new();
    let root = fs.root();
    assert_eq!(fs.create(root, "a/b", pb::FileKind::Regular), Err(errno::EINVAL));
    assert_eq!(fs.create(root, &"x".repeat(256), pb::FileKind::Regular), Err(errno::ENAMETOOLONG));
    assert!(fs.create(root, &"x".repeat(255), pb::FileKind::Regular).is_ok());
    let f = fs.create(root, "f", pb::FileKind::Regular).unwrap();
    let reply = fs.mutate(Op::Unlink(pb::UnlinkOp {
        parent: Some(root),
        name: b"f".to_vec(),
        directory: false,
        caller_not_holding: true,
    }));
    assert_eq!(reply.errno, 0);
    assert!(!reply.orphaned, "nobody else holds it: reclaimed at once");
    assert!(matches!(fs.query().getattr(Some(&handle(&f))), Err(cairn_meta::query::QueryError::Errno(errno::ESTALE))));
}

#[test]
fn unlinked_file_is_kept_while_its_session_may_hold_it() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let f = fs.create(root, "f", pb::FileKind::Regular).unwrap();
    let reply = fs.mutate(Op::Unlink(pb::UnlinkOp {
        parent: Some(root),
        name: b"f".to_vec(),
        directory: false,
        caller_not_holding: false,
    }));
    assert!(reply.orphaned);
    assert_eq!(fs.query().getattr(Some(&handle(&f))).unwrap().nlink, 0);
    assert_eq!(fs.query().orphans_held_by(fs.session, 10).unwrap(), vec![handle(&f)]);
    fs.mutate(Op::Release(pb::ReleaseOp { target: Some(handle(&f)) }));
    assert!(fs.query().getattr(Some(&handle(&f))).is_err());
}

#[test]
fn committed_blocks_become_garbage_when_no_extent_references_them() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let f = fs.create(root, "f", pb::FileKind::Regular).unwrap();
    let block = pb::BlockRef {
        id_hi: fs.session,
        id_lo: 1,
        len: 8192,
        digest: vec![7; 32],
        servers: vec![1],
        token: Vec::new(),
    };
    let extent = |offset: u64, len: u64, block_offset: u32| pb::Extent {
        offset,
        len,
        block: Some(block.clone()),
        block_offset,
        inline_data: vec![],
    };
    let reply = fs.mutate(Op::Commit(pb::CommitOp {
        target: Some(handle(&f)),
        extents: vec![extent(0, 4096, 0), extent(10_000, 4096, 4096)],
        min_size: 0,
        update_mtime: true,
        kill_suid: false,
        ..Default::default()
    }));
    assert_eq!(reply.attr.as_ref().unwrap().size, 14_096);
    assert_eq!(reply.attr.as_ref().unwrap().allocated, 8192);
    let (_, extents) = fs.query().extents(Some(&handle(&f)), 0, u64::MAX).unwrap();
    assert_eq!(extents.len(), 2);
    assert!(fs.query().garbage(10).unwrap().is_empty());
    fs.mutate(Op::SetAttr(pb::SetAttrOp { target: Some(handle(&f)), size: Some(5000), ..Default::default() }));
    assert!(fs.query().garbage(10).unwrap().is_empty(), "one extent still points into the block");
    fs.mutate(Op::SetAttr(pb::SetAttrOp { target: Some(handle(&f)), size: Some(0), ..Default::default() }));
    assert_eq!(fs.query().garbage(10).unwrap().len(), 1, "the block is garbage once nothing references it");
}

#[test]
fn setgid_directories_pass_their_group_on() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let dir = fs.create(root, "shared", pb::FileKind::Directory).unwrap();
    fs.mutate(Op::SetAttr(pb::SetAttrOp {
        target: Some(handle(&dir)),
        perm: Some(0o2775),
        gid: Some(50),
        ..Default::default()
    }));
    let child = fs.create(handle(&dir), "sub", pb::FileKind::Directory).unwrap();
    assert_eq!(child.gid, 50);
    assert_eq!(child.perm & 0o2000, 0o2000, "subdirectories inherit setgid");
    let file = fs.create(handle(&dir), "file", pb::FileKind::Regular).unwrap();
    assert_eq!(file.gid, 50);
}

mod log_store {
    use cairn_meta::raft_types::TypeConfig;
    use cairn_meta::store::{LogStore, open_databases};
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::alias::{EntryOf, LogIdOf};
    use openraft::{EntryPayload, RaftLogReader};

    fn entry(index: u64) -> EntryOf<TypeConfig> {
        EntryOf::<TypeConfig> {
            log_id: LogIdOf::<TypeConfig>::new(openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 }, index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn purged_position_and_entries_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::new(&open_databases(dir.path()).unwrap());
            store.append((1..=10).map(entry), IOFlushed::noop()).await.unwrap();
            store.purge(entry(4).log_id).await.unwrap();
            store.truncate_after(Some(entry(8).log_id)).await.unwrap();
        }
        let mut store = LogStore::new(&open_databases(dir.path()).unwrap());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(entry(4).log_id));
        assert_eq!(state.last_log_id, Some(entry(8).log_id));
        let entries = store.try_get_log_entries(0..100).await.unwrap();
        assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![5, 6, 7, 8]);
    }
}

fn lock_op(target: pb::FileHandle, owner: u64, kind: pb::LockKind, start: u64, end: u64) -> Op {
    Op::Lock(pb::LockOp { target: Some(target), owner, kind: kind as i32, start, end, pid: owner as u32 })
}

#[test]
fn locks_conflict_across_sessions_end_with_the_session_and_fence_commits() {
    let mut fs = Fixture::new();
    let root = fs.root();
    let file = handle(&fs.create(root, "db", pb::FileKind::Regular).unwrap());
    let first = fs.session;
    let granted = fs.mutate(lock_op(file, 1, pb::LockKind::LockWrite, 0, 99));
    assert_eq!(granted.errno, 0);
    let token = granted.lock.unwrap().token;
    assert!(token > 0);

    // Another session (another mount) is refused, and told who is in the way.
    let second = fs.apply(Command::OpenSession { client_name: "other".into(), now_ms: 0, lease_ms: 120_000 }).value;
    fs.session = second;
    let refused = fs.mutate(lock_op(file, 1, pb::LockKind::LockRead, 50, 50));
    assert_eq!(refused.errno, errno::EAGAIN);
    assert_eq!(refused.lock.unwrap().pid, 1);
    assert_eq!(fs.mutate(lock_op(file, 1, pb::LockKind::LockRead, 100, 199)).errno, 0);

    // A commit fenced with a token its session does not hold is refused.
    let commit =
        |token| Op::Commit(pb::CommitOp { target: Some(file), min_size: 10, lock_token: token, ..Default::default() });
    assert_eq!(fs.mutate(commit(token)).errno, errno::ENOLCK);
    fs.session = first;
    assert_eq!(fs.mutate(commit(token)).errno, 0);

    // The first session expires: its lock goes, the second session gets it with a higher
    // token, and the old token no longer fences anything.
    fs.apply(Command::ExpireSessions { now_ms: 61_000 });
    assert!(fs.query().locks(file.ino).unwrap().iter().all(|l| l.session == second));
    fs.session = second;
    let regranted = fs.mutate(lock_op(file, 1, pb::LockKind::LockWrite, 0, 99));
    assert_eq!(regranted.errno, 0);
    assert!(regranted.lock.unwrap().token > token);
    let late = pb::MutateRequest { session: first, seq: 1_000, caller: None, op: Some(commit(token)), confined_to: 0 };
    let reply = fs.apply(Command::Mutate { now: Time { sec: 10_000, nsec: 0 }, request: late.encode_to_vec() });
    assert_ne!(reply.errno, 0, "a commit of the expired session goes nowhere");
}
