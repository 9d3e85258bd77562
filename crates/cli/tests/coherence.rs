//! What one mount closes, another mount opening the file afterwards reads (close-to-open), with
//! no wait in between.

mod common;

use std::fs;

use cairn_testkit::{Cluster, ClusterSpec};

#[test]
fn data_closed_on_one_mount_is_read_at_once_on_another() {
    if !common::can_mount() {
        return;
    }
    let spec = ClusterSpec { metas: 1, datas: 1, ..Default::default() };
    let mut cluster = Cluster::start_with(common::bin(), spec).unwrap();
    let a = cluster.mount().unwrap();
    let b = cluster.mount().unwrap();
    for round in 0..1000usize {
        // Sizes grow and shrink, so a size the reader's kernel cached would cut or pad the read.
        let content = format!("round {round} {}", "x".repeat((round * 7919) % 9000));
        fs::write(a.join("f"), &content).unwrap();
        let read = fs::read(b.join("f")).unwrap();
        assert!(read == content.as_bytes(), "round {round}: read {} bytes, wrote {}", read.len(), content.len());
    }
}
