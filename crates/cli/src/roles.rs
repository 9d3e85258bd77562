//! The server and client roles: `up` (everything in one process), `meta`, `data` and `mount`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cairn_client::callbacks::PartitionPolicy;
use cairn_client::{Client, ClientOptions, RetryPolicy};
use cairn_data::scrub::ScrubPolicy;
use cairn_data::{DataService, Volume};
use cairn_meta::{Bootstrap, MetaConfig, MetaNode, MetaService};
use cairn_mount::MountOptions;
use cairn_proto as pb;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::Server;

use crate::layout::{self, Marker};
use crate::registration::{Report, report_loop};
use crate::renewal;
use crate::security::{self, GuardLayer, Transport};
use cairn_data::tokens::BlockTokenKeys;
use cairn_trust::tls::CertSlot;
use cairn_trust::{JoinToken, Role, TrustFiles};

/// Streams each client connection may have open at once.
const STREAMS_PER_CONNECTION_MAX: usize = 256;
/// How long a block stays on a data server before meta is asked whether anything needs it:
/// longer than any repair or upload takes to be recorded.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(600);
/// How long a new meta server keeps asking the group to take it in.
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

async fn bind(listen: &str) -> Result<TcpListener> {
    let address: SocketAddr = listen.parse().with_context(|| format!("--listen {listen} is not an IP:port address"))?;
    TcpListener::bind(address).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!(
                "port {} on {} is in use (is another cairn running?): pass --listen with a free port",
                address.port(),
                address.ip()
            )
        } else {
            anyhow!("cannot listen on {address}: {e}")
        }
    })
}

/// The address other processes should use for this server: `advertise` when given (a proxy or
/// NAT in front of it), else the address it listens on. Outgoing connections leave from the
/// listening IP, so peers see one address per server.
fn advertised(listener: &TcpListener, advertise: Option<String>) -> Result<String> {
    let local = listener.local_addr()?;
    pb::net::set_source_address(local.ip());
    Ok(advertise.unwrap_or_else(|| local.to_string()))
}

/// Serves the given services until `shutdown` flips: over TLS with `trust`, else plaintext.
async fn serve(
    listener: TcpListener,
    meta: Option<MetaService>,
    data: Option<DataService>,
    mut shutdown: watch::Receiver<bool>,
    trust: Option<ServerTrust>,
) -> Result<()> {
    let transport = if trust.is_some() { Transport::Tls } else { Transport::Plaintext };
    let router = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(pb::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(pb::CONNECTION_WINDOW_BYTES)
        .max_frame_size(pb::FRAME_BYTES_MAX)
        .concurrency_limit_per_connection(STREAMS_PER_CONNECTION_MAX)
        .layer(GuardLayer { transport })
        .add_optional_service(meta.map(MetaService::into_server))
        .add_optional_service(data.map(DataService::into_server));
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Some(trust) = trust {
        return router
            .serve_with_incoming_shutdown(security::tls_incoming(listener, &trust.files, trust.certs)?, stop)
            .await
            .context("serving");
    }
    // Nagle's algorithm would hold a reply's last small frame back until the peer's delayed
    // ACK (~40 ms): every accepted connection sends at once.
    // A failed accept (a peer that reset at once, descriptors running out) must not end the
    // server, as an error from the incoming stream would: it is logged and skipped.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(|stream| {
        match stream.and_then(|stream| stream.set_nodelay(true).map(|()| stream)) {
            Ok(stream) => Some(Ok::<_, std::io::Error>(stream)),
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                None
            }
        }
    });
    router.serve_with_incoming_shutdown(incoming, stop).await.context("serving")
}

