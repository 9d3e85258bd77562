//! Files' data maps (which blocks hold which bytes of a file) kept under the file's promise, so
//! that a read after another open, or after the kernel dropped the pages it cached, asks meta
//! nothing.
//!
//! Validity: a file's maps carry the serial that its cached attributes were given when the
//! first of them was kept (`Callbacks::keep_data_window`). A break, a loss of trust or this
//! client's own change drops those attributes, and the next map kept gets a new serial, so a
//! map fetched before the change never answers after it. Maps also age out well before the
//! block tokens in them expire.
//!
//! Bounds: the bytes of all maps kept (their extents, inline data included), and the windows
//! kept per file.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_proto as pb;
use lru::LruCache;
use prost::Message;

/// Bytes of data maps kept at most, across files.
const MAP_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Windows kept per file at most (each covers 256 MiB of a file, or its whole data map).
const WINDOWS_PER_FILE_MAX: usize = 8;
/// Files with maps kept at most.
const FILES_MAX: usize = 16_384;
/// How long a map answers after it was fetched: meta's block tokens last an hour.
const KEPT_FOR_MAX: Duration = Duration::from_secs(10 * 60);

/// Part of a file's data map, as meta answered it: the extents that hold bytes
/// `start..end` of a file of `size` bytes, and the data servers they name.
#[derive(Debug)]
pub struct DataWindow {
    pub start: u64,
    pub end: u64,
    pub size: u64,
    pub extents: Vec<pb::Extent>,
    pub servers: Arc<HashMap<u64, String>>,
}

impl DataWindow {
    /// Whether this window answers a read of `offset..end` (a read past the file's end needs
    /// no more than the window that reaches it).
    pub fn covers(&self, offset: u64, end: u64) -> bool {
        self.start <= offset && (end <= self.end || self.end >= self.size)
    }

    /// What keeping the window costs, about.
    fn bytes(&self) -> usize {
        let extents: usize = self.extents.iter().map(|e| e.encoded_len() + 64).sum();
        let servers: usize = self.servers.values().map(|s| s.len() + 48).sum();
        extents + servers + 128
    }
}

struct Kept {
    window: Arc<DataWindow>,
    at: Instant,
    bytes: usize,
}

struct FileMaps {
    serial: u64,
    windows: Vec<Kept>,
}

impl FileMaps {
    fn bytes(&self) -> usize {
        self.windows.iter().map(|k| k.bytes).sum()
    }
}

struct Held {
    files: LruCache<u64, FileMaps>,
    bytes: usize,
}

/// Data maps kept across opens, per inode.
pub struct DataMaps {
    held: Mutex<Held>,
    kept_for: Duration,
}

impl Default for DataMaps {
    fn default() -> Self {
        DataMaps {
            held: Mutex::new(Held { files: LruCache::new(NonZeroUsize::new(FILES_MAX).expect("non-zero")), bytes: 0 }),
            kept_for: KEPT_FOR_MAX,
        }
    }
}

impl DataMaps {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kept window of `ino` under `serial` that answers a read of `offset..end`.
    pub fn get(&self, ino: u64, serial: u64, offset: u64, end: u64) -> Option<Arc<DataWindow>> {
        let mut held = self.held();
        let held = &mut *held;
        let maps = held.files.get_mut(&ino)?;
        if maps.serial != serial {
            return None;
        }
        // Windows past their age go as they are met, not only when a bound pushes them out.
        let before = maps.bytes();
        let kept_for = self.kept_for;
        maps.windows.retain(|k| k.at.elapsed() < kept_for);
        held.bytes -= before - maps.bytes();
        if maps.windows.is_empty() {
            held.files.pop(&ino);
            return None;
        }
        maps.windows.iter().rev().find(|k| k.window.covers(offset, end)).map(|k| k.window.clone())
    }

