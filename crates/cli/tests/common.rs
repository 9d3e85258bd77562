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
