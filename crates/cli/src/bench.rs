//! `cairn bench`: the same workloads on a Cairn mount and on the local disk, in one run, with
//! the ratio. Cairn runs as a one-node file system in this process, its data on the same disk
//! as the local workload, so the ratio measures what Cairn costs over the disk it sits on.
//!
//! Cold reads drop the kernel's page cache and remount Cairn (a new client, empty caches).
//!
//! With `--mount`, the Cairn side is an existing mount (a cluster, say) instead: the kernel's
//! cache is still dropped before reads, but that mount's client keeps its caches, so its read
//! figures are not cold and the report says so.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_mount::{MountOptions, Mounted};

use crate::roles::LocalNode;

pub struct BenchOptions {
    pub dir: PathBuf,
    pub size_mib: u64,
    pub files: u64,
    pub random_reads: u64,
    pub runs: usize,
    /// An existing Cairn mount to measure instead of a one-node file system in this process.
    pub mount: Option<PathBuf>,
    /// TLS or plaintext, for the one-node file system.
    pub transport: crate::security::Transport,
}

const CHUNK: usize = 1024 * 1024;

struct Target {
    dir: PathBuf,
}

/// Figures of one run on one target.
#[derive(Default, Clone)]
struct Figures {
    write_mb_s: f64,
    read_mb_s: f64,
    random_read_iops: f64,
    create_per_s: f64,
    stat_per_s: f64,
    small_read_per_s: f64,
    remove_per_s: f64,
}

fn drop_page_cache() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn rate(count: f64, elapsed: Duration) -> f64 {
    count / elapsed.as_secs_f64().max(1e-9)
}

fn sequential_write(path: &Path, size: u64, chunk: &[u8]) -> Result<f64> {
    let started = Instant::now();
    let mut file = File::create(path)?;
    let mut written = 0;
    while written < size {
        file.write_all(chunk)?;
        written += chunk.len() as u64;
    }
    file.sync_all()?;
    drop(file);
    Ok(rate(size as f64 / 1e6, started.elapsed()))
}

/// Whether `data`, read at `offset` of a file made of `chunk` repeated, is what was written.
fn matches_written(chunk: &[u8], offset: u64, data: &[u8]) -> bool {
    let mut at = (offset % chunk.len() as u64) as usize;
    let mut rest = data;
    while !rest.is_empty() {
        let take = rest.len().min(chunk.len() - at);
        if rest[..take] != chunk[at..at + take] {
            return false;
        }
        rest = &rest[take..];
        at = 0;
    }
    true
}

/// Reads the file through, checking every byte against what was written (a figure for wrong
/// data would be worthless).
fn sequential_read(path: &Path, size: u64, chunk: &[u8]) -> Result<f64> {
    let started = Instant::now();
    let mut file = File::open(path)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        if !matches_written(chunk, total, &buffer[..n]) {
            bail!("{} holds other data than written at offset {total}", path.display());
        }
        total += n as u64;
    }
    if total != size {
        bail!("read {total} bytes of {size} from {}", path.display());
    }
    Ok(rate(size as f64 / 1e6, started.elapsed()))
}

fn random_reads(path: &Path, size: u64, count: u64, chunk: &[u8]) -> Result<f64> {
    let file = File::open(path)?;
    let mut buffer = vec![0u8; 4096];
    let blocks = size / 4096;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let started = Instant::now();
    for _ in 0..count {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % blocks) * 4096;
        file.read_exact_at(&mut buffer, offset)?;
        if !matches_written(chunk, offset, &buffer) {
            bail!("{} holds other data than written at offset {offset}", path.display());
        }
    }
    Ok(rate(count as f64, started.elapsed()))
}

