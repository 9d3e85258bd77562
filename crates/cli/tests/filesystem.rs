//! End-to-end behaviour through real mounts of real server processes: durability across
//! `kill -9`, unlinked-but-open files, stale handles, corruption detection, and the `up`
//! command a newcomer runs.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cairn_testkit::{free_address, is_mounted, pattern, wait_until};

/// Size of the `index`th file the writer process writes (at most 300 KB).
fn writer_file_len(index: u64) -> usize {
    (index as usize * 7919) % 300_000 + 1
}

#[test]
fn fsynced_data_survives_kill_of_every_server_and_the_mount_carries_on() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let mount = cluster.mount().unwrap();
    // The writer is a separate process: a process that holds files of a mount open must not
    // fork the servers' restarts, or every exec would flush those files (FUSE flushes on each
    // close, and exec closes the child's copies) and wait for the servers being restarted.
    let source = cluster.dir.path().join("pattern");
    fs::write(&source, pattern(1, 600_000)).unwrap();
    let acknowledged_log = cluster.dir.path().join("acknowledged");
    let script = format!(
        "i=0; while true; do len=$(( (i * 7919) % 300000 + 1 )); \
         dd if={source} of={mount}/f$i bs=1M count=$len iflag=count_bytes conv=fsync status=none || exit 1; \
         echo $i >> {log}; i=$((i + 1)); done",
        source = source.display(),
        mount = mount.display(),
        log = acknowledged_log.display()
    );
    let mut writer = Command::new("bash").arg("-c").arg(script).stdin(Stdio::null()).spawn().unwrap();
    let acknowledged = || -> Vec<u64> {
        fs::read_to_string(&acknowledged_log).unwrap_or_default().lines().filter_map(|l| l.parse().ok()).collect()
    };
    wait_until("some files to be written", Duration::from_secs(60), || acknowledged().len() >= 20).unwrap();
    cluster.metas[0].kill();
    cluster.datas[0].kill();
    let at_kill = acknowledged().len();
    cluster.metas[0].restart().unwrap();
    cluster.datas[0].restart().unwrap();
    cluster.wait_healthy(Duration::from_secs(60)).unwrap();
    wait_until("writes to resume after the restart", Duration::from_secs(90), || {
        acknowledged().len() >= at_kill + 20 || writer.try_wait().ok().flatten().is_some()
    })
    .unwrap();
    // SAFETY: signalling the writer this test started; it is reaped below.
    unsafe { libc::kill(writer.id() as i32, libc::SIGKILL) };
    let status = writer.wait().unwrap();
    assert!(status.code().is_none(), "the writer saw an error across the restart: {status}");
    assert!(cluster.mounts[0].process.is_running(), "the mount process must survive the server restart");
    let expected = pattern(1, 600_000);
    let acknowledged = acknowledged();
    assert!(acknowledged.len() >= at_kill + 20);
    for &i in &acknowledged {
        let data = fs::read(mount.join(format!("f{i}"))).unwrap();
        let len = writer_file_len(i);
        assert_eq!(data.len(), len, "file f{i} has the wrong length");
        assert!(data == expected[..len], "file f{i} has the wrong content");
    }
    // A second, fresh mount sees the same data (nothing served from the first client's caches).
    let second = cluster.mount().unwrap();
    let first = acknowledged[0];
    assert_eq!(fs::read(second.join(format!("f{first}"))).unwrap(), expected[..writer_file_len(first)]);
}

#[test]
fn unlinked_open_file_stays_usable_until_last_close() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let mount = cluster.mount().unwrap();
    let path = mount.join("doomed");
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.write_all(&pattern(1, 100_000)).unwrap();
    file.sync_all().unwrap();
    fs::remove_file(&path).unwrap();
    assert!(!path.exists());
    file.write_all_at(&pattern(2, 50_000), 100_000).unwrap();
    file.sync_all().unwrap();
    let mut back = vec![0u8; 150_000];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back[..100_000], &pattern(1, 100_000)[..]);
    assert_eq!(&back[100_000..], &pattern(2, 50_000)[..]);
    assert_eq!(file.metadata().unwrap().len(), 150_000);
    assert_eq!(file.metadata().unwrap().nlink(), 0);
    let inodes_open = cluster.status().unwrap()["inodes"].as_u64().unwrap();
    drop(file);
    // After the last close the inode is reclaimed; nothing under its name came back.
    assert!(!path.exists());
    assert!(fs::read_dir(&mount).unwrap().next().is_none());
    assert!(inodes_open >= 1);
}

