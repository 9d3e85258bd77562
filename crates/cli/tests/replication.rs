//! Replicated data: copies written through a chain of data servers, a data server killed while
//! writing, re-replication back to R copies, and a corrupt copy served around and repaired.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use cairn_testkit::workload::Workload;
use cairn_testkit::{Cluster, ClusterSpec, pattern, wait_until};

fn cluster(datas: usize) -> Cluster {
    Cluster::start_with(common::bin(), ClusterSpec { metas: 1, datas, replication: 3, ..Default::default() })
        .expect("starting a cluster")
}

/// Blocks each data server holds, as `cairn status` reports them.
fn blocks_per_server(cluster: &Cluster) -> Vec<u64> {
    let status = cluster.status().expect("status");
    cluster
        .datas
        .iter()
        .map(|d| {
            status["data_servers"]
                .as_array()
                .and_then(|servers| servers.iter().find(|s| s["address"] == d.address.as_str()))
                .and_then(|s| s["blocks"].as_u64())
                .unwrap_or(0)
        })
        .collect()
}

/// Waits until a repair scan that started after now found every block with its copies.
fn wait_fully_replicated(cluster: &Cluster, timeout: Duration) {
    let scans = || cluster.status().and_then(|s| s["repair_scans"].as_u64());
    let start = scans().unwrap_or(0);
    wait_until("every block to have its copies again", timeout, || {
        cluster.status().is_some_and(|s| {
            s["repair_scans"].as_u64().is_some_and(|n| n >= start + 2)
                && s["under_replicated_blocks"].as_u64() == Some(0)
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
}

/// Size of the file written before a data server is killed (MiB); `CAIRN_REPAIR_MIB` raises it
/// to measure repair time.
fn repair_mib() -> usize {
    std::env::var("CAIRN_REPAIR_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

#[test]
fn data_server_killed_mid_write_loses_nothing_and_copies_come_back() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = cluster(4);
    let mount = cluster.mount().unwrap();
    let big = pattern(5, repair_mib() * 1024 * 1024);
    fs::write(mount.join("big"), &big).unwrap();
    let copies: u64 = blocks_per_server(&cluster).iter().sum();
    let blocks = big.len().div_ceil(4 * 1024 * 1024) as u64;
    assert!(copies >= 3 * blocks, "every block of the file has three copies");

    let mut workload = Workload::start(&mount, &cluster.dir.path().join("scratch")).unwrap();
    wait_until("the workload to get going", Duration::from_secs(60), || workload.acks().len() >= 20).unwrap();
    // Kill the server with the most copies, while the workload writes through it.
    let held = blocks_per_server(&cluster);
    let victim = (0..held.len()).max_by_key(|i| held[*i]).unwrap();
    cluster.datas[victim].kill();
    let killed_at = Instant::now();
    let at_kill = workload.acks().len();
    wait_until("the workload to go on without the dead server", Duration::from_secs(90), || {
        workload.acks().len() >= at_kill + 20 || workload.failed()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let acks = workload.stop().unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    // Reads keep working with a replica gone, and nothing acknowledged is missing.
    assert!(fs::read(mount.join("big")).unwrap() == big, "the big file reads back intact");
    workload.verify(&mount, &acks).unwrap();

    // Meta declares the server dead and copies its blocks from the survivors.
    let victim_address = cluster.datas[victim].address.clone();
    wait_until("meta to declare the killed server dead", Duration::from_secs(60), || {
        cluster.status().is_some_and(|s| {
            s["data_servers"].as_array().is_some_and(|d| {
                d.iter().any(|d| d["address"] == victim_address.as_str() && d["live"] == serde_json::Value::Bool(false))
            })
        })
    })
    .unwrap();
    wait_fully_replicated(&cluster, Duration::from_secs(180));
    println!("repaired {} MiB in {:.1} s after the kill", repair_mib(), killed_at.elapsed().as_secs_f64());

    // With another server gone, the file still reads from the copies the repair made.
    let second = (0..cluster.datas.len()).find(|i| *i != victim).unwrap();
    cluster.datas[second].kill();
    let fresh = cluster.mount().unwrap();
    assert!(fs::read(fresh.join("big")).unwrap() == big, "the repaired copies hold the file");
}

/// Flips one byte of `content` (at `offset` in the file) inside a data server's segment.
fn flip_byte(server_dir: &std::path::Path, content: &[u8], offset: usize) {
    let segment = fs::read_dir(server_dir.join("blocks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let bytes = fs::read(&segment).unwrap();
    let needle = &content[offset..offset + 64];
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("file data in the segment");
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[bytes[at] ^ 0xff], at as u64).unwrap();
    file.sync_all().unwrap();
}

/// Proof of a repair onto the first data server: with the other two gone, a fresh mount reads
/// `content` from the repaired copy.
fn assert_first_server_alone_serves(cluster: &mut Cluster, content: &[u8]) {
    cluster.datas[1].kill();
    cluster.datas[2].kill();
    let fresh = cluster.mount().unwrap();
    assert!(fs::read(fresh.join("file")).unwrap() == content, "the repaired copy holds the file");
}

#[test]
fn a_corrupt_copy_is_read_around_and_repaired() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = cluster(3);
    let mount = cluster.mount().unwrap();
    let content = pattern(8, 3 * 1024 * 1024);
    fs::write(mount.join("file"), &content).unwrap();
    flip_byte(&cluster.datas[0].dir, &content, 1_000_000);

    // A client with nothing cached reads correct data. Readers start at different copies, so a
    // few fresh mounts read until one came upon the bad copy, detected it and read around it.
    let mut detected = false;
    for _ in 0..16 {
        let reader = cluster.mount().unwrap();
        assert!(fs::read(reader.join("file")).unwrap() == content, "a corrupt copy reached the reader");
        let log = cluster.mounts.last().map(|m| m.process.log()).unwrap_or_default();
        if log.contains("replica failed verification") {
            detected = true;
            break;
        }
    }
    assert!(detected, "no reader started at the corrupt copy\n{}", cluster.logs());
    // The report makes meta drop the bad copy and copy the block again onto that server.
    wait_until("meta to drop the bad copy", Duration::from_secs(60), || {
        cluster.metas[0].log().contains("bad copy reported and dropped")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    wait_fully_replicated(&cluster, Duration::from_secs(60));
    assert_first_server_alone_serves(&mut cluster, &content);
}

#[test]
fn the_scrubber_finds_a_corrupt_copy_nobody_reads_and_it_is_repaired() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec {
        metas: 1,
        datas: 3,
        replication: 3,
        fast_scrub: true,
        ..Default::default()
    }) else {
        return;
    };
    let mount = cluster.mount().unwrap();
    let content = pattern(9, 3 * 1024 * 1024);
    fs::write(mount.join("file"), &content).unwrap();
    flip_byte(&cluster.datas[0].dir, &content, 2_000_000);
    // Nobody reads the file: the data server's own scrub finds the damage and reports it.
    wait_until("the scrubber to report the bad copy", Duration::from_secs(60), || {
        cluster.datas[0].log().contains("scrub found a corrupt block")
            && cluster.metas[0].log().contains("bad copy reported and dropped")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    wait_fully_replicated(&cluster, Duration::from_secs(60));
    assert_first_server_alone_serves(&mut cluster, &content);
}

#[test]
fn uploads_of_a_client_that_died_before_committing_are_collected() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec {
        metas: 1,
        datas: 1,
        replication: 1,
        session_lease_secs: 3,
        orphan_grace_secs: 1,
        ..Default::default()
    }) else {
        return;
    };
    let kept = cluster.mount().unwrap();
    let content = pattern(10, 8 * 1024 * 1024);
    fs::write(kept.join("kept"), &content).unwrap();
    let blocks =
        |cluster: &Cluster| cluster.status().and_then(|s| s["data_servers"][0]["blocks"].as_u64()).unwrap_or(u64::MAX);
    assert_eq!(blocks(&cluster), 2, "the committed file is two blocks");
    // A writer on a second mount fills three blocks and never closes its file; then that
    // mount's client dies without committing them. Every close of a descriptor of the file
    // flushes, and a flush of written data commits: a child's exit, an exec closing an inherited
    // copy, a shell restoring a redirected stdout. So the writer opens the file as its stdout
    // (that close comes before any write), writes with a builtin and becomes `sleep`.
    let doomed = cluster.mount().unwrap();
    let script = format!("exec >{}/lost; printf '%*s' 12582912 ''; exec sleep 600", doomed.display());
    let mut writer = std::process::Command::new("bash").arg("-c").arg(script).spawn().unwrap();
    wait_until("the writer's full blocks to upload", Duration::from_secs(60), || {
        let held = blocks(&cluster);
        held != u64::MAX && held >= 5
    })
    .unwrap();
    cluster.mounts[1].process.kill();
    let _ = writer.kill();
    let _ = writer.wait();
    // Its session expires, and the data server learns its uploads are wanted by nobody.
    wait_until("the dead client's uploads to be deleted", Duration::from_secs(60), || blocks(&cluster) == 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(fs::read(kept.join("kept")).unwrap() == content, "committed blocks are kept");
}

#[test]
fn a_new_data_server_takes_its_share_of_existing_blocks() {
    let Some(mut cluster) =
        common::mountable_cluster(ClusterSpec { replication: 1, orphan_grace_secs: 1, ..Default::default() })
    else {
        return;
    };
    let mount = cluster.mount().unwrap();
    let content = pattern(11, 64 * 1024 * 1024);
    fs::write(mount.join("big"), &content).unwrap();
    assert_eq!(blocks_per_server(&cluster), vec![16]);
    cluster.add_data().unwrap();
    // Meta moves blocks onto the new server until the two differ by less than four blocks;
    // the old server then deletes the copies it no longer has to keep.
    wait_until("the new server to take its share", Duration::from_secs(120), || {
        let held = blocks_per_server(&cluster);
        held.len() == 2 && held[1] >= 6 && held[0] <= 10
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", blocks_per_server(&cluster), cluster.logs()));
    let fresh = cluster.mount().unwrap();
    assert!(fs::read(fresh.join("big")).unwrap() == content, "the moved blocks hold the file");
}

/// The id meta knows data server `index` by, from `cairn status`.
fn data_server_id(cluster: &Cluster, index: usize) -> u64 {
    let status = cluster.status().expect("status");
    let address = cluster.datas[index].address.as_str();
    status["data_servers"]
        .as_array()
        .and_then(|servers| servers.iter().find(|s| s["address"] == address))
        .and_then(|s| s["id"].as_u64())
        .unwrap_or_else(|| panic!("no data server at {address} in {status}"))
}

/// `cairn cluster remove-data` for data server `index`: its output, or the error it printed.
fn remove_data(cluster: &Cluster, id: u64) -> Result<String, String> {
    let output = std::process::Command::new(common::bin())
        .args(["cluster", "remove-data", "--meta", &cluster.meta_addresses(), "--id", &id.to_string()])
        .args(["--wait-secs", "180"])
        .args(cluster.client_args())
        .output()
        .expect("running cairn");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() { Ok(stdout) } else { Err(format!("{stdout}{stderr}")) }
}

#[test]
fn data_servers_are_removed_for_good_whether_running_or_dead() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = cluster(4);
    let mount = cluster.mount().unwrap();
    let content = pattern(13, 32 * 1024 * 1024);
    fs::write(mount.join("kept"), &content).unwrap();
    let unknown = remove_data(&cluster, 42).expect_err("an unknown id is refused");
    assert!(unknown.contains("no data server 42"), "{unknown}");

    // A running server is drained: its copies are made on the others, then it is removed and
    // its reports are refused from then on.
    let running = 0;
    let id = data_server_id(&cluster, running);
    let out = remove_data(&cluster, id).unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(out.contains(&format!("data server {id} removed")), "{out}");
    wait_until("the removed server's reports to be refused", Duration::from_secs(30), || {
        cluster.datas[running].log().contains("was removed from this file system")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let status = cluster.status().unwrap();
    assert_eq!(status["data_servers"].as_array().map(Vec::len), Some(3), "{status}");
    assert_eq!(status["under_replicated_blocks"].as_u64(), Some(0), "{status}");
    let mut gone = cluster.datas.remove(running);
    gone.kill();

    // A dead server is removed too: its copies come from the other copies, onto a new server.
    cluster.add_data().unwrap();
    let dead = 0;
    let id = data_server_id(&cluster, dead);
    cluster.datas[dead].kill();
    let out = remove_data(&cluster, id).unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(out.contains(&format!("data server {id} removed")), "{out}");
    cluster.datas.remove(dead);
    cluster.wait_healthy(Duration::from_secs(60)).unwrap();
    wait_fully_replicated(&cluster, Duration::from_secs(60));

    // Every block has its copies on the servers that remain.
    let fresh = cluster.mount().unwrap();
    assert!(fs::read(fresh.join("kept")).unwrap() == content, "the file reads back from the remaining servers");
}