/// The trust files a server serves and connects with (TLS), after checking they exist; or
/// none, loudly, with `--plaintext`.
fn server_trust(dir: &std::path::Path, transport: Transport, what: &str) -> Result<Option<ServerTrust>> {
    if transport == Transport::Plaintext {
        security::warn_plaintext(what);
        security::install_plaintext();
        return Ok(None);
    }
    if !TrustFiles::present(dir) {
        bail!(
            "{} holds no TLS certificate: it was made with --plaintext (run it with --plaintext) or its tls/ directory is gone",
            dir.display()
        );
    }
    let files = TrustFiles::load(dir)?;
    let certs = security::install(&files)?;
    Ok(Some(ServerTrust { files, certs }))
}

/// What a TLS server serves with: its trust files and the slot its certificate is presented
/// from (replaced when it renews).
struct ServerTrust {
    files: TrustFiles,
    certs: Arc<CertSlot>,
}

impl ServerTrust {
    /// Renews the certificate whenever it falls due, for as long as the process runs.
    fn keep_renewed(&self, dir: &std::path::Path, meta: Vec<String>, role: Role, id: u64) {
        tokio::spawn(renewal::keep_renewed(dir.to_path_buf(), meta, role, id, self.certs.clone()));
    }
}

pub async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

pub fn check_mount_point(path: &std::path::Path) -> Result<()> {
    if !path.exists() {
        bail!("mount point {} does not exist: create it with `mkdir -p {}`", path.display(), path.display());
    }
    if !path.is_dir() {
        bail!("mount point {} is not a directory", path.display());
    }
    if cairn_mount::mount::is_mount_point(path) {
        bail!(
            "{} is already a mount point: unmount it first (`umount {}`) or pick another directory",
            path.display(),
            path.display()
        );
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        bail!(
            "FUSE is not available: /dev/fuse is missing (load the module with `modprobe fuse` or install the fuse3 package)"
        );
    }
    Ok(())
}

/// Runs the scrubber over `volume` and reports every corrupt block to the meta leader.
async fn scrub_and_report(
    volume: Arc<Volume>,
    policy: ScrubPolicy,
    shutdown: watch::Receiver<bool>,
    meta: Vec<String>,
    server: u64,
) {
    let report = |id: pb::BlockId, len: u32, what: String| {
        let meta = meta.clone();
        async move {
            let request = pb::ReportBadBlockRequest {
                block: Some(pb::BlockRef { id_hi: id.hi(), id_lo: id.lo(), len, ..Default::default() }),
                server,
                what,
            };
            let sent = crate::cluster::on_leader(&meta, Duration::from_secs(30), |mut c| {
                let request = request.clone();
                async move { c.report_bad_block(request).await }
            })
            .await;
            if let Err(e) = sent {
                tracing::warn!(block = %id, error = %e, "could not report a corrupt block to meta");
            }
        }
    };
    cairn_data::scrub::scrub(volume, policy, shutdown, report).await;
}

/// Deletes blocks meta no longer wants on this server: uploads whose session died before
/// committing them, and copies meta's records moved elsewhere. A block is asked about only
/// after it has been here for `grace`, so a copy whose record is still being written is safe.
async fn collect_orphans(
    volume: Arc<Volume>,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
    meta: Vec<String>,
    server: u64,
) {
    let period = (grace / 2).clamp(Duration::from_millis(500), Duration::from_secs(300));
    let mut first_seen: std::collections::HashMap<u128, std::time::Instant> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let held = volume.blocks();
        let now = std::time::Instant::now();
        let mut still_here = std::collections::HashMap::with_capacity(held.len());
        let mut ripe = Vec::new();
        for (id, _) in held {
            let seen = first_seen.get(&id.0).copied().unwrap_or(now);
            still_here.insert(id.0, seen);
            if now.duration_since(seen) >= grace {
                ripe.push(id);
            }
        }
        first_seen = still_here;
        for batch in ripe.chunks(cairn_meta::service::ORPHAN_QUERY_MAX) {
            let request = pb::FindOrphansRequest {
                server,
                blocks: batch
                    .iter()
                    .map(|id| pb::BlockRef { id_hi: id.hi(), id_lo: id.lo(), ..Default::default() })
                    .collect(),
            };
            let answer = crate::cluster::on_leader(&meta, Duration::from_secs(30), |mut c| {
                let request = request.clone();
                async move { c.find_orphans(request).await }
            })
            .await;
            let orphans: Vec<pb::BlockId> = match answer {
                Ok(reply) => reply.orphans.iter().map(pb::BlockId::of).collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "meta did not answer about orphan blocks");
                    break;
                }
            };
            if orphans.is_empty() {
                continue;
            }
            let target = volume.clone();
            match tokio::task::spawn_blocking(move || target.delete(&orphans)).await {
                Ok(Ok(deleted)) => tracing::info!(deleted, "deleted blocks nothing refers to"),
                Ok(Err(e)) => tracing::warn!(error = %e, "deleting orphan blocks failed"),
                Err(e) => tracing::warn!(error = %e, "orphan deletion task failed"),
            }
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

