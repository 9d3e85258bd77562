//! Test harness for Cairn: starts real `cairn` processes (meta, data, mounts) on loopback ports
//! in a temporary directory, kills (`SIGKILL`), stops and restarts them, and waits for
//! conditions with deadlines instead of sleeping and hoping.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod crossmount;
pub mod fsx;
pub mod op_times;
pub mod proxy;
pub mod workload;

use proxy::{Faults, Proxy};

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

/// A number from the environment variable `name`, or `default` when it is not set.
pub fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(value) => value.trim().parse().with_context(|| format!("{name}={value:?} is not a number")),
        Err(_) => Ok(default),
    }
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
    free_address_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Like [`free_address`], on a given loopback IP.
pub fn free_address_on(ip: IpAddr) -> String {
    listener_on(ip).local_addr().expect("local address").to_string()
}

fn listener_on(ip: IpAddr) -> TcpListener {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let spread = (std::process::id() * 7919) % 10_000;
    for _ in 0..10_000 {
        let port = 20_000 + (spread + NEXT.fetch_add(1, Ordering::SeqCst) * 13) % 12_000;
        if let Ok(listener) = TcpListener::bind((ip, port as u16)) {
            return listener;
        }
    }
    panic!("no free port between 20000 and 32000 on {ip}");
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    // Resolved through the parent: a mount whose process died answers ENOTCONN to a stat of
    // its root, and it is still a mount (one that teardown must remove).
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return false };
    let Ok(canonical) = parent.canonicalize().map(|p| p.join(name)) else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|line| line.split(' ').nth(4).is_some_and(|m| Path::new(m) == canonical))
}

/// Lazily unmounts every mount below `dir`, deepest first.
pub fn detach_mounts_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut below: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(&dir) && *m != dir)
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in below {
        let _ = Command::new("umount").arg("-l").arg(&mount).status();
    }
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

/// A file system of separate processes: meta servers, data servers and mounts, each server
/// on its own loopback IP behind a proxy that can cut it off.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub metas: Vec<Server>,
    pub datas: Vec<Server>,
    pub mounts: Vec<Mount>,
    pub faults: Arc<Faults>,
    spec: ClusterSpec,
    /// Servers started so far: a new one gets the next number (its name, directory and IP),
    /// even after others were taken out of `metas` or `datas`.
    metas_started: usize,
    datas_started: usize,
    mounts_started: usize,
}

/// One server process, the address it is reached at (its proxy) and its directory.
pub struct Server {
    pub process: Process,
    /// The advertised address: the proxy in front of the server.
    pub address: String,
    /// The server's own IP: its identity for [`Faults`].
    pub ip: IpAddr,
    /// Where the server itself listens, behind the proxy (reaching it here bypasses faults).
    pub listen: String,
    pub dir: PathBuf,
    _proxy: Proxy,
}

