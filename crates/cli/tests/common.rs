//! Shared setup for the integration tests.
#![allow(dead_code)]

use std::path::Path;

use cairn_testkit::{Cluster, cairn_bin};

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

pub fn bin() -> std::path::PathBuf {
    cairn_bin(option_env!("CARGO_BIN_EXE_cairn"))
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
