//! A data server's reports to meta: its address, failure domain and free space, sent every
//! second to every meta server of the group (as HDFS data nodes report to both name nodes), so
//! that whichever member leads next already knows which data servers are alive.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_data::Volume;
use cairn_data::tokens::BlockTokenKeys;
use cairn_proto as pb;
use cairn_trust::block_token::BlockTokenKey;
use futures::future::join_all;
use tonic::transport::Channel;

use crate::layout::{self, Marker};

/// How often a data server reports to meta.
const REPORT_PERIOD: Duration = Duration::from_secs(1);
/// How long one report may take before it counts as failed.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Meta servers a data server reports to at most (a group has three or five).
const META_SERVERS_MAX: usize = 16;

/// What a data server says about itself.
pub struct Report {
    pub address: String,
    pub domain: String,
    pub volume: Arc<Volume>,
    /// Where the block-token keys meta's replies carry go (with TLS).
    pub block_keys: Option<Arc<BlockTokenKeys>>,
}

/// Reports to every known meta server each period until the process ends. `meta` are the
/// addresses given at start; the group's current members are learned from the replies.
pub async fn report_loop(meta: Vec<String>, dir: PathBuf, mut marker: Marker, report: Report) {
    let mut members = MetaServers::new(meta);
    let mut refused_logged = false;
    loop {
        let usage = report.volume.usage();
        let request = pb::RegisterDataServerRequest {
            id: marker.data_server_id,
            address: report.address.clone(),
            capacity_bytes: usage.capacity_bytes,
            used_bytes: usage.capacity_bytes.saturating_sub(usage.free_bytes),
            fs_id: marker.fs_id.clone(),
            domain: report.domain.clone(),
        };
        let calls = members.channels().into_iter().map(|(address, channel)| {
            let request = request.clone();
            async move {
                let mut call = tonic::Request::new(request);
                call.set_timeout(REPORT_TIMEOUT);
                (address, pb::meta_client::MetaClient::new(channel).register_data_server(call).await)
            }
        });
        let mut heard = false;
        let mut reported = Vec::new();
        for (address, result) in join_all(calls).await {
            match result {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    heard = true;
                    refused_logged = false;
                    if marker.fs_id.is_empty() && !reply.fs_id.is_empty() {
                        marker.fs_id = reply.fs_id;
                        if let Err(e) = layout::update(&dir, &marker) {
                            tracing::error!(error = %e, "could not record the file system id");
                        }
                    }
                    if let Some(keys) = &report.block_keys
                        && !reply.block_token_keys.is_empty()
                    {
                        keys.merge(token_keys_of(&reply.block_token_keys));
                    }
                    if reported.is_empty() {
                        reported = reply.meta_addresses;
                    }
                }
                Err(status) if status.code() == tonic::Code::PermissionDenied => {
                    if !refused_logged {
                        tracing::error!(%status, meta = %address, "meta refused this data server");
                        refused_logged = true;
                    }
                }
                // Followers answer "not leader" to a server the group has not recorded yet;
                // the leader's answer is the one that counts.
                Err(status) => tracing::debug!(%status, meta = %address, "report not taken"),
            }
        }
        if !reported.is_empty() {
            members.learn(&reported);
        }
        if !heard {
            tracing::debug!("no meta server took this data server's report");
        }
        tokio::time::sleep(REPORT_PERIOD).await;
    }
}

fn token_keys_of(keys: &[pb::BlockTokenKey]) -> Vec<BlockTokenKey> {
    keys.iter()
        .filter_map(|k| Some(BlockTokenKey { epoch: k.epoch, key: <[u8; 32]>::try_from(k.key.as_slice()).ok()? }))
        .collect()
}

/// The meta servers to report to: those given at start and the group's members as last
/// reported, each with a channel that reconnects by itself.
struct MetaServers {
    given: Vec<String>,
    current: Vec<String>,
    channels: HashMap<String, Channel>,
}

impl MetaServers {
    fn new(given: Vec<String>) -> Self {
        let mut given = given;
        given.truncate(META_SERVERS_MAX);
        MetaServers { current: given.clone(), given, channels: HashMap::new() }
    }

    /// The group's members as one of them reported: a server that left is no longer called,
    /// except one given at start.
    fn learn(&mut self, reported: &[String]) {
        let mut current = self.given.clone();
        for address in reported {
            if current.len() >= META_SERVERS_MAX {
                break;
            }
            if !current.contains(address) {
                current.push(address.clone());
            }
        }
        self.channels.retain(|address, _| current.contains(address));
        self.current = current;
    }

    fn channels(&mut self) -> Vec<(String, Channel)> {
        let mut out = Vec::with_capacity(self.current.len());
        for address in &self.current {
            if let Some(channel) = self.channels.get(address) {
                out.push((address.clone(), channel.clone()));
                continue;
            }
            match pb::net::endpoint(address) {
                Ok(endpoint) => {
                    let channel = pb::net::lazy_channel(&endpoint);
                    self.channels.insert(address.clone(), channel.clone());
                    out.push((address.clone(), channel));
                }
                Err(e) => tracing::warn!(error = %e, meta = %address, "bad meta address"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_learned_replace_those_that_left_but_keep_the_given_ones() {
        let mut servers = MetaServers::new(vec!["a:1".into()]);
        servers.learn(&["a:1".into(), "b:1".into(), "c:1".into()]);
        assert_eq!(servers.current, ["a:1", "b:1", "c:1"]);
        servers.learn(&["b:1".into(), "d:1".into()]);
        assert_eq!(servers.current, ["a:1", "b:1", "d:1"]);
    }

    #[test]
    fn members_are_bounded() {
        let mut servers = MetaServers::new(vec!["a:1".into()]);
        let many: Vec<String> = (0..100).map(|i| format!("m{i}:1")).collect();
        servers.learn(&many);
        assert_eq!(servers.current.len(), META_SERVERS_MAX);
    }
}
