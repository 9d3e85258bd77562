//! Create delegations across real mounts: files one mount makes on its own in a directory it
//! holds are seen whole by another mount at once, survive a meta kill once synced, and a mount
//! killed while holding a directory, or cut off past its lease, does not keep others out of it;
//! the cut-off one reports what it lost at its next fsync.

mod common;

use std::fs;

use cairn_testkit::ClusterSpec;

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn expected(range: std::ops::Range<usize>) -> Vec<String> {
    let mut names: Vec<String> = range.map(|i| format!("f{i}")).collect();
    names.sort();
    names
}

fn delegated_entries(mount: &std::path::Path) -> u64 {
    common::metrics(mount)["delegated_entries"].as_u64().unwrap()
}

fn delegated_pending(mount: &std::path::Path) -> u64 {
    common::metrics(mount)["delegated_pending"].as_u64().unwrap()
}

#[test]
fn files_made_under_a_delegation_are_seen_whole_by_another_mount_at_once() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else { return };
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..300 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    assert!(
        delegated_entries(&a) > 0 || common::metrics(&a)["delegated_pending"].as_u64().unwrap() > 0,
        "no delegation"
    );
    // No wait: the listing recalls the delegation, which sends what is left first.
    assert_eq!(names(&b.join("d")), expected(0..300));
    for i in 0..300 {
        assert_eq!(fs::read_to_string(b.join(format!("d/f{i}"))).unwrap(), format!("file {i}"));
    }
    // The other way round, and removals: the directory is plain again on both.
    fs::write(b.join("d/f300"), "file 300").unwrap();
    assert_eq!(fs::read_to_string(a.join("d/f300")).unwrap(), "file 300");
    for i in 0..100 {
        fs::remove_file(a.join(format!("d/f{i}"))).unwrap();
    }
    assert_eq!(names(&b.join("d")), expected(100..301));
    assert_eq!(common::metrics(&a)["delegated_lost"].as_u64().unwrap(), 0);
}

#[test]
fn files_made_and_removed_under_a_delegation_reach_meta_in_order() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else { return };
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..500 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
        if i % 2 == 1 {
            fs::remove_file(a.join(format!("d/f{}", i - 1))).unwrap();
        }
    }
    // A file made here and grown past inline data commits through meta, after its create.
    fs::write(a.join("d/big"), vec![7u8; 3 * 1024 * 1024]).unwrap();
    let mut want: Vec<String> = (0..500).filter(|i| i % 2 == 1).map(|i| format!("f{i}")).collect();
    want.push("big".into());
    want.sort();
    assert_eq!(names(&b.join("d")), want);
    assert_eq!(fs::read(b.join("d/big")).unwrap(), vec![7u8; 3 * 1024 * 1024]);
    assert_eq!(fs::read_to_string(b.join("d/f499")).unwrap(), "file 499");
    assert!(delegated_entries(&a) > 0, "no delegation");
}

#[test]
fn synced_files_made_under_a_delegation_survive_a_meta_kill() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return;
    };
    let a = cluster.mount().unwrap();
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..200 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    // fsync of the directory returns once everything made in it is durable.
    fs::File::open(a.join("d")).unwrap().sync_all().unwrap();
    cluster.metas[0].process.restart().unwrap();
    let b = cluster.mount().unwrap();
    assert_eq!(names(&b.join("d")), expected(0..200));
    for i in 0..200 {
        assert_eq!(fs::read_to_string(b.join(format!("d/f{i}"))).unwrap(), format!("file {i}"));
    }
}

