//! Cairn's metadata service: the namespace (inodes, directory entries, attributes, xattrs, the
//! map from files to blocks, sessions and the exactly-once result table) as a replicated state
//! machine on openraft, stored in redb. A one-node file system is a one-member Raft group: the
//! same code runs three or five members.

pub mod access;
pub mod credentials;
pub mod delegation;
pub mod extents;
pub mod lock_table;
pub mod locks;
pub mod model;
pub mod namespace;
pub mod network;
pub mod node;
pub mod promises;
pub mod query;
pub mod raft_types;
pub mod repair;
pub mod service;
pub mod store;

pub use node::{Bootstrap, MetaConfig, MetaError, MetaNode};
pub use service::MetaService;