    /// Keeps `window` of `ino`, fetched under the promise numbered `serial`; maps kept under
    /// another serial are dropped (they are older).
    pub fn keep(&self, ino: u64, serial: u64, window: Arc<DataWindow>) {
        let bytes = window.bytes();
        if bytes > MAP_BYTES_MAX / 4 {
            return;
        }
        let mut held = self.held();
        let held = &mut *held;
        let stale = held.files.peek(&ino).is_some_and(|maps| maps.serial != serial);
        if stale && let Some(old) = held.files.pop(&ino) {
            held.bytes -= old.bytes();
        }
        while held.bytes + bytes > MAP_BYTES_MAX || (held.files.len() == FILES_MAX && !held.files.contains(&ino)) {
            let Some((_, old)) = held.files.pop_lru() else { break };
            held.bytes -= old.bytes();
        }
        let maps = held.files.get_or_insert_mut(ino, || FileMaps { serial, windows: Vec::new() });
        let mut dropped = 0;
        // A window from the same start replaces the older one; past the bound, the oldest goes.
        if let Some(at) = maps.windows.iter().position(|k| k.window.start == window.start) {
            dropped += maps.windows.remove(at).bytes;
        }
        if maps.windows.len() == WINDOWS_PER_FILE_MAX {
            dropped += maps.windows.remove(0).bytes;
        }
        maps.windows.push(Kept { window, at: Instant::now(), bytes });
        held.bytes = held.bytes + bytes - dropped;
        debug_assert_eq!(held.bytes, held.files.iter().map(|(_, m)| m.bytes()).sum::<usize>());
    }

    /// Drops what is kept of `ino` (its blocks' tokens were refused, or a read through the
    /// map failed).
    pub fn forget(&self, ino: u64) {
        let mut held = self.held();
        if let Some(old) = held.files.pop(&ino) {
            held.bytes -= old.bytes();
        }
    }

    /// Drops every map.
    pub fn clear(&self) {
        let mut held = self.held();
        held.files.clear();
        held.bytes = 0;
    }

    /// Bytes kept, for metrics and tests.
    pub fn bytes(&self) -> usize {
        self.held().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: u64, end: u64, size: u64, inline: usize) -> Arc<DataWindow> {
        let extent =
            pb::Extent { offset: start, len: inline as u64, inline_data: vec![7; inline], ..Default::default() };
        Arc::new(DataWindow { start, end, size, extents: vec![extent], servers: Arc::new(HashMap::new()) })
    }

    #[test]
    fn a_window_answers_reads_it_covers_under_its_serial_only() {
        let maps = DataMaps::default();
        maps.keep(5, 1, window(0, 100, 1000, 10));
        assert!(maps.get(5, 1, 0, 100).is_some());
        assert!(maps.get(5, 1, 50, 150).is_none(), "past the window's end");
        assert!(maps.get(5, 2, 0, 10).is_none(), "another promise");
        maps.keep(5, 1, window(100, 1000, 1000, 10));
        assert!(maps.get(5, 1, 500, 5000).is_some(), "the window that reaches the end covers reads past it");
        // A newer promise drops what the older one kept.
        maps.keep(5, 2, window(0, 100, 1000, 10));
        assert!(maps.get(5, 1, 0, 10).is_none());
        assert!(maps.get(5, 2, 100, 200).is_none());
        maps.forget(5);
        assert!(maps.get(5, 2, 0, 10).is_none());
        assert_eq!(maps.bytes(), 0);
    }

    #[test]
    fn kept_bytes_stay_bounded_and_counted() {
        let maps = DataMaps::default();
        let inline = 1024 * 1024;
        for ino in 0..100 {
            for start in 0..3 {
                maps.keep(ino, 1, window(start * 10, start * 10 + 10, 1000, inline));
            }
        }
        assert!(maps.bytes() <= MAP_BYTES_MAX);
        assert!(maps.bytes() > MAP_BYTES_MAX / 2);
        assert!(maps.get(99, 1, 20, 30).is_some(), "the newest is kept");
        assert!(maps.get(0, 1, 0, 10).is_none(), "the oldest went first");
        for start in 0..20 {
            maps.keep(200, 1, window(start * 10, start * 10 + 10, 1000, 10));
        }
        assert!(maps.get(200, 1, 0, 10).is_none(), "past the windows kept per file, the oldest goes");
        assert!(maps.get(200, 1, 190, 200).is_some());
    }

    #[test]
    fn a_window_past_its_age_answers_nothing_and_is_dropped_when_met() {
        let maps = DataMaps { kept_for: Duration::from_secs(1), ..DataMaps::default() };
        maps.keep(5, 1, window(0, 100, 1000, 10));
        maps.keep(6, 1, window(0, 100, 1000, 10));
        assert!(maps.get(5, 1, 0, 10).is_some());
        std::thread::sleep(Duration::from_millis(1100));
        maps.keep(5, 1, window(100, 1000, 1000, 10));
        assert!(maps.get(5, 1, 0, 10).is_none(), "the first window aged out");
        assert!(maps.get(5, 1, 200, 300).is_some(), "the window kept since still answers");
        assert!(maps.get(6, 1, 0, 10).is_none());
        assert_eq!(maps.bytes(), window(100, 1000, 1000, 10).bytes(), "only the young window is counted");
    }
}
