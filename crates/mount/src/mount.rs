//! Mounting and unmounting, with errors that say how to fix the usual problems.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cairn_client::Client;
use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::fs::{CairnFs, MountOptions};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0} does not exist: create it with `mkdir -p {0}`")]
    MissingMountPoint(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{0} is already a mount point: unmount it first (`umount {0}`) or pick another directory")]
    Busy(PathBuf),
    #[error("FUSE is not available: /dev/fuse is missing (load the module with `modprobe fuse`, or install fuse3)")]
    NoFuse,
    #[error("mounting {path} failed: {source}")]
    Mount { path: PathBuf, source: std::io::Error },
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines()
        .any(|line| line.split(' ').nth(4).is_some_and(|mount_point| Path::new(&unescape(mount_point)) == canonical))
}

fn unescape(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// A mounted Cairn file system; unmounts when dropped or on [`Mounted::unmount`].
pub struct Mounted {
    session: Option<BackgroundSession>,
    path: PathBuf,
    client: Arc<Client>,
}

impl Mounted {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts; a busy mount is detached lazily so the process can still exit.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let unmounted = match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "unmount failed; detaching lazily");
                lazy_unmount(&self.path)
            }
        };
        // The whole-file copies' volume is the mount's own: it goes with it.
        if let Some(copies) = &self.client.copies {
            copies.close();
        }
        unmounted
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(path = %self.path.display(), error = %e, "unmount failed");
        }
    }
}

/// Detaches a mount even while it is busy (MNT_DETACH).
pub fn lazy_unmount(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c_path` is a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Mounts the file system `client` is connected to at `path`.
pub fn mount(
    client: Arc<Client>,
    runtime: tokio::runtime::Handle,
    path: &Path,
    options: MountOptions,
) -> Result<Mounted, MountError> {
    if !path.exists() {
        return Err(MountError::MissingMountPoint(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err(MountError::NotADirectory(path.to_path_buf()));
    }
    if is_mount_point(path) {
        return Err(MountError::Busy(path.to_path_buf()));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuse);
    }
    let path = path.canonicalize().map_err(|source| MountError::Mount { path: path.to_path_buf(), source })?;
    let notifier = Arc::new(OnceLock::new());
    // A read-only credential mounts read-only: the kernel then refuses writes itself (EROFS)
    // and meta would refuse them anyway.
    let access = if client.meta.read_only { MountOption::RO } else { MountOption::RW };
    let fs = CairnFs::new(client.clone(), runtime, options, notifier.clone());
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("cairn".into()),
        MountOption::Subtype("cairn".into()),
        MountOption::DefaultPermissions,
        access,
        MountOption::Dev,
        MountOption::Suid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = true;
    let session =
        fuser::spawn_mount(fs, &path, &config).map_err(|source| MountError::Mount { path: path.clone(), source })?;
    let _ = notifier.set(session.notifier());
    Ok(Mounted { session: Some(session), path, client })
}
