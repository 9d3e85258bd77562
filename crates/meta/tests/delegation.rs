//! Create delegations in the state machine: grants, batches, what a batch may not do, and
//! other sessions' mutations held back while a directory is delegated.

use cairn_meta::model::Time;
use cairn_meta::namespace::Tables;
use cairn_meta::query::Query;
use cairn_meta::raft_types::{Command, CommandReply, DELEGATED_ELSEWHERE};
use cairn_meta::store::{apply_command, open_databases};
use cairn_proto::{self as pb, delegated_entry, errno, mutate_request::Op};
use prost::Message;
use redb::ReadableDatabase;

struct Fixture {
    _dir: tempfile::TempDir,
    db: std::sync::Arc<redb::Database>,
    seq: u64,
}

const USER: u32 = 1000;

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = open_databases(dir.path()).unwrap().state;
        let mut fixture = Fixture { _dir: dir, db, seq: 0 };
        fixture.apply(Command::InitFs { fs_id: "test".into(), now: Time { sec: 1, nsec: 0 } });
        fixture
    }

    fn open_session(&mut self) -> u64 {
        self.apply(Command::OpenSession { client_name: "t".into(), now_ms: 0, lease_ms: 60_000 }).value
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

    fn request(&mut self, session: u64, uid: u32, op: Op) -> CommandReply {
        self.seq += 1;
        let request = pb::MutateRequest {
            session,
            seq: self.seq,
            caller: Some(pb::Caller { uid, gid: uid, groups: vec![] }),
            op: Some(op),
            confined_to: 0,
        };
        self.apply(Command::Mutate { now: Time { sec: 100, nsec: 0 }, request: request.encode_to_vec() })
    }

    fn mutate(&mut self, session: u64, op: Op) -> pb::MutateReply {
        let reply = self.request(session, USER, op);
        assert_eq!(reply.errno, 0, "command refused");
        pb::MutateReply::decode(reply.mutate.as_slice()).unwrap()
    }

    /// A directory everyone may write in.
    fn shared_dir(&mut self, session: u64) -> pb::FileHandle {
        let root = self.query().root().unwrap();
        let reply = self.request(session, 0, mkdir(root, "shared"));
        let attr = pb::MutateReply::decode(reply.mutate.as_slice()).unwrap().attr.unwrap();
        pb::FileHandle { ino: attr.ino, generation: attr.generation }
    }

    fn delegate(&mut self, session: u64, dir: pb::FileHandle) -> Result<pb::Delegation, i32> {
        let reply = self.mutate(session, Op::Delegate(pb::DelegateOp { dir: Some(dir), inodes: 16 }));
        if reply.errno != 0 {
            return Err(reply.errno);
        }
        Ok(reply.delegation.unwrap())
    }
}

/// Makes directory `name` in `parent`, writable by everyone.
fn mkdir(parent: pb::FileHandle, name: &str) -> Op {
    Op::Create(pb::CreateOp {
        parent: Some(parent),
        name: name.as_bytes().to_vec(),
        kind: pb::FileKind::Directory as i32,
        perm: 0o777,
        exclusive: true,
        ..Default::default()
    })
}

fn at(sec: i64) -> Option<pb::Timestamp> {
    Some(pb::Timestamp { sec, nsec: 0 })
}

fn create(name: &str, ino: u64, sec: i64) -> pb::DelegatedEntry {
    let op = pb::DelegatedCreate { name: name.as_bytes().to_vec(), ino, perm: 0o644 };
    pb::DelegatedEntry { time: at(sec), op: Some(delegated_entry::Op::Create(op)) }
}

fn commit(target: pb::FileHandle, data: &[u8], sec: i64) -> pb::DelegatedEntry {
    let extent = pb::Extent { offset: 0, len: data.len() as u64, inline_data: data.to_vec(), ..Default::default() };
    let op = pb::CommitOp {
        target: Some(target),
        extents: vec![extent],
        min_size: data.len() as u64,
        update_mtime: true,
        ..Default::default()
    };
    pb::DelegatedEntry { time: at(sec), op: Some(delegated_entry::Op::Commit(op)) }
}

