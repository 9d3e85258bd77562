//! What one mount closes, another mount opening the file afterwards reads (close-to-open), with
//! no wait in between.

mod common;

use std::fs;

use cairn_testkit::{ClusterSpec, pattern};

#[test]
fn data_closed_on_one_mount_is_read_at_once_on_another() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    for round in 0..1000usize {
        // Sizes grow and shrink, so a size the reader's kernel cached would cut or pad the read.
        let content = format!("round {round} {}", "x".repeat((round * 7919) % 9000));
        fs::write(a.join("f"), &content).unwrap();
        let read = fs::read(b.join("f")).unwrap();
        assert!(read == content.as_bytes(), "round {round}: read {} bytes, wrote {}", read.len(), content.len());
    }
}

/// `stat` on a path: Some((mode, size)) or None when it does not exist.
fn stat(path: &std::path::Path) -> Option<(u32, u64)> {
    use std::os::unix::fs::PermissionsExt;
    match fs::symlink_metadata(path) {
        Ok(m) => Some((m.permissions().mode() & 0o7777, m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("stat {}: {e}", path.display()),
    }
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn c_path(path: &std::path::Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// An extended attribute's value, or None when the file has no such attribute.
fn xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let (path, name) = (c_path(path), std::ffi::CString::new(name).unwrap());
    let mut value = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and `value` is as long as the length passed.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "getxattr {name:?}: {e}");
        return None;
    }
    value.truncate(n as usize);
    Some(value)
}

fn set_xattr(path: &std::path::Path, name: &str, value: Option<&[u8]>) {
    let (path, name) = (c_path(path), std::ffi::CString::new(name).unwrap());
    // SAFETY: both strings are NUL-terminated and the value's pointer and length agree.
    let rc = unsafe {
        match value {
            Some(v) => libc::lsetxattr(path.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0),
            None => libc::lremovexattr(path.as_ptr(), name.as_ptr()),
        }
    };
    assert_eq!(rc, 0, "setxattr {name:?}: {}", std::io::Error::last_os_error());
}

#[test]
fn namespace_changes_on_one_mount_are_seen_at_once_on_another() {
    use std::os::unix::fs::PermissionsExt;
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    fs::create_dir(a.join("d")).unwrap();
    fs::write(a.join("d/f"), b"0123456789").unwrap();
    for round in 0..200u32 {
        // B looks first each time, so its kernel and client hold what is about to change.
        let (da, db) = (a.join("d"), b.join("d"));
        let mode = 0o600 | (round % 8) << 3;
        assert!(stat(&db.join("f")).is_some());
        fs::set_permissions(da.join("f"), fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(stat(&db.join("f")).map(|s| s.0), Some(mode), "round {round}: chmod");

        let size = u64::from(round % 10);
        fs::OpenOptions::new().write(true).open(da.join("f")).unwrap().set_len(size).unwrap();
        assert_eq!(stat(&db.join("f")).map(|s| s.1), Some(size), "round {round}: truncate (stat)");
        assert_eq!(fs::read(db.join("f")).unwrap().len() as u64, size, "round {round}: truncate (read)");
        fs::write(da.join("f"), b"0123456789").unwrap();

        let sub = format!("sub{round}");
        assert_eq!(stat(&db.join(&sub)), None);
        let before = names(&db);
        fs::create_dir(da.join(&sub)).unwrap();
        assert!(stat(&db.join(&sub)).is_some(), "round {round}: mkdir");
        assert_eq!(names(&db).len(), before.len() + 1, "round {round}: mkdir (listing)");

        fs::rename(da.join("f"), da.join("g")).unwrap();
        assert_eq!(stat(&db.join("f")), None, "round {round}: rename (old name)");
        assert!(stat(&db.join("g")).is_some(), "round {round}: rename (new name)");
        fs::rename(da.join("g"), da.join("f")).unwrap();
        assert!(stat(&db.join("f")).is_some(), "round {round}: rename back");

        fs::remove_dir(da.join(&sub)).unwrap();
        assert_eq!(stat(&db.join(&sub)), None, "round {round}: rmdir");
        assert_eq!(names(&db), before, "round {round}: rmdir (listing)");

        let doomed = format!("x{round}");
        fs::write(da.join(&doomed), b"x").unwrap();
        assert!(stat(&db.join(&doomed)).is_some(), "round {round}: create");
        fs::remove_file(da.join(&doomed)).unwrap();
        assert_eq!(stat(&db.join(&doomed)), None, "round {round}: unlink");

        let value = format!("v{round}");
        assert_eq!(xattr(&db.join("f"), "user.tag"), None);
        set_xattr(&da.join("f"), "user.tag", Some(value.as_bytes()));
        assert_eq!(xattr(&db.join("f"), "user.tag"), Some(value.into_bytes()), "round {round}: setxattr");
        set_xattr(&da.join("f"), "user.tag", None);
        assert_eq!(xattr(&db.join("f"), "user.tag"), None, "round {round}: removexattr");
    }
}

/// `lgetxattr`'s errno for `name` on `path`, or 0 when the file has it.
fn xattr_errno(path: &std::path::Path, name: &str) -> i32 {
    let (path, name) = (c_path(path), std::ffi::CString::new(name).unwrap());
    let mut value = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and `value` is as long as the length passed.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    if n < 0 { std::io::Error::last_os_error().raw_os_error().unwrap() } else { 0 }
}

#[test]
fn ls_l_of_a_cached_tree_asks_the_mount_nothing_per_file() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    for dir in 0..4 {
        fs::create_dir(a.join(format!("d{dir}"))).unwrap();
        for i in 0..50 {
            fs::write(a.join(format!("d{dir}/{i}")), format!("{i}")).unwrap();
        }
    }
    // The SELinux label is not kept: refused on set as on get, even for root, so `ls -l`
    // stops asking after the first file; file capabilities are still kept.
    let file = a.join("d0/0");
    assert_eq!(xattr_errno(&file, "security.selinux"), libc::EOPNOTSUPP);
    let (path, name) = (c_path(&file), std::ffi::CString::new("security.selinux").unwrap());
    // SAFETY: both strings are NUL-terminated and the value is as long as the length passed.
    let set = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, 0) };
    assert_eq!((set, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EOPNOTSUPP)));
    let capability = [1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    set_xattr(&file, "security.capability", Some(&capability));
    assert_eq!(xattr(&b.join("d0/0"), "security.capability"), Some(capability.to_vec()));

    let ls = |root: &std::path::Path| {
        let out = std::process::Command::new("ls").arg("-lR").arg(root).output().unwrap();
        assert!(out.status.success(), "ls -lR: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let first = ls(&b);
    assert_eq!(first.lines().filter(|line| line.starts_with("-rw")).count(), 200, "{first}");
    let reads = common::metrics(&b)["xattr_reads"].as_u64().unwrap();
    let rpcs = common::metrics(&b)["meta_rpcs"].as_u64().unwrap();
    assert_eq!(ls(&b), first);
    let reads = common::metrics(&b)["xattr_reads"].as_u64().unwrap() - reads;
    assert!(reads <= 2, "a second ls -lR of 200 files made {reads} getxattr requests");
    assert_eq!(common::metrics(&b)["meta_rpcs"].as_u64().unwrap(), rpcs, "a second ls -lR asked meta");
}

/// Drops the kernel's cached pages of `path` (for a directory, its cached listing), as memory
/// pressure may at any time.
fn drop_kernel_pages(path: &std::path::Path) {
    let dir = fs::File::open(path).unwrap();
    // SAFETY: the descriptor is open for the call's duration.
    let advised =
        unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&dir), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(advised, 0, "posix_fadvise");
}

#[test]
fn a_listing_the_kernel_dropped_is_listed_again_from_the_promise_and_absent_names_need_no_request() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    // More names than one page of a listing holds.
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..300 {
        fs::write(a.join(format!("d/{i:03}")), b"").unwrap();
    }
    fs::create_dir(a.join("d/sub")).unwrap();
    let names = |root: &std::path::Path| {
        let mut names: Vec<String> =
            fs::read_dir(root.join("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };
    let counter = |name: &str| common::metrics(&b)[name].as_u64().unwrap();
    let first = names(&b);
    assert_eq!(first.len(), 301);
    let (rpcs, dir_reads) = (counter("meta_rpcs"), counter("dir_reads"));
    drop_kernel_pages(&b.join("d"));
    assert_eq!(names(&b), first);
    assert!(counter("dir_reads") > dir_reads, "the kernel still had the listing: the test shows nothing");
    assert_eq!(counter("meta_rpcs"), rpcs, "a listing known whole under a promise asked meta again");
    // A name the whole listing lacks does not exist: no request either.
    let absent = fs::symlink_metadata(b.join("d/absent")).unwrap_err();
    assert_eq!(absent.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(counter("meta_rpcs"), rpcs, "an absent name in a directory known whole asked meta");

    // A change elsewhere breaks the promise: the next listing and lookup see it.
    fs::write(a.join("d/absent"), b"now").unwrap();
    fs::remove_file(a.join("d/000")).unwrap();
    drop_kernel_pages(&b.join("d"));
    let after = names(&b);
    assert_eq!(after.len(), 301);
    assert!(after.contains(&"absent".to_string()) && !after.contains(&"000".to_string()), "{after:?}");
    assert_eq!(fs::read(b.join("d/absent")).unwrap(), b"now");
}

/// The names `dir` yields from where its stream stands to its end, sorted.
fn read_names(dir: *mut libc::DIR) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        // SAFETY: `dir` is an open directory stream; the entry is read before the next call.
        let entry = unsafe { libc::readdir(dir) };
        if entry.is_null() {
            break;
        }
        // SAFETY: `d_name` is NUL-terminated within the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
        names.push(name.to_string_lossy().into_owned());
    }
    names.sort();
    names
}

#[test]
fn a_file_read_again_after_the_kernel_dropped_its_pages_asks_meta_nothing_until_it_changes() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    // A file in blocks, and one small enough that meta holds its bytes.
    let big = pattern(1, 9 * 1024 * 1024 + 123);
    let small = b"a small file ".repeat(100);
    fs::write(a.join("big"), &big).unwrap();
    fs::write(a.join("small"), &small).unwrap();
    let counter = |name: &str| common::metrics(&b)[name].as_u64().unwrap();
    assert_eq!(fs::read(b.join("big")).unwrap(), big);
    assert_eq!(fs::read(b.join("small")).unwrap(), small);
    assert!(counter("data_map_bytes") > 0, "no data map was kept");
    let rpcs = counter("meta_rpcs");
    for round in 0..3 {
        drop_kernel_pages(&b.join("big"));
        drop_kernel_pages(&b.join("small"));
        let reads = counter("file_reads");
        assert_eq!(fs::read(b.join("big")).unwrap(), big);
        assert_eq!(fs::read(b.join("small")).unwrap(), small);
        assert!(counter("file_reads") > reads, "the kernel still had the pages: the test shows nothing");
        assert_eq!(counter("meta_rpcs"), rpcs, "round {round}: a read under the promise asked meta for the data map");
    }

    // Changes elsewhere break the promise: the next open reads them, whether the kernel
    // dropped its pages or not.
    let replaced = pattern(2, 5 * 1024 * 1024);
    fs::write(a.join("big"), &replaced).unwrap();
    let mut appended = small.clone();
    appended.extend_from_slice(b"and more");
    fs::write(a.join("small"), &appended).unwrap();
    assert_eq!(fs::read(b.join("small")).unwrap(), appended);
    drop_kernel_pages(&b.join("big"));
    assert_eq!(fs::read(b.join("big")).unwrap(), replaced);
    // An overwrite in place that keeps the size, read after the kernel dropped its pages.
    let patch = pattern(3, 4096);
    let file = fs::OpenOptions::new().write(true).open(a.join("big")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &patch, 4 * 1024 * 1024).unwrap();
    drop(file);
    let mut expected = replaced.clone();
    expected[4 * 1024 * 1024..4 * 1024 * 1024 + 4096].copy_from_slice(&patch);
    drop_kernel_pages(&b.join("big"));
    assert_eq!(fs::read(b.join("big")).unwrap(), expected);
    drop_kernel_pages(&b.join("big"));
    assert_eq!(fs::read(b.join("big")).unwrap(), expected);
}

#[test]
fn a_directory_stream_read_again_from_the_start_sees_names_added_since() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    // Only its owner may read it: never listed from the client's cache, always from meta.
    fs::create_dir(a.join("d")).unwrap();
    fs::set_permissions(a.join("d"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    fs::write(a.join("d/first"), b"").unwrap();
    let path = c_path(&b.join("d"));
    // SAFETY: the path is NUL-terminated; the stream is closed below.
    let dir = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!dir.is_null(), "opendir: {}", std::io::Error::last_os_error());
    // One entry read: the mount has sent the first page and not been asked past it.
    // SAFETY: `dir` is open.
    assert!(!unsafe { libc::readdir(dir) }.is_null());
    // A name that sorts before the one the first page ended with.
    fs::write(a.join("d/aaa"), b"").unwrap();
    // SAFETY: `dir` is open.
    unsafe { libc::rewinddir(dir) };
    let again = read_names(dir);
    // SAFETY: `dir` is open and not used after.
    unsafe { libc::closedir(dir) };
    assert_eq!(again, [".", "..", "aaa", "first"]);
}

#[test]
fn cached_metadata_is_served_without_asking_meta_until_someone_changes_it() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..50 {
        fs::write(a.join(format!("d/{i}")), format!("{i}")).unwrap();
    }
    let walk = |root: &std::path::Path| {
        for entry in fs::read_dir(root.join("d")).unwrap() {
            let entry = entry.unwrap();
            fs::symlink_metadata(entry.path()).unwrap();
            // What `ls -l` asks of each file.
            xattr(&entry.path(), "user.tag");
            fs::read(entry.path()).unwrap();
        }
    };
    // A first `ls -l` on this mount: the listing brings each file's attributes and whether it
    // has extended attributes, so the one `ls` asks each file for needs no request.
    let before = common::metrics(&b)["meta_rpcs"].as_u64().unwrap();
    for entry in fs::read_dir(b.join("d")).unwrap() {
        let entry = entry.unwrap();
        fs::symlink_metadata(entry.path()).unwrap();
        assert_eq!(xattr(&entry.path(), "user.tag"), None);
    }
    let listing = common::metrics(&b)["meta_rpcs"].as_u64().unwrap() - before;
    assert!(listing < 10, "a first listing of 50 files took {listing} meta requests");
    walk(&b);
    let rpcs = common::metrics(&b)["meta_rpcs"].as_u64().unwrap();
    let breaks = common::metrics(&b)["breaks"].as_u64().unwrap();
    walk(&b);
    walk(&b);
    assert_eq!(common::metrics(&b)["meta_rpcs"].as_u64().unwrap(), rpcs, "a cached walk asked meta");
    fs::write(a.join("d/7"), b"changed").unwrap();
    assert!(common::metrics(&b)["breaks"].as_u64().unwrap() > breaks, "the change was not pushed to the other mount");
    assert_eq!(fs::read(b.join("d/7")).unwrap(), b"changed");
}

