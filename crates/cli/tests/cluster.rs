//! A replicated meta group of real processes: leader failover under load, partitions, a full
//! restart, and exactly-once replies to requests retried across a leader change.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use cairn_proto::{self as pb, errno, mutate_request::Op};
use cairn_testkit::workload::{Workload, now_seconds, pause_around};
use cairn_testkit::{Cluster, ClusterSpec, wait_until};

fn three_metas() -> Cluster {
    Cluster::start_with(common::bin(), ClusterSpec { metas: 3, datas: 1, ..Default::default() })
        .expect("starting a three-meta cluster")
}

/// Three meta servers, a mount, and a create-and-fsync workload on it that has got going.
fn three_metas_under_load() -> (Cluster, std::path::PathBuf, Workload) {
    let mut cluster = three_metas();
    let mount = cluster.mount().unwrap();
    let workload = Workload::start(&mount, &cluster.dir.path().join("scratch")).unwrap();
    wait_until("the workload to get going", Duration::from_secs(60), || workload.acks().len() >= 30).unwrap();
    (cluster, mount, workload)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// (last applied index, state digest) of every meta server, asked directly.
fn digests(cluster: &Cluster) -> Vec<Option<(u64, Vec<u8>)>> {
    runtime().block_on(async {
        let mut out = Vec::new();
        for meta in &cluster.metas {
            let reply = async {
                let mut client = common::meta_client(cluster, &meta.listen).await.ok()?;
                let reply = client.status(pb::StatusRequest { with_digest: true }).await.ok()?.into_inner();
                Some((reply.last_applied, reply.state_digest))
            }
            .await;
            out.push(reply);
        }
        out
    })
}

/// Waits until every meta server applied the same log and holds the same state.
fn wait_converged(cluster: &Cluster) {
    let mut last = Vec::new();
    let converged = wait_until("every meta server to hold the same state", Duration::from_secs(60), || {
        last = digests(cluster);
        last.iter().all(|d| d.is_some()) && last.windows(2).all(|w| w[0] == w[1])
    });
    if let Err(e) = converged {
        panic!("{e}: {last:?}\n{}", cluster.logs());
    }
}

#[test]
fn leader_killed_under_load_loses_nothing_acknowledged() {
    if !common::can_mount() {
        return;
    }
    let (mut cluster, mount, mut workload) = three_metas_under_load();
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
    cluster.metas[leader].kill();
    let killed_at = now_seconds();
    let at_kill = workload.acks().len();
    cluster.wait_for_new_leader(leader, Duration::from_secs(30)).unwrap();
    wait_until("the workload to resume by itself", Duration::from_secs(60), || {
        workload.acks().len() >= at_kill + 30 || workload.failed()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let acks = workload.stop().unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    println!("failover pause: {} ms", pause_around(&acks, killed_at).as_millis());

    // The old leader comes back as a follower and catches up to the same state.
    cluster.metas[leader].restart().unwrap();
    cluster.wait_healthy(Duration::from_secs(60)).unwrap();
    wait_converged(&cluster);
    workload.verify(&mount, &acks).unwrap();
    // A second mount, with nothing cached, sees the same.
    let second = cluster.mount().unwrap();
    workload.verify(&second, &acks).unwrap();
}

#[test]
fn minority_cannot_commit_and_catches_up_after_healing() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = three_metas();
    let mount = cluster.mount().unwrap();
    fs::write(mount.join("before"), b"before the partition").unwrap();
    let old = cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
    let old_listen = cluster.metas[old].listen.clone();
    cluster.faults.isolate(cluster.metas[old].ip);
    let new = cluster.wait_for_new_leader(old, Duration::from_secs(30)).unwrap();
    assert_ne!(new, old);

    // The isolated server cannot commit anything: a new session needs a Raft write.
    let minority_commit = runtime().block_on(async {
        let mut client = common::meta_client(&cluster, &old_listen).await.unwrap();
        let mut request = tonic::Request::new(pb::OpenSessionRequest { client_name: "minority".into() });
        request.set_timeout(Duration::from_secs(3));
        client.open_session(request).await
    });
    assert!(minority_commit.is_err(), "a meta server cut off from the majority committed a write");

    // The majority goes on, and the mount follows it.
    fs::write(mount.join("during"), b"written while partitioned").unwrap();
    fs::create_dir(mount.join("dir-during")).unwrap();
    let (applied_minority, _) = digests(&cluster)[old].clone().expect("the isolated server answers directly");
    let (applied_majority, _) = digests(&cluster)[new].clone().expect("the new leader answers");
    assert!(applied_majority > applied_minority, "the majority applied more than the cut-off server");

    cluster.faults.heal();
    wait_converged(&cluster);
    assert_eq!(fs::read(mount.join("before")).unwrap(), b"before the partition");
    assert_eq!(fs::read(mount.join("during")).unwrap(), b"written while partitioned");
    assert!(mount.join("dir-during").is_dir());
}

#[test]
fn every_server_killed_at_once_comes_back_healthy_with_every_acknowledged_file() {
    if !common::can_mount() {
        return;
    }
    let (mut cluster, mount, mut workload) = three_metas_under_load();
    for server in cluster.metas.iter_mut().chain(cluster.datas.iter_mut()) {
        server.kill();
    }
    let at_kill = workload.acks().len();
    for server in cluster.metas.iter_mut().chain(cluster.datas.iter_mut()) {
        server.restart().unwrap();
    }
    cluster.wait_healthy(Duration::from_secs(60)).unwrap();
    wait_until("the workload to resume", Duration::from_secs(90), || {
        workload.acks().len() >= at_kill + 20 || workload.failed()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let acks = workload.stop().unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    wait_converged(&cluster);
    workload.verify(&mount, &acks).unwrap();
}

/// Creating directory `d{i}` in `parent`.
fn numbered_directory(parent: pb::FileHandle, i: u64) -> Op {
    Op::Create(pb::CreateOp {
        parent: Some(parent),
        name: format!("d{i}").into_bytes(),
        kind: pb::FileKind::Directory as i32,
        perm: 0o755,
        exclusive: true,
        ..Default::default()
    })
}

fn mutate(session: u64, seq: u64, op: Op) -> pb::MutateRequest {
    pb::MutateRequest {
        session,
        seq,
        caller: Some(pb::Caller { uid: 0, gid: 0, groups: vec![] }),
        op: Some(op),
        confined_to: 0,
    }
}

/// Sends `request` to whichever meta server leads, following "not leader" answers.
async fn send_to_leader(cluster: &Cluster, request: pb::MutateRequest) -> pb::MutateReply {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for meta in &cluster.metas {
            let Ok(mut client) = common::meta_client(cluster, &meta.address).await else { continue };
            if let Ok(reply) = client.mutate(request.clone()).await {
                return reply.into_inner();
            }
        }
        assert!(Instant::now() < deadline, "no meta leader took the request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn requests_retried_across_a_leader_change_return_their_first_answer() {
    let mut cluster = three_metas();
    let rt = runtime();
    let (session, root) = rt.block_on(async {
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
        let mut client = common::meta_client(&cluster, &cluster.metas[leader].address).await.unwrap();
        let reply =
            client.open_session(pb::OpenSessionRequest { client_name: "retry".into() }).await.unwrap().into_inner();
        (reply.session, reply.root.unwrap())
    });
    let create = |name: &str| {
        Op::Create(pb::CreateOp {
            parent: Some(root),
            name: name.into(),
            kind: pb::FileKind::Regular as i32,
            perm: 0o644,
            exclusive: true,
            ..Default::default()
        })
    };
    let requests = [
        mutate(session, 1, create("a")),
        mutate(session, 2, create("victim")),
        mutate(
            session,
            3,
            Op::Rename(pb::RenameOp {
                parent: Some(root),
                name: b"a".to_vec(),
                new_parent: Some(root),
                new_name: b"b".to_vec(),
                ..Default::default()
            }),
        ),
        mutate(
            session,
            4,
            Op::Unlink(pb::UnlinkOp { parent: Some(root), name: b"victim".to_vec(), ..Default::default() }),
        ),
    ];
    let first: Vec<pb::MutateReply> =
        rt.block_on(async { futures_join(requests.iter().map(|r| send_to_leader(&cluster, r.clone()))).await });
    for reply in &first {
        assert_eq!(reply.errno, 0, "first attempt failed: {reply:?}");
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
    cluster.metas[leader].kill();
    cluster.wait_for_new_leader(leader, Duration::from_secs(30)).unwrap();
    // Applied again, each of these would fail: the name exists (O_EXCL), `a` is gone (rename),
    // `victim` is gone (unlink). The new leader answers from the stored results instead.
    for (request, first) in requests.iter().zip(&first) {
        let again = rt.block_on(send_to_leader(&cluster, request.clone()));
        // What a stored answer says is as of its first application: never promised as current.
        assert!(!again.promised, "a replayed answer was promised: {request:?}");
        let again = pb::MutateReply { promised: first.promised, ..again };
        assert_eq!(&again, first, "a retried request was applied twice: {request:?}");
    }
    // A new request with the same operation is applied, and fails as it should.
    let fresh = rt.block_on(send_to_leader(&cluster, mutate(session, 5, create("b"))));
    assert_eq!(fresh.errno, errno::EEXIST);
}

/// Runs the futures one after another (order matters: each request depends on the previous).
async fn futures_join<F: Future<Output = pb::MutateReply>>(futures: impl Iterator<Item = F>) -> Vec<pb::MutateReply> {
    let mut out = Vec::new();
    for future in futures {
        out.push(future.await);
    }
    out
}

#[test]
fn a_killed_meta_server_restarts_with_every_change_though_its_log_was_purged() {
    // A snapshot every 50 entries purges the log behind it, and the state machine commits
    // without syncing: after `kill -9` it rolls back to its last durable point and is rebuilt
    // from there (by the log, or the snapshot where the log is gone).
    let spec = ClusterSpec { snapshot_every: 50, ..Default::default() };
    let mut cluster = Cluster::start_with(common::bin(), spec).unwrap();
    let rt = runtime();
    rt.block_on(async {
        cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
        let mut client = common::meta_client(&cluster, &cluster.metas[0].address).await.unwrap();
        let session =
            client.open_session(pb::OpenSessionRequest { client_name: "purged".into() }).await.unwrap().into_inner();
        for i in 1..=400u64 {
            let reply =
                client.mutate(mutate(session.session, i, numbered_directory(session.root.unwrap(), i))).await.unwrap();
            assert_eq!(reply.into_inner().errno, 0);
        }
    });
    cluster.metas[0].kill();
    cluster.metas[0].restart().unwrap();
    cluster.wait_for_leader(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    rt.block_on(async {
        let mut client = common::meta_client(&cluster, &cluster.metas[0].address).await.unwrap();
        let session =
            client.open_session(pb::OpenSessionRequest { client_name: "after".into() }).await.unwrap().into_inner();
        for i in 1..=400u64 {
            let request = pb::LookupRequest {
                parent: session.root,
                name: format!("d{i}").into_bytes(),
                session: 0,
                caller: None,
            };
            let reply = client.lookup(request).await.unwrap().into_inner();
            assert_eq!(reply.errno, 0, "d{i} lost across the restart");
        }
    });
}

#[test]
fn a_new_meta_server_catches_up_from_a_snapshot() {
    let spec = ClusterSpec { metas: 3, datas: 1, snapshot_every: 50, ..Default::default() };
    let mut cluster = Cluster::start_with(common::bin(), spec).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).unwrap();
        let mut client = common::meta_client(&cluster, &cluster.metas[leader].address).await.unwrap();
        let session =
            client.open_session(pb::OpenSessionRequest { client_name: "history".into() }).await.unwrap().into_inner();
        let root = session.root.unwrap();
        // Enough history that the log before it has been purged behind a snapshot.
        for i in 1..=400u64 {
            let reply =
                client.mutate(mutate(session.session, i, numbered_directory(root, i))).await.unwrap().into_inner();
            assert_eq!(reply.errno, 0);
        }
    });
    let new = cluster.add_meta().unwrap();
    wait_converged(&cluster);
    assert!(
        cluster.metas[new].log().contains("installed a snapshot from the leader"),
        "the new member caught up from a snapshot:\n{}",
        cluster.metas[new].log()
    );
}
