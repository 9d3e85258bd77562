//! The data service over gRPC: stores and serves blocks of a [`Volume`], checking every size and
//! id before touching memory or disk.

use std::pin::Pin;
use std::sync::Arc;

use cairn_proto::data_server::{Data, DataServer};
use cairn_proto::{
    BLOCK_BYTES_MAX, BlockId, DataStatusReply, DataStatusRequest, DeleteBlocksReply, DeleteBlocksRequest,
    GetBlockChunk, GetBlockRequest, MAX_MESSAGE_BYTES, PIECE_BYTES, PutBlockChunk, PutBlockReply, SyncBlocksReply,
    SyncBlocksRequest, errno,
};
use futures::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tonic::{Request, Response, Status, Streaming};

use crate::volume::{NewBlock, Volume, VolumeError};

/// Blocks being received at once; with [`BLOCK_BYTES_MAX`] this bounds the memory of uploads.
const PUTS_IN_FLIGHT_MAX: usize = 32;
/// Pieces sent per reply chunk when streaming a block out.
const PIECES_PER_CHUNK: usize = 16;
/// Deletions accepted in one request.
const DELETES_PER_REQUEST_MAX: usize = 100_000;

pub struct DataService {
    volume: Arc<Volume>,
    server_id: u64,
    fs_id: String,
    puts: Arc<Semaphore>,
}

impl DataService {
    pub fn new(volume: Arc<Volume>, server_id: u64, fs_id: String) -> Self {
        DataService { volume, server_id, fs_id, puts: Arc::new(Semaphore::new(PUTS_IN_FLIGHT_MAX)) }
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
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty block upload"))?;
        let block = first.block.ok_or_else(|| Status::invalid_argument("first chunk must name the block"))?;
        let sync = first.sync;
        let len = block.len as usize;
        if len == 0 || len > BLOCK_BYTES_MAX {
            return Err(Status::invalid_argument(format!("block length {len} out of range 1..={BLOCK_BYTES_MAX}")));
        }
        if block.digest.len() != 32 {
            return Err(Status::invalid_argument("block digest must be 32 bytes"));
        }
        let id = BlockId::of(&block);
        let mut received = first.data.len();
        if received > len {
            return Err(Status::invalid_argument("block upload longer than announced"));
        }
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
                    parts.push(chunk.data);
                }
                None => break,
            }
        }
        if received != len {
            return Err(Status::invalid_argument(format!("block upload has {received} of {len} bytes")));
        }
        if self.volume.contains(id) {
            // A retried upload of a block already durable here.
            return Ok(Response::new(PutBlockReply { errno: 0 }));
        }
        let received_at = std::time::Instant::now();
        let new_block = NewBlock::verified_parts(id, &block.digest, parts).map_err(volume_status)?;
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || volume.append(vec![new_block], sync))
            .await
            .map_err(|e| Status::internal(format!("append task: {e}")))?
            .map_err(volume_status)?;
        tracing::debug!(block = %id, verify_and_append_us = received_at.elapsed().as_micros() as u64, "block appended");
        Ok(Response::new(PutBlockReply { errno: 0 }))
    }

    type GetBlockStream = ChunkStream;

    async fn get_block(&self, request: Request<GetBlockRequest>) -> Result<Response<ChunkStream>, Status> {
        let request = request.into_inner();
        let block = request.block.ok_or_else(|| Status::invalid_argument("no block named"))?;
        let id = BlockId::of(&block);
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
                        data: data.into(),
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
