//! `cairn status`: what the meta group and its data servers say about themselves.

use std::time::Duration;

use anyhow::{Context, Result};
use cairn_proto as pb;

pub async fn status(meta: Vec<String>, json: bool) -> Result<()> {
    let mut last_error = None;
    for address in &meta {
        let result = async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5));
            let mut client = pb::meta_client::MetaClient::new(endpoint.connect().await?);
            Ok::<_, anyhow::Error>(client.status(pb::StatusRequest {}).await?.into_inner())
        }
        .await;
        match result {
            Ok(reply) => return print(&reply, json),
            Err(e) => last_error = Some(e.context(format!("asking {address}"))),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no meta address given"))).context("no meta server answered")
}

fn print(reply: &pb::StatusReply, json: bool) -> Result<()> {
    let healthy = reply.leader_id != 0 && !reply.data_servers.is_empty();
    if json {
        let value = serde_json::json!({
            "fs_id": reply.fs_id,
            "healthy": healthy,
            "node": { "id": reply.node_id, "address": reply.address, "role": reply.role },
            "leader_id": reply.leader_id,
            "term": reply.term,
            "last_applied": reply.last_applied,
            "inodes": reply.inodes,
            "sessions": reply.sessions,
            "meta_members": reply.members.iter().map(|m| serde_json::json!({"id": m.id, "address": m.address})).collect::<Vec<_>>(),
            "data_servers": reply.data_servers.iter().map(|d| serde_json::json!({
                "id": d.id, "address": d.address, "capacity_bytes": d.capacity_bytes, "used_bytes": d.used_bytes,
                "live": d.capacity_bytes > 0,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("file system  {}", reply.fs_id);
    println!("health       {}", if healthy { "ok" } else { "degraded" });
    println!(
        "meta         node {} at {} is {} (leader {}, term {}, applied {})",
        reply.node_id, reply.address, reply.role, reply.leader_id, reply.term, reply.last_applied
    );
    for member in &reply.members {
        println!("  member     {} at {}", member.id, member.address);
    }
    println!("inodes       {}", reply.inodes);
    println!("sessions     {}", reply.sessions);
    for d in &reply.data_servers {
        let state = if d.capacity_bytes > 0 { "live" } else { "not heard from" };
        println!(
            "data server  {:x} at {} ({state}, {} of {} bytes used)",
            d.id, d.address, d.used_bytes, d.capacity_bytes
        );
    }
    Ok(())
}
