//! The data service over gRPC: stores and serves blocks of a [`Volume`], checking every size and
//! id before touching memory or disk.

use std::pin::Pin;
use std::sync::Arc;

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use cairn_proto::data_client::DataClient;
use cairn_proto::data_server::{Data, DataServer};
use cairn_proto::{
    BLOCK_BYTES_MAX, BlockId, DataStatusReply, DataStatusRequest, DeleteBlocksReply, DeleteBlocksRequest, FORWARD_MAX,
    GetBlockChunk, GetBlockRequest, MAX_MESSAGE_BYTES, PIECE_BYTES, PutBlockChunk, PutBlockReply, ReplicateBlockReply,
    ReplicateBlockRequest, SyncBlocksReply, SyncBlocksRequest, errno,
};
use futures::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::tokens::BlockTokenKeys;
use crate::volume::{NewBlock, Volume, VolumeError};
use cairn_trust::block_token::BlockAccess;

/// Blocks being received at once; with [`BLOCK_BYTES_MAX`] this bounds the memory of uploads.
const PUTS_IN_FLIGHT_MAX: usize = 32;
/// Pieces sent per reply chunk when streaming a block out.
const PIECES_PER_CHUNK: usize = 16;
/// Deletions accepted in one request.
const DELETES_PER_REQUEST_MAX: usize = 100_000;
/// Connections to other data servers kept open at most.
const PEERS_MAX: usize = 256;

/// The status a broken chain answers with: retryable, naming the replica that failed so the
/// client can ask for a placement without it.
fn replica_failed(address: &str, why: impl std::fmt::Display) -> Status {
    let mut status = Status::unavailable(format!("replica {address} failed: {why}"));
    if let Ok(value) = address.parse() {
        status.metadata_mut().insert(cairn_proto::FAILED_REPLICA_HEADER, value);
    }
    status
}

/// What a downstream replica's answer means for this one's.
fn downstream_outcome(
    address: &str,
    outcome: Result<Result<Response<PutBlockReply>, Status>, tokio::task::JoinError>,
) -> Result<(), Status> {
    match outcome {
        Ok(Ok(reply)) if reply.get_ref().errno == 0 => Ok(()),
        Ok(Ok(reply)) => Err(replica_failed(address, format!("errno {}", reply.get_ref().errno))),
        // A failure further down the chain already names its replica.
        Ok(Err(status)) if status.metadata().contains_key(cairn_proto::FAILED_REPLICA_HEADER) => {
            let mut passed = Status::unavailable(status.message().to_string());
            *passed.metadata_mut() = status.metadata().clone();
            Err(passed)
        }
        Ok(Err(status)) => Err(replica_failed(address, status.message())),
        Err(e) => Err(Status::internal(format!("forwarding task: {e}"))),
    }
}

pub struct DataService {
    volume: Arc<Volume>,
    server_id: u64,
    fs_id: String,
    puts: Arc<Semaphore>,
    peers: Mutex<HashMap<String, DataClient<Channel>>>,
    /// With TLS: the keys clients' block tokens are checked with. Without, nothing is checked
    /// (no peer is authenticated either).
    tokens: Option<Arc<BlockTokenKeys>>,
}

impl DataService {
    pub fn new(volume: Arc<Volume>, server_id: u64, fs_id: String) -> Self {
        DataService {
            volume,
            server_id,
            fs_id,
            puts: Arc::new(Semaphore::new(PUTS_IN_FLIGHT_MAX)),
            peers: Mutex::new(HashMap::new()),
            tokens: None,
        }
    }

    /// Requires block tokens from clients, checked with `keys` (which meta's reports fill).
    pub fn with_block_tokens(self, keys: Arc<BlockTokenKeys>) -> Self {
        DataService { tokens: Some(keys), ..self }
    }

    fn check_token(
        &self,
        peer: Option<&cairn_trust::Peer>,
        token: &[u8],
        access: BlockAccess,
        subject: u128,
    ) -> Result<(), Status> {
        match &self.tokens {
            Some(keys) => keys.check(peer, token, access, subject),
            None => Ok(()),
        }
    }