#[test]
fn a_mount_killed_while_holding_a_directory_does_not_keep_others_out() {
    let Some((mut cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else { return };
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..100 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    fs::File::open(a.join("d")).unwrap().sync_all().unwrap();
    for i in 100..150 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    cluster.mounts[0].process.kill();
    // The listing waits for the recall, which nobody answers, until the holder's lease has run
    // out; then the delegation is revoked. What was synced is there; the rest may be lost.
    let listed = names(&b.join("d"));
    for name in expected(0..100) {
        assert!(listed.contains(&name), "{name} was synced and is missing");
    }
    fs::write(b.join("d/after"), "after").unwrap();
    assert_eq!(fs::read_to_string(b.join("d/after")).unwrap(), "after");
}

#[test]
fn an_unmount_sends_what_was_made_under_a_delegation_first() {
    let Some((mut cluster, a, _b)) = common::two_mounts(ClusterSpec::default()) else { return };
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..2000 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    // SIGTERM: `cairn mount` unmounts, and the unmount waits for the batches.
    cluster.mounts[0].process.stop(std::time::Duration::from_secs(60));
    let c = cluster.mount().unwrap();
    assert_eq!(names(&c.join("d")), expected(0..2000));
}

#[test]
fn a_holder_cut_off_past_its_lease_loses_what_it_had_not_sent_and_says_so() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec { session_lease_secs: 6, ..Default::default() })
    else {
        return;
    };
    let a = cluster.mount().unwrap();
    let a_ip = cluster.last_mount_ip();
    let b = cluster.mount().unwrap();
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..100 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    fs::File::open(a.join("d")).unwrap().sync_all().unwrap();
    assert!(delegated_entries(&a) > 0, "the directory was delegated");
    cluster.faults.cut(a_ip, cluster.metas[0].ip);
    // Within its lease the holder still creates on its own; none of it can reach meta.
    for i in 100..150 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    // The other mount's listing waits for the recall nobody answers, then for the holder's
    // lease; then it sees what was synced, and can change the directory.
    assert_eq!(names(&b.join("d")), expected(0..100));
    fs::write(b.join("d/after"), "after").unwrap();
    cluster.faults.heal();
    // Back in touch, the holder learns its session and delegation are gone: the next fsync
    // says that changes were lost, its metrics count them, and it shows what meta has.
    let d = fs::File::open(a.join("d")).unwrap();
    cairn_testkit::wait_until("the holder's fsync to report the loss", std::time::Duration::from_secs(60), || {
        d.sync_all().is_err_and(|e| e.raw_os_error() == Some(libc::EIO))
    })
    .unwrap();
    d.sync_all().expect("the loss is reported once");
    assert!(common::metrics(&a)["delegated_lost"].as_u64().unwrap() >= 50);
    let mut seen = expected(0..100);
    seen.push("after".to_string());
    seen.sort();
    cairn_testkit::wait_until("the holder to show what meta has", std::time::Duration::from_secs(30), || {
        names(&a.join("d")) == seen
    })
    .unwrap();
    assert_eq!(fs::read_to_string(a.join("d/after")).unwrap(), "after");
    fs::write(a.join("d/again"), "again").unwrap();
    assert_eq!(fs::read_to_string(b.join("d/again")).unwrap(), "again");
}

#[test]
fn a_listing_of_the_parent_shows_a_delegated_directory_as_its_holder_left_it() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else { return };
    fs::create_dir(a.join("d")).unwrap();
    // The other mount has listed the parent before, as `ls -l` does.
    let listed_mtime = |root: &std::path::Path| {
        let entry = fs::read_dir(root).unwrap().map(Result::unwrap).find(|e| e.file_name() == "d").unwrap();
        entry.metadata().unwrap().modified().unwrap()
    };
    listed_mtime(&b);
    let before = delegated_entries(&a);
    for i in 0..300 {
        fs::write(a.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    assert!(delegated_entries(&a) > before || delegated_pending(&a) > 0, "the directory was delegated");
    let holders = fs::symlink_metadata(a.join("d")).unwrap().modified().unwrap();
    // The holder closed every file: a listing of the parent elsewhere shows the directory as
    // changed by all of them, whether or not the last batch had reached meta.
    assert_eq!(listed_mtime(&b), holders);
}

fn meta_rpcs(mount: &std::path::Path) -> u64 {
    common::metrics(mount)["meta_rpcs"].as_u64().unwrap()
}

/// `stat` of every entry under `dir`, as `find -ls` does; how many there were.
fn walk(dir: &std::path::Path) -> usize {
    let mut count = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        count += 1;
        if meta.is_dir() {
            count += walk(&entry.path());
        }
    }
    count
}

#[test]
fn a_tree_just_made_under_delegations_is_walked_elsewhere_once_and_then_from_cache() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else { return };
    let (dirs, files) = (20, 30);
    fs::create_dir(a.join("tree")).unwrap();
    for d in 0..dirs {
        fs::create_dir(a.join(format!("tree/{d}"))).unwrap();
        for f in 0..files {
            fs::write(a.join(format!("tree/{d}/{f}")), b"").unwrap();
        }
    }
    assert!(delegated_entries(&a) + delegated_pending(&a) > 0, "no directory was delegated");
    // The first walk elsewhere: the listing of `tree` has every directory returned first (not
    // only the first few), so what it promises stays true, and no file needs a request of its
    // own.
    let before = meta_rpcs(&b);
    assert_eq!(walk(&b.join("tree")), dirs * (files + 1));
    let first = meta_rpcs(&b) - before;
    assert!(first <= 4 * dirs as u64, "a first walk of {dirs} directories took {first} meta requests");
    let before = meta_rpcs(&b);
    assert_eq!(walk(&b.join("tree")), dirs * (files + 1));
    assert_eq!(meta_rpcs(&b) - before, 0, "a second walk asked meta");
}