fn unlink(dir: pb::FileHandle, name: &str, sec: i64) -> pb::DelegatedEntry {
    let op =
        pb::UnlinkOp { parent: Some(dir), name: name.as_bytes().to_vec(), directory: false, caller_not_holding: true };
    pb::DelegatedEntry { time: at(sec), op: Some(delegated_entry::Op::Unlink(op)) }
}

fn batch(dir: pb::FileHandle, entries: Vec<pb::DelegatedEntry>, release: bool) -> Op {
    Op::Batch(pb::DelegatedBatchOp { dir: Some(dir), entries, release })
}

#[test]
fn a_batch_makes_files_with_the_reserved_numbers_and_the_holders_times() {
    let mut fs = Fixture::new();
    let session = fs.open_session();
    let dir = fs.shared_dir(session);
    let grant = fs.delegate(session, dir).unwrap();
    assert_eq!(grant.count, 16);
    let ino = grant.first_ino;
    let file = pb::FileHandle { ino, generation: grant.first_generation };
    let reply = fs.mutate(
        session,
        batch(dir, vec![create("a", ino, 500), commit(file, b"hello", 501), create("b", ino + 1, 502)], false),
    );
    assert_eq!(reply.batch_errnos, vec![0, 0, 0]);
    let query = fs.query();
    let a = query.lookup(Some(&dir), b"a").unwrap();
    assert_eq!((a.ino, a.generation, a.size, a.uid, a.gid), (ino, grant.first_generation, 5, USER, USER));
    assert_eq!(a.mtime.unwrap().sec, 501, "the commit's time is the holder's");
    assert_eq!(a.btime.unwrap().sec, 500);
    let b = query.lookup(Some(&dir), b"b").unwrap();
    assert_eq!(b.generation, grant.first_generation + 1);
    let dir_attr = query.getattr(Some(&dir)).unwrap();
    assert_eq!(dir_attr.mtime.unwrap().sec, 502);
    assert_eq!(reply.attr.unwrap().mtime.unwrap().sec, 502, "the reply shows the directory after the batch");
}

#[test]
fn a_batch_may_not_reuse_numbers_leave_the_range_or_touch_older_files() {
    let mut fs = Fixture::new();
    let session = fs.open_session();
    let dir = fs.shared_dir(session);
    // A file made before the delegation: others may know it.
    let older = fs.mutate(
        session,
        Op::Create(pb::CreateOp {
            parent: Some(dir),
            name: b"older".to_vec(),
            kind: pb::FileKind::Regular as i32,
            perm: 0o644,
            exclusive: true,
            ..Default::default()
        }),
    );
    let older = older.attr.unwrap();
    let grant = fs.delegate(session, dir).unwrap();
    let ino = grant.first_ino;
    let reply = fs.mutate(
        session,
        batch(
            dir,
            vec![
                create("a", ino + 1, 10),
                create("again", ino + 1, 11),
                create("before", ino, 12),
                create("outside", ino + 16, 13),
                create("a", ino + 2, 14),
                commit(pb::FileHandle { ino: older.ino, generation: older.generation }, b"x", 15),
                unlink(dir, "older", 16),
            ],
            false,
        ),
    );
    assert_eq!(
        reply.batch_errnos,
        vec![0, errno::EINVAL, errno::EINVAL, errno::EINVAL, errno::EEXIST, errno::EINVAL, errno::EINVAL]
    );
    let query = fs.query();
    assert!(query.lookup(Some(&dir), b"older").is_ok());
    assert!(query.lookup(Some(&dir), b"again").is_err());
}

