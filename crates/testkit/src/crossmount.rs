//! A random-operations checker of close-to-open coherence across mounts. A seeded stream of
//! whole-file writes, writes into a range, appends, truncates, renames, unlinks, mode changes,
//! a directory made and removed, reads, stats and listings runs on a small namespace, each
//! operation on one of several mounts of one file system, and each finished (its file closed)
//! before the next starts. An in-memory model says
//! what every file holds: whatever mount the next operation runs on, it must see the model,
//! with no wait. The first divergence fails with the seed, the operation number, the mount and
//! the last operations, so that a failing run replays from its seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, anyhow};

use crate::fsx::{Rng, describe_io, hex, read_fully};
use crate::op_times::OpTimes;

/// How many recent operations a failure report lists.
const HISTORY: usize = 24;
/// Directories of the namespace, under the checker's own directory ("" is that directory).
/// The last one comes and goes (made and removed by the operations); the others stay.
const DIRS: [&str; 4] = ["", "d0", "d1", "d2"];
const COMING_AND_GOING: &str = "d2";
/// Modes a change of mode picks from.
const MODES: [u32; 5] = [0o600, 0o640, 0o644, 0o664, 0o400];
/// File names per directory.
const FILES_PER_DIR: u64 = 4;

#[derive(Clone, Debug)]
pub struct CrossMountConfig {
    /// Seeds the operation stream and the data written; a run replays exactly from it.
    pub seed: u64,
    /// No file grows past this many bytes; one whole-file write in eight is at least a quarter
    /// of it (large files take other paths in a client: blocks, whole-file copies).
    pub max_file_len: u64,
    /// Largest small write, write into a range, append and range read.
    pub max_op_len: u64,
}

impl Default for CrossMountConfig {
    fn default() -> CrossMountConfig {
        CrossMountConfig { seed: 1, max_file_len: 3 * 1024 * 1024 + 777, max_op_len: 64 * 1024 }
    }
}

/// One operation: what it does, to which name, on which mount (an index into the mounts).
#[derive(Clone, Debug)]
pub enum Op {
    Write { mount: usize, path: String, len: u64 },
    WriteAt { mount: usize, path: String, offset: u64, len: u64 },
    Append { mount: usize, path: String, len: u64 },
    Truncate { mount: usize, path: String, size: u64 },
    Rename { mount: usize, from: String, to: String },
    Unlink { mount: usize, path: String },
    Read { mount: usize, path: String },
    ReadAt { mount: usize, path: String, offset: u64, len: u64 },
    Chmod { mount: usize, path: String, mode: u32 },
    Mkdir { mount: usize },
    Rmdir { mount: usize },
    Stat { mount: usize, path: String },
    List { mount: usize, dir: String },
}