pub fn client_name(role: &str) -> String {
    format!("{role}@{}:{}", host_name(), std::process::id())
}

/// A one-node file system served from this process: meta and data on one port.
pub struct LocalNode {
    pub node: Arc<MetaNode>,
    pub address: String,
    pub marker: Marker,
    pub fresh: bool,
    shutdown: watch::Sender<bool>,
}

impl LocalNode {
    /// Creates (first time) or opens the file system in `data` and serves it on `listen`.
    /// With TLS, the in-process client connects as the server itself.
    pub async fn start(data: &std::path::Path, listen: &str, transport: Transport) -> Result<LocalNode> {
        let (marker, fresh) = layout::open_or_create(data, &layout::new_fs_id(), None, true)?;
        if fresh && transport == Transport::Tls {
            security::init_authority(data, &marker.fs_id, 1)?;
        }
        if transport == Transport::Tls {
            renewal::renew_if_due(data, &[], Role::Meta, 1).await?;
        }
        let trust = server_trust(data, transport, "this file system")?;
        if let Some(trust) = &trust {
            trust.keep_renewed(data, Vec::new(), Role::Meta, 1);
        }
        let signer = security::load_signer(data)?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let listener = bind(listen).await?;
        let address = advertised(&listener, None)?;
        let config = MetaConfig::new(1, address.clone(), layout::meta_dir(data));
        let bootstrap = Bootstrap { fs_id: marker.fs_id.clone(), replication: 1 };
        let node = MetaNode::start(config, Some(bootstrap)).await.context("starting meta")?;
        node.wait_for_leader(Duration::from_secs(30)).await?;
        let volume = Arc::new(Volume::open(&layout::blocks_dir(data)).context("opening the block volume")?);
        let meta_service = MetaService::new(node.clone()).with_signer(signer);
        let block_keys = (transport == Transport::Tls).then(|| Arc::new(BlockTokenKeys::default()));
        let mut data_service = DataService::new(volume.clone(), marker.data_server_id, marker.fs_id.clone());
        if let Some(keys) = &block_keys {
            data_service = data_service.with_block_tokens(keys.clone());
        }
        tokio::spawn(serve(listener, Some(meta_service), Some(data_service), shutdown.clone(), trust));
        tokio::spawn(node.clone().run_background(shutdown.clone()));
        let scrubbing = scrub_and_report(
            volume.clone(),
            ScrubPolicy::default(),
            shutdown.clone(),
            vec![address.clone()],
            marker.data_server_id,
        );
        tokio::spawn(scrubbing);
        let collection = collect_orphans(
            volume.clone(),
            ORPHAN_GRACE,
            shutdown.clone(),
            vec![address.clone()],
            marker.data_server_id,
        );
        tokio::spawn(collection);
        let report = Report { address: address.clone(), domain: host_name(), volume, block_keys };
        let registration = report_loop(vec![address.clone()], data.to_path_buf(), marker.clone(), report);
        tokio::spawn(registration);
        Ok(LocalNode { node, address, marker, fresh, shutdown: shutdown_tx })
    }