#[test]
fn a_mount_filling_its_own_new_directory_asks_meta_only_to_change_it_and_still_sees_other_mounts() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    // A made the directory and every change in it: it knows which names do not exist and what
    // the directory looks like after each change, so a file costs a create and a commit.
    fs::create_dir(a.join("own")).unwrap();
    let rpcs = common::metrics(&a)["meta_rpcs"].as_u64().unwrap();
    for i in 0..50 {
        fs::write(a.join(format!("own/{i}")), format!("{i}")).unwrap();
    }
    let asked = common::metrics(&a)["meta_rpcs"].as_u64().unwrap() - rpcs;
    assert!(asked <= 2 * 50 + 1, "50 files in a new directory took {asked} requests to meta");
    for i in (0..50).step_by(2) {
        fs::remove_file(a.join(format!("own/{i}"))).unwrap();
    }
    assert_eq!(names(&b.join("own")).len(), 25);
    for round in 0..50u32 {
        let dir = a.join(format!("d{round}"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("mine"), b"a").unwrap();
        assert_eq!(stat(&dir.join("theirs")), None);
        // Another mount's changes reach A at once, though A answered the name itself.
        let theirs = b.join(format!("d{round}/theirs"));
        fs::write(&theirs, b"b").unwrap();
        assert!(stat(&dir.join("theirs")).is_some(), "round {round}: made elsewhere");
        assert_eq!(fs::read(dir.join("theirs")).unwrap(), b"b");
        fs::remove_file(&theirs).unwrap();
        assert_eq!(stat(&dir.join("theirs")), None, "round {round}: removed elsewhere");
        fs::remove_file(b.join(format!("d{round}/mine"))).unwrap();
        assert_eq!(stat(&dir.join("mine")), None, "round {round}: own file removed elsewhere");
        assert!(names(&dir).is_empty(), "round {round}: listing");
    }
}