use std::os::unix::fs::MetadataExt;

#[test]
fn removed_directory_gives_estale_to_a_client_still_holding_it() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let first = cluster.mount().unwrap();
    let second = cluster.mount().unwrap();
    fs::create_dir(first.join("d")).unwrap();
    let held = File::open(first.join("d")).unwrap();
    assert!(held.metadata().unwrap().is_dir());
    wait_until("the second mount to see the directory", Duration::from_secs(10), || second.join("d").exists()).unwrap();
    fs::remove_dir(second.join("d")).unwrap();
    // Once the first mount's attribute cache lapses, its handle is stale.
    wait_until("the held directory to report ESTALE", Duration::from_secs(10), || {
        held.metadata().err().and_then(|e| e.raw_os_error()) == Some(libc::ESTALE)
    })
    .unwrap();
}

#[test]
fn corrupted_block_is_reported_as_eio_never_as_data() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let first = cluster.mount().unwrap();
    let content = pattern(7, 3 * 1024 * 1024);
    fs::write(first.join("big"), &content).unwrap();
    // Flip one byte of the file's data inside the data server's segment file.
    let segment = fs::read_dir(cluster.datas[0].dir.join("blocks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let bytes = fs::read(&segment).unwrap();
    let needle = &content[2_000_000..2_000_064];
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("file data in the segment");
    let segment_file = OpenOptions::new().write(true).open(&segment).unwrap();
    segment_file.write_all_at(&[bytes[at] ^ 0xff], at as u64).unwrap();
    segment_file.sync_all().unwrap();
    // A fresh client (no cached pieces) must get EIO for the damaged range, and data elsewhere.
    let second = cluster.mount().unwrap();
    let file = File::open(second.join("big")).unwrap();
    let mut buffer = vec![0u8; 4096];
    file.read_exact_at(&mut buffer, 0).unwrap();
    assert_eq!(&buffer[..], &content[..4096]);
    let error = file.read_exact_at(&mut buffer, 2_000_000).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "corruption must surface as EIO, got {error}");
    assert!(cluster.datas[0].log().contains("hash mismatch"), "the data server logs the corruption");
}

