//! A one-member meta group stopped and started again on its store: what it acknowledged is
//! there, and it reads its own state without asking anyone only once that is certain.

use std::time::{Duration, Instant};

use cairn_meta::raft_types::Command;
use cairn_meta::store::{LOG_FILE, STATE_FILE};
use cairn_meta::{Bootstrap, MetaConfig, MetaNode};

const DEADLINE: Duration = Duration::from_secs(30);

async fn start(dir: &std::path::Path, bootstrap: bool) -> std::sync::Arc<MetaNode> {
    let bootstrap = bootstrap.then(|| Bootstrap { fs_id: "restart-test".into(), replication: 1 });
    let started = Instant::now();
    loop {
        let config = MetaConfig::new(1, "127.0.0.1:9".into(), dir.to_path_buf());
        match MetaNode::start(config, bootstrap.clone()).await {
            Ok(node) => return node,
            // The stopped member's tasks may still hold the store for a moment.
            Err(e) if started.elapsed() < DEADLINE => {
                eprintln!("store not free yet: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("meta did not start: {e}"),
        }
    }
}

async fn until_it_reads_locally(node: &MetaNode) {
    let started = Instant::now();
    while !node.reads_locally() {
        assert!(started.elapsed() < DEADLINE, "a sole leader never came to read its own state");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_has_every_acknowledged_change_and_reads_locally_again() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), true).await;
    until_it_reads_locally(&node).await;
    let mut sessions = Vec::new();
    for i in 0..50 {
        let reply = node
            .propose(Command::OpenSession { client_name: format!("client {i}"), now_ms: 0, lease_ms: 600_000 })
            .await
            .unwrap();
        sessions.push(reply.value);
    }
    assert!(dir.path().join(LOG_FILE).exists() && dir.path().join(STATE_FILE).exists());
    node.shutdown().await;
    drop(node);

    let node = start(dir.path(), false).await;
    // Whatever path it takes, a read reflects every acknowledged change...
    let view = tokio::time::timeout(DEADLINE, node.read()).await.expect("a read answered in time").unwrap();
    for session in &sessions {
        assert!(view.session_exists(*session).unwrap(), "session {session} lost across the restart");
    }
    // ... and the member comes to read its own state at once.
    until_it_reads_locally(&node).await;
    let view = node.read().await.unwrap();
    assert!(view.session_exists(*sessions.last().unwrap()).unwrap());
    node.shutdown().await;
}