#[test]
fn a_client_cut_off_from_meta_never_serves_data_replaced_elsewhere_and_resumes_after_healing() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec { session_lease_secs: 3, ..Default::default() })
    else {
        return;
    };
    let failing = cluster.mount_with_args(&["--on-partition", "eio"]).unwrap();
    let failing_ip = cluster.last_mount_ip();
    let waiting = cluster.mount().unwrap();
    let waiting_ip = cluster.last_mount_ip();
    let writer = cluster.mount().unwrap();
    fs::write(writer.join("f"), b"old").unwrap();
    for mount in [&failing, &waiting] {
        assert_eq!(fs::read(mount.join("f")).unwrap(), b"old");
        assert_eq!(fs::read(mount.join("f")).unwrap(), b"old", "served from the caches");
    }
    let meta_ip = cluster.metas[0].ip;
    cluster.faults.cut(failing_ip, meta_ip);
    cluster.faults.cut(waiting_ip, meta_ip);
    // The writer's close returns once the cut-off holders' leases ran out; from then on they
    // must never show the old data.
    fs::write(writer.join("f"), b"brand new").unwrap();
    let blocked = std::thread::spawn({
        let path = waiting.join("f");
        move || fs::read(path)
    });
    for _ in 0..5 {
        match fs::read(failing.join("f")) {
            Ok(data) => assert_ne!(data, b"old", "a cut-off client served replaced data"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        }
        match fs::symlink_metadata(failing.join("f")) {
            Ok(m) => assert_ne!(m.len(), 3, "a cut-off client served a replaced size"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        }
    }
    assert!(fs::read(failing.join("f")).is_err(), "a cut-off client with --on-partition eio answered");
    cluster.faults.heal();
    cairn_testkit::wait_until("the cut-off client to read again", std::time::Duration::from_secs(30), || {
        fs::read(failing.join("f")).is_ok_and(|d| d == b"brand new")
    })
    .unwrap();
    let read = blocked.join().unwrap().expect("the waiting client's read completes after healing");
    assert_eq!(read, b"brand new");
}

#[test]
fn close_to_open_holds_while_the_meta_leader_is_killed() {
    let Some((mut cluster, a, b)) = common::two_mounts(ClusterSpec { metas: 3, datas: 1, ..Default::default() }) else {
        return;
    };
    let mut killed = None;
    for round in 0..1000usize {
        if round == 300 {
            let leader = cluster.wait_for_leader(std::time::Duration::from_secs(30)).unwrap();
            cluster.metas[leader].process.kill();
            killed = Some(leader);
        }
        let content = format!("round {round} {}", "y".repeat((round * 7919) % 9000));
        fs::write(a.join("f"), &content).unwrap();
        let read = fs::read(b.join("f")).unwrap();
        assert!(read == content.as_bytes(), "round {round}: read {} bytes, wrote {}", read.len(), content.len());
        let size = fs::symlink_metadata(b.join("f")).unwrap().len();
        assert_eq!(size, content.len() as u64, "round {round}: stat");
    }
    let new_leader = cluster.leader().expect("a leader after the kill");
    assert_ne!(Some(new_leader), killed);
}

#[test]
fn a_strict_mount_makes_each_write_visible_before_close() {
    use std::io::Write;
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return;
    };
    let strict = cluster.mount_with_args(&["--strict"]).unwrap();
    let reader = cluster.mount().unwrap();
    let mut file = fs::File::create(strict.join("log")).unwrap();
    let mut expected = Vec::new();
    for round in 0..100 {
        let line = format!("line {round}\n");
        file.write_all(line.as_bytes()).unwrap();
        expected.extend_from_slice(line.as_bytes());
        // Still open on the strict mount: the write alone made it visible.
        assert_eq!(fs::read(reader.join("log")).unwrap(), expected, "round {round}");
    }
}

