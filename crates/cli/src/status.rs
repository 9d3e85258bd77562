//! `cairn status`: every meta server and data server, asked directly, with its role, address
//! and process id, and whether the file system as a whole is healthy.

use std::time::Duration;

use anyhow::{Context, Result};
use cairn_proto as pb;
use serde_json::json;

const ASK_TIMEOUT: Duration = Duration::from_secs(2);

fn endpoint(address: &str) -> Result<tonic::transport::Endpoint> {
    Ok(pb::net::endpoint(address)?.timeout(ASK_TIMEOUT))
}

async fn meta_status(address: &str) -> Result<pb::StatusReply> {
    let mut client = pb::meta_client::MetaClient::new(pb::net::connect(&endpoint(address)?).await?)
        .max_decoding_message_size(pb::MAX_MESSAGE_BYTES);
    Ok(client.status(pb::StatusRequest::default()).await?.into_inner())
}

async fn data_status(address: &str) -> Result<pb::DataStatusReply> {
    let mut client = pb::data_client::DataClient::new(pb::net::connect(&endpoint(address)?).await?);
    Ok(client.status(pb::DataStatusRequest {}).await?.into_inner())
}

/// What one meta server said about itself, or that it did not answer.
struct MetaView {
    member: pb::MetaMember,
    reply: Option<pb::StatusReply>,
}

/// What one data server said, and whether the meta leader hears its heartbeats.
struct DataView {
    server: pb::DataServer,
    live: bool,
    reply: Option<pb::DataStatusReply>,
}

struct Report {
    fs_id: String,
    leader: Option<pb::StatusReply>,
    meta: Vec<MetaView>,
    data: Vec<DataView>,
}

impl Report {
    /// A leader is known, every meta member answers, and every data server is live.
    fn healthy(&self) -> bool {
        self.leader.as_ref().is_some_and(|l| l.under_replicated_blocks == 0)
            && self.meta.iter().all(|m| m.reply.is_some())
            && !self.data.is_empty()
            && self.data.iter().all(|d| d.live && d.reply.is_some())
    }
}

async fn gather(meta: &[String]) -> Result<Report> {
    let mut first = None;
    let mut last_error = None;
    for address in meta {
        match meta_status(address).await {
            Ok(reply) => {
                first = Some(reply);
                break;
            }
            Err(e) => last_error = Some(e.context(format!("asking {address}"))),
        }
    }
    let Some(first) = first else {
        return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no meta address given")))
            .context("no meta server answered");
    };
    let mut views = Vec::new();
    for member in &first.members {
        let reply =
            if member.address == first.address { Some(first.clone()) } else { meta_status(&member.address).await.ok() };
        views.push(MetaView { member: member.clone(), reply });
    }
    if views.is_empty() {
        views.push(MetaView {
            member: pb::MetaMember { id: first.node_id, address: first.address.clone(), voter: false },
            reply: Some(first.clone()),
        });
    }
    // The leader's view of data servers is the one that counts: it hears their heartbeats.
    let leader =
        views.iter().filter_map(|v| v.reply.as_ref()).find(|r| r.role == "leader" && r.node_id == r.leader_id).cloned();
    let servers = leader.as_ref().unwrap_or(&first).data_servers.clone();
    let mut data = Vec::new();
    for server in servers {
        let reply = data_status(&server.address).await.ok();
        data.push(DataView { live: leader.is_some() && server.capacity_bytes > 0, server, reply });
    }
    Ok(Report { fs_id: first.fs_id.clone(), leader, meta: views, data })
}

/// Whether the group at `meta` has a leader.
pub async fn leader_known(meta: &[String]) -> bool {
    gather(meta).await.is_ok_and(|report| report.leader.is_some())
}

/// Whether every server of the file system at `meta` reports in.
pub async fn healthy(meta: &[String]) -> bool {
    gather(meta).await.is_ok_and(|report| report.healthy() && report.meta.len() >= meta.len())
}

pub async fn status(meta: Vec<String>, json: bool) -> Result<()> {
    let report = gather(&meta).await?;
    if json { print_json(&report) } else { print_text(&report) }
}

fn print_json(report: &Report) -> Result<()> {
    let leader = report.leader.as_ref();
    let value = json!({
        "fs_id": report.fs_id,
        "healthy": report.healthy(),
        "leader": leader.map(|l| json!({"id": l.node_id, "address": l.address, "pid": l.pid})),
        "term": leader.map(|l| l.term),
        "inodes": leader.map(|l| l.inodes),
        "sessions": leader.map(|l| l.sessions),
        "under_replicated_blocks": leader.map(|l| l.under_replicated_blocks),
        "repair_scans": leader.map(|l| l.repair_scans),
        "meta": report.meta.iter().map(|m| {
            let r = m.reply.as_ref();
            json!({
                "id": m.member.id,
                "address": m.member.address,
                "voter": m.member.voter,
                "reachable": r.is_some(),
                "role": r.map(|r| r.role.as_str()).unwrap_or("unreachable"),
                "pid": r.map(|r| r.pid),
                "term": r.map(|r| r.term),
                "last_applied": r.map(|r| r.last_applied),
            })
        }).collect::<Vec<_>>(),
        "data_servers": report.data.iter().map(|d| {
            let r = d.reply.as_ref();
            json!({
                "id": d.server.id,
                "address": d.server.address,
                "role": "data",
                "live": d.live,
                "draining": d.server.draining,
                "reachable": r.is_some(),
                "pid": r.map(|r| r.pid),
                "blocks": r.map(|r| r.blocks),
                "capacity_bytes": d.server.capacity_bytes,
                "used_bytes": d.server.used_bytes,
            })
        }).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

fn print_text(report: &Report) -> Result<()> {
    println!("file system  {}", report.fs_id);
    println!("health       {}", if report.healthy() { "ok" } else { "degraded" });
    if let Some(leader) = &report.leader {
        println!("inodes       {}", leader.inodes);
        println!("sessions     {}", leader.sessions);
        if leader.under_replicated_blocks > 0 {
            println!("repairing    {} blocks short of copies", leader.under_replicated_blocks);
        }
    } else {
        println!("leader       none: the meta group has no quorum or is electing");
    }
    for m in &report.meta {
        let kind = if m.member.voter { "voter" } else { "learner" };
        match &m.reply {
            Some(r) => println!(
                "meta {:<4}    {} {} ({kind}), pid {}, term {}, applied {}",
                m.member.id, m.member.address, r.role, r.pid, r.term, r.last_applied
            ),
            None => println!("meta {:<4}    {} unreachable ({kind})", m.member.id, m.member.address),
        }
    }
    for d in &report.data {
        let state = if d.live { "live" } else { "not heard from" };
        let draining = if d.server.draining { ", draining" } else { "" };
        let pid = d.reply.as_ref().map(|r| r.pid.to_string()).unwrap_or_else(|| "?".into());
        println!(
            "data {}    {} {state}{draining}, pid {pid}, {} of {} bytes used",
            d.server.id, d.server.address, d.server.used_bytes, d.server.capacity_bytes
        );
    }
    Ok(())
}
