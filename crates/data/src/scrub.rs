//! The scrubber: re-reads every block on a data server in the background, at a bounded rate,
//! and reports the ones that no longer match their hashes, so meta drops that copy and makes a
//! new one from a good replica before a reader ever meets it.

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::BlockId;
use tokio::sync::watch;

use crate::volume::{Volume, VolumeError};

#[derive(Clone, Copy, Debug)]
pub struct ScrubPolicy {
    /// Bytes re-read per second at most.
    pub bytes_per_second: u64,
    /// Pause between two passes over the whole volume.
    pub pause: Duration,
}

impl Default for ScrubPolicy {
    fn default() -> Self {
        ScrubPolicy { bytes_per_second: 16 * 1024 * 1024, pause: Duration::from_secs(60) }
    }
}

/// Scrubs `volume` until `shutdown` flips; `report` gets every corrupt block (and why).
pub async fn scrub<F, Fut>(volume: Arc<Volume>, policy: ScrubPolicy, mut shutdown: watch::Receiver<bool>, report: F)
where
    F: Fn(BlockId, u32, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let rate = policy.bytes_per_second.max(1);
    loop {
        let mut checked = 0u64;
        let mut bad = 0u64;
        for (id, len) in volume.blocks() {
            let target = volume.clone();
            let outcome = tokio::task::spawn_blocking(move || target.verify(id)).await;
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(VolumeError::Corrupt { what, .. })) => {
                    bad += 1;
                    tracing::error!(block = %id, %what, "scrub found a corrupt block");
                    report(id, len, what).await;
                }
                // Deleted since the list was taken, or an I/O error already logged: next one.
                Ok(Err(_)) | Err(_) => {}
            }
            checked += u64::from(len);
            let pace = Duration::from_secs_f64(f64::from(len) / rate as f64);
            tokio::select! {
                _ = tokio::time::sleep(pace) => {}
                _ = shutdown.changed() => return,
            }
        }
        tracing::debug!(checked_bytes = checked, bad, "scrub pass done");
        tokio::select! {
            _ = tokio::time::sleep(policy.pause) => {}
            _ = shutdown.changed() => return,
        }
    }
}
