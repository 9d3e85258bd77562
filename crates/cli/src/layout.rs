//! The data directory: a marker naming the file system, with `meta/` and `blocks/` beside it,
//! so a directory of another file system (or not Cairn's at all) is refused.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

const MARKER: &str = "cairn.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Marker {
    pub fs_id: String,
    /// This directory's data server id (0 when it holds no data server).
    pub data_server_id: u64,
    /// This directory's id in the meta group (0 when it holds no meta server yet).
    #[serde(default)]
    pub meta_id: u64,
}

pub fn new_fs_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Reads the marker of `dir`, or writes a new one (naming `new_fs_id`, which may be empty when
/// not known yet) when the directory is new or empty. `expected_fs_id` refuses a directory that
/// belongs to another file system.
pub fn open_or_create(
    dir: &Path,
    new_fs_id: &str,
    expected_fs_id: Option<&str>,
    data_server: bool,
) -> Result<(Marker, bool)> {
    let marker_path = dir.join(MARKER);
    if marker_path.exists() {
        let text =
            std::fs::read_to_string(&marker_path).with_context(|| format!("reading {}", marker_path.display()))?;
        let mut marker: Marker =
            serde_json::from_str(&text).with_context(|| format!("{} is not a Cairn marker", marker_path.display()))?;
        if let Some(expected) = expected_fs_id
            && !marker.fs_id.is_empty()
            && marker.fs_id != expected
        {
            bail!(
                "{} belongs to file system {}, not {expected}: use another directory for this file system",
                dir.display(),
                marker.fs_id
            );
        }
        if data_server && marker.data_server_id == 0 {
            marker.data_server_id = rand::random::<u64>() >> 1 | 1;
            write(&marker_path, &marker)?;
        }
        return Ok((marker, false));
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty and holds no Cairn file system: give an empty or new directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = Marker {
        fs_id: new_fs_id.to_string(),
        data_server_id: if data_server { rand::random::<u64>() >> 1 | 1 } else { 0 },
        meta_id: 0,
    };
    write(&marker_path, &marker)?;
    Ok((marker, true))
}

pub fn update(dir: &Path, marker: &Marker) -> Result<()> {
    write(&dir.join(MARKER), marker)
}

fn write(path: &Path, marker: &Marker) -> Result<()> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, serde_json::to_vec_pretty(marker)?).with_context(|| format!("writing {}", temp.display()))?;
    std::fs::File::open(&temp)?.sync_all()?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

pub fn meta_dir(dir: &Path) -> PathBuf {
    dir.join("meta")
}

pub fn blocks_dir(dir: &Path) -> PathBuf {
    dir.join("blocks")
}