fn small_files(dir: &Path, files: u64) -> Result<(f64, f64, f64, f64)> {
    let dir = dir.join("small");
    fs::create_dir_all(&dir)?;
    let data = pattern(4096, 7);
    let started = Instant::now();
    for i in 0..files {
        let mut file = OpenOptions::new().write(true).create_new(true).open(dir.join(format!("f{i}")))?;
        file.write_all(&data)?;
    }
    let create = rate(files as f64, started.elapsed());
    let started = Instant::now();
    for i in 0..files {
        fs::metadata(dir.join(format!("f{i}")))?;
    }
    let stat = rate(files as f64, started.elapsed());
    let started = Instant::now();
    let mut buffer = Vec::with_capacity(4096);
    for i in 0..files {
        buffer.clear();
        File::open(dir.join(format!("f{i}")))?.read_to_end(&mut buffer)?;
    }
    let read = rate(files as f64, started.elapsed());
    let started = Instant::now();
    for i in 0..files {
        fs::remove_file(dir.join(format!("f{i}")))?;
    }
    let remove = rate(files as f64, started.elapsed());
    fs::remove_dir(&dir)?;
    Ok((create, stat, read, remove))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The Cairn side of the comparison.
enum Side {
    /// A one-node file system served and mounted by this process, remounted to go cold.
    InProcess { local: Box<LocalNode>, mounted: Option<Mounted>, mount_dir: PathBuf },
    /// A mount someone else runs.
    External,
}

impl Side {
    fn remount(&mut self, runtime: &tokio::runtime::Runtime) -> Result<()> {
        if let Side::InProcess { local, mounted, mount_dir, .. } = self {
            if let Some(m) = mounted.take() {
                m.unmount()?;
            }
            drop_page_cache();
            let client = runtime.block_on(local.client("bench"))?;
            *mounted = Some(cairn_mount::mount(client, runtime.handle().clone(), mount_dir, MountOptions::default())?);
        } else {
            drop_page_cache();
        }
        Ok(())
    }

    fn stop(self, runtime: &tokio::runtime::Runtime) -> Result<()> {
        if let Side::InProcess { local, mut mounted, .. } = self {
            if let Some(m) = mounted.take() {
                m.unmount()?;
            }
            runtime.block_on(local.stop());
        }
        Ok(())
    }
}

pub fn bench(runtime: &tokio::runtime::Runtime, options: BenchOptions) -> Result<()> {
    let local_dir = options.dir.join("local");
    fs::create_dir_all(&local_dir).with_context(|| format!("creating {}", local_dir.display()))?;
    let (mut side, mount_dir) = match &options.mount {
        Some(mount) => {
            let dir = mount.join("cairn-bench");
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            (Side::External, dir)
        }
        None => {
            let data_dir = options.dir.join("cairn-data");
            let mount_dir = options.dir.join("cairn-mount");
            fs::create_dir_all(&mount_dir).with_context(|| format!("creating {}", mount_dir.display()))?;
            let listen = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
                probe.local_addr()?.to_string()
            };
            let local = runtime.block_on(LocalNode::start(&data_dir, &listen, options.transport))?;
            let mut side = Side::InProcess { local: Box::new(local), mounted: None, mount_dir: mount_dir.clone() };
            side.remount(runtime)?;
            (side, mount_dir)
        }
    };
    let go_cold = |side: &mut Side| side.remount(runtime);
    let targets = [Target { dir: local_dir.clone() }, Target { dir: mount_dir.clone() }];
    let size = options.size_mib * 1024 * 1024;
    let chunk = pattern(CHUNK, 42);
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(), Vec::new()];
    let dropped = drop_page_cache();
    if !dropped {
        eprintln!("bench: cannot drop the page cache (needs root): cold reads are warm");
    }
    for run in 1..=options.runs {
        let mut figures = [Figures::default(), Figures::default()];
        for (i, target) in targets.iter().enumerate() {
            figures[i].write_mb_s = sequential_write(&target.dir.join("big"), size, &chunk)?;
        }
        go_cold(&mut side)?;
        for (i, target) in targets.iter().enumerate() {
            figures[i].read_mb_s = sequential_read(&target.dir.join("big"), size, &chunk)?;
        }
        go_cold(&mut side)?;
        for (i, target) in targets.iter().enumerate() {
            figures[i].random_read_iops = random_reads(&target.dir.join("big"), size, options.random_reads, &chunk)?;
            fs::remove_file(target.dir.join("big"))?;
        }
        for (i, target) in targets.iter().enumerate() {
            let (create, stat, read, remove) = small_files(&target.dir, options.files)?;
            figures[i].create_per_s = create;
            figures[i].stat_per_s = stat;
            figures[i].small_read_per_s = read;
            figures[i].remove_per_s = remove;
        }
        eprintln!("bench: run {run} of {} done", options.runs);
        for (i, f) in figures.into_iter().enumerate() {
            results[i].push(f);
        }
    }
    side.stop(runtime)?;
    report(&options, &results);
    Ok(())
}

/// A report row: workload, unit, and the figure it reads.
type Row = (&'static str, &'static str, fn(&Figures) -> f64);

fn report(options: &BenchOptions, results: &[Vec<Figures>]) {
    let rows: [Row; 7] = [
        ("sequential write + fsync", "MB/s", |f| f.write_mb_s),
        ("sequential read, cold", "MB/s", |f| f.read_mb_s),
        ("4 KiB random read, cold", "IOPS", |f| f.random_read_iops),
        ("create + 4 KiB write", "files/s", |f| f.create_per_s),
        ("stat", "files/s", |f| f.stat_per_s),
        ("open + read 4 KiB", "files/s", |f| f.small_read_per_s),
        ("remove", "files/s", |f| f.remove_per_s),
    ];
    println!(
        "workloads: {} MiB file, {} random reads, {} small files; median of {} runs",
        options.size_mib, options.random_reads, options.files, options.runs
    );
    if let Some(mount) = &options.mount {
        println!("cairn: the mount at {} (its client caches stay warm: read figures are not cold)", mount.display());
    }
    println!("{:<26} {:>14} {:>14} {:>8}", "workload", "local disk", "cairn", "ratio");
    for (name, unit, get) in rows {
        let local = median(results[0].iter().map(get).collect());
        let cairn = median(results[1].iter().map(get).collect());
        println!("{name:<26} {:>9.0} {unit:<4} {:>9.0} {unit:<4} {:>7.2}x", local, cairn, cairn / local);
    }
}
