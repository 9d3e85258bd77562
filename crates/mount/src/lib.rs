//! Cairn's FUSE mount: the kernel-facing layer. Every operation goes through the client
//! library, so a mount on the server's own machine takes the same path as one elsewhere.

pub mod convert;
pub mod fs;
pub mod mount;
pub mod names;

pub use fs::{CairnFs, MountOptions};
pub use mount::{MountError, Mounted, mount};
