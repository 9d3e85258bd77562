//! Locks across mounts: fcntl byte-range locks and flock held in meta, contended from two
//! mounts of one file system, released when the holder's mount dies (at session expiry), and
//! SQLite databases written from both mounts at once.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cairn_testkit::ClusterSpec;
use common::fcntl_lock;

fn open(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap()
}

fn flock(file: &File, operation: i32) -> Result<(), i32> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) }
}

#[test]
fn fcntl_and_flock_locks_hold_across_mounts() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    let on_a = open(&a.join("shared"));
    let on_b = open(&b.join("shared"));

    // A write lock on bytes 0..100 from mount A: mount B can lock elsewhere, not there.
    fcntl_lock(&on_a, libc::F_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    assert_eq!(fcntl_lock(&on_b, libc::F_SETLK, libc::F_RDLCK, 50, 10).unwrap_err(), libc::EAGAIN);
    fcntl_lock(&on_b, libc::F_SETLK, libc::F_WRLCK, 100, 10).unwrap();
    let conflict = fcntl_lock(&on_b, libc::F_GETLK, libc::F_WRLCK, 0, 1).unwrap();
    assert_eq!((conflict.l_type as i32, conflict.l_start, conflict.l_len), (libc::F_WRLCK, 0, 100));

    // Downgrading the middle to a read lock splits A's lock: B may now read-lock there only.
    fcntl_lock(&on_a, libc::F_SETLK, libc::F_RDLCK, 40, 20).unwrap();
    fcntl_lock(&on_b, libc::F_SETLK, libc::F_RDLCK, 45, 5).unwrap();
    assert_eq!(fcntl_lock(&on_b, libc::F_SETLK, libc::F_RDLCK, 30, 20).unwrap_err(), libc::EAGAIN);
    fcntl_lock(&on_b, libc::F_SETLK, libc::F_UNLCK, 45, 5).unwrap();

    // A blocked F_SETLKW on B wakes when A unlocks.
    let waiter_file = open(&b.join("shared"));
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let result = fcntl_lock(&waiter_file, libc::F_SETLKW, libc::F_WRLCK, 0, 100);
        done_tx.send(Instant::now()).unwrap();
        (result.map(|_| ()), waiter_file)
    });
    assert!(done_rx.recv_timeout(Duration::from_millis(500)).is_err(), "the waiter must block while A holds the lock");
    let unlocked_at = Instant::now();
    fcntl_lock(&on_a, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    let woke_at = done_rx.recv_timeout(Duration::from_secs(30)).expect("the waiter wakes");
    let (result, waiter_file) = waiter.join().unwrap();
    result.unwrap();
    println!("blocked lock granted {:?} after the unlock", woke_at - unlocked_at);
    // Closing any descriptor of the file drops the process's locks on it (POSIX).
    drop(waiter_file);
    fcntl_lock(&on_a, libc::F_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    fcntl_lock(&on_a, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();

    // flock: exclusive across mounts, shared with shared, released at close.
    let flock_a = open(&a.join("flocked"));
    let flock_b = open(&b.join("flocked"));
    flock(&flock_a, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    assert_eq!(flock(&flock_b, libc::LOCK_SH | libc::LOCK_NB).unwrap_err(), libc::EWOULDBLOCK);
    flock(&flock_a, libc::LOCK_SH).unwrap();
    flock(&flock_b, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    flock(&flock_b, libc::LOCK_UN).unwrap();
    // FUSE releases a closed file just after close() returns, so B waits for it rather than
    // failing at once.
    drop(flock_a);
    flock(&flock_b, libc::LOCK_EX).unwrap();
}

#[test]
fn a_dead_clients_locks_go_when_its_session_expires() {
    let lease = 3;
    let Some((mut cluster, a, b)) = common::two_mounts(ClusterSpec { session_lease_secs: lease, ..Default::default() })
    else {
        return;
    };
    let on_a = open(&a.join("held"));
    fcntl_lock(&on_a, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let on_b = open(&b.join("held"));
    assert_eq!(fcntl_lock(&on_b, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap_err(), libc::EAGAIN);

    // The holder's client dies with kill -9: nobody unlocks, the session lease runs out.
    cluster.mounts[0].process.kill();
    let killed_at = Instant::now();
    fcntl_lock(&on_b, libc::F_SETLKW, libc::F_WRLCK, 0, 0).unwrap();
    let waited = killed_at.elapsed();
    println!("lock of the killed client released after {waited:?}");
    assert!(waited >= Duration::from_secs(lease) - Duration::from_millis(500), "released before the lease ran out");
    drop(on_a);
}

/// Runs `sql` against `db` with the sqlite3 shell; panics with its output on failure.
fn sqlite(db: &Path, sql: &str) -> String {
    let output = Command::new("sqlite3").arg(db).arg(sql).output().expect("sqlite3 is installed (scripts/setup.sh)");
    assert!(
        output.status.success(),
        "sqlite3 {sql:.60}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn sqlite_written_from_two_mounts_at_once_stays_whole() {
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    sqlite(&a.join("app.db"), "CREATE TABLE t (writer TEXT, n INTEGER, pad TEXT);");
    write_from_both_at_once(&a, &b);
    assert_whole(&a, &b);
}

/// The same with the database read through a whole-file copy on one mount (`--passthrough`):
/// a reader there holds it open on the copy, so that mount's writer shares the copy too, and
/// takes its locks on it.
#[test]
fn sqlite_written_from_two_mounts_at_once_stays_whole_where_one_reads_through_a_copy() {
    let Some(mut cluster) = common::mountable_cluster(ClusterSpec::default()) else {
        return;
    };
    let a = cluster.mount().unwrap();
    let copying = cluster.mount_with_args(&["--passthrough"]).unwrap();
    // Large enough for a copy (1 MiB and up).
    sqlite(
        &a.join("app.db"),
        "CREATE TABLE t (writer TEXT, n INTEGER, pad TEXT); \
         WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < 2000) \
         INSERT INTO t SELECT 'seed', n, hex(randomblob(300)) FROM k;",
    );
    let db = copying.join("app.db");
    std::fs::read(&db).unwrap();
    let opens = common::metrics(&copying)["passthrough_opens"].as_u64().unwrap();
    let _reader = File::open(&db).unwrap();
    assert_eq!(
        common::metrics(&copying)["passthrough_opens"].as_u64().unwrap(),
        opens + 1,
        "the reader is on the copy"
    );
    write_from_both_at_once(&a, &copying);
    assert!(
        common::metrics(&copying)["passthrough_opens"].as_u64().unwrap() > opens + 1,
        "the writer there shared the copy"
    );
    assert_whole(&a, &copying);
}

/// Rows each writer inserts, a transaction each.
const SQLITE_ROWS: usize = 150;

/// One `sqlite3` process on each mount inserts rows, a transaction each, at the same time.
fn write_from_both_at_once(a: &Path, b: &Path) {
    let writers: Vec<_> = [("a", a.to_path_buf()), ("b", b.to_path_buf())]
        .into_iter()
        .map(|(name, mount)| {
            let mut script = String::from(".timeout 60000\n");
            for n in 0..SQLITE_ROWS {
                script.push_str(&format!(
                    "BEGIN IMMEDIATE; INSERT INTO t VALUES ('{name}', {n}, hex(randomblob(300))); COMMIT;\n"
                ));
            }
            std::thread::spawn(move || {
                let mut child = Command::new("sqlite3")
                    .arg(mount.join("app.db"))
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("sqlite3 is installed (scripts/setup.sh)");
                use std::io::Write;
                child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
                child.wait_with_output().unwrap()
            })
        })
        .collect();
    for writer in writers {
        let output = writer.join().unwrap();
        assert!(output.status.success() && output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
    }
}

/// Both mounts see a whole database with every row the writers committed.
fn assert_whole(a: &Path, b: &Path) {
    for mount in [a, b] {
        assert_eq!(sqlite(&mount.join("app.db"), "PRAGMA integrity_check;"), "ok");
        let counts = sqlite(
            &mount.join("app.db"),
            "SELECT writer, count(DISTINCT n) FROM t WHERE writer != 'seed' GROUP BY writer;",
        );
        assert_eq!(counts, format!("a|{SQLITE_ROWS}\nb|{SQLITE_ROWS}"), "every committed row is there");
    }
}

/// A lock holder reads what the previous holder wrote, through the descriptor it kept open
/// and its cached pages, round after round (a database keeps its file open across
/// transactions).
#[test]
fn a_lock_holder_reads_what_the_previous_holder_wrote_through_the_descriptor_it_kept() {
    use std::os::unix::fs::FileExt;
    let Some((_cluster, a, b)) = common::two_mounts(ClusterSpec::default()) else {
        return;
    };
    const SIZE: usize = 256 * 1024;
    std::fs::write(a.join("db"), vec![0u8; SIZE]).unwrap();
    let on_a = open(&a.join("db"));
    let on_b = open(&b.join("db"));
    let mut seen = vec![0u8; SIZE];
    for round in 1..=20u8 {
        // A reads the whole file under the lock: its pages are cached.
        fcntl_lock(&on_a, libc::F_SETLKW, libc::F_RDLCK, 0, 0).unwrap();
        on_a.read_exact_at(&mut seen, 0).unwrap();
        fcntl_lock(&on_a, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
        // B changes one page of it, and the size, under the lock.
        fcntl_lock(&on_b, libc::F_SETLKW, libc::F_WRLCK, 0, 0).unwrap();
        let page = vec![round; 4096];
        let at = 4096 * u64::from(round);
        on_b.write_all_at(&page, at).unwrap();
        on_b.set_len((SIZE + usize::from(round)) as u64).unwrap();
        fcntl_lock(&on_b, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
        // A's next lock shows both.
        fcntl_lock(&on_a, libc::F_SETLKW, libc::F_RDLCK, 0, 0).unwrap();
        let mut data = vec![0u8; 4096];
        on_a.read_exact_at(&mut data, at).unwrap();
        assert!(data == page, "round {round}: the page the previous holder wrote");
        assert_eq!(on_a.metadata().unwrap().len(), (SIZE + usize::from(round)) as u64, "round {round}: its size");
        fcntl_lock(&on_a, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    }
}