#[test]
fn up_creates_mounts_serves_and_unmounts_on_sigterm() {
    if !common::can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mount = dir.path().join("mnt");
    fs::create_dir(&mount).unwrap();
    let listen = free_address();
    let run = || {
        Command::new(common::bin())
            .args(["up", "--data", data.to_str().unwrap(), "--mount", mount.to_str().unwrap(), "--listen", &listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = run();
    wait_until("the up mount", Duration::from_secs(60), || is_mounted(&mount)).unwrap();
    fs::write(mount.join("f"), "hi\n").unwrap();
    assert_eq!(fs::read_to_string(mount.join("f")).unwrap(), "hi\n");
    let credential = data.join("tls/admin.cred");
    let status = Command::new(common::bin())
        .args(["status", "--meta", &listen, "--credential", credential.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("health       ok"));
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exit = child.wait().unwrap();
    assert!(exit.success(), "cairn up exits cleanly on SIGTERM");
    assert!(!is_mounted(&mount), "SIGTERM unmounts");
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(stdout.contains("cairn mount --meta"), "up prints how a second client mounts: {stdout}");
    // The second start finds the same file system and the data.
    let mut child = run();
    wait_until("the up mount again", Duration::from_secs(60), || is_mounted(&mount)).unwrap();
    assert_eq!(fs::read_to_string(mount.join("f")).unwrap(), "hi\n");
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

fn cairn_error(args: &[&str]) -> String {
    let output = Command::new(common::bin()).args(args).output().unwrap();
    assert!(!output.status.success(), "cairn {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn misuse_gets_a_message_that_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("no-such-dir");
    let message = cairn_error(&["up", "--data", data.to_str().unwrap(), "--mount", missing.to_str().unwrap()]);
    assert!(message.contains("does not exist") && message.contains("mkdir"), "{message}");

    let foreign = dir.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("something"), "not cairn").unwrap();
    let message = cairn_error(&["meta", "--dir", foreign.to_str().unwrap(), "--init", "--listen", &free_address()]);
    assert!(message.contains("holds no Cairn file system"), "{message}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let message =
        cairn_error(&["meta", "--dir", dir.path().join("m").to_str().unwrap(), "--init", "--listen", &address]);
    assert!(message.contains("in use"), "{message}");

    let message = cairn_error(&["meta", "--dir", dir.path().join("m2").to_str().unwrap(), "--listen", &free_address()]);
    assert!(message.contains("--init"), "{message}");

    let message = cairn_error(&["status", "--meta", &free_address()]);
    assert!(message.contains("--credential"), "{message}");
    let message = cairn_error(&["status", "--meta", &free_address(), "--plaintext"]);
    assert!(message.contains("no meta server answered"), "{message}");
    let _ = Path::new("/");
}

/// A read whose flush commits a write that grew the file, racing the kernel's attribute
/// refresh, must not see the file cut back to its old size (found by the fsx checker).
#[test]
fn a_file_grown_by_a_write_is_not_cut_short_by_a_concurrent_attribute_refresh() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let mount = cluster.mount().unwrap();
    for round in 0..5 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(mount.join(format!("g{round}")))
            .unwrap();
        file.set_len(32_899).unwrap();
        let mut buffer = vec![0u8; 40_877];
        file.read_exact_at(&mut buffer[..5], 3_130).unwrap();
        file.write_all_at(&vec![b'b'; 11_765], 32_899).unwrap();
        file.read_exact_at(&mut buffer[..12_562], 463).unwrap();
        let n = file.read_at(&mut buffer, 6_090).unwrap();
        assert_eq!(n, 44_664 - 6_090, "round {round}: the read stopped at the old end of file");
    }
}

#[test]
fn large_sparse_files_and_open_flags_behave_as_on_a_local_disk() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let mount = cluster.mount().unwrap();
    // Past 4 GiB, with a hole before: reads of the hole give zeros, and little is allocated.
    let big = mount.join("sparse");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&big).unwrap();
    let far = 5 * 1024 * 1024 * 1024u64;
    file.write_all_at(b"end", far).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let metadata = fs::metadata(&big).unwrap();
    assert_eq!(metadata.len(), far + 3);
    assert!(metadata.blocks() * 512 < 1024 * 1024, "a hole takes no space: {} blocks", metadata.blocks());
    let file = File::open(&big).unwrap();
    let mut buffer = [1u8; 4096];
    file.read_exact_at(&mut buffer, 4 * 1024 * 1024 * 1024).unwrap();
    assert!(buffer.iter().all(|&b| b == 0));
    let mut tail = [0u8; 3];
    file.read_exact_at(&mut tail, far).unwrap();
    assert_eq!(&tail, b"end");
    drop(file);

    // O_APPEND writes at the end, O_TRUNC empties, O_EXCL refuses an existing name.
    let path = mount.join("flags");
    fs::write(&path, b"one").unwrap();
    let mut appender = OpenOptions::new().append(true).open(&path).unwrap();
    appender.write_all(b"two").unwrap();
    drop(appender);
    assert_eq!(fs::read(&path).unwrap(), b"onetwo");
    drop(OpenOptions::new().write(true).truncate(true).open(&path).unwrap());
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    let error = OpenOptions::new().write(true).create_new(true).open(&path).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EEXIST));
    let error = fs::write(mount.join("x".repeat(256)), b"").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENAMETOOLONG));
    // One file system: a rename across directories never gives EXDEV.
    fs::create_dir(mount.join("elsewhere")).unwrap();
    fs::rename(&path, mount.join("elsewhere/flags")).unwrap();
}
