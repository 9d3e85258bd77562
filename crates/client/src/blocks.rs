//! Moving blocks to and from data servers: uploads placed by the meta leader, reads verified
//! piece by piece against the digest meta holds, and a bounded in-memory cache of verified
//! pieces (blocks never change, so a cached piece is never stale).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use cairn_proto::data_client::DataClient;
use cairn_proto::{self as pb, BlockId, PIECE_BYTES, digest_of_pieces, piece_hash};
use lru::LruCache;
use tonic::transport::Channel;

use crate::disk_cache::DiskCache;
use crate::error::{ClientError, ClientResult};
use crate::meta::{MetaConnection, endpoint};

/// Bytes sent per upload message.
const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;
/// Failed servers one upload remembers to avoid.
const FAILED_SERVERS_MAX: usize = 16;

pub struct BlockStore {
    meta: Arc<MetaConnection>,
    clients: Mutex<HashMap<String, DataClient<Channel>>>,
    cache: Mutex<LruCache<(u128, u32), Bytes>>,
    /// Pieces kept on local disk across mounts, behind the memory cache.
    disk: Option<DiskCache>,
    next_block: AtomicU64,
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
            cache: Mutex::new(LruCache::new(pieces)),
            disk,
            next_block: AtomicU64::new(0),
        }
    }

    fn client(&self, address: &str) -> ClientResult<DataClient<Channel>> {
        let mut clients = self.clients.lock().expect("data client pool poisoned");
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        let client = DataClient::new(endpoint(address, &self.meta.policy)?.connect_lazy())
            .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(pb::MAX_MESSAGE_BYTES);
        clients.insert(address.to_string(), client.clone());
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
                    self.insert_pieces(id.0, 0, &data);
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

    /// Caches verified pieces in memory and on disk.
    fn insert_pieces(&self, id: u128, first_piece: u32, data: &[u8]) {
        {
            let mut cache = self.cache.lock().expect("block cache poisoned");
            for (i, piece) in data.chunks(PIECE_BYTES).enumerate() {
                cache.put((id, first_piece + i as u32), Bytes::copy_from_slice(piece));
            }
        }
        if let Some(disk) = &self.disk {
            for (i, piece) in data.chunks(PIECE_BYTES).enumerate() {
                disk.put(id, first_piece + i as u32, piece);
            }
        }
    }

    /// Pieces `first..=last` from memory, else from disk (then kept in memory too).
    fn cached(&self, id: u128, first: u32, last: u32) -> Option<Vec<Bytes>> {
        let in_memory: Option<Vec<Bytes>> = {
            let mut cache = self.cache.lock().expect("block cache poisoned");
            (first..=last).map(|piece| cache.get(&(id, piece)).cloned()).collect()
        };
        if in_memory.is_some() {
            return in_memory;
        }
        let disk = self.disk.as_ref()?;
        let pieces: Vec<Bytes> = (first..=last).map(|piece| disk.get(id, piece)).collect::<Option<_>>()?;
        let mut cache = self.cache.lock().expect("block cache poisoned");
        for (i, piece) in pieces.iter().enumerate() {
            cache.put((id, first + i as u32), piece.clone());
        }
        Some(pieces)
    }

    /// Reads `len` bytes at `offset` of a block. With `whole_rest`, fetches through the end of
    /// the block so that the sequential reads that follow hit the cache.
    pub async fn read(
        &self,
        block: &pb::BlockRef,
        servers: &HashMap<u64, String>,
        offset: u32,
        len: u32,
        whole_rest: bool,
    ) -> ClientResult<Bytes> {
        let id = BlockId::of(block);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset as usize + len as usize;
        if end > block.len as usize {
            return Err(ClientError::Errno(pb::errno::EIO));
        }
        let first = (offset as usize / PIECE_BYTES) as u32;
        let last = ((end - 1) / PIECE_BYTES) as u32;
        let pieces = match self.cached(id.0, first, last) {
            Some(pieces) => pieces,
            None => {
                let fetch_last = if whole_rest { ((block.len as usize - 1) / PIECE_BYTES) as u32 } else { last };
                let data = self.fetch(block, servers, first, fetch_last).await?;
                self.insert_pieces(id.0, first, &data);
                data.chunks(PIECE_BYTES).take((last - first + 1) as usize).map(Bytes::copy_from_slice).collect()
            }
        };
        let mut out = BytesMut::with_capacity(len as usize);
        let skip = offset as usize - first as usize * PIECE_BYTES;
        let mut remaining = len as usize;
        for (i, piece) in pieces.iter().enumerate() {
            let start = if i == 0 { skip } else { 0 };
            let take = (piece.len() - start).min(remaining);
            out.extend_from_slice(&piece[start..start + take]);
            remaining -= take;
        }
        if remaining != 0 {
            return Err(ClientError::Corrupt(id.to_string()));
        }
        Ok(out.freeze())
    }

    /// Whether every piece of the block from `offset` on is cached.
    pub fn is_cached(&self, block: &pb::BlockRef, offset: u32) -> bool {
        let id = BlockId::of(block);
        let first = offset / PIECE_BYTES as u32;
        let last = (block.len.saturating_sub(1)) / PIECE_BYTES as u32;
        self.cached(id.0, first, last).is_some()
    }

    /// Fetches whole pieces `first..=last` from a replica, verifying them; tries every replica
    /// before giving up.
    async fn fetch(
        &self,
        block: &pb::BlockRef,
        servers: &HashMap<u64, String>,
        first: u32,
        last: u32,
    ) -> ClientResult<Vec<u8>> {
        let id = BlockId::of(block);
        let policy = self.meta.policy.clone();
        let started = Instant::now();
        let mut backoff = policy.backoff_min;
        let offset = first * PIECE_BYTES as u32;
        let end = ((last as usize + 1) * PIECE_BYTES).min(block.len as usize);
        let len = end as u32 - offset;
        loop {
            let mut last_error = String::from("no replica known");
            let mut corrupt_everywhere = !block.servers.is_empty();
            for server in replica_order(&block.servers, id, self.meta.session()) {
                let Some(address) = servers.get(server) else { continue };
                match self.fetch_from(address, block, offset, len).await {
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

    async fn fetch_from(
        &self,
        address: &str,
        block: &pb::BlockRef,
        offset: u32,
        len: u32,
    ) -> Result<Vec<u8>, FetchError> {
        let mut client =
            self.client(address).map_err(|e| FetchError::Status(tonic::Status::invalid_argument(e.to_string())))?;
        let request = pb::GetBlockRequest { block: Some(block.clone()), offset, len };
        let mut stream = client.get_block(request).await.map_err(FetchError::Status)?.into_inner();
        let mut hashes: Option<Vec<[u8; 32]>> = None;
        let mut data = Vec::with_capacity(len as usize);
        let first_piece = offset as usize / PIECE_BYTES;
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
            if chunk.first_piece as usize != first_piece + data.len() / PIECE_BYTES || data.len() % PIECE_BYTES != 0 {
                return Err(FetchError::Corrupt("pieces out of order".into()));
            }
            for (i, piece) in chunk.data.chunks(PIECE_BYTES).enumerate() {
                let index = chunk.first_piece as usize + i;
                if hashes.get(index) != Some(&piece_hash(piece)) {
                    return Err(FetchError::Corrupt(format!("piece {index} does not match its hash")));
                }
            }
            data.extend_from_slice(&chunk.data);
            if data.len() > len as usize + PIECE_BYTES {
                return Err(FetchError::Corrupt("more data than asked for".into()));
            }
        }
        if data.len() < len as usize {
            return Err(FetchError::Status(tonic::Status::unavailable("block stream ended early")));
        }
        data.truncate(len as usize);
        Ok(data)
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
