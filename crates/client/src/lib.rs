//! Cairn's client library: everything a mount or a tool needs to use a Cairn file system.
//! It talks to the meta leader (following redirects, retrying with backoff until a deadline,
//! every mutation exactly-once through its session), moves blocks to and from data servers
//! with end-to-end verification, and buffers writes until close or fsync.

pub mod blocks;
pub mod callbacks;
pub mod copy_sync;
pub mod copy_volume;
pub mod data_maps;
pub mod delegations;
pub mod disk_cache;
pub mod error;
pub mod files;
pub mod locks;
pub mod meta;
pub mod whole_copies;

use std::sync::Arc;

pub use error::{ClientError, ClientResult};
pub use files::{Files, OpenFile};
pub use meta::{MetaConnection, RetryPolicy};

/// A connected client: the meta connection, the block store and the open files.
pub struct Client {
    pub meta: Arc<MetaConnection>,
    pub blocks: Arc<blocks::BlockStore>,
    pub files: Files,
    pub locks: Arc<locks::Locks>,
    /// Whole-file copies the kernel may read from directly (`ClientOptions::whole_copies`).
    pub copies: Option<Arc<whole_copies::WholeCopies>>,
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub retry: RetryPolicy,
    /// Memory for verified pieces kept for re-reads.
    pub cache_bytes: usize,
    pub uploads_in_flight: usize,
    /// Where pieces are cached on disk across mounts: a subdirectory named by the file system
    /// id is used. None: no disk cache.
    pub disk_cache_dir: Option<std::path::PathBuf>,
    pub disk_cache_bytes: u64,
    /// What requests do once the callback lease ran out and meta cannot be reached.
    pub partition: callbacks::PartitionPolicy,
    /// Keep whole-file copies of large cached files beside the disk cache (its directory and
    /// size limit), for the kernel to read from directly. Needs the disk cache.
    pub whole_copies: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retry: RetryPolicy::default(),
            cache_bytes: 256 * 1024 * 1024,
            uploads_in_flight: 8,
            disk_cache_dir: None,
            disk_cache_bytes: 1024 * 1024 * 1024,
            partition: callbacks::PartitionPolicy::default(),
            whole_copies: false,
        }
    }
}

impl Client {
    pub async fn connect(
        addresses: Vec<String>,
        client_name: String,
        options: ClientOptions,
    ) -> ClientResult<Arc<Client>> {
        let meta = MetaConnection::connect(addresses, client_name, options.retry, options.partition).await?;
        let disk = match &options.disk_cache_dir {
            Some(dir) if options.disk_cache_bytes > 0 && !meta.fs_id.is_empty() => {
                let pieces = dir.join(&meta.fs_id);
                match disk_cache::DiskCache::open(&pieces, options.disk_cache_bytes) {
                    Ok(cache) => Some((cache, dir.join(format!("{}.whole", meta.fs_id)))),
                    Err(e) => {
                        tracing::warn!(dir = %pieces.display(), error = %e, "no on-disk cache (another mount may use it)");
                        None
                    }
                }
            }
            _ => None,
        };
        // Copies sit beside the pieces and are used only by the mount holding the pieces' lock.
        let copies = match &disk {
            Some((_, dir)) if options.whole_copies => {
                match whole_copies::WholeCopies::open(dir, options.disk_cache_bytes, whole_copies::Revocation::ShutDown)
                {
                    Ok(copies) => Some(Arc::new(copies)),
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "no whole-file copies");
                        None
                    }
                }
            }
            _ => None,
        };
        let disk = disk.map(|(cache, _)| cache);
        let blocks = Arc::new(blocks::BlockStore::new(meta.clone(), options.cache_bytes, disk));
        let locks = Arc::new(locks::Locks::new(meta.clone()));
        let files = Files::new(meta.clone(), blocks.clone(), locks.clone(), options.uploads_in_flight);
        Ok(Arc::new(Client { meta, blocks, files, locks, copies }))
    }

    /// Keeps the session and the callback stream alive and hands unlinked inodes this client no longer holds back to
    /// meta, until the returned task is aborted.
    pub fn spawn_heartbeat(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let client = self.clone();
        let callbacks = self.meta.callbacks.spawn(self.meta.clone());
        let sender = tokio::spawn(self.meta.delegations.clone().run(self.meta.clone()));
        tokio::spawn(async move {
            let _callbacks = callbacks::AbortOnDrop(callbacks);
            let _sender = callbacks::AbortOnDrop(sender);
            let period = meta::heartbeat_period(client.meta.lease);
            loop {
                tokio::time::sleep(period).await;
                match client.meta.heartbeat().await {
                    Ok(orphans) => {
                        for handle in orphans {
                            if !client.files.is_open(handle.ino) {
                                client.release_orphan(handle).await;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "session heartbeat failed"),
                }
            }
        })
    }

    /// Tells meta this session no longer holds an unlinked inode.
    pub async fn release_orphan(&self, handle: cairn_proto::FileHandle) {
        let op = cairn_proto::mutate_request::Op::Release(cairn_proto::ReleaseOp { target: Some(handle) });
        if let Err(e) = self.meta.mutate(&cairn_proto::Caller::default(), op).await {
            tracing::warn!(ino = handle.ino, error = %e, "releasing unlinked inode failed");
        }
    }
}
