//! A mount with `--passthrough` serves readers of a large cached file from a whole-file copy
//! on local disk that the kernel reads itself. These tests check that the copy is used, and
//! that it never costs coherence: with other mounts (close-to-open, across many rounds), with
//! writers on the same mount (which the kernel then sends into the copy too), and when the
//! copy went stale under open readers.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cairn_testkit::{Cluster, ClusterSpec};

const MIB: usize = 1024 * 1024;

fn passthrough_opens(mount: &Path) -> u64 {
    common::metrics(mount)["passthrough_opens"].as_u64().expect("passthrough_opens counter")
}

/// `len` bytes that differ from round to round.
fn content(round: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i / 4096 + round * 31) % 251) as u8).collect()
}

/// A plain mount and a `--passthrough` one; None where mounts cannot run.
fn two_mounts() -> Option<(Cluster, std::path::PathBuf, std::path::PathBuf)> {
    let mut cluster = common::mountable_cluster(ClusterSpec::default())?;
    let writer = cluster.mount().unwrap();
    let reader = cluster.mount_with_args(&["--passthrough"]).unwrap();
    Some((cluster, writer, reader))
}

#[test]
fn a_file_closed_on_another_mount_is_read_at_once_even_where_readers_use_a_local_copy() {
    let Some((_cluster, writer, reader)) = two_mounts() else { return };
    let before = passthrough_opens(&reader);
    for round in 0..60 {
        // Sizes grow and shrink around the size copies start at.
        let data = content(round, MIB / 2 + (round * 7919 * 13) % (3 * MIB));
        fs::write(writer.join("f"), &data).unwrap();
        // The first read fills the copy; the second is served from it when it is large enough.
        for pass in 0..2 {
            let read = fs::read(reader.join("f")).unwrap();
            assert!(read == data, "round {round} pass {pass}: read {} bytes, wrote {}", read.len(), data.len());
        }
    }
    assert!(passthrough_opens(&reader) > before + 20, "re-reads of the large rounds came from the copy");
}

#[test]
fn writers_beside_readers_of_the_copy_write_into_it_and_commit_at_close() {
    use std::io::Write;
    let Some((_cluster, other, mount)) = two_mounts() else { return };
    let original = content(0, 2 * MIB);
    fs::write(other.join("f"), &original).unwrap();
    let path = mount.join("f");
    assert_eq!(fs::read(&path).unwrap(), original);
    let before = passthrough_opens(&mount);
    let reader = fs::File::open(&path).unwrap();
    assert_eq!(passthrough_opens(&mount), before + 1, "the whole copy serves the reader");

    // A write on this mount: the open reader sees it at once, the other mount at close.
    let writer = fs::OpenOptions::new().write(true).open(&path).unwrap();
    writer.write_all_at(b"written here", 1000).unwrap();
    let mut seen = [0u8; 12];
    reader.read_exact_at(&mut seen, 1000).unwrap();
    assert_eq!(&seen, b"written here");
    assert_eq!(&fs::read(other.join("f")).unwrap()[1000..1012], &original[1000..1012], "not committed before close");
    drop(writer);
    let mut expected = original.clone();
    expected[1000..1012].copy_from_slice(b"written here");
    assert_eq!(fs::read(other.join("f")).unwrap(), expected, "committed at close");
    // This mount's own commit leaves its copy current: a new reader joins without re-reading.
    let rpcs = common::metrics(&mount)["meta_rpcs"].as_u64().unwrap();
    assert_eq!(fs::read(&path).unwrap(), expected);
    assert_eq!(common::metrics(&mount)["meta_rpcs"].as_u64().unwrap(), rpcs, "no refresh, no request");

    // An append: the size shows here while the writer is open, and there after close.
    let mut appender = fs::OpenOptions::new().append(true).open(&path).unwrap();
    appender.write_all(b"appended").unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), expected.len() as u64 + 8);
    drop(appender);
    expected.extend_from_slice(b"appended");
    assert_eq!(fs::read(other.join("f")).unwrap(), expected);

    // A write through a shared mapping, and a truncation.
    {
        let file = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // SAFETY: a fresh shared mapping of 4 KiB of an open file, unmapped below.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), map.cast::<u8>(), 6);
            assert_eq!(libc::msync(map, 4096, libc::MS_SYNC), 0);
            assert_eq!(libc::munmap(map, 4096), 0);
        }
        file.set_len(5000).unwrap();
    }
    expected[..6].copy_from_slice(b"mapped");
    expected.truncate(5000);
    assert_eq!(fs::read(other.join("f")).unwrap(), expected);
    assert_eq!(reader.metadata().unwrap().len(), 5000);
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut &reader, &mut all).unwrap();
    assert_eq!(all, expected, "the open reader sees the file as this mount left it");
    assert_eq!(fs::read(&path).unwrap(), expected);
}

