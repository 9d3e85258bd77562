//! Moving blocks to and from data servers: uploads placed by the meta leader, reads verified
//! piece by piece against the digest meta holds, and a bounded in-memory cache of verified
//! pieces (blocks never change, so a cached piece is never stale).
//!
//! A block is fetched once however many readers want it at the same time: a fetch in flight is
//! registered, its verified pieces enter the cache as they arrive, and a reader that misses the
//! cache waits for the fetch that covers its pieces instead of starting another. Readahead
//! ([`BlockStore::prefetch`]) uses the same registry, so a sequential reader finds the next
//! block arriving or arrived.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use cairn_proto::data_client::DataClient;
use cairn_proto::{self as pb, BlockId, PIECE_BYTES, digest_of_pieces, piece_hash};
use lru::LruCache;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::disk_cache::DiskCache;
use crate::error::{ClientError, ClientResult};
use crate::meta::{MetaConnection, endpoint};

/// Bytes sent per upload message.
const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;
/// TCP connections to each data server. Each connection's TLS work (encryption on one end,
/// decryption on the other) runs in one task, so one connection puts a whole stream's cipher
/// work on one core at a time; two let blocks in flight use both.
const CONNECTIONS_PER_SERVER: usize = 2;
/// Failed servers one upload remembers to avoid.
const FAILED_SERVERS_MAX: usize = 16;

pub struct BlockStore {
    meta: Arc<MetaConnection>,
    /// [`CONNECTIONS_PER_SERVER`] channels to each data server, used in turn.
    clients: Mutex<HashMap<String, Vec<DataClient<Channel>>>>,
    next_connection: AtomicUsize,
    cache: Mutex<LruCache<(u128, u32), Bytes>>,
    /// Pieces kept on local disk across mounts, behind the memory cache.
    disk: Option<DiskCache>,
    next_block: AtomicU64,
    /// Fetches in flight, by block id: at most one per block.
    fetching: Arc<Mutex<HashMap<u128, Fetching>>>,
    /// Block bytes received from data servers, for metrics and tests.
    pub bytes_fetched: AtomicU64,
}

/// A fetch in flight of pieces `first..=last` of a block. Its pieces enter the cache as they are
/// verified, each batch announced on `progress`; the sender drops when the fetch ends, whether
/// it succeeded or not.
struct Fetching {
    first: u32,
    last: u32,
    progress: Arc<watch::Sender<u32>>,
}

/// Removes its block's entry from the registry when the fetch ends (or is abandoned).
struct FetchingEntry {
    registry: Arc<Mutex<HashMap<u128, Fetching>>>,
    id: u128,
    progress: Arc<watch::Sender<u32>>,
}

impl Drop for FetchingEntry {
    fn drop(&mut self) {
        if let Ok(mut registry) = self.registry.lock()
            && registry.get(&self.id).is_some_and(|f| Arc::ptr_eq(&f.progress, &self.progress))
        {
            registry.remove(&self.id);
        }
    }
}

fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    )
}

impl BlockStore {
    /// `cache_bytes` bounds the memory of verified pieces kept for re-reads.
    pub fn new(meta: Arc<MetaConnection>, cache_bytes: usize, disk: Option<DiskCache>) -> Self {
        let pieces = NonZeroUsize::new((cache_bytes / PIECE_BYTES).max(16)).expect("at least 16 pieces");
        BlockStore {
            meta,
            clients: Mutex::new(HashMap::new()),
            next_connection: AtomicUsize::new(0),
            cache: Mutex::new(LruCache::new(pieces)),
            disk,
            next_block: AtomicU64::new(0),
            fetching: Arc::new(Mutex::new(HashMap::new())),
            bytes_fetched: AtomicU64::new(0),
        }
    }

