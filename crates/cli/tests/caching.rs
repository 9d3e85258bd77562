//! The client's block caches: the on-disk cache outlives a mount, serves blocks with every data
//! server gone, and a damaged cached piece is never served; a sequential read fetches each
//! block once, however many reads and readaheads want it.

mod common;

use std::fs;

use cairn_testkit::{ClusterSpec, pattern};

/// Cached piece files under `cache` (one subdirectory per file system, one per shard).
fn piece_files(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for fs_dir in fs::read_dir(cache).into_iter().flatten().flatten() {
        for shard in fs::read_dir(fs_dir.path()).into_iter().flatten().flatten() {
            for piece in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                files.push(piece.path());
            }
        }
    }
    files
}

#[test]
fn blocks_read_once_are_served_from_disk_after_a_remount() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return;
    };
    let cache = cluster.dir.path().join("kept-cache");
    let content = pattern(21, 6 * 1024 * 1024 + 12_345);

    let first = cluster.mount_with_cache(&cache).unwrap();
    fs::write(first.join("file"), &content).unwrap();
    assert!(fs::read(first.join("file")).unwrap() == content);
    cluster.mounts.clear();
    assert!(!piece_files(&cache).is_empty(), "reading the file cached its pieces");

    // Every data server gone: a new mount with the same cache still reads the file.
    cluster.datas[0].kill();
    let second = cluster.mount_with_cache(&cache).unwrap();
    assert!(fs::read(second.join("file")).unwrap() == content, "the remount reads from its disk cache");
    cluster.mounts.clear();

    // A flipped byte in a cached piece: that piece is fetched again, never served damaged.
    let damaged = piece_files(&cache).into_iter().next().unwrap();
    let mut bytes = fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&damaged, &bytes).unwrap();
    cluster.datas[0].restart().unwrap();
    let third = cluster.mount_with_cache(&cache).unwrap();
    assert!(fs::read(third.join("file")).unwrap() == content, "the damaged piece came from the data server");
    let log = cluster.mounts[0].process.log();
    assert!(log.contains("cached piece failed its check"), "the damage was noticed:\n{log}");
}

#[test]
fn a_sequential_read_fetches_each_block_once() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return;
    };
    // Six full 4 MiB blocks and a short one.
    let content = pattern(5, 6 * 4 * 1024 * 1024 + 777);
    let writer = cluster.mount().unwrap();
    fs::write(writer.join("file"), &content).unwrap();

    // A fresh mount (empty caches) reads it front to back in 128 KiB reads; the kernel's own
    // readahead sends larger reads of its own, some at once.
    let reader = cluster.mount().unwrap();
    let before = common::metrics(&reader)["block_bytes_fetched"].as_u64().unwrap();
    let mut file = fs::File::open(reader.join("file")).unwrap();
    let mut read_back = Vec::with_capacity(content.len());
    let mut buffer = vec![0u8; 128 * 1024];
    loop {
        let n = std::io::Read::read(&mut file, &mut buffer).unwrap();
        if n == 0 {
            break;
        }
        read_back.extend_from_slice(&buffer[..n]);
    }
    assert!(read_back == content, "the file read back differs from what was written");
    let fetched = common::metrics(&reader)["block_bytes_fetched"].as_u64().unwrap() - before;
    assert_eq!(fetched, content.len() as u64, "every block fetched exactly once");
}

#[test]
fn reads_with_every_copy_gone_fail_within_the_mounts_timeout_even_when_joining_a_readahead() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return;
    };
    let content = pattern(9, 3 * 4 * 1024 * 1024);
    let writer = cluster.mount().unwrap();
    fs::write(writer.join("file"), &content).unwrap();
    let timeout = std::time::Duration::from_secs(4);
    let reader = cluster.mount_with_args(&["--timeout-secs", "4"]).unwrap();
    cluster.datas[0].process.kill();

    // Reads of the three blocks at once: whichever starts first fetches its block and reads
    // ahead the next ones, and the others join those fetches, which are failing. Each read
    // gives EIO, and none waits much past its own timeout. (The kernel tries a failed read a
    // second time, so a read(2) sees up to two timeouts; the bound is loose for a busy machine.)
    let file = std::sync::Arc::new(fs::File::open(reader.join("file")).unwrap());
    let readers: Vec<_> = (0..3u64)
        .map(|block| {
            let file = file.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let mut buffer = vec![0u8; 128 * 1024];
                let offset = block * 4 * 1024 * 1024 + 4096;
                let result = std::os::unix::fs::FileExt::read_at(&*file, &mut buffer, offset);
                (block, result.map(|_| ()), started.elapsed())
            })
        })
        .collect();
    for reader in readers {
        let (block, result, waited) = reader.join().unwrap();
        eprintln!("block {block}: {result:?} after {waited:?}");
        let error = result.expect_err("a read with no copy left succeeded");
        assert_eq!(error.raw_os_error(), Some(libc::EIO), "block {block}: {error}");
        assert!(waited < timeout * 3, "block {block}: the read failed only after {waited:?}");
    }
    let mut file = fs::File::open(reader.join("file")).unwrap();
    cluster.datas[0].process.restart().unwrap();
    // With the server back, the same mount reads the file.
    let mut read_back = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut read_back).unwrap();
    assert!(read_back == content, "the file read back after the restart differs");
}