#[test]
fn a_copy_gone_stale_under_open_readers_is_brought_up_to_date_for_the_next_open() {
    let Some((_cluster, other, mount)) = two_mounts() else { return };
    let original = content(0, 3 * MIB);
    fs::write(other.join("f"), &original).unwrap();
    let path = mount.join("f");
    assert_eq!(fs::read(&path).unwrap(), original);
    let held = fs::File::open(&path).unwrap();
    let before = passthrough_opens(&mount);
    assert!(before >= 1, "the held reader reads the copy");

    // Another mount replaces the file's content and size.
    let replaced = content(1, 2 * MIB + 123);
    fs::write(other.join("f"), &replaced).unwrap();
    // A new open on this mount must show it (close-to-open), though the kernel makes it
    // share the copy the held reader uses.
    assert_eq!(fs::read(&path).unwrap(), replaced);
    assert!(passthrough_opens(&mount) > before, "the new open shared the copy");
    let mut from_held = vec![0u8; 16];
    held.read_exact_at(&mut from_held, 0).unwrap();
    assert_eq!(from_held, replaced[..16], "the copy was brought up to date in place");

    // Grown elsewhere again: an append here, by an open for writing only, lands after the
    // new end, not after the end the copy had.
    let mut grown = content(2, 2 * MIB + 500);
    fs::write(other.join("f"), &grown).unwrap();
    {
        use std::io::Write;
        let mut appender = fs::OpenOptions::new().append(true).open(&path).unwrap();
        appender.write_all(b"appended here").unwrap();
    }
    grown.extend_from_slice(b"appended here");
    assert_eq!(fs::read(other.join("f")).unwrap(), grown);

    // Once every reader closed, the copy the writer left is whole: opens read it again.
    drop(held);
    let before = passthrough_opens(&mount);
    for _ in 0..3 {
        assert_eq!(fs::read(&path).unwrap(), grown);
    }
    assert!(passthrough_opens(&mount) >= before + 3, "the copy serves opens again");
}