    /// A connection to another data server (the next replica of a chain, or a repair source).
    fn peer(&self, address: &str) -> Result<DataClient<Channel>, Status> {
        let mut peers = self.peers.lock().map_err(|_| Status::internal("peer pool poisoned"))?;
        if let Some(client) = peers.get(address) {
            return Ok(client.clone());
        }
        if peers.len() >= PEERS_MAX {
            peers.clear();
        }
        let endpoint = cairn_proto::net::endpoint(address)
            .map_err(|e| Status::invalid_argument(format!("replica address {address}: {e}")))?
            .initial_stream_window_size(cairn_proto::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(cairn_proto::CONNECTION_WINDOW_BYTES)
            .max_frame_size(cairn_proto::FRAME_BYTES_MAX);
        let client = DataClient::new(cairn_proto::net::lazy_channel(&endpoint))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        peers.insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Stores a complete, received block unless it is here already (a retried upload).
    async fn store(&self, id: BlockId, digest: &[u8], parts: Vec<Bytes>, sync: bool) -> Result<(), Status> {
        if self.volume.contains(id) {
            // A retried upload is the same block; anything else under a taken id is refused.
            return match self.volume.piece_hashes(id, digest) {
                Ok(_) => Ok(()),
                Err(_) => Err(Status::already_exists(format!("block {id} is stored here with another digest"))),
            };
        }
        let received_at = std::time::Instant::now();
        let new_block = NewBlock::verified_parts(id, digest, parts).map_err(volume_status)?;
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || volume.append(vec![new_block], sync))
            .await
            .map_err(|e| Status::internal(format!("append task: {e}")))?
            .map_err(volume_status)?;
        tracing::debug!(block = %id, verify_and_append_us = received_at.elapsed().as_micros() as u64, "block appended");
        Ok(())
    }

    pub fn into_server(self) -> DataServer<Self> {
        DataServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn volume_status(err: VolumeError) -> Status {
    match err {
        VolumeError::NotFound(id) => Status::not_found(format!("block {id} not found")),
        VolumeError::Invalid(what) => Status::invalid_argument(what),
        VolumeError::Corrupt { id, what } => Status::data_loss(format!("block {id} corrupt: {what}")),
        VolumeError::Io(e) => Status::internal(format!("volume I/O: {e}")),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GetBlockChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Data for DataService {
    async fn put_block(&self, request: Request<Streaming<PutBlockChunk>>) -> Result<Response<PutBlockReply>, Status> {
        let _permit = self.puts.acquire().await.map_err(|_| Status::unavailable("shutting down"))?;
        let peer = request.extensions().get::<cairn_trust::Peer>().cloned();
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty block upload"))?;
        let block = first.block.ok_or_else(|| Status::invalid_argument("first chunk must name the block"))?;
        // A client stores only blocks of its own session (their ids start with it).
        self.check_token(peer.as_ref(), &block.token, BlockAccess::Write, u128::from(block.id_hi) << 64)?;
        let sync = first.sync;
        let len = block.len as usize;
        if len == 0 || len > BLOCK_BYTES_MAX {
            return Err(Status::invalid_argument(format!("block length {len} out of range 1..={BLOCK_BYTES_MAX}")));
        }
        if block.digest.len() != 32 {
            return Err(Status::invalid_argument("block digest must be 32 bytes"));
        }
        if first.forward.len() > FORWARD_MAX || first.forward.iter().any(|a| a.is_empty() || a.len() > 256) {
            return Err(Status::invalid_argument(format!(
                "at most {FORWARD_MAX} replicas to forward to, as host:port"
            )));
        }
        let id = BlockId::of(&block);
        let mut received = first.data.len();
        if received > len {
            return Err(Status::invalid_argument("block upload longer than announced"));
        }
        // The next replica gets every chunk as it arrives, so the copies are written in a
        // pipeline rather than one after another.
        let downstream = match first.forward.split_first() {
            Some((next, rest)) => {
                let (sender, receiver) = mpsc::channel::<PutBlockChunk>(4);
                let head = PutBlockChunk {
                    block: Some(block.clone()),
                    data: first.data.clone(),
                    sync,
                    forward: rest.to_vec(),
                };
                let _ = sender.send(head).await;
                let mut client = self.peer(next)?;
                let call = tokio::spawn(async move {
                    client.put_block(tokio_stream::wrappers::ReceiverStream::new(receiver)).await
                });
                Some((next.clone(), sender, call))
            }
            None => None,
        };
        let mut parts = vec![first.data];
        while received < len {
            match stream.message().await? {
                Some(chunk) => {
                    if chunk.block.is_some() {
                        return Err(Status::invalid_argument("only the first chunk may name the block"));
                    }
                    if received + chunk.data.len() > len {
                        return Err(Status::invalid_argument("block upload longer than announced"));
                    }
                    received += chunk.data.len();
                    if let Some((_, sender, _)) = &downstream {
                        // A replica that stopped taking chunks shows in its answer below.
                        let _ = sender.send(PutBlockChunk { data: chunk.data.clone(), ..Default::default() }).await;
                    }
                    parts.push(chunk.data);
                }
                None => break,
            }
        }
        if received != len {
            return Err(Status::invalid_argument(format!("block upload has {received} of {len} bytes")));
        }
        self.store(id, &block.digest, parts, sync).await?;
        if let Some((next, sender, call)) = downstream {
            drop(sender);
            downstream_outcome(&next, call.await)?;
        }
        Ok(Response::new(PutBlockReply { errno: 0 }))
    }

    type GetBlockStream = ChunkStream;

    async fn get_block(&self, request: Request<GetBlockRequest>) -> Result<Response<ChunkStream>, Status> {
        let peer = request.extensions().get::<cairn_trust::Peer>().cloned();
        let request = request.into_inner();
        let block = request.block.ok_or_else(|| Status::invalid_argument("no block named"))?;
        let id = BlockId::of(&block);
        self.check_token(peer.as_ref(), &block.token, BlockAccess::Read, id.0)?;
        let (block_len, pieces) = self.volume.piece_hashes(id, &block.digest).map_err(volume_status)?;
        let offset = request.offset as usize;
        let len = request.len as usize;
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > block_len as usize) {
            return Err(Status::out_of_range(format!("range {offset}+{len} outside block of {block_len} bytes")));
        }
        let first_piece = offset / PIECE_BYTES;
        let last_piece = (offset + len - 1) / PIECE_BYTES;
        let (sender, receiver) = mpsc::channel::<Result<GetBlockChunk, Status>>(2);
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            volume.will_read(id, first_piece, last_piece);
            let mut piece = first_piece;
            let mut first_chunk = true;
            while piece <= last_piece {
                let last = (piece + PIECES_PER_CHUNK - 1).min(last_piece);
                let chunk = match volume.read_pieces(id, piece, last) {
                    Ok(data) => GetBlockChunk {
                        piece_hashes: if first_chunk {
                            pieces.iter().map(|h| h.to_vec()).collect()
                        } else {
                            Vec::new()
                        },
                        first_piece: piece as u32,
                        data,
                        errno: 0,
                    },
                    Err(VolumeError::Corrupt { .. }) => GetBlockChunk { errno: errno::EIO, ..Default::default() },
                    Err(e) => {
                        let _ = sender.blocking_send(Err(volume_status(e)));
                        return;
                    }
                };
                let failed = chunk.errno != 0;
                if sender.blocking_send(Ok(chunk)).is_err() || failed {
                    return;
                }
                first_chunk = false;
                piece = last + 1;
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        Ok(Response::new(Box::pin(stream.map(|item| item))))
    }

    async fn delete_blocks(
        &self,
        request: Request<DeleteBlocksRequest>,
    ) -> Result<Response<DeleteBlocksReply>, Status> {
        let request = request.into_inner();
        if request.blocks.len() > DELETES_PER_REQUEST_MAX {
            return Err(Status::invalid_argument(format!("at most {DELETES_PER_REQUEST_MAX} deletions per request")));
        }
        let ids: Vec<BlockId> = request.blocks.iter().map(BlockId::of).collect();
        let volume = self.volume.clone();
        let deleted = tokio::task::spawn_blocking(move || volume.delete(&ids))
            .await
            .map_err(|e| Status::internal(format!("delete task: {e}")))?
            .map_err(volume_status)?;
        Ok(Response::new(DeleteBlocksReply { deleted: deleted as u32 }))
    }

    async fn sync_blocks(&self, _request: Request<SyncBlocksRequest>) -> Result<Response<SyncBlocksReply>, Status> {
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || volume.sync())
            .await
            .map_err(|e| Status::internal(format!("sync task: {e}")))?
            .map_err(volume_status)?;
        Ok(Response::new(SyncBlocksReply {}))
    }

    async fn replicate_block(
        &self,
        request: Request<ReplicateBlockRequest>,
    ) -> Result<Response<ReplicateBlockReply>, Status> {
        let request = request.into_inner();
        let block = request.block.ok_or_else(|| Status::invalid_argument("no block named"))?;
        let len = block.len as usize;
        if len == 0 || len > BLOCK_BYTES_MAX || block.digest.len() != 32 {
            return Err(Status::invalid_argument("block length or digest out of range"));
        }
        if request.source.is_empty() || request.source.len() > 256 {
            return Err(Status::invalid_argument("source must be host:port"));
        }
        let id = BlockId::of(&block);
        if self.volume.contains(id) {
            // A copy already here counts only if it reads back intact.
            let volume = self.volume.clone();
            let digest = block.digest.clone();
            let check = tokio::task::spawn_blocking(move || {
                let (stored_len, _) = volume.piece_hashes(id, &digest)?;
                volume.read_pieces(id, 0, (stored_len as usize - 1) / PIECE_BYTES).map(|_| ())
            })
            .await
            .map_err(|e| Status::internal(format!("check task: {e}")))?;
            match check {
                Ok(()) => return Ok(Response::new(ReplicateBlockReply {})),
                Err(VolumeError::Corrupt { .. }) => {
                    let volume = self.volume.clone();
                    tokio::task::spawn_blocking(move || volume.delete(&[id]))
                        .await
                        .map_err(|e| Status::internal(format!("delete task: {e}")))?
                        .map_err(volume_status)?;
                }
                Err(e) => return Err(volume_status(e)),
            }
        }
        let _permit = self.puts.acquire().await.map_err(|_| Status::unavailable("shutting down"))?;
        let mut source = self.peer(&request.source)?;
        let fetch = GetBlockRequest { block: Some(block.clone()), offset: 0, len: block.len };
        let mut stream = source.get_block(fetch).await?.into_inner();
        let mut parts = Vec::new();
        let mut received = 0usize;
        while let Some(chunk) = stream.message().await? {
            if chunk.errno != 0 {
                return Err(Status::data_loss(format!("the copy at {} is corrupt", request.source)));
            }
            received += chunk.data.len();
            if received > len {
                return Err(Status::data_loss(format!("{} sent more than the block holds", request.source)));
            }
            parts.push(chunk.data);
        }
        if received != len {
            return Err(Status::unavailable(format!("{} sent {received} of {len} bytes", request.source)));
        }
        // `store` checks the bytes against the digest before anything reaches the disk.
        self.store(id, &block.digest, parts, true).await?;
        Ok(Response::new(ReplicateBlockReply {}))
    }

    async fn status(&self, _request: Request<DataStatusRequest>) -> Result<Response<DataStatusReply>, Status> {
        let usage = self.volume.usage();
        Ok(Response::new(DataStatusReply {
            id: self.server_id,
            blocks: usage.blocks,
            used_bytes: usage.live_bytes,
            capacity_bytes: usage.capacity_bytes,
            fs_id: self.fs_id.clone(),
            pid: std::process::id(),
        }))
    }
}
