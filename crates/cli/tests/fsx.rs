//! fsx-style random operations against a real Cairn cluster through FUSE, with both servers
//! killed (`kill -9`) and restarted halfway while the mount stays up.
//!
//! `CAIRN_FSX_OPS` sets the number of operations (default 100000), `CAIRN_FSX_SEED` the seed.
//! `CAIRN_FSX_MAX_FILE_LEN` and `CAIRN_FSX_MAX_OP_LEN` bound the file and each operation
//! (defaults 2 MiB + 4321 bytes and 64 KiB). The test runner's timeout bounds the run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_testkit::fsx::{Fsx, FsxConfig};
use cairn_testkit::{Cluster, cairn_bin};

const DEFAULT_OPS: u64 = 100_000;
const DEFAULT_SEED: u64 = 20_240_611;

/// The last lines of a log, enough to see what a server did just before a failure.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn can_mount() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root");
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing");
    }
    None
}

#[test]
fn fsx_survives_killed_servers() -> Result<()> {
    if let Some(why) = can_mount() {
        println!("skipping fsx_survives_killed_servers: {why}");
        return Ok(());
    }
    let operations = cairn_testkit::env_u64("CAIRN_FSX_OPS", DEFAULT_OPS)?;
    let seed = cairn_testkit::env_u64("CAIRN_FSX_SEED", DEFAULT_SEED)?;
    let config = FsxConfig {
        seed,
        operations,
        max_file_len: cairn_testkit::env_u64("CAIRN_FSX_MAX_FILE_LEN", 2 * 1024 * 1024 + 4321)?,
        max_op_len: cairn_testkit::env_u64("CAIRN_FSX_MAX_OP_LEN", 64 * 1024)?,
        verify_every: 1000,
    };
    println!("fsx: seed {seed} (CAIRN_FSX_SEED), {operations} operations (CAIRN_FSX_OPS), {config:?}");

    let started = Instant::now();
    let mut cluster = Cluster::start(cairn_bin(option_env!("CARGO_BIN_EXE_cairn")))?;
    let mount = cluster.mount()?;
    let logs = |cluster: &Cluster| {
        let mounts: String = cluster
            .mounts
            .iter()
            .map(|m| format!("{} log (end):\n{}\n", m.process.name, tail(&m.process.log())))
            .collect();
        format!(
            "meta log (end):\n{}\ndata log (end):\n{}\n{mounts}",
            tail(&cluster.metas[0].log()),
            tail(&cluster.datas[0].log())
        )
    };

    let mut fsx = Fsx::new(mount.join("fsx.dat"), config)?;
    let half = operations / 2;
    fsx.run(half).with_context(|| logs(&cluster))?;
    println!("fsx: {} operations in {:?}", fsx.ops_done(), started.elapsed());
    print!("{}", fsx.stats());

    // Everything fsync'd must survive both servers dying at once.
    fsx.fsync().with_context(|| logs(&cluster))?;
    let t = Instant::now();
    cluster.metas[0].kill();
    cluster.datas[0].kill();
    cluster.metas[0].restart()?;
    cluster.datas[0].restart()?;
    cluster.wait_healthy(Duration::from_secs(60))?;
    println!("fsx: meta and data killed (-9) and restarted, healthy again in {:?}", t.elapsed());
    // The same mount carries on: the client retries until the servers are back.
    fsx.verify_all().with_context(|| logs(&cluster))?;
    println!("fsx: file intact after the restart ({} bytes)", fsx.model_len());

    let t = Instant::now();
    let before = fsx.ops_done();
    fsx.run(operations - before).with_context(|| logs(&cluster))?;
    fsx.verify_all().with_context(|| logs(&cluster))?;
    println!("fsx: {} more operations in {:?}", fsx.ops_done() - before, t.elapsed());
    fsx.reopen().with_context(|| logs(&cluster))?;
    fsx.verify_all().with_context(|| logs(&cluster))?;
    print!("{}", fsx.stats());
    let done = fsx.ops_done();
    drop(fsx);
    let elapsed = started.elapsed();
    assert_eq!(done, operations, "every operation ran");
    println!("fsx: {done} operations with seed {seed} passed in {elapsed:?} in total");
    Ok(())
}
