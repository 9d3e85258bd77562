//! A create-and-write workload in its own process, recording what was acknowledged.
//!
//! It must not run inside the test process: FUSE flushes a file on every close of any copy of
//! its descriptor, and a process that forks while it holds mount files open (the harness
//! starting a server, say) makes the child's exec close those copies and wait for the servers
//! the harness is about to start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::pattern;

/// Bytes of the pattern every file is a prefix of.
const SOURCE_BYTES: usize = 256 * 1024;

pub struct Workload {
    child: Child,
    source: PathBuf,
    log: PathBuf,
}

/// One acknowledged step: file `f{index}` (and directory `d{index}` on every tenth) is durable.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub index: u64,
    /// When the step returned, in seconds since the epoch.
    pub at: f64,
}

/// Length of file `f{index}`.
pub fn file_len(index: u64) -> usize {
    (index as usize * 7919) % (SOURCE_BYTES - 1) + 1
}

impl Workload {
    /// Starts writing into `dir`; its bookkeeping goes into `scratch` (outside the mount).
    pub fn start(dir: &Path, scratch: &Path) -> Result<Workload> {
        std::fs::create_dir_all(scratch)?;
        let source = scratch.join("workload-source");
        std::fs::write(&source, pattern(99, SOURCE_BYTES))?;
        let log = scratch.join("workload-acks");
        let script = format!(
            "i=0; while true; do len=$(( (i * 7919) % {modulus} + 1 )); \
             if [ $((i % 10)) -eq 0 ]; then mkdir {dir}/d$i || exit 1; fi; \
             dd if={source} of={dir}/f$i bs=1M count=$len iflag=count_bytes conv=fsync status=none || exit 1; \
             echo \"$i $EPOCHREALTIME\" >> {log}; i=$((i + 1)); done",
            modulus = SOURCE_BYTES - 1,
            dir = dir.display(),
            source = source.display(),
            log = log.display(),
        );
        let child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the workload")?;
        Ok(Workload { child, source, log })
    }

    /// What was acknowledged so far.
    pub fn acks(&self) -> Vec<Ack> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (index, at) = line.split_once(' ')?;
                Some(Ack { index: index.parse().ok()?, at: at.replace(',', ".").parse().ok()? })
            })
            .collect()
    }

    /// Whether the workload stopped by itself (an operation failed).
    pub fn failed(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Stops the workload; an error if it had stopped by itself, with what it printed.
    pub fn stop(&mut self) -> Result<Vec<Ack>> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut pipe) = self.child.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut stderr);
            }
            anyhow::bail!("the workload failed ({status}): {stderr}");
        }
        // SAFETY: signalling the child this workload started; it is reaped below.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        Ok(self.acks())
    }

    /// Checks that every acknowledged file and directory is in `dir` with the bytes written.
    pub fn verify(&self, dir: &Path, acks: &[Ack]) -> Result<()> {
        let source = std::fs::read(&self.source)?;
        for ack in acks {
            let name = dir.join(format!("f{}", ack.index));
            let data = std::fs::read(&name).with_context(|| format!("acknowledged {} lost", name.display()))?;
            anyhow::ensure!(
                data == source[..file_len(ack.index)],
                "acknowledged {} holds other bytes than written",
                name.display()
            );
            if ack.index % 10 == 0 {
                let dir_name = dir.join(format!("d{}", ack.index));
                anyhow::ensure!(dir_name.is_dir(), "acknowledged directory {} lost", dir_name.display());
            }
        }
        Ok(())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling the child this workload started; it is reaped below.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Now, in the same unit as [`Ack::at`].
pub fn now_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// How long the workload stood still around `moment` (seconds since the epoch): the gap
/// between the last acknowledgement before it and the first after.
pub fn pause_around(acks: &[Ack], moment: f64) -> Duration {
    let before = acks.iter().rev().find(|a| a.at <= moment).map(|a| a.at).unwrap_or(moment);
    let after = acks.iter().find(|a| a.at > moment).map(|a| a.at).unwrap_or(moment);
    Duration::from_secs_f64((after - before).max(0.0))
}
