//! Cairn's data server: immutable blocks, each verified by its BLAKE3 piece hashes on the way in
//! and on every read. It knows nothing about files; meta decides what a block means.

pub mod scrub;
pub mod server;
pub mod tokens;
pub mod volume;

pub use server::DataService;
pub use volume::{Volume, VolumeError};
