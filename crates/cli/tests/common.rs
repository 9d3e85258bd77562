//! Shared setup for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cairn_testkit::{Cluster, ClusterSpec, cairn_bin};

/// Mount tests need root and FUSE; elsewhere they say so and pass (CI runs them as root).
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    if !(root && fuse) {
        assert!(std::env::var("CI").is_err(), "CI must run the mount tests: needs root and /dev/fuse");
        eprintln!("skipping: needs root and /dev/fuse");
    }
    root && fuse
}

pub fn cluster() -> Cluster {
    Cluster::start(cairn_bin(option_env!("CARGO_BIN_EXE_cairn"))).expect("starting a cluster")
}

pub fn bin() -> PathBuf {
    cairn_bin(option_env!("CARGO_BIN_EXE_cairn"))
}

/// A cluster of `spec` for tests that mount it; None where mounts cannot run (see `can_mount`).
pub fn mountable_cluster(spec: ClusterSpec) -> Option<Cluster> {
    can_mount().then(|| Cluster::start_with(bin(), spec).expect("starting a cluster"))
}

/// A cluster of `spec` and two mounts of it with the default options; None where mounts cannot
/// run.
pub fn two_mounts(spec: ClusterSpec) -> Option<(Cluster, PathBuf, PathBuf)> {
    let mut cluster = mountable_cluster(spec)?;
    let a = cluster.mount().expect("the first mount");
    let b = cluster.mount().expect("the second mount");
    Some((cluster, a, b))
}

/// A meta client of `cluster`'s server at `address`, with the administrator's credential.
pub async fn meta_client(
    cluster: &Cluster,
    address: &str,
) -> anyhow::Result<cairn_proto::meta_client::MetaClient<tonic::transport::Channel>> {
    let channel = cairn::security::connect_with(address, &cluster.credential()).await?;
    Ok(cairn_proto::meta_client::MetaClient::new(channel))
}

/// A data client of `cluster`'s server at `address`, with the administrator's credential.
pub async fn data_client(
    cluster: &Cluster,
    address: &str,
) -> anyhow::Result<cairn_proto::data_client::DataClient<tonic::transport::Channel>> {
    let channel = cairn::security::connect_with(address, &cluster.credential()).await?;
    Ok(cairn_proto::data_client::DataClient::new(channel))
}

/// A mount's counters (see the mount's metrics attribute).
pub fn metrics(mount: &Path) -> serde_json::Value {
    let out = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.cairn.metrics"])
        .arg(mount)
        .output()
        .expect("getfattr runs");
    assert!(out.status.success(), "getfattr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("metrics are JSON")
}

/// fcntl on `file`: `cmd` is F_SETLK, F_SETLKW or F_GETLK. Returns the lock as the kernel left
/// it (for F_GETLK, the conflicting one) or the errno.
pub fn fcntl_lock(file: &std::fs::File, cmd: i32, kind: i32, start: i64, len: i64) -> Result<libc::flock, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed flock is a valid value; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as i16;
    lock.l_whence = libc::SEEK_SET as i16;
    lock.l_start = start;
    lock.l_len = len;
    // SAFETY: fcntl with a lock command reads and writes the flock we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock) };
    if rc == 0 { Ok(lock) } else { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) }
}
