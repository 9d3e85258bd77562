//! The file system whole-file copies live on: an ext4 image of the mount's own, loop-mounted at
//! the copies' directory.
//!
//! Why a file system of their own: the kernel reads a copy behind a passthrough open by itself,
//! and nothing in FUSE takes such an open back. When this client stops trusting its promises
//! (its lease ran out, meta unreachable), a copy may be stale, and a descriptor opened before
//! must not go on reading it. Shutting the copies' file system down (`EXT4_IOC_SHUTDOWN`) does
//! exactly that: from then on every read of a file on it, cached pages included, fails with
//! `EIO`. The copies are gone with it; a new volume is made when copies are wanted again.
//!
//! The image is sparse, has no journal (copies are rebuilt from Cairn, never recovered), and
//! gives freed blocks back to the image file (`discard`). A volume left mounted by a mount that
//! was killed is detached and replaced at the next start on the same cache directory.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `EXT4_IOC_SHUTDOWN`: `_IOR('X', 125, __u32)`, in the generic ioctl encoding (x86, Arm,
/// RISC-V; PowerPC, MIPS and SPARC encode it otherwise, and have no copies volume).
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64"
))]
const EXT4_IOC_SHUTDOWN: Option<libc::c_ulong> = Some((2 << 30) | (4 << 16) | ((b'X' as libc::c_ulong) << 8) | 125);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64"
)))]
const EXT4_IOC_SHUTDOWN: Option<libc::c_ulong> = None;
/// Shut down at once, without flushing the log (there is none) or the data (it is disposable).
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
const EXT4_SUPER_MAGIC: i64 = 0xEF53;
/// Room for ext4's own metadata beside the copies.
const METADATA_BYTES: u64 = 64 * 1024 * 1024;

/// One mounted copies volume.
pub struct CopyVolume {
    dir: PathBuf,
    image: PathBuf,
    /// Shut down or unmounted: nothing on it can be read any more.
    closed: bool,
    /// Unmounted (lazily) and its image removed.
    detached: bool,
}

impl CopyVolume {
    /// Makes a volume able to hold `bytes` of copies and mounts it at `dir`, replacing any
    /// left there. Needs `mkfs.ext4`, loop devices and the right to mount.
    pub fn create(dir: &Path, bytes: u64) -> io::Result<CopyVolume> {
        if EXT4_IOC_SHUTDOWN.is_none() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no ext4 shutdown request on this architecture"));
        }
        let image = dir.with_extension("img");
        detach(dir);
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match fs::remove_file(&image) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::create_dir_all(dir)?;
        let file = OpenOptions::new().write(true).create_new(true).open(&image)?;
        file.set_len(bytes.saturating_add(bytes / 16).saturating_add(METADATA_BYTES))?;
        drop(file);
        let volume = CopyVolume { dir: dir.to_path_buf(), image, closed: false, detached: false };
        // One inode per MiB: copies are 1 MiB and up.
        run(Command::new(tool("mkfs.ext4"))
            .args(["-q", "-F", "-O", "^has_journal", "-T", "largefile", "-m", "0"])
            .arg(&volume.image))?;
        run(Command::new(tool("mount"))
            .args(["-t", "ext4", "-o", "loop,noatime,discard,nosuid,nodev,noexec"])
            .arg(&volume.image)
            .arg(dir))?;
        if !is_ext4_mount(dir) {
            return Err(io::Error::other(format!("{} is not the copies volume after mounting it", dir.display())));
        }
        Ok(volume)
    }

    /// Whether reads of copies on this volume may still be served.
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    /// Makes every read of every file on the volume fail from now on, through descriptors
    /// already open too.
    pub fn shut_down(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let dir = File::open(&self.dir)?;
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 from a live local; the descriptor is open.
        let request = EXT4_IOC_SHUTDOWN.ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, &flags as *const u32) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.closed = true;
        Ok(())
    }

    /// Detaches the volume (files still open on it keep it until they close) and removes its
    /// image.
    pub fn close(&mut self) {
        self.closed = true;
        if std::mem::replace(&mut self.detached, true) {
            return;
        }
        detach(&self.dir);
        if let Err(e) = fs::remove_file(&self.image)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(image = %self.image.display(), error = %e, "removing the copies volume failed");
        }
    }
}

impl Drop for CopyVolume {
    fn drop(&mut self) {
        self.close();
    }
}

/// `name` as found on the search path, or in the system directories root's path holds.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    PathBuf::from(name)
}

fn run(command: &mut Command) -> io::Result<()> {
    let out = command.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{:?} failed ({}): {}",
        command.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Lazily unmounts whatever is mounted at `dir` (nothing, usually).
fn detach(dir: &Path) {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else { return };
    // Stacked mounts (a volume left over below a newer one) come off one per call.
    for _ in 0..8 {
        // SAFETY: `path` is a valid NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            break;
        }
    }
}

/// Whether `dir` is the root of an ext4 file system other than its parent's.
fn is_ext4_mount(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(here), Some(Ok(parent))) = (fs::metadata(dir), dir.parent().map(fs::metadata)) else { return false };
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and `stat` is large enough for the kernel's answer.
    if unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs succeeded and filled it.
    let stat = unsafe { stat.assume_init() };
    // `f_type`'s type differs from one target to another.
    #[allow(clippy::unnecessary_cast)]
    let kind = stat.f_type as i64;
    here.dev() != parent.dev() && kind == EXT4_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::FileExt;

    fn can_mount() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        root && Path::new("/dev/loop-control").exists() && tool("mkfs.ext4").exists()
    }

    #[test]
    fn a_shut_down_volume_fails_reads_through_descriptors_opened_before() {
        if !can_mount() {
            eprintln!("skipping: needs root, loop devices and mkfs.ext4");
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("fs.whole");
        let mut volume = CopyVolume::create(&dir, 64 * 1024 * 1024).unwrap();
        let path = dir.join("copy");
        fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        let mut page = [0u8; 4096];
        file.read_exact_at(&mut page, 0).unwrap();
        assert_eq!(page, [7u8; 4096]);
        volume.shut_down().unwrap();
        assert!(!volume.is_open());
        let err = file.read_exact_at(&mut page, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "a cached page was read after shutdown");
        drop(file);
        // A new volume replaces it at the same place, empty.
        let again = CopyVolume::create(&dir, 64 * 1024 * 1024).unwrap();
        assert!(fs::read_dir(&dir).unwrap().flatten().all(|e| e.file_name() == "lost+found"));
        fs::write(dir.join("copy"), b"new").unwrap();
        let mut text = String::new();
        File::open(dir.join("copy")).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "new");
        drop(again);
        assert!(!is_ext4_mount(&dir), "the volume stays mounted after close");
        assert!(!dir.with_extension("img").exists());
    }
}
