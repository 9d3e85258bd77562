//! Random changes and reads across four mounts of one file system, one of them with
//! `--passthrough` and one `--strict`: every open after a close, on any mount, sees what was
//! closed (close-to-open), with no wait, whatever each mount's kernel and client had cached;
//! and so while the meta leader is killed in the middle of the stream.
//!
//! `CAIRN_CROSSMOUNT_OPS` sets the number of operations per checker (default 3000),
//! `CAIRN_CROSSMOUNT_SEED` the first seed. The test runner's timeout bounds the run.

mod common;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cairn_testkit::crossmount::{CrossMount, CrossMountConfig};
use cairn_testkit::{Cluster, ClusterSpec};

const DEFAULT_OPS: u64 = 3000;
const DEFAULT_SEED: u64 = 20_261_207;

/// Two plain mounts, a `--passthrough` one and a `--strict` one.
fn four_mounts(cluster: &mut Cluster) -> Result<[PathBuf; 4]> {
    Ok([
        cluster.mount()?,
        cluster.mount()?,
        cluster.mount_with_args(&["--passthrough"])?,
        cluster.mount_with_args(&["--strict"])?,
    ])
}

/// How many opens on the passthrough mount read a whole-file copy (whether a large file was
/// read there twice with no change between, after its copy was filled, is up to the stream).
fn report_copies_read(passthrough_mount: &Path) -> Result<()> {
    let opens = common::metrics(passthrough_mount)["passthrough_opens"].as_u64().context("passthrough_opens")?;
    println!("cross-mount: {opens} opens on the --passthrough mount read a whole-file copy");
    Ok(())
}

/// Runs `operations` more of `check` and then checks everything, on a thread of its own.
fn run_on_a_thread(mut check: CrossMount, operations: u64) -> std::thread::JoinHandle<Result<CrossMount>> {
    std::thread::spawn(move || {
        check.run(operations)?;
        check.verify_all()?;
        Ok(check)
    })
}

#[test]
fn random_changes_on_four_mounts_are_seen_by_every_open_after_their_close() -> Result<()> {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return Ok(());
    };
    let operations = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_OPS", DEFAULT_OPS)?;
    let seed = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_SEED", DEFAULT_SEED)?;
    println!(
        "cross-mount: seeds {seed} and {} (CAIRN_CROSSMOUNT_SEED), {operations} operations each (CAIRN_CROSSMOUNT_OPS)",
        seed + 1
    );
    let mounts = four_mounts(&mut cluster)?;

    // Two checkers at once, each in a directory of its own (so each one's model holds): the
    // breaks that one's changes send cross the other's requests and replies.
    let started = std::time::Instant::now();
    let checkers: Vec<_> = [("one", seed), ("two", seed + 1)]
        .into_iter()
        .map(|(name, seed)| {
            let check = CrossMount::new(&mounts, name, CrossMountConfig { seed, ..Default::default() })?;
            Ok(run_on_a_thread(check, operations))
        })
        .collect::<Result<_>>()?;
    for checker in checkers {
        let check = checker.join().expect("the checker does not panic")?;
        print!("{}", check.stats());
    }
    println!("cross-mount: {} operations in {:?}", 2 * operations, started.elapsed());
    report_copies_read(&mounts[2])
}

#[test]
fn random_changes_stay_coherent_while_the_meta_leader_is_killed() -> Result<()> {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec { metas: 3, ..Default::default() }) else {
        return Ok(());
    };
    let operations = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_OPS", DEFAULT_OPS)?;
    let seed = cairn_testkit::env_u64("CAIRN_CROSSMOUNT_SEED", DEFAULT_SEED)? + 2;
    println!("cross-mount across a leader kill: seed {seed}, {operations} operations");
    let mounts = four_mounts(&mut cluster)?;
    let mut check = CrossMount::new(&mounts, "cross", CrossMountConfig { seed, ..Default::default() })?;
    // Every mount holds promises before the kill.
    check.run(operations / 4)?;

    let leader = cluster.wait_for_leader(std::time::Duration::from_secs(30))?;
    let checker = run_on_a_thread(check, operations - operations / 4);
    // The checker is in the middle of an operation, or between two, when the leader dies.
    cluster.metas[leader].process.kill();
    let check = checker.join().expect("the checker does not panic")?;
    print!("{}", check.stats());
    let new_leader = cluster.leader().context("a leader after the kill")?;
    assert_ne!(new_leader, leader);
    report_copies_read(&mounts[2])
}