    /// A client of this file system, with its session kept alive.
    pub async fn client(&self, role: &str) -> Result<Arc<Client>> {
        let client = Client::connect(vec![self.address.clone()], client_name(role), ClientOptions::default())
            .await
            .context("connecting to meta")?;
        client.spawn_heartbeat();
        Ok(client)
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.node.shutdown().await;
    }
}

pub fn up(
    runtime: &tokio::runtime::Runtime,
    data: PathBuf,
    mount_path: PathBuf,
    listen: String,
    transport: Transport,
) -> Result<()> {
    check_mount_point(&mount_path)?;
    let (local, client) = runtime.block_on(async {
        let local = LocalNode::start(&data, &listen, transport).await?;
        let client = local.client("up").await?;
        Ok::<_, anyhow::Error>((local, client))
    })?;
    let mounted = cairn_mount::mount(client, runtime.handle().clone(), &mount_path, MountOptions::default())?;
    let address = &local.address;
    println!(
        "Cairn file system {} {} and mounted at {}",
        local.marker.fs_id,
        if local.fresh { "created" } else { "started" },
        mounted.path().display()
    );
    let credential = security::admin_credential_path(&data);
    let with = match transport {
        Transport::Tls => format!("--credential {}", credential.display()),
        Transport::Plaintext => "--plaintext".to_string(),
    };
    println!("  meta and data served at {address} ({})", if transport == Transport::Tls { "TLS" } else { "NO TLS" });
    println!("  mount it elsewhere:  cairn mount --meta {address} {with} --mount DIR");
    println!("  status:              cairn status --meta {address} {with}");
    println!("Press Ctrl-C to unmount and stop.");
    runtime.block_on(wait_for_signal())?;
    eprintln!("cairn: unmounting {}", mounted.path().display());
    let unmounted = mounted.unmount();
    runtime.block_on(local.stop());
    unmounted.context("unmounting")?;
    Ok(())
}

/// How `cairn meta` starts on its directory.
pub struct MetaStart {
    pub transport: Transport,
    /// The join token, for a server joining a group (with TLS).
    pub token: Option<JoinToken>,
    pub dir: PathBuf,
    pub listen: String,
    /// Create a new file system (a one-member group) in an empty directory.
    pub init: bool,
    /// Meta servers of an existing group to join.
    pub join: Vec<String>,
    pub id: Option<u64>,
    pub advertise: Option<String>,
    /// Copies of each block, for a new file system (--init).
    pub replication: u32,
    /// Raft log entries between snapshots.
    pub snapshot_every: u64,
    pub session_lease: Duration,
}

