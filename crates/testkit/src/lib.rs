//! Test harness for Cairn: starts real `cairn` processes (meta, data, mounts) on loopback ports
//! in a temporary directory, kills (`SIGKILL`), stops and restarts them, and waits for
//! conditions with deadlines instead of sleeping and hoping.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod fsx;

/// `len` bytes that depend on `seed` (xorshift), to write and later check.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// A loopback address with a port that was free a moment ago.
///
/// Ports come from below the kernel's ephemeral range (32768 and up here): a server restarted
/// on its old port must not find it taken by some client's outgoing connection, which is what
/// `bind(0)` ports, taken from that range, risk.
pub fn free_address() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let spread = (std::process::id() * 7919) % 10_000;
    for _ in 0..10_000 {
        let port = 20_000 + (spread + NEXT.fetch_add(1, Ordering::SeqCst) * 13) % 12_000;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().expect("local address").to_string();
        }
    }
    panic!("no free loopback port between 20000 and 32000");
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|line| line.split(' ').nth(4).is_some_and(|m| Path::new(m) == canonical))
}

/// One `cairn` process the harness started, with its log file.
pub struct Process {
    pub name: String,
    args: Vec<String>,
    bin: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    fn start(bin: &Path, name: &str, args: Vec<String>, log: PathBuf) -> Result<Process> {
        let mut process = Process { name: name.to_string(), args, bin: bin.to_path_buf(), log, child: None };
        process.spawn()?;
        Ok(process)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: sending a signal to a child this harness started and has not reaped.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// `kill -9`: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout`, then kills it.
    pub fn stop(&mut self, timeout: Duration) {
        self.signal(libc::SIGTERM);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.resume();
        self.stop(Duration::from_secs(5));
    }
}

/// A file system of separate processes: one meta server, one data server, and mounts.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub meta_address: String,
    pub data_address: String,
    pub meta: Process,
    pub data: Process,
    pub mounts: Vec<Mount>,
}

pub struct Mount {
    pub path: PathBuf,
    pub process: Process,
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.process.resume();
        self.process.stop(Duration::from_secs(10));
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// The `cairn` binary under test: `CAIRN_BIN`, or the one cargo built next to the tests.
pub fn cairn_bin(cargo_bin: Option<&str>) -> PathBuf {
    if let Ok(path) = std::env::var("CAIRN_BIN") {
        return PathBuf::from(path);
    }
    PathBuf::from(cargo_bin.expect("CAIRN_BIN or the cargo binary path"))
}

impl Cluster {
    /// Starts a meta server and a data server and waits until the data server registered.
    pub fn start(bin: PathBuf) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("cairn-test-").tempdir()?;
        let meta_address = free_address();
        let data_address = free_address();
        let meta = Process::start(
            &bin,
            "meta",
            vec![
                "meta".into(),
                "--dir".into(),
                dir.path().join("meta").display().to_string(),
                "--listen".into(),
                meta_address.clone(),
                "--init".into(),
            ],
            dir.path().join("meta.log"),
        )?;
        let data = Process::start(
            &bin,
            "data",
            vec![
                "data".into(),
                "--dir".into(),
                dir.path().join("data").display().to_string(),
                "--listen".into(),
                data_address.clone(),
                "--meta".into(),
                meta_address.clone(),
            ],
            dir.path().join("data.log"),
        )?;
        let cluster = Cluster { dir, bin, meta_address, data_address, meta, data, mounts: Vec::new() };
        cluster.wait_healthy(Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// `cairn status --json` as parsed JSON, if meta answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let output = Command::new(&self.bin).args(["status", "--json", "--meta", &self.meta_address]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        wait_until("the file system to report healthy", timeout, || {
            self.status().is_some_and(|s| {
                s["healthy"] == serde_json::Value::Bool(true)
                    && s["data_servers"]
                        .as_array()
                        .is_some_and(|d| d.iter().all(|d| d["live"] == serde_json::Value::Bool(true)))
            })
        })
        .with_context(|| format!("meta log:\n{}\ndata log:\n{}", self.meta.log(), self.data.log()))
    }

    /// Mounts the file system at a new directory and waits until the mount is up.
    pub fn mount(&mut self) -> Result<PathBuf> {
        let index = self.mounts.len();
        let path = self.dir.path().join(format!("mnt{index}"));
        std::fs::create_dir_all(&path)?;
        let process = Process::start(
            &self.bin,
            &format!("mount{index}"),
            vec![
                "mount".into(),
                "--meta".into(),
                self.meta_address.clone(),
                "--mount".into(),
                path.display().to_string(),
            ],
            self.dir.path().join(format!("mount{index}.log")),
        )?;
        let mount = Mount { path: path.clone(), process };
        let result = wait_until("the mount to appear", Duration::from_secs(30), || is_mounted(&path));
        if let Err(e) = result {
            let log = mount.process.log();
            drop(mount);
            return Err(e.context(format!("mount log:\n{log}")));
        }
        self.mounts.push(mount);
        Ok(path)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn meta_dir(&self) -> PathBuf {
        self.dir.path().join("meta")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Mounts first, while the servers can still answer their last flushes.
        self.mounts.clear();
        if std::env::var_os("CAIRN_KEEP_TEST_DIRS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept test directory {}", self.dir.path().display());
        }
    }
}
