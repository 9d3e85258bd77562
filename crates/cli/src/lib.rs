//! The roles and tools behind the `cairn` command, as a library so tests and examples can start
//! a node in-process.

pub mod bench;
pub mod cluster;
pub mod credentials;
pub mod dev_cluster;
pub mod layout;
pub mod registration;
pub mod renewal;
pub mod roles;
pub mod security;
pub mod status;