pub async fn meta(start: MetaStart) -> Result<()> {
    let MetaStart {
        transport,
        token,
        dir,
        listen,
        init,
        join,
        id,
        advertise,
        replication,
        snapshot_every,
        session_lease,
    } = start;
    if !(1..=cairn_meta::node::REPLICATION_MAX).contains(&replication) {
        bail!("--replication must be 1 to {}", cairn_meta::node::REPLICATION_MAX);
    }
    if init && !join.is_empty() {
        bail!("--init creates a new file system and --join adds this server to an existing one: give only one");
    }
    let new_fs_id = if init { layout::new_fs_id() } else { String::new() };
    let (mut marker, fresh) = layout::open_or_create(&dir, &new_fs_id, None, false)?;
    if fresh && !init && join.is_empty() {
        std::fs::remove_file(dir.join("cairn.json")).ok();
        bail!(
            "{} holds no meta server: pass --init to create a file system there, or --join ADDRESS to add it to a running one",
            dir.display()
        );
    }
    match (marker.meta_id, id) {
        (0, id) => {
            // Stores from before ids were recorded ran as the default id 1.
            let fallback = if fresh && !init { rand::random::<u64>() >> 1 | 2 } else { 1 };
            marker.meta_id = id.unwrap_or(fallback);
            layout::update(&dir, &marker)?;
        }
        (recorded, Some(id)) if recorded != id => {
            bail!("{} holds meta server {recorded}, not {id}: drop --id or use another directory", dir.display())
        }
        _ => {}
    }
    let id = marker.meta_id;
    let listener = bind(&listen).await?;
    let address = advertised(&listener, advertise)?;
    if transport == Transport::Tls {
        if fresh && init {
            security::init_authority(&dir, &marker.fs_id, id)?;
            let token = cairn_trust::files::AuthorityFiles::token_path(&dir);
            println!("cairn meta {id}: new file system; servers join it with --token {}", token.display());
        } else if !join.is_empty() {
            security::enroll(&dir, &join, token.as_ref(), Role::Meta, id).await.context("joining with TLS")?;
        }
        renewal::renew_if_due(&dir, &join, Role::Meta, id).await?;
    }
    let trust = server_trust(&dir, transport, &format!("meta server {id}"))?;
    if let Some(trust) = &trust {
        trust.keep_renewed(&dir, join.clone(), Role::Meta, id);
    }
    let signer = security::load_signer(&dir)?;
    tracing::info!(%address, id, "listening; starting the meta store and raft");
    let config =
        MetaConfig { snapshot_every, session_lease, ..MetaConfig::new(id, address.clone(), layout::meta_dir(&dir)) };
    let bootstrap = init.then(|| Bootstrap { fs_id: marker.fs_id.clone(), replication });
    let node = MetaNode::start(config, bootstrap).await.context("starting meta")?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let service = MetaService::new(node.clone()).with_signer(signer);
    let server = tokio::spawn(serve(listener, Some(service), None, shutdown.clone(), trust));
    tokio::spawn(node.clone().run_background(shutdown));
    // A server that joined before knows its file system: it restarts as a member.
    if !join.is_empty() && marker.fs_id.is_empty() {
        println!("cairn meta {id} at {address}: joining the group at {}", join.join(","));
        let joined = tokio::select! {
            joined = crate::cluster::add_meta(&join, id, &address, JOIN_TIMEOUT) => joined,
            _ = wait_for_signal() => Err(anyhow!("stopped before joining")),
        };
        match joined {
            Ok(fs_id) => {
                marker.fs_id = fs_id;
                layout::update(&dir, &marker)?;
            }
            Err(e) => {
                let _ = shutdown_tx.send(true);
                node.shutdown().await;
                return Err(e.context("joining the meta group"));
            }
        }
    }
    println!("cairn meta {id} serving file system {} at {address}", marker.fs_id);
    wait_for_signal().await?;
    let _ = shutdown_tx.send(true);
    node.shutdown().await;
    server.await??;
    Ok(())
}

/// How `cairn data` starts.
pub struct DataStart {
    pub transport: Transport,
    /// The join token, for a new data server (with TLS).
    pub token: Option<JoinToken>,
    pub scrub: ScrubPolicy,
    /// How long a block must have been here before meta is asked whether it is still wanted.
    pub orphan_grace: Duration,
    pub dir: PathBuf,
    pub listen: String,
    pub advertise: Option<String>,
    pub meta: Vec<String>,
    /// Failure domain label (default: the host name).
    pub domain: Option<String>,
}