#[test]
fn another_session_waits_while_the_directory_is_delegated_and_a_release_lets_it_in() {
    let mut fs = Fixture::new();
    let holder = fs.open_session();
    let other = fs.open_session();
    let dir = fs.shared_dir(holder);
    let grant = fs.delegate(holder, dir).unwrap();
    assert_eq!(fs.delegate(other, dir), Err(errno::EBUSY));
    let create_other = Op::Create(pb::CreateOp {
        parent: Some(dir),
        name: b"a".to_vec(),
        kind: pb::FileKind::Regular as i32,
        perm: 0o644,
        exclusive: true,
        ..Default::default()
    });
    let held_back = fs.request(other, USER, create_other.clone());
    assert_eq!((held_back.errno, held_back.value, held_back.holder), (DELEGATED_ELSEWHERE, dir.ino, holder));
    assert_eq!(fs.query().delegated_elsewhere(other, &[dir.ino]).unwrap(), Some((dir.ino, holder)));
    assert_eq!(fs.query().delegated_elsewhere(holder, &[dir.ino]).unwrap(), None);
    // The holder sends its file and lets go; the other's create now finds the name taken.
    let reply = fs.mutate(holder, batch(dir, vec![create("a", grant.first_ino, 20)], true));
    assert_eq!(reply.batch_errnos, vec![0]);
    assert_eq!(fs.query().delegation_holder(dir.ino).unwrap(), None);
    let reply = fs.request(other, USER, create_other);
    assert_eq!(reply.errno, 0);
    let reply = pb::MutateReply::decode(reply.mutate.as_slice()).unwrap();
    assert_eq!(reply.errno, errno::EEXIST);
    // A batch after the release is refused whole: nothing made under it counts.
    let reply = fs.mutate(holder, batch(dir, vec![create("b", grant.first_ino + 1, 21)], false));
    assert_eq!(reply.errno, errno::EIO);
}

#[test]
fn a_revoked_or_expired_delegation_takes_no_more_batches() {
    let mut fs = Fixture::new();
    let holder = fs.open_session();
    let dir = fs.shared_dir(holder);
    let grant = fs.delegate(holder, dir).unwrap();
    assert_eq!(fs.apply(Command::RevokeDelegation { dir: dir.ino, session: holder }).value, 1);
    let reply = fs.mutate(holder, batch(dir, vec![create("a", grant.first_ino, 20)], false));
    assert_eq!(reply.errno, errno::EIO);
    assert!(fs.query().lookup(Some(&dir), b"a").is_err());
    // Granted again, then the session ends: the delegation goes with it.
    fs.delegate(holder, dir).unwrap();
    fs.apply(Command::ExpireSessions { now_ms: 10_000_000 });
    assert_eq!(fs.query().delegation_holder(dir.ino).unwrap(), None);
}

#[test]
fn a_renewed_grant_keeps_the_files_made_since_the_first() {
    let mut fs = Fixture::new();
    let session = fs.open_session();
    let dir = fs.shared_dir(session);
    let first = fs.delegate(session, dir).unwrap();
    fs.mutate(session, batch(dir, vec![create("a", first.first_ino, 10)], false));
    let second = fs.delegate(session, dir).unwrap();
    assert!(second.first_ino >= first.first_ino + 16);
    let reply = fs.mutate(session, batch(dir, vec![create("b", second.first_ino, 11), unlink(dir, "a", 12)], false));
    assert_eq!(reply.batch_errnos, vec![0, 0], "a file made under the first range is still the holder's");
    assert!(fs.query().lookup(Some(&dir), b"a").is_err());
}

#[test]
fn a_delegated_directory_is_not_removed_or_replaced_by_another_session() {
    let mut fs = Fixture::new();
    let holder = fs.open_session();
    let other = fs.open_session();
    let dir = fs.shared_dir(holder);
    fs.delegate(holder, dir).unwrap();
    let root = fs.query().root().unwrap();
    let rmdir = Op::Unlink(pb::UnlinkOp {
        parent: Some(root),
        name: b"shared".to_vec(),
        directory: true,
        caller_not_holding: true,
    });
    // Empty as far as meta knows, but its holder may be filling it.
    assert_eq!(fs.request(other, 0, rmdir.clone()).errno, DELEGATED_ELSEWHERE);
    let empty = fs.request(other, 0, mkdir(root, "empty"));
    assert_eq!(empty.errno, 0);
    let over = Op::Rename(pb::RenameOp {
        parent: Some(root),
        name: b"empty".to_vec(),
        new_parent: Some(root),
        new_name: b"shared".to_vec(),
        flags: 0,
        caller_not_holding: true,
    });
    assert_eq!(fs.request(other, 0, over).errno, DELEGATED_ELSEWHERE);
    // Its holder may remove it; the delegation goes with it.
    let reply = fs.request(holder, 0, rmdir);
    assert_eq!(reply.errno, 0);
    assert_eq!(pb::MutateReply::decode(reply.mutate.as_slice()).unwrap().errno, 0);
    assert_eq!(fs.query().delegation_holder(dir.ino).unwrap(), None);
}
