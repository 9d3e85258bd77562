//! Changing the cluster: `cairn cluster add-meta | remove-meta | remove-data`, and the join a
//! new meta server performs itself (`cairn meta --join`).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cairn_meta::service::LEADER_HEADER;
use cairn_proto as pb;
use tonic::Code;

/// How long a membership change may take: adding a member waits for it to catch up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends a membership request to the leader: starts at the given addresses and follows the
/// leader named in "not leader" answers, retrying with backoff until `deadline`.
pub(crate) async fn on_leader<T, F, Fut>(meta: &[String], deadline: Duration, mut call: F) -> Result<T>
where
    F: FnMut(pb::meta_client::MetaClient<tonic::transport::Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    if meta.is_empty() {
        bail!("--meta needs at least one meta server address");
    }
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut address = meta[0].clone();
    let mut attempt = 0usize;
    loop {
        let endpoint = pb::net::endpoint(&address)?.timeout(CHANGE_TIMEOUT);
        let outcome = match pb::net::connect(&endpoint).await {
            Ok(channel) => match call(pb::meta_client::MetaClient::new(channel)).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::InvalidArgument
                            | Code::NotFound
                            | Code::PermissionDenied
                            | Code::Unauthenticated
                            | Code::FailedPrecondition
                    ) =>
                {
                    bail!("{address}: {}", status.message())
                }
                Err(status) => {
                    let leader = status.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok());
                    match leader {
                        Some(leader) if leader != address => {
                            address = leader.to_string();
                            continue;
                        }
                        _ => format!("{address}: {}", status.message()),
                    }
                }
            },
            Err(e) => format!("{address}: {e}"),
        };
        if started.elapsed() > deadline {
            bail!("no meta leader accepted the change within {deadline:?} (last: {outcome})");
        }
        tracing::debug!(%outcome, "membership change not accepted yet; retrying");
        attempt += 1;
        address = meta[attempt % meta.len()].clone();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Adds meta server `id` at `address` to the group; returns the file system id.
pub async fn add_meta(meta: &[String], id: u64, address: &str, deadline: Duration) -> Result<String> {
    let request = pb::AddMetaServerRequest { id, address: address.to_string() };
    let reply = on_leader(meta, deadline, |mut c| {
        let request = request.clone();
        async move { c.add_meta_server(request).await }
    })
    .await?;
    Ok(reply.fs_id)
}

pub async fn remove_meta(meta: &[String], id: u64) -> Result<Vec<pb::MetaMember>> {
    let reply = on_leader(meta, CHANGE_TIMEOUT, |mut c| async move {
        c.remove_meta_server(pb::RemoveMetaServerRequest { id }).await
    })
    .await?;
    Ok(reply.members)
}

pub fn print_members(members: &[pb::MetaMember]) {
    for m in members {
        println!("meta {} at {} ({})", m.id, m.address, if m.voter { "voter" } else { "learner" });
    }
}

/// `cairn cluster add-meta`: the server must already run and listen at `address`.
pub async fn add_meta_command(meta: Vec<String>, id: u64, address: String) -> Result<()> {
    add_meta(&meta, id, &address, CHANGE_TIMEOUT).await?;
    println!("meta server {id} at {address} added");
    Ok(())
}

pub async fn remove_meta_command(meta: Vec<String>, id: u64) -> Result<()> {
    let members = remove_meta(&meta, id).await?;
    println!("meta server {id} removed; the group is now:");
    print_members(&members);
    Ok(())
}

/// `cairn cluster rotate-block-key`.
pub async fn rotate_block_key_command(meta: Vec<String>) -> Result<()> {
    let reply = on_leader(&meta, CHANGE_TIMEOUT, |mut c| async move {
        c.rotate_block_token_key(pb::RotateBlockTokenKeyRequest {}).await
    })
    .await?;
    println!(
        "block-token key epoch {} in use; tokens of epoch {} still pass until they expire",
        reply.epoch,
        reply.epoch.saturating_sub(1)
    );
    Ok(())
}

/// How often `remove-data` asks how the drain goes.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// `cairn cluster remove-data`: drains data server `id` (its copies are made again elsewhere)
/// and waits until meta removed it, or removes it at once with `force`.
pub async fn remove_data_command(meta: Vec<String>, id: u64, force: bool, wait: Option<Duration>) -> Result<()> {
    let started = Instant::now();
    let mut reported = None;
    loop {
        let reply = on_leader(&meta, CHANGE_TIMEOUT, |mut c| async move {
            c.remove_data_server(pb::RemoveDataServerRequest { id, force }).await
        })
        .await?;
        if reply.removed {
            if reply.blocks_left > 0 {
                println!(
                    "data server {id} removed; {} blocks still listed a copy there, and those with no other copy are lost",
                    reply.blocks_left
                );
            } else {
                println!("data server {id} removed; every block has its copies on other servers");
            }
            return Ok(());
        }
        if reported != Some(reply.blocks_left) {
            println!("data server {id} draining: {} blocks still to copy elsewhere", reply.blocks_left);
            reported = Some(reply.blocks_left);
        }
        let Some(wait) = wait else {
            println!("meta goes on draining it; run this again to see how far it got");
            return Ok(());
        };
        if started.elapsed() > wait {
            bail!(
                "data server {id} still holds {} blocks after {wait:?}: are there enough other live data servers (`cairn status`)?",
                reply.blocks_left
            );
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