impl std::ops::Deref for Server {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// The shape of a test cluster.
#[derive(Clone, Copy, Debug)]
pub struct ClusterSpec {
    pub metas: usize,
    pub datas: usize,
    /// Copies of each block; 0 means as many as there are data servers, at most 3.
    pub replication: u32,
    /// Raft log entries between snapshots; 0 keeps the server's default.
    pub snapshot_every: u64,
    /// Scrub every data server's volume continuously (one pass a second, fast) instead of the
    /// servers' default pace.
    pub fast_scrub: bool,
    /// Client session lease in seconds; 0 keeps the server's default.
    pub session_lease_secs: u64,
    /// How long data servers keep a block before asking meta whether it is wanted; 0 keeps
    /// the default.
    pub orphan_grace_secs: u64,
    /// Run every server and mount with `--plaintext` instead of TLS.
    pub plaintext: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            metas: 1,
            datas: 1,
            replication: 0,
            snapshot_every: 0,
            fast_scrub: false,
            session_lease_secs: 0,
            orphan_grace_secs: 0,
            plaintext: false,
        }
    }
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
    /// Starts one meta server and one data server and waits until the file system is healthy.
    pub fn start(bin: PathBuf) -> Result<Cluster> {
        Cluster::start_with(bin, ClusterSpec::default())
    }

    /// Starts `spec.metas` meta servers (the first creates the file system, the others join)
    /// and `spec.datas` data servers, and waits until every one of them reports in.
    pub fn start_with(bin: PathBuf, spec: ClusterSpec) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("cairn-test-").tempdir()?;
        let mut cluster = Cluster {
            dir,
            bin,
            metas: Vec::new(),
            datas: Vec::new(),
            mounts: Vec::new(),
            faults: Faults::new(),
            spec,
            metas_started: 0,
            datas_started: 0,
            mounts_started: 0,
        };
        let replication = if spec.replication == 0 { spec.datas.clamp(1, 3) as u32 } else { spec.replication };
        for i in 0..spec.metas.max(1) {
            let join = if i == 0 { None } else { Some(cluster.metas[0].address.clone()) };
            let server = cluster.start_meta(join, replication)?;
            cluster.metas.push(server);
            if i == 0 {
                cluster.wait_for_leader(Duration::from_secs(60))?;
            }
        }
        for _ in 0..spec.datas.max(1) {
            let server = cluster.start_data()?;
            cluster.datas.push(server);
        }
        cluster.wait_healthy(Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn server(&self, name: &str, ip: IpAddr, args: Vec<String>) -> Result<Server> {
        let proxy_listener = listener_on(ip);
        let listen = free_address_on(ip);
        let proxy = Proxy::start(proxy_listener, listen.parse()?, self.faults.clone())?;
        let address = proxy.address.to_string();
        let dir = self.dir.path().join(name);
        let mut all = args;
        all.extend([
            "--dir".into(),
            dir.display().to_string(),
            "--listen".into(),
            listen.clone(),
            "--advertise".into(),
        ]);
        all.push(address.clone());
        let process = Process::start(&self.bin, name, all, self.dir.path().join(format!("{name}.log")))?;
        Ok(Server { process, address, ip, listen, dir, _proxy: proxy })
    }

    /// The first meta server's directory, where `--init` wrote the file system's authority.
    fn first_meta_dir(&self) -> PathBuf {
        self.dir.path().join("meta")
    }

    /// The administrator's credential (`--credential`), written by the first meta server.
    pub fn credential(&self) -> PathBuf {
        self.first_meta_dir().join("tls/admin.cred")
    }

    /// The join token's file (`--token`), written by the first meta server.
    pub fn token(&self) -> PathBuf {
        self.first_meta_dir().join("tls/join.token")
    }

    /// What a command gets to connect: the administrator's credential, or `--plaintext`.
    pub fn client_args(&self) -> Vec<String> {
        if self.spec.plaintext {
            vec!["--plaintext".into()]
        } else {
            vec!["--credential".into(), self.credential().display().to_string()]
        }
    }

    /// What a joining server gets: the join token, or `--plaintext`.
    fn join_args(&self) -> Vec<String> {
        if self.spec.plaintext {
            vec!["--plaintext".into()]
        } else {
            vec!["--token".into(), self.token().display().to_string()]
        }
    }

    fn start_meta(&mut self, join: Option<String>, replication: u32) -> Result<Server> {
        let index = self.metas_started;
        self.metas_started += 1;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 10, index as u8 + 1));
        let mut args = vec!["meta".to_string(), "--id".into(), (index + 1).to_string()];
        match join {
            None => {
                args.extend(["--init".into(), "--replication".into(), replication.to_string()]);
                if self.spec.plaintext {
                    args.push("--plaintext".into());
                }
            }
            Some(join) => {
                args.extend(["--join".into(), join]);
                args.extend(self.join_args());
            }
        }
        if self.spec.snapshot_every > 0 {
            args.extend(["--snapshot-every".into(), self.spec.snapshot_every.to_string()]);
        }
        if self.spec.session_lease_secs > 0 {
            args.extend(["--session-lease-secs".into(), self.spec.session_lease_secs.to_string()]);
        }
        let name = if index == 0 { "meta".to_string() } else { format!("meta{index}") };
        self.server(&name, ip, args)
    }

    fn start_data(&mut self) -> Result<Server> {
        let index = self.datas_started;
        self.datas_started += 1;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 20, index as u8 + 1));
        let name = if index == 0 { "data".to_string() } else { format!("data{index}") };
        let mut args = vec!["data".into(), "--meta".into(), self.meta_addresses()];
        args.extend(self.join_args());
        if self.spec.fast_scrub {
            args.extend(["--scrub-mib-per-s".into(), "1024".into(), "--scrub-pause-secs".into(), "1".into()]);
        }
        if self.spec.orphan_grace_secs > 0 {
            args.extend(["--orphan-grace-secs".into(), self.spec.orphan_grace_secs.to_string()]);
        }
        self.server(&name, ip, args)
    }

    /// Starts one more meta server, which joins the group, and waits until it is a voter.
    pub fn add_meta(&mut self) -> Result<usize> {
        let index = self.metas.len();
        let server = self.start_meta(Some(self.metas[0].address.clone()), 0)?;
        self.metas.push(server);
        self.wait_healthy(Duration::from_secs(120))?;
        Ok(index)
    }

    /// Starts one more data server and waits until meta hears from it.
    pub fn add_data(&mut self) -> Result<usize> {
        let index = self.datas.len();
        let server = self.start_data()?;
        self.datas.push(server);
        self.wait_healthy(Duration::from_secs(60))?;
        Ok(index)
    }

    /// Every meta server's address, comma separated (what `--meta` takes).
    pub fn meta_addresses(&self) -> String {
        self.metas.iter().map(|m| m.address.as_str()).collect::<Vec<_>>().join(",")
    }

    /// `cairn status --json` as parsed JSON, if some meta server answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let output = Command::new(&self.bin)
            .args(["status", "--json", "--meta", &self.meta_addresses()])
            .args(self.client_args())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// The index in `metas` of the current leader, as the group reports it.
    pub fn leader(&self) -> Option<usize> {
        let status = self.status()?;
        let address = status["leader"]["address"].as_str()?;
        self.metas.iter().position(|m| m.address == address)
    }

    pub fn wait_for_leader(&self, timeout: Duration) -> Result<usize> {
        let mut leader = None;
        wait_until("a meta leader", timeout, || {
            leader = self.leader();
            leader.is_some()
        })
        .with_context(|| self.logs())?;
        leader.context("leader vanished")
    }

    /// Waits until some meta server other than `old` leads.
    pub fn wait_for_new_leader(&self, old: usize, timeout: Duration) -> Result<usize> {
        let mut leader = None;
        wait_until("a new meta leader", timeout, || {
            leader = self.leader().filter(|l| *l != old);
            leader.is_some()
        })
        .with_context(|| format!("status: {:?}\n{}", self.status(), self.logs()))?;
        leader.context("leader vanished")
    }

    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        wait_until("the file system to report healthy", timeout, || {
            self.status().is_some_and(|s| {
                s["healthy"] == serde_json::Value::Bool(true)
                    && s["data_servers"].as_array().is_some_and(|d| d.len() >= self.datas.len())
                    && s["meta"].as_array().is_some_and(|m| {
                        m.len() == self.metas.len() && m.iter().all(|m| m["voter"] == serde_json::Value::Bool(true))
                    })
            })
        })
        .with_context(|| self.logs())
    }

    /// The last lines of every server's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for server in self.metas.iter().chain(&self.datas) {
            let log = server.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("--- {} log (last lines) ---\n", server.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Mounts the file system at a new directory and waits until the mount is up.
    pub fn mount(&mut self) -> Result<PathBuf> {
        let cache = self.dir.path().join(format!("cache{}", self.mounts_started));
        self.mount_with_cache(&cache)
    }

    /// Like [`Cluster::mount`], with the on-disk block cache in `cache` (which outlives it).
    pub fn mount_with_cache(&mut self, cache: &Path) -> Result<PathBuf> {
        self.mount_with(cache, &[])
    }

    /// Like [`Cluster::mount`], with more `cairn mount` arguments.
    pub fn mount_with_args(&mut self, extra: &[&str]) -> Result<PathBuf> {
        let cache = self.dir.path().join(format!("cache{}", self.mounts_started));
        self.mount_with(&cache, extra)
    }

    /// Like [`Cluster::mount`], connecting with the client credential at `credential` instead
    /// of the administrator's.
    pub fn mount_as(&mut self, credential: &Path) -> Result<PathBuf> {
        let cache = self.dir.path().join(format!("cache{}", self.mounts_started));
        self.mount_inner(&cache, &[], Some(credential))
    }

    /// The loopback IP the last mount started sends from.
    pub fn last_mount_ip(&self) -> IpAddr {
        Self::mount_ip(self.mounts_started.saturating_sub(1))
    }

    /// The loopback IP the `index`th mount sends from (a fault can cut it off alone).
    pub fn mount_ip(index: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 30, index as u8 + 1))
    }

    fn mount_with(&mut self, cache: &Path, extra: &[&str]) -> Result<PathBuf> {
        self.mount_inner(cache, extra, None)
    }

    fn mount_inner(&mut self, cache: &Path, extra: &[&str], credential: Option<&Path>) -> Result<PathBuf> {
        let index = self.mounts_started;
        self.mounts_started += 1;
        let path = self.dir.path().join(format!("mnt{index}"));
        std::fs::create_dir_all(&path)?;
        let mut args: Vec<String> = vec![
            "mount".into(),
            "--meta".into(),
            self.meta_addresses(),
            "--mount".into(),
            path.display().to_string(),
            "--cache-dir".into(),
            cache.display().to_string(),
            "--bind".into(),
            Self::mount_ip(index).to_string(),
        ];
        match credential {
            Some(credential) => args.extend(["--credential".into(), credential.display().to_string()]),
            None => args.extend(self.client_args()),
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let process = Process::start(
            &self.bin,
            &format!("mount{index}"),
            args,
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
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Mounts first, while the servers can still answer their last flushes.
        self.mounts.clear();
        // What a mount killed with SIGKILL left mounted in the test directory (the volume of
        // its whole-file copies), so that the directory can go.
        detach_mounts_under(self.dir.path());
        if std::env::var_os("CAIRN_KEEP_TEST_DIRS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept test directory {}", self.dir.path().display());
        }
    }
}