    fn client(&self, address: &str) -> ClientResult<DataClient<Channel>> {
        let turn = self.next_connection.fetch_add(1, Ordering::Relaxed) % CONNECTIONS_PER_SERVER;
        let mut clients = self.clients.lock().expect("data client pool poisoned");
        if let Some(connections) = clients.get(address) {
            return Ok(connections[turn].clone());
        }
        let endpoint = endpoint(address, &self.meta.policy)?;
        let connections: Vec<_> = (0..CONNECTIONS_PER_SERVER)
            .map(|_| {
                DataClient::new(pb::net::lazy_channel(&endpoint))
                    .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(pb::MAX_MESSAGE_BYTES)
            })
            .collect();
        let client = connections[turn].clone();
        clients.insert(address.to_string(), connections);
        Ok(client)
    }

    fn new_block_id(&self) -> BlockId {
        BlockId::new(self.meta.session(), self.next_block.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Stores `data` as a new block on the servers meta picks. With `sync` it returns once every
    /// copy is durable; without, once every copy is written, and [`BlockStore::sync`] on the
    /// returned addresses must precede any commit naming the block. Retries with fresh
    /// placements until the deadline.
    pub async fn put(&self, data: Bytes, sync: bool) -> ClientResult<StoredBlock> {
        debug_assert!(!data.is_empty() && data.len() <= pb::BLOCK_BYTES_MAX);
        let (_, digest) = pb::block_digest(&data);
        let id = self.new_block_id();
        let started = Instant::now();
        let policy = self.meta.policy.clone();
        let mut backoff = policy.backoff_min;
        // Servers that failed this upload: later placements leave them out.
        let mut failed_servers: Vec<u64> = Vec::new();
        loop {
            let placement = self.meta.place_blocks(1, &failed_servers).await?;
            let servers: Vec<u64> = placement.servers.iter().map(|s| s.id).collect();
            let addresses: Vec<String> = placement.servers.iter().map(|s| s.address.clone()).collect();
            let Some((head, forward)) = addresses.split_first() else {
                return Err(ClientError::Refused {
                    what: "block upload",
                    status: "meta placed the block nowhere".into(),
                });
            };
            let block = pb::BlockRef {
                id_hi: id.hi(),
                id_lo: id.lo(),
                len: data.len() as u32,
                digest: digest.to_vec(),
                servers,
                token: placement.write_token.clone(),
            };
            let status = match self.upload(head, forward, &block, &data, sync).await {
                Ok(()) => {
                    tracing::debug!(block = %id, bytes = data.len(), elapsed_us = started.elapsed().as_micros() as u64, "block stored");
                    // A full block comes from a streaming write: kept in memory, a large file
                    // would sweep the cache of everything else, and the kernel keeps the pages
                    // just written anyway. The disk cache, much larger, takes it.
                    if data.len() < pb::BLOCK_BYTES_MAX {
                        self.insert_pieces(id.0, 0, data.chunks(PIECE_BYTES));
                    } else if let Some(disk) = &self.disk {
                        for (i, piece) in data.chunks(PIECE_BYTES).enumerate() {
                            disk.put(id.0, i as u32, piece);
                        }
                    }
                    return Ok(StoredBlock { block, addresses });
                }
                Err(status) if !transient(&status) => {
                    return Err(ClientError::Refused { what: "block upload", status: status.to_string() });
                }
                Err(status) => status,
            };
            // The chain names the replica that broke it; without a name, the head did.
            let failed = status
                .metadata()
                .get(pb::FAILED_REPLICA_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(head.as_str())
                .to_string();
            if let Some(server) = placement.servers.iter().find(|s| s.address == failed)
                && !failed_servers.contains(&server.id)
            {
                if failed_servers.len() >= FAILED_SERVERS_MAX {
                    failed_servers.remove(0);
                }
                failed_servers.push(server.id);
            }
            if started.elapsed() >= policy.deadline {
                return Err(ClientError::Timeout {
                    what: "block upload",
                    seconds: policy.deadline.as_secs(),
                    last: status.to_string(),
                });
            }
            tracing::debug!(%status, "block upload failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(policy.backoff_max);
        }
    }

    /// Makes every block the servers at `addresses` acknowledged durable.
    pub async fn sync(&self, addresses: impl IntoIterator<Item = &String>) -> ClientResult<()> {
        let policy = self.meta.policy.clone();
        for address in addresses {
            let started = Instant::now();
            let mut backoff = policy.backoff_min;
            loop {
                let mut client = self.client(address)?;
                match client.sync_blocks(pb::SyncBlocksRequest {}).await {
                    Ok(_) => break,
                    Err(status) if transient(&status) && started.elapsed() < policy.deadline => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(policy.backoff_max);
                    }
                    Err(status) => return Err(ClientError::Refused { what: "block sync", status: status.to_string() }),
                }
            }
        }
        Ok(())
    }

    /// Streams a block to `address`, which passes it down the chain of `forward` replicas.
    async fn upload(
        &self,
        address: &str,
        forward: &[String],
        block: &pb::BlockRef,
        data: &Bytes,
        sync: bool,
    ) -> Result<(), tonic::Status> {
        let mut client = self.client(address).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut messages = Vec::with_capacity(data.len() / UPLOAD_CHUNK_BYTES + 1);
        for (i, at) in (0..data.len()).step_by(UPLOAD_CHUNK_BYTES).enumerate() {
            let end = (at + UPLOAD_CHUNK_BYTES).min(data.len());
            messages.push(pb::PutBlockChunk {
                block: (i == 0).then(|| block.clone()),
                data: data.slice(at..end),
                sync: sync && i == 0,
                forward: if i == 0 { forward.to_vec() } else { Vec::new() },
            });
        }
        let reply = client.put_block(tokio_stream::iter(messages)).await?.into_inner();
        if reply.errno != 0 {
            return Err(tonic::Status::internal(format!("data server answered errno {}", reply.errno)));
        }
        Ok(())
    }

    /// Caches verified pieces in memory and on disk. The memory cache holds copies: a slice
    /// would keep its whole network buffer alive and void the cache's bound.
    fn insert_pieces<'p>(&self, id: u128, first_piece: u32, pieces: impl Iterator<Item = &'p [u8]> + Clone) {
        {
            let mut cache = self.cache.lock().expect("block cache poisoned");
            for (i, piece) in pieces.clone().enumerate() {
                cache.put((id, first_piece + i as u32), Bytes::copy_from_slice(piece));
            }
        }
        if let Some(disk) = &self.disk {
            for (i, piece) in pieces.enumerate() {
                disk.put(id, first_piece + i as u32, piece);
            }
        }
    }

    /// Pieces `first..=last` from memory, else from disk (then kept in memory too).
    fn cached(&self, id: u128, first: u32, last: u32) -> Option<Vec<Bytes>> {
        self.in_memory(id, first, last).or_else(|| self.on_disk(id, first, last))
    }

    fn in_memory(&self, id: u128, first: u32, last: u32) -> Option<Vec<Bytes>> {
        let mut cache = self.cache.lock().expect("block cache poisoned");
        (first..=last).map(|piece| cache.get(&(id, piece)).cloned()).collect()
    }

    /// Reads pieces back from the disk cache (verified there) into the memory cache.
    fn on_disk(&self, id: u128, first: u32, last: u32) -> Option<Vec<Bytes>> {
        let disk = self.disk.as_ref()?;
        let pieces: Vec<Bytes> = (first..=last).map(|piece| disk.get(id, piece)).collect::<Option<_>>()?;
        let mut cache = self.cache.lock().expect("block cache poisoned");
        for (i, piece) in pieces.iter().enumerate() {
            cache.put((id, first + i as u32), piece.clone());
        }
        Some(pieces)
    }

    /// Fills `dest` with the block's bytes from `offset`. With `whole_rest`, fetches through
    /// the end of the block so that the sequential reads that follow hit the cache.
    pub async fn read_into(
        &self,
        block: &pb::BlockRef,
        servers: &HashMap<u64, String>,
        offset: u32,
        dest: &mut [u8],
        whole_rest: bool,
    ) -> ClientResult<()> {
        let id = BlockId::of(block);
        if dest.is_empty() {
            return Ok(());
        }
        let end = offset as usize + dest.len();
        if end > block.len as usize {
            return Err(ClientError::Errno(pb::errno::EIO));
        }
        let first = (offset as usize / PIECE_BYTES) as u32;
        let last = ((end - 1) / PIECE_BYTES) as u32;
        let pieces = self.pieces(block, servers, first, last, whole_rest).await?;
        let mut at = offset as usize - first as usize * PIECE_BYTES;
        let mut filled = 0;
        for piece in &pieces {
            let take = piece.len().saturating_sub(at).min(dest.len() - filled);
            let source = piece.get(at..at + take).ok_or_else(|| ClientError::Corrupt(id.to_string()))?;
            dest[filled..filled + take].copy_from_slice(source);
            filled += take;
            at = 0;
        }
        if filled != dest.len() {
            return Err(ClientError::Corrupt(id.to_string()));
        }
        Ok(())
    }

    /// Pieces `first..=last` of a block: from the cache, from a fetch in flight that covers
    /// them, or fetched (through the end of the block with `whole_rest`).
    async fn pieces(
        &self,
        block: &pb::BlockRef,
        servers: &HashMap<u64, String>,
        first: u32,
        last: u32,
        whole_rest: bool,
    ) -> ClientResult<Vec<Bytes>> {
        let id = BlockId::of(block).0;
        if let Some(pieces) = self.cached(id, first, last) {
            return Ok(pieces);
        }
        // Time spent waiting for another fetch counts against this read's deadline.
        let started = Instant::now();
        let joined = {
            let registry = self.fetching.lock().expect("fetch registry poisoned");
            registry.get(&id).filter(|f| f.first <= first && last <= f.last).map(|f| f.progress.subscribe())
        };
        if let Some(mut progress) = joined {
            // Only memory inside the loop: the fetch puts each piece there as it is verified,
            // and probing the disk cache at every piece would repeat its reads.
            loop {
                if let Some(pieces) = self.in_memory(id, first, last) {
                    return Ok(pieces);
                }
                if progress.changed().await.is_err() {
                    break;
                }
            }
            // The fetch ended without them (it failed, or they were evicted): fetch here.
            if let Some(pieces) = self.cached(id, first, last) {
                return Ok(pieces);
            }
        }
        let fetch_last = if whole_rest { ((block.len as usize - 1) / PIECE_BYTES) as u32 } else { last };
        let (progress, _entry) = self.register(id, first, fetch_last);
        let mut fetched = self.fetch(block, servers, first, fetch_last, &progress, started).await?;
        fetched.truncate((last - first + 1) as usize);
        Ok(fetched)
    }

    /// Registers a fetch of pieces `first..=last` unless one of the block is in flight already
    /// (then the fetch goes on unregistered, and `progress` has no listener).
    fn register(&self, id: u128, first: u32, last: u32) -> (Arc<watch::Sender<u32>>, Option<FetchingEntry>) {
        let progress = Arc::new(watch::Sender::new(first));
        let mut registry = self.fetching.lock().expect("fetch registry poisoned");
        if registry.contains_key(&id) {
            return (progress, None);
        }
        registry.insert(id, Fetching { first, last, progress: progress.clone() });
        let entry = FetchingEntry { registry: self.fetching.clone(), id, progress: progress.clone() };
        (progress, Some(entry))
    }

    /// Starts fetching a block from `offset` to its end in the background (from the disk cache
    /// when it holds it), unless it is in memory or being fetched: readahead for sequential
    /// readers.
    pub fn prefetch(self: &Arc<Self>, block: pb::BlockRef, offset: u32, servers: Arc<HashMap<u64, String>>) {
        if offset >= block.len {
            return;
        }
        let id = BlockId::of(&block).0;
        let first = offset / PIECE_BYTES as u32;
        let last = (block.len - 1) / PIECE_BYTES as u32;
        if self.is_cached(id, first, last) {
            return;
        }
        // Registered before the task starts, so that a read arriving meanwhile joins it.
        let (progress, Some(entry)) = self.register(id, first, last) else { return };
        let store = self.clone();
        tokio::spawn(async move {
            let _entry = entry;
            // The disk cache may hold it (and then serves it even with every server away).
            if store.cached(id, first, last).is_some() {
                return;
            }
            if let Err(e) = store.fetch(&block, &servers, first, last, &progress, Instant::now()).await {
                tracing::debug!(error = %e, "readahead failed");
            }
        });
    }

    /// Whether pieces `first..=last` of a block are in the memory cache (the disk cache is not
    /// asked: readahead only needs to know whether to fetch).
    fn is_cached(&self, id: u128, first: u32, last: u32) -> bool {
        let cache = self.cache.lock().expect("block cache poisoned");
        (first..=last).all(|piece| cache.contains(&(id, piece)))
    }

    /// Fetches whole pieces `first..=last` from a replica, verifying them; tries every replica
    /// before giving up, and retries until the policy's deadline counted from `started`.
    async fn fetch(
        &self,
        block: &pb::BlockRef,
        servers: &HashMap<u64, String>,
        first: u32,
        last: u32,
        progress: &watch::Sender<u32>,
        started: Instant,
    ) -> ClientResult<Vec<Bytes>> {
        let id = BlockId::of(block);
        let policy = self.meta.policy.clone();
        let mut backoff = policy.backoff_min;
        let offset = first * PIECE_BYTES as u32;
        let end = ((last as usize + 1) * PIECE_BYTES).min(block.len as usize);
        let len = end as u32 - offset;
        loop {
            let mut last_error = String::from("no replica known");
            let mut corrupt_everywhere = !block.servers.is_empty();
            for server in replica_order(&block.servers, id, self.meta.session()) {
                let Some(address) = servers.get(server) else { continue };
                match self.fetch_from(address, block, offset, len, progress).await {
                    Ok(data) => return Ok(data),
                    Err(FetchError::Corrupt(what)) => {
                        tracing::error!(block = %id, server, what, "replica failed verification");
                        self.report_bad_copy(block, *server, &what);
                        last_error = what;
                    }
                    // Every copy would refuse the same token.
                    Err(FetchError::Status(status)) if status.code() == tonic::Code::PermissionDenied => {
                        return Err(ClientError::TokenRefused(status.message().to_string()));
                    }
                    Err(FetchError::Status(status)) => {
                        corrupt_everywhere = false;
                        if !transient(&status) && status.code() != tonic::Code::NotFound {
                            tracing::error!(block = %id, server, %status, "replica refused read");
                        }
                        last_error = status.to_string();
                    }
                }
            }
            if corrupt_everywhere {
                return Err(ClientError::Corrupt(id.to_string()));
            }
            if started.elapsed() >= policy.deadline {
                return Err(ClientError::Timeout {
                    what: "block read",
                    seconds: policy.deadline.as_secs(),
                    last: last_error,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(policy.backoff_max);
        }
    }

    /// Tells meta about a bad copy so it repairs the block; the read goes on meanwhile.
    fn report_bad_copy(&self, block: &pb::BlockRef, server: u64, what: &str) {
        let meta = self.meta.clone();
        let block = pb::BlockRef { servers: Vec::new(), ..block.clone() };
        let what = what.to_string();
        tokio::spawn(async move {
            if let Err(e) = meta.report_bad_block(block, server, what).await {
                tracing::warn!(server, error = %e, "could not report a bad copy");
            }
        });
    }

    /// Fetches `len` bytes from `offset` (whole pieces) from one replica, verifying each piece
    /// and caching it as it arrives. Returns the pieces, slices of the received messages.
    async fn fetch_from(
        &self,
        address: &str,
        block: &pb::BlockRef,
        offset: u32,
        len: u32,
        progress: &watch::Sender<u32>,
    ) -> Result<Vec<Bytes>, FetchError> {
        let id = BlockId::of(block);
        let mut client =
            self.client(address).map_err(|e| FetchError::Status(tonic::Status::invalid_argument(e.to_string())))?;
        let request = pb::GetBlockRequest { block: Some(block.clone()), offset, len };
        let mut stream = client.get_block(request).await.map_err(FetchError::Status)?.into_inner();
        let mut hashes: Option<Vec<[u8; 32]>> = None;
        let first_piece = offset as usize / PIECE_BYTES;
        let piece_count = (len as usize).div_ceil(PIECE_BYTES);
        let mut pieces: Vec<Bytes> = Vec::with_capacity(piece_count);
        let mut received = 0usize;
        while let Some(chunk) = stream.message().await.map_err(FetchError::Status)? {
            if chunk.errno != 0 {
                return Err(FetchError::Corrupt(format!("data server reported errno {}", chunk.errno)));
            }
            if hashes.is_none() {
                let list: Option<Vec<[u8; 32]>> =
                    chunk.piece_hashes.iter().map(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).collect();
                let list = list.ok_or_else(|| FetchError::Corrupt("malformed piece hash".into()))?;
                if digest_of_pieces(&list).as_slice() != block.digest.as_slice() {
                    return Err(FetchError::Corrupt("piece hashes do not match the block digest".into()));
                }
                hashes = Some(list);
            }
            let hashes = hashes.as_ref().expect("set above");
            if chunk.first_piece as usize != first_piece + pieces.len() || !received.is_multiple_of(PIECE_BYTES) {
                return Err(FetchError::Corrupt("pieces out of order".into()));
            }
            let batch_start = pieces.len();
            for at in (0..chunk.data.len()).step_by(PIECE_BYTES) {
                let piece = chunk.data.slice(at..(at + PIECE_BYTES).min(chunk.data.len()));
                let index = chunk.first_piece as usize + (at / PIECE_BYTES);
                if hashes.get(index) != Some(&piece_hash(&piece)) {
                    return Err(FetchError::Corrupt(format!("piece {index} does not match its hash")));
                }
                pieces.push(piece);
            }
            received += chunk.data.len();
            self.bytes_fetched.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            if received > len as usize + PIECE_BYTES {
                return Err(FetchError::Corrupt("more data than asked for".into()));
            }
            let batch = &pieces[batch_start..];
            self.insert_pieces(id.0, chunk.first_piece, batch.iter().map(|p| p.as_ref()));
            progress.send_replace(chunk.first_piece + batch.len() as u32);
        }
        if received < len as usize {
            return Err(FetchError::Status(tonic::Status::unavailable("block stream ended early")));
        }
        debug_assert_eq!(pieces.len(), piece_count);
        Ok(pieces)
    }
}

/// A block written to its data servers.
pub struct StoredBlock {
    pub block: pb::BlockRef,
    /// Where the copies are, for the sync barrier before a commit.
    pub addresses: Vec<String>,
}

enum FetchError {
    Corrupt(String),
    Status(tonic::Status),
}

/// The order in which `reader` tries a block's copies: a rotation of the recorded order that
/// depends on the block and the reader, so that readers spread over the copies while each keeps
/// going back to the same one (whose page cache then holds the block).
fn replica_order(servers: &[u64], block: BlockId, reader: u64) -> impl Iterator<Item = &u64> {
    let mixed = (block.lo() ^ block.hi().rotate_left(32) ^ reader).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let start = if servers.is_empty() { 0 } else { ((mixed >> 32) % servers.len() as u64) as usize };
    servers[start..].iter().chain(&servers[..start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_copy_is_tried_once_whatever_the_start() {
        let servers = [7, 8, 9];
        for reader in 0..50 {
            let mut order: Vec<u64> = replica_order(&servers, BlockId(reader as u128 * 31), reader).copied().collect();
            order.sort_unstable();
            assert_eq!(order, servers);
        }
        assert_eq!(replica_order(&[], BlockId(1), 1).count(), 0);
    }

    #[test]
    fn readers_spread_over_the_copies() {
        let servers = [1, 2, 3];
        let mut first = [0usize; 3];
        for reader in 0..300u64 {
            let head = *replica_order(&servers, BlockId(42), reader).next().unwrap();
            first[head as usize - 1] += 1;
        }
        assert!(first.iter().all(|n| *n >= 50), "first copies tried: {first:?}");
        let again: Vec<u64> = replica_order(&servers, BlockId(42), 5).copied().collect();
        assert_eq!(again, replica_order(&servers, BlockId(42), 5).copied().collect::<Vec<_>>());
    }
}