pub async fn data(start: DataStart) -> Result<()> {
    let DataStart { transport, token, dir, listen, advertise, meta, domain, scrub, orphan_grace } = start;
    let domain = domain.unwrap_or_else(host_name);
    if meta.is_empty() {
        bail!("--meta needs at least one meta server address");
    }
    let (marker, _) = layout::open_or_create(&dir, "", None, true)?;
    let listener = bind(&listen).await?;
    let address = advertised(&listener, advertise)?;
    if transport == Transport::Tls {
        let id = marker.data_server_id;
        security::enroll(&dir, &meta, token.as_ref(), Role::Data, id).await.context("joining with TLS")?;
        renewal::renew_if_due(&dir, &meta, Role::Data, id).await?;
    }
    let trust = server_trust(&dir, transport, &format!("data server {}", marker.data_server_id))?;
    if let Some(trust) = &trust {
        trust.keep_renewed(&dir, meta.clone(), Role::Data, marker.data_server_id);
    }
    let volume = Arc::new(Volume::open(&layout::blocks_dir(&dir)).context("opening the block volume")?);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let block_keys = (transport == Transport::Tls).then(|| Arc::new(BlockTokenKeys::default()));
    let mut service = DataService::new(volume.clone(), marker.data_server_id, marker.fs_id.clone());
    if let Some(keys) = &block_keys {
        service = service.with_block_tokens(keys.clone());
    }
    let server = tokio::spawn(serve(listener, None, Some(service), shutdown, trust));
    tokio::spawn(scrub_and_report(volume.clone(), scrub, shutdown_tx.subscribe(), meta.clone(), marker.data_server_id));
    let collection =
        collect_orphans(volume.clone(), orphan_grace, shutdown_tx.subscribe(), meta.clone(), marker.data_server_id);
    tokio::spawn(collection);
    let report = Report { address: address.clone(), domain, volume, block_keys };
    tokio::spawn(report_loop(meta, dir.clone(), marker.clone(), report));
    println!("cairn data server {} serving {} at {address}", marker.data_server_id, dir.display());
    wait_for_signal().await?;
    let _ = shutdown_tx.send(true);
    server.await??;
    Ok(())
}

/// The on-disk block cache of a mount.
pub struct DiskCacheOptions {
    /// None: the default place (/var/cache/cairn as root, else ~/.cache/cairn).
    pub dir: Option<PathBuf>,
    /// 0 turns the cache off.
    pub bytes: u64,
}

impl DiskCacheOptions {
    fn dir(&self) -> Option<PathBuf> {
        if let Some(dir) = &self.dir {
            return Some(dir.clone());
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return Some(PathBuf::from("/var/cache/cairn"));
        }
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/cairn"))
    }
}

/// How a mount behaves towards other clients.
#[derive(Clone, Copy, Debug, Default)]
pub struct MountModes {
    pub strict: bool,
    /// Whole-file copies read by the kernel directly (`MountOptions::passthrough`).
    pub passthrough: bool,
    pub partition: PartitionPolicy,
    /// How long a request keeps trying before EIO.
    pub timeout: std::time::Duration,
}

pub fn mount(
    runtime: &tokio::runtime::Runtime,
    meta: Vec<String>,
    mount_path: PathBuf,
    cache: DiskCacheOptions,
    modes: MountModes,
) -> Result<()> {
    if meta.is_empty() {
        bail!("--meta needs at least one meta server address");
    }
    check_mount_point(&mount_path)?;
    let options = ClientOptions {
        disk_cache_dir: cache.dir(),
        disk_cache_bytes: cache.bytes,
        partition: modes.partition,
        retry: RetryPolicy::with_deadline(modes.timeout),
        whole_copies: modes.passthrough,
        ..Default::default()
    };
    let client = runtime.block_on(async {
        let client = Client::connect(meta.clone(), client_name("mount"), options)
            .await
            .with_context(|| format!("connecting to meta at {}", meta.join(",")))?;
        if modes.passthrough && client.copies.is_none() {
            bail!(
                "--passthrough keeps whole-file copies on a volume of its own: it needs the disk cache \
                 (--cache-mib above 0), root, loop devices and mkfs.ext4 (the log above says which failed)"
            );
        }
        client.spawn_heartbeat();
        Ok::<_, anyhow::Error>(client)
    })?;
    let mounted = cairn_mount::mount(
        client,
        runtime.handle().clone(),
        &mount_path,
        MountOptions { strict: modes.strict, passthrough: modes.passthrough },
    )?;
    println!("Cairn mounted at {} (meta {})", mounted.path().display(), meta.join(","));
    runtime.block_on(wait_for_signal())?;
    eprintln!("cairn: unmounting {}", mounted.path().display());
    mounted.unmount().context("unmounting")?;
    Ok(())
}