/// A thread that changes file `f` on one mount without a pause (its extended attributes and
/// links, and its mode if `chmod`), so that a change of that mount's own naming the file is in
/// flight most of the time.
struct OwnChanges {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl OwnChanges {
    fn start(mount: &std::path::Path, chmod: bool) -> OwnChanges {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (stopped, path, link) = (stop.clone(), mount.join("f"), mount.join("f-link"));
        let thread = std::thread::spawn(move || {
            let (mut n, mut links) = (0u64, 0u64);
            let steps = if chmod { 4 } else { 3 };
            while !stopped.load(Ordering::Relaxed) {
                n += 1;
                match (n % steps, chmod) {
                    (0, _) => set_xattr(&path, "user.tick", Some(n.to_string().as_bytes())),
                    (1, true) => {
                        let mode = if n % 8 == 1 { 0o640 } else { 0o644 };
                        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                    }
                    // Either may fail: the kernel counts the file's links itself, and a
                    // stat answered after meta applied an unlink but before the unlink's
                    // reply leaves it one short (a link of a file it counts 0 links for is
                    // refused). Only the changes in flight matter here.
                    (m, _) if m == steps - 2 => links += u64::from(fs::hard_link(&path, &link).is_ok()),
                    _ => _ = fs::remove_file(&link),
                }
            }
            (n, links)
        });
        OwnChanges { stop, thread }
    }

