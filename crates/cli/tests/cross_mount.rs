//! Random changes and reads across three mounts of one file system, one of them with
//! `--passthrough`: every open after a close, on any mount, sees what was closed
//! (close-to-open), with no wait, whatever each mount's kernel and client had cached; and so
//! while the meta leader is killed in the middle of the stream.
//!
//! `CAIRN_CROSSMOUNT_OPS` sets the number of operations (default 3000), `CAIRN_CROSSMOUNT_SEED`
//! the seed. The test runner's timeout bounds the run.

mod common;

use anyhow::{Context, Result};
use cairn_testkit::crossmount::{CrossMount, CrossMountConfig};
use cairn_testkit::{Cluster, ClusterSpec};

const DEFAULT_OPS: u64 = 3000;
const DEFAULT_SEED: u64 = 20_261_207;

/// Two plain mounts and a `--passthrough` one, and the checker over them.
fn three_mounts(cluster: &mut Cluster, seed: u64) -> Result<([std::path::PathBuf; 3], CrossMount)> {
    let mounts = [cluster.mount()?, cluster.mount()?, cluster.mount_with_args(&["--passthrough"])?];
    let check = CrossMount::new(&mounts, "cross", CrossMountConfig { seed, ..Default::default() })?;
    Ok((mounts, check))
}

/// Large files were read on the passthrough mount from whole-file copies, not only through its
/// page cache.
fn assert_copies_were_read(passthrough_mount: &std::path::Path) -> Result<()> {
    let opens = common::metrics(passthrough_mount)["passthrough_opens"].as_u64().context("passthrough_opens")?;
    assert!(opens > 0, "no read on the --passthrough mount went through a copy");
    Ok(())
}

#[test]
fn random_changes_on_three_mounts_are_seen_by_every_open_after_their_close() -> Result<()> {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return Ok(());
    };
    let operations = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_OPS", DEFAULT_OPS)?;
    let seed = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_SEED", DEFAULT_SEED)?;
    println!("cross-mount: seed {seed} (CAIRN_CROSSMOUNT_SEED), {operations} operations (CAIRN_CROSSMOUNT_OPS)");
    let (mounts, mut check) = three_mounts(&mut cluster, seed)?;

    let started = std::time::Instant::now();
    check.run(operations)?;
    check.verify_all()?;
    print!("{}", check.stats());
    println!("cross-mount: {} operations in {:?}", check.ops_done(), started.elapsed());
    assert_copies_were_read(&mounts[2])
}

#[test]
fn random_changes_stay_coherent_while_the_meta_leader_is_killed() -> Result<()> {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec { metas: 3, ..Default::default() }) else {
        return Ok(());
    };
    let operations = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_OPS", DEFAULT_OPS)?;
    let seed = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_SEED", DEFAULT_SEED)? + 1;
    println!("cross-mount across a leader kill: seed {seed}, {operations} operations");
    let (mounts, mut check) = three_mounts(&mut cluster, seed)?;
    // Every mount holds promises before the kill.
    check.run(operations / 4)?;

    let leader = cluster.wait_for_leader(std::time::Duration::from_secs(30))?;
    let rest = operations - operations / 4;
    let checker = std::thread::spawn(move || -> Result<CrossMount> {
        check.run(rest)?;
        check.verify_all()?;
        Ok(check)
    });
    // The checker is in the middle of an operation, or between two, when the leader dies.
    cluster.metas[leader].process.kill();
    let check = checker.join().expect("the checker does not panic")?;
    print!("{}", check.stats());
    let new_leader = cluster.leader().context("a leader after the kill")?;
    assert_ne!(new_leader, leader);
    assert_copies_were_read(&mounts[2])
}