impl Op {
    /// The operation's kind, as named in [`CrossMount::stats`].
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write whole",
            Op::WriteAt { .. } => "write range",
            Op::Append { .. } => "append",
            Op::Truncate { .. } => "truncate",
            Op::Rename { .. } => "rename",
            Op::Unlink { .. } => "unlink",
            Op::Read { .. } => "read whole",
            Op::ReadAt { .. } => "read range",
            Op::Chmod { .. } => "chmod",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Stat { .. } => "stat",
            Op::List { .. } => "list",
        }
    }

    fn mount(&self) -> usize {
        match *self {
            Op::Write { mount, .. }
            | Op::WriteAt { mount, .. }
            | Op::Append { mount, .. }
            | Op::Truncate { mount, .. }
            | Op::Rename { mount, .. }
            | Op::Unlink { mount, .. }
            | Op::Read { mount, .. }
            | Op::ReadAt { mount, .. }
            | Op::Chmod { mount, .. }
            | Op::Mkdir { mount }
            | Op::Rmdir { mount }
            | Op::Stat { mount, .. }
            | Op::List { mount, .. } => mount,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write { mount, path, len } => write!(f, "mount {mount}: write {path} whole, {len} bytes"),
            Op::WriteAt { mount, path, offset, len } => {
                write!(f, "mount {mount}: write {path} at {offset:#x}, {len} bytes")
            }
            Op::Append { mount, path, len } => write!(f, "mount {mount}: append {len} bytes to {path}"),
            Op::Truncate { mount, path, size } => write!(f, "mount {mount}: truncate {path} to {size:#x} ({size})"),
            Op::Rename { mount, from, to } => write!(f, "mount {mount}: rename {from} to {to}"),
            Op::Unlink { mount, path } => write!(f, "mount {mount}: unlink {path}"),
            Op::Read { mount, path } => write!(f, "mount {mount}: read {path} whole"),
            Op::ReadAt { mount, path, offset, len } => {
                write!(f, "mount {mount}: read {path} at {offset:#x}, {len} bytes")
            }
            Op::Chmod { mount, path, mode } => write!(f, "mount {mount}: chmod {path} to {mode:o}"),
            Op::Mkdir { mount } => write!(f, "mount {mount}: mkdir {COMING_AND_GOING}"),
            Op::Rmdir { mount } => write!(f, "mount {mount}: rmdir {COMING_AND_GOING}"),
            Op::Stat { mount, path } => write!(f, "mount {mount}: stat {path}"),
            Op::List { mount, dir } => write!(f, "mount {mount}: list {dir:?}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Write,
    WriteAt,
    Append,
    Truncate,
    Rename,
    Unlink,
    Read,
    ReadAt,
    Chmod,
    Mkdir,
    Rmdir,
    Stat,
    List,
}

/// Relative weights of the operation kinds.
const WEIGHTS: [(Kind, u64); 13] = [
    (Kind::Write, 14),
    (Kind::WriteAt, 12),
    (Kind::Append, 8),
    (Kind::Truncate, 7),
    (Kind::Rename, 6),
    (Kind::Unlink, 4),
    (Kind::Read, 25),
    (Kind::ReadAt, 10),
    (Kind::Chmod, 4),
    (Kind::Mkdir, 2),
    (Kind::Rmdir, 2),
    (Kind::Stat, 8),
    (Kind::List, 6),
];

/// What a file must be.
struct Model {
    data: Vec<u8>,
    mode: u32,
}

pub struct CrossMount {
    /// The checker's directory as each mount sees it.
    roots: Vec<PathBuf>,
    config: CrossMountConfig,
    rng: Rng,
    /// Each file, by its name under the checker's directory.
    files: BTreeMap<String, Model>,
    /// Whether the directory that comes and goes is there.
    coming_dir: bool,
    /// The mode a new file gets (the process's umask applies).
    new_file_mode: u32,
    ops_done: u64,
    history: VecDeque<String>,
    /// Count and total time of each operation kind, in first-seen order.
    stats: OpTimes,
}

impl CrossMount {
    /// Makes the checker's directory `name` (and its subdirectories) through the first mount;
    /// every mount must be a mount of the same file system.
    pub fn new(mounts: &[PathBuf], name: &str, config: CrossMountConfig) -> Result<CrossMount> {
        assert!(!mounts.is_empty(), "no mounts");
        assert!(config.max_op_len > 0 && config.max_file_len >= config.max_op_len, "bad config: {config:?}");
        let roots: Vec<PathBuf> = mounts.iter().map(|m| m.join(name)).collect();
        for dir in DIRS.iter().filter(|d| **d != COMING_AND_GOING) {
            let path = roots[0].join(dir);
            fs::create_dir_all(&path).map_err(|e| anyhow!("making {}: {}", path.display(), describe_io(&e)))?;
        }
        let rng = Rng::new(config.seed);
        let umask = process_umask()?;
        Ok(CrossMount {
            roots,
            config,
            rng,
            files: BTreeMap::new(),
            coming_dir: false,
            new_file_mode: 0o666 & !umask,
            ops_done: 0,
            history: VecDeque::with_capacity(HISTORY),
            stats: OpTimes::default(),
        })
    }

    pub fn ops_done(&self) -> u64 {
        self.ops_done
    }

    /// How many operations of each kind ran and how long they took, one line per kind.
    pub fn stats(&self) -> String {
        self.stats.report(12)
    }

    /// Runs the next `n` operations.
    pub fn run(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            let op = self.choose();
            self.run_op(op)?;
        }
        Ok(())
    }

    /// Lists, stats and reads every name of the namespace on every mount and compares them with
    /// the model.
    pub fn verify_all(&mut self) -> Result<()> {
        for mount in 0..self.roots.len() {
            for dir in DIRS {
                self.run_op(Op::List { mount, dir: dir.to_string() })?;
            }
            for path in self.all_names() {
                self.run_op(Op::Stat { mount, path: path.clone() })?;
                self.run_op(Op::Read { mount, path })?;
            }
        }
        Ok(())
    }

    /// Runs `op` as the next operation, checking it against the model.
    pub fn run_op(&mut self, op: Op) -> Result<()> {
        let number = self.ops_done + 1;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(format!("#{number:>6} {op}"));
        let started = Instant::now();
        self.apply(&op).map_err(|why| {
            let history: Vec<&str> = self.history.iter().map(String::as_str).collect();
            anyhow!(
                "cross-mount check (seed {}) failed at operation #{number}, {op}:\n  {why}\nlast operations:\n{}",
                self.config.seed,
                history.join("\n")
            )
        })?;
        self.stats.add(op.name(), started.elapsed());
        self.ops_done = number;
        Ok(())
    }

    fn all_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dir in DIRS {
            for i in 0..FILES_PER_DIR {
                names.push(if dir.is_empty() { format!("f{i}") } else { format!("{dir}/f{i}") });
            }
        }
        names
    }

    /// A name of the namespace: most often one that exists, when any does.
    fn pick_name(&mut self, existing: bool) -> String {
        if existing && !self.files.is_empty() && !self.rng.one_in(8) {
            let at = self.rng.below(self.files.len() as u64) as usize;
            return self.files.keys().nth(at).expect("in range").clone();
        }
        let names = self.all_names();
        names[self.rng.below(names.len() as u64) as usize].clone()
    }

    fn len_of(&self, path: &str) -> u64 {
        self.files.get(path).map_or(0, |f| f.data.len() as u64)
    }

    fn choose(&mut self) -> Op {
        let mount = self.rng.below(self.roots.len() as u64) as usize;
        let total: u64 = WEIGHTS.iter().map(|(_, w)| w).sum();
        let mut pick = self.rng.below(total);
        let kind = WEIGHTS
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(kind, _)| *kind)
            .expect("a weight is chosen");
        let max_file = self.config.max_file_len;
        let max_op = self.config.max_op_len;
        match kind {
            Kind::Write => {
                let existing = !self.rng.one_in(3);
                let path = self.pick_name(existing);
                let len =
                    if self.rng.one_in(8) { self.rng.range(max_file / 4, max_file) } else { self.rng.range(0, max_op) };
                Op::Write { mount, path, len }
            }
            Kind::WriteAt => {
                let path = self.pick_name(true);
                let size = self.len_of(&path);
                let offset = self.rng.range(0, (size + max_op / 2).min(max_file - 1));
                let len = self.rng.range(1, max_op.min(max_file - offset));
                Op::WriteAt { mount, path, offset, len }
            }
            Kind::Append => {
                let path = self.pick_name(true);
                let room = max_file.saturating_sub(self.len_of(&path));
                let len = self.rng.range(0, max_op.min(room));
                Op::Append { mount, path, len }
            }
            Kind::Truncate => {
                let path = self.pick_name(true);
                let size = self.rng.range(0, (self.len_of(&path) * 2 + 4096).min(max_file));
                Op::Truncate { mount, path, size }
            }
            Kind::Rename => {
                let from = self.pick_name(true);
                let existing = self.rng.one_in(2);
                let to = self.pick_name(existing);
                Op::Rename { mount, from, to }
            }
            Kind::Unlink => Op::Unlink { mount, path: self.pick_name(true) },
            Kind::Read => Op::Read { mount, path: self.pick_name(true) },
            Kind::ReadAt => {
                let path = self.pick_name(true);
                let offset = self.rng.range(0, self.len_of(&path) + 100);
                let len = self.rng.range(1, max_op);
                Op::ReadAt { mount, path, offset, len }
            }
            Kind::Chmod => {
                let path = self.pick_name(true);
                let mode = MODES[self.rng.below(MODES.len() as u64) as usize];
                Op::Chmod { mount, path, mode }
            }
            Kind::Mkdir => Op::Mkdir { mount },
            Kind::Rmdir => Op::Rmdir { mount },
            Kind::Stat => Op::Stat { mount, path: self.pick_name(true) },
            Kind::List => Op::List { mount, dir: DIRS[self.rng.below(DIRS.len() as u64) as usize].to_string() },
        }
    }

    fn data(&mut self, len: u64) -> Vec<u8> {
        let mut data = vec![0u8; len as usize];
        self.rng.fill(&mut data);
        data
    }

    /// Whether directory `dir` of the namespace is there.
    fn dir_present(&self, dir: &str) -> bool {
        dir != COMING_AND_GOING || self.coming_dir
    }

    /// Whether the directory `path` is in is there.
    fn parent_present(&self, path: &str) -> bool {
        self.dir_present(Path::new(path).parent().and_then(Path::to_str).unwrap_or(""))
    }

    /// Checks `result` against whether the model has a file at `path`: the value when it has,
    /// `ENOENT` when it has not.
    fn expect_presence<T>(&self, path: &str, result: io::Result<T>) -> Result<Option<T>, String> {
        expect_found(path, self.files.contains_key(path), result)
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let root = self.roots[op.mount()].clone();
        let at = |path: &str| -> PathBuf { root.join(path) };
        let io = |what: &str, e: io::Error| format!("{what}: {}", describe_io(&e));
        match op {
            Op::Write { path, len, .. } => {
                let data = self.data(*len);
                let opened = OpenOptions::new().write(true).create(true).truncate(true).open(at(path));
                let Some(mut file) = expect_found(path, self.parent_present(path), opened)? else { return Ok(()) };
                file.write_all(&data).map_err(|e| io("write", e))?;
                close(file)?;
                let mode = self.files.get(path).map_or(self.new_file_mode, |f| f.mode);
                self.files.insert(path.clone(), Model { data, mode });
            }
            Op::WriteAt { path, offset, len, .. } => {
                let data = self.data(*len);
                let opened = OpenOptions::new().write(true).open(at(path));
                let Some(file) = self.expect_presence(path, opened)? else { return Ok(()) };
                file.write_all_at(&data, *offset).map_err(|e| io("pwrite", e))?;
                close(file)?;
                let model = &mut self.files.get_mut(path).expect("present").data;
                let end = (*offset + *len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[*offset as usize..end].copy_from_slice(&data);
            }
            Op::Append { path, len, .. } => {
                let data = self.data(*len);
                let opened = OpenOptions::new().append(true).open(at(path));
                let Some(mut file) = self.expect_presence(path, opened)? else { return Ok(()) };
                file.write_all(&data).map_err(|e| io("append", e))?;
                close(file)?;
                self.files.get_mut(path).expect("present").data.extend_from_slice(&data);
            }
            Op::Truncate { path, size, .. } => {
                let opened = OpenOptions::new().write(true).open(at(path));
                let Some(file) = self.expect_presence(path, opened)? else { return Ok(()) };
                file.set_len(*size).map_err(|e| io("ftruncate", e))?;
                close(file)?;
                self.files.get_mut(path).expect("present").data.resize(*size as usize, 0);
            }
            Op::Rename { from, to, .. } => {
                let renamed = fs::rename(at(from), at(to));
                let possible = self.files.contains_key(from) && self.parent_present(to);
                if expect_found(&format!("{from} (to {to})"), possible, renamed)?.is_some() && from != to {
                    let file = self.files.remove(from).expect("present");
                    self.files.insert(to.clone(), file);
                }
            }
            Op::Unlink { path, .. } => {
                if self.expect_presence(path, fs::remove_file(at(path)))?.is_some() {
                    self.files.remove(path);
                }
            }
            Op::Chmod { path, mode, .. } => {
                let changed = fs::set_permissions(at(path), fs::Permissions::from_mode(*mode));
                if self.expect_presence(path, changed)?.is_some() {
                    self.files.get_mut(path).expect("present").mode = *mode;
                }
            }
            Op::Mkdir { .. } => match (self.coming_dir, fs::create_dir(at(COMING_AND_GOING))) {
                (false, Ok(())) => self.coming_dir = true,
                (true, Err(e)) if e.kind() == io::ErrorKind::AlreadyExists => {}
                (present, result) => return Err(format!("the directory is there: {present}; mkdir: {result:?}")),
            },
            Op::Rmdir { .. } => {
                let empty = !self.files.keys().any(|name| name.starts_with(&format!("{COMING_AND_GOING}/")));
                match (self.coming_dir, empty, fs::remove_dir(at(COMING_AND_GOING))) {
                    (true, true, Ok(())) => self.coming_dir = false,
                    (true, false, Err(e)) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                    (false, _, Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    (present, empty, result) => {
                        return Err(format!("the directory is there: {present}, empty: {empty}; rmdir: {result:?}"));
                    }
                }
            }
            Op::Read { path, .. } => {
                if let Some(read) = self.expect_presence(path, fs::read(at(path)))? {
                    compare(&self.files[path].data, 0, &read)?;
                }
            }
            Op::ReadAt { path, offset, len, .. } => {
                let opened = File::open(at(path));
                if let Some(file) = self.expect_presence(path, opened)? {
                    let read = read_fully(&file, *offset, *len).map_err(|e| io("pread", e))?;
                    let model = &self.files[path].data;
                    let start = (*offset as usize).min(model.len());
                    let end = (*offset + *len).min(model.len() as u64) as usize;
                    compare(&model[start..end], *offset, &read)?;
                }
            }
            Op::Stat { path, .. } => {
                if let Some(meta) = self.expect_presence(path, fs::symlink_metadata(at(path)))? {
                    let want = &self.files[path];
                    let mode = meta.permissions().mode() & 0o7777;
                    if !meta.is_file() || meta.len() != want.data.len() as u64 || mode != want.mode {
                        return Err(format!(
                            "stat: a file of {} bytes and mode {:o} expected, found a file: {}, {} bytes, mode {mode:o}",
                            want.data.len(),
                            want.mode,
                            meta.is_file(),
                            meta.len()
                        ));
                    }
                }
            }
            Op::List { dir, .. } => {
                let Some(entries) = expect_found(dir, self.dir_present(dir), fs::read_dir(at(dir)))? else {
                    return Ok(());
                };
                let mut found = BTreeSet::new();
                for entry in entries {
                    let entry = entry.map_err(|e| io("readdir", e))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    found.insert(if dir.is_empty() { name } else { format!("{dir}/{name}") });
                }
                let mut want: BTreeSet<String> = self
                    .files
                    .keys()
                    .filter(|name| Path::new(name).parent() == Some(Path::new(dir.as_str())))
                    .cloned()
                    .collect();
                if dir.is_empty() {
                    want.extend(DIRS.iter().filter(|d| !d.is_empty() && self.dir_present(d)).map(|d| d.to_string()));
                }
                if found != want {
                    return Err(format!("listing: expected {want:?}, found {found:?}"));
                }
            }
        }
        Ok(())
    }
}

/// Checks `result` against whether `what` should be found: the value when it should, `ENOENT`
/// when it should not.
fn expect_found<T>(what: &str, present: bool, result: io::Result<T>) -> Result<Option<T>, String> {
    match (present, result) {
        (true, Ok(value)) => Ok(Some(value)),
        (true, Err(e)) => Err(format!("{what} is there, yet: {}", describe_io(&e))),
        (false, Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        (false, Err(e)) => Err(format!("{what} is not there: expected ENOENT, got {}", describe_io(&e))),
        (false, Ok(_)) => Err(format!("{what} is not there, yet the mount found it")),
    }
}

/// The process's umask, read without setting it (other threads may be making files).
fn process_umask() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).ok_or_else(|| anyhow!("no Umask line"))?;
    Ok(u32::from_str_radix(line.trim(), 8)?)
}

/// Closes `file`, reporting what the close returns (where a client commits).
fn close(file: File) -> Result<(), String> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just taken from the `File`, which no longer closes it.
    if unsafe { libc::close(fd) } != 0 {
        return Err(format!("close: {}", describe_io(&io::Error::last_os_error())));
    }
    Ok(())
}

/// Compares bytes read at `offset` with what the model says is there.
fn compare(want: &[u8], offset: u64, got: &[u8]) -> Result<(), String> {
    if want == got {
        return Ok(());
    }
    let at = want.iter().zip(got).position(|(w, g)| w != g).unwrap_or(want.len().min(got.len()));
    let show = |bytes: &[u8]| hex(&bytes[at.min(bytes.len())..(at + 16).min(bytes.len())]);
    Err(format!(
        "read {} bytes at {offset:#x} where {} were expected; first difference at {:#x}: expected [{}], got [{}]",
        got.len(),
        want.len(),
        offset + at as u64,
        show(want),
        show(got)
    ))
}