    /// Stops the thread; returns how many changes it made. It must have linked the file.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (changes, links) = self.thread.join().unwrap();
        assert!(links > 0, "no link made in {changes} changes");
        changes
    }
}

/// A client with its own change to the inode in flight must still have its kernel forget the
/// inode's attributes before another mount's change to it returns: a `stat` there sees it.
#[test]
fn a_size_and_mode_changed_on_one_mount_are_seen_at_once_by_stat_on_another_that_keeps_changing_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    fs::write(a.join("f"), b"start").unwrap();
    // Not its mode: that is what the other mount changes.
    let changes = OwnChanges::start(&b, false);
    let mut failure = None;
    for round in 0..500usize {
        let content = "z".repeat(1 + (round * 7919) % 9000);
        fs::write(a.join("f"), &content).unwrap();
        let mode = if round % 2 == 0 { 0o600 } else { 0o644 };
        fs::set_permissions(a.join("f"), fs::Permissions::from_mode(mode)).unwrap();
        let seen = fs::metadata(b.join("f")).unwrap();
        if seen.len() != content.len() as u64 || seen.permissions().mode() & 0o777 != mode {
            failure = Some(format!(
                "round {round}: stat saw {} bytes, mode {:o}; wrote {} bytes, mode {mode:o}",
                seen.len(),
                seen.permissions().mode() & 0o777,
                content.len()
            ));
            break;
        }
    }
    let ticks = changes.stop();
    if let Some(failure) = failure {
        panic!("{failure} ({ticks} changes made meanwhile on the stating mount)");
    }
}

/// A client with its own change to the inode in flight is waited for only until its own cache
/// forgot what a break named, not its kernel (which may hold a lock the invalidation needs),
/// and its change's reply may be older than the other mount's commit. An open there must
/// still read what the other mount closed.
#[test]
fn data_closed_on_one_mount_is_read_at_once_on_another_that_keeps_changing_the_file() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    fs::write(a.join("f"), b"start").unwrap();
    let changes = OwnChanges::start(&b, true);
    let mut failure = None;
    for round in 0..500usize {
        let content = format!("round {round} {}", "y".repeat((round * 7919) % 9000));
        fs::write(a.join("f"), &content).unwrap();
        let read = fs::read(b.join("f")).unwrap();
        if read != content.as_bytes() {
            failure = Some(format!("round {round}: read {} bytes, wrote {}", read.len(), content.len()));
            break;
        }
    }
    let ticks = changes.stop();
    if let Some(failure) = failure {
        panic!("{failure} ({ticks} changes made meanwhile on the reading mount)");
    }
}