/// A database read through the copy: a lock taken here after another mount wrote under it
/// shows that write, through the descriptor the database kept open, as it does on a mount
/// without copies.
#[test]
fn a_lock_taken_on_a_file_read_through_its_copy_shows_what_the_previous_holder_wrote() {
    use common::fcntl_lock;
    let Some((_cluster, other, mount)) = two_mounts() else { return };
    let original = content(0, 2 * MIB);
    fs::write(other.join("db"), &original).unwrap();
    let path = mount.join("db");
    assert_eq!(fs::read(&path).unwrap(), original);
    // A reader (a read-only connection, a backup) holds it open on the copy; the writer's
    // open joins it there.
    let before = passthrough_opens(&mount);
    let _reader = fs::File::open(&path).unwrap();
    let held = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    assert_eq!(passthrough_opens(&mount), before + 2, "the database is read through the copy");

    for round in 1..4u8 {
        let on_other = fs::OpenOptions::new().read(true).write(true).open(other.join("db")).unwrap();
        fcntl_lock(&on_other, libc::F_SETLKW, libc::F_WRLCK, 0, 0).unwrap();
        // Bytes that page did not hold before.
        let page = vec![250 - round; 4096];
        on_other.write_all_at(&page, 4096 * u64::from(round)).unwrap();
        fcntl_lock(&on_other, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
        drop(on_other);

        fcntl_lock(&held, libc::F_SETLKW, libc::F_WRLCK, 0, 0).unwrap();
        let mut seen = vec![0u8; 4096];
        held.read_exact_at(&mut seen, 4096 * u64::from(round)).unwrap();
        assert!(seen == page, "round {round}: the lock holder reads what the previous holder wrote");
        // And what it writes under the lock reaches the other mount when it lets go.
        held.write_all_at(&[round + 100; 10], 0).unwrap();
        fcntl_lock(&held, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
        assert_eq!(fs::read(other.join("db")).unwrap()[..10], [round + 100; 10]);
    }
}

#[test]
fn a_plain_mount_keeps_no_copies() {
    let Some((_cluster, plain, _)) = two_mounts() else { return };
    fs::write(plain.join("f"), content(0, 2 * MIB)).unwrap();
    for _ in 0..3 {
        fs::read(plain.join("f")).unwrap();
    }
    let metrics = common::metrics(&plain);
    assert_eq!(metrics["passthrough_opens"], 0);
    assert_eq!(metrics["whole_copies"], 0);
}

#[test]
fn a_commit_from_the_copy_sends_only_the_pages_written_here() {
    let Some((_cluster, other, mount)) = two_mounts() else { return };
    let original = content(0, 2 * MIB);
    fs::write(other.join("f"), &original).unwrap();
    let path = mount.join("f");
    assert_eq!(fs::read(&path).unwrap(), original);
    let _reader = fs::File::open(&path).unwrap();
    let writer = fs::OpenOptions::new().write(true).open(&path).unwrap();
    writer.write_all_at(b"here", 0).unwrap();
    // Meanwhile the other mount writes another page of the same region, and closes first.
    {
        let elsewhere = fs::OpenOptions::new().write(true).open(other.join("f")).unwrap();
        elsewhere.write_all_at(b"there", 40_960).unwrap();
    }
    drop(writer);
    let mut expected = original;
    expected[..4].copy_from_slice(b"here");
    expected[40_960..40_965].copy_from_slice(b"there");
    assert_eq!(fs::read(other.join("f")).unwrap(), expected, "both writes stand");
    assert_eq!(fs::read(&path).unwrap(), expected);
}

#[test]
fn a_reader_of_the_copy_cut_off_from_meta_stops_reading_it_when_the_lease_runs_out() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec { session_lease_secs: 3, ..Default::default() })
    else {
        return;
    };
    let other = cluster.mount().unwrap();
    let mount = cluster.mount_with_args(&["--passthrough", "--on-partition", "eio"]).unwrap();
    let mount_ip = cluster.last_mount_ip();
    let old = content(1, 2 * MIB);
    fs::write(other.join("f"), &old).unwrap();
    assert!(fs::read(mount.join("f")).unwrap() == old, "the read that fills the copy");
    let before = passthrough_opens(&mount);
    let held = fs::File::open(mount.join("f")).unwrap();
    assert!(passthrough_opens(&mount) > before, "the open was not served from the copy: the test shows nothing");
    let mut page = vec![0u8; 4096];
    held.read_exact_at(&mut page, 0).unwrap();
    assert!(page == old[..4096]);
    // A writer here too, with a page in the copy it has not committed yet.
    let patch = vec![0xAB; 4096];
    let writer = fs::OpenOptions::new().write(true).open(mount.join("f")).unwrap();
    writer.write_all_at(&patch, 8192).unwrap();

    cluster.faults.cut(mount_ip, cluster.metas[0].ip);
    // The other mount's close returns once this one's lease ran out: from then on, the
    // descriptor opened before must not serve the replaced data.
    let new = content(2, 2 * MIB);
    fs::write(other.join("f"), &new).unwrap();
    for offset in [0, MIB, 2 * MIB - 4096] {
        let read = held.read_exact_at(&mut page, offset as u64);
        let err = read.expect_err("a descriptor reading the copy went on past the lease");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    }
    match fs::read(mount.join("f")) {
        Ok(data) => assert!(data != old, "a new open on the cut-off mount served replaced data"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }

    cluster.faults.heal();
    cairn_testkit::wait_until("the mount to trust its promises again", std::time::Duration::from_secs(30), || {
        common::metrics(&mount)["promise_ttl_ms"].as_u64().is_some_and(|ttl| ttl > 0)
    })
    .unwrap();
    // The page written before the cut was read out of the copy before it went, and is
    // committed now, over the other mount's data there.
    writer.sync_all().expect("the writer's page, saved from the copy, commits after healing");
    drop(writer);
    drop(held);
    let mut expected = new.clone();
    expected[8192..8192 + 4096].copy_from_slice(&patch);
    assert!(fs::read(other.join("f")).unwrap() == expected, "the saved page did not reach meta");
    cairn_testkit::wait_until("the healed mount to read the file", std::time::Duration::from_secs(30), || {
        fs::read(mount.join("f")).is_ok_and(|data| data == expected)
    })
    .unwrap();
    // Copies are made again, on a new volume, and serve re-reads.
    let before = passthrough_opens(&mount);
    for _ in 0..3 {
        assert!(fs::read(mount.join("f")).unwrap() == expected);
    }
    assert!(passthrough_opens(&mount) > before, "no copy served re-reads after healing");
}

#[test]
fn a_passthrough_mount_that_cannot_keep_copies_refuses_to_start() {
    let Some(cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return;
    };
    let mount = cluster.dir.path().join("refused");
    fs::create_dir_all(&mount).unwrap();
    // No disk cache: nowhere to keep copies.
    let out = std::process::Command::new(common::bin())
        .args(["mount", "--meta", &cluster.meta_addresses(), "--credential"])
        .arg(cluster.credential())
        .arg("--mount")
        .arg(&mount)
        .args(["--cache-mib", "0", "--passthrough"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the mount started without copies");
    assert!(stderr.contains("--passthrough keeps whole-file copies"), "{stderr}");
    assert!(!cairn_testkit::is_mounted(&mount));
}
