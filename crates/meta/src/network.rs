//! Raft messages between meta servers, carried over the Meta gRPC service as opaque bytes.

use std::time::Duration;

use cairn_proto::RaftBytes;
use cairn_proto::meta_client::MetaClient;
use openraft::BasicNode;
use openraft::OptionalSend;
use openraft::errors::{RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use tonic::transport::Channel;

use crate::model::{decode, encode};
use crate::raft_types::TypeConfig;

/// Hands out a connection per peer; connecting is lazy so creating one never fails.
#[derive(Clone, Default)]
pub struct NetworkFactory;

pub struct Peer {
    address: String,
    client: Option<MetaClient<Channel>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Peer;

    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> Peer {
        Peer { address: node.addr.clone(), client: None }
    }
}

fn unreachable(e: impl std::fmt::Display) -> Unreachable<TypeConfig> {
    Unreachable::from_string(e.to_string())
}

impl Peer {
    fn client(&mut self) -> Result<MetaClient<Channel>, Unreachable<TypeConfig>> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let endpoint = cairn_proto::net::endpoint(&self.address).map_err(unreachable)?;
        let client = MetaClient::new(cairn_proto::net::lazy_channel(&endpoint))
            .max_decoding_message_size(cairn_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(cairn_proto::MAX_MESSAGE_BYTES);
        self.client = Some(client.clone());
        Ok(client)
    }

    async fn call<Req: serde::Serialize, Resp: for<'de> serde::Deserialize<'de>>(
        &mut self,
        method: RaftMethod,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, Unreachable<TypeConfig>> {
        let mut client = self.client()?;
        let mut message = tonic::Request::new(RaftBytes { payload: encode(request) });
        message.set_timeout(timeout);
        let reply = match method {
            RaftMethod::Append => client.raft_append(message).await,
            RaftMethod::Vote => client.raft_vote(message).await,
            RaftMethod::Snapshot => {
                let payload = message.into_inner().payload;
                let pieces: Vec<RaftBytes> = payload
                    .chunks(cairn_proto::SNAPSHOT_PIECE_BYTES)
                    .map(|piece| RaftBytes { payload: piece.to_vec() })
                    .collect();
                let mut streamed = tonic::Request::new(tokio_stream::iter(pieces));
                streamed.set_timeout(timeout);
                client.raft_snapshot(streamed).await
            }
        };
        let reply = reply.map_err(|status| {
            // A broken connection is dropped so the next call reconnects.
            self.client = None;
            unreachable(status)
        })?;
        decode(&reply.into_inner().payload).map_err(unreachable)
    }
}

#[derive(Clone, Copy)]
enum RaftMethod {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let reply: Result<AppendEntriesResponse<TypeConfig>, RaftError<TypeConfig>> =
            self.call(RaftMethod::Append, &rpc, option.soft_ttl()).await?;
        reply.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let reply: Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>> =
            self.call(RaftMethod::Vote, &rpc, option.soft_ttl()).await?;
        reply.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = (vote, snapshot.meta, snapshot.snapshot);
        let reply: Result<SnapshotResponse<TypeConfig>, openraft::errors::Fatal<TypeConfig>> =
            self.call(RaftMethod::Snapshot, &request, option.hard_ttl()).await?;
        reply.map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))
    }
}
