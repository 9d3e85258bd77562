//! The `cairn` command: one binary for every role (meta server, data server, mount) and the
//! tools around them.

use std::path::PathBuf;

use anyhow::Result;
use cairn::security::{self, Transport};
use cairn::{bench, cluster, credentials, dev_cluster, renewal, roles, status};
use cairn_client::callbacks::PartitionPolicy;
use cairn_data::scrub::ScrubPolicy;
use clap::{Parser, Subcommand, ValueEnum};

/// What a mount does when it lost touch with meta for longer than its promise lease.
#[derive(Clone, Copy, ValueEnum)]
enum OnPartition {
    Wait,
    Eio,
}

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn: a distributed file system")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Run or connect WITHOUT TLS: no encryption, no authentication. For a network you trust
    /// entirely; servers say so loudly.
    #[arg(long, global = true)]
    plaintext: bool,
    /// The client credential to connect with (mount, status, cluster changes). `--init` writes
    /// the administrator's to tls/admin.cred in the meta server's directory.
    #[arg(long, global = true)]
    credential: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Start a one-node file system (meta and data in this process) and mount it.
    Up {
        /// Where the file system keeps its metadata and blocks (created on first run).
        #[arg(long)]
        data: PathBuf,
        /// Where to mount it.
        #[arg(long)]
        mount: PathBuf,
        /// Address to serve meta and data on.
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: String,
    },
    /// Run a meta server.
    Meta {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: String,
        /// Create a new file system here if the directory is empty.
        #[arg(long)]
        init: bool,
        /// Join the running meta group at these address(es), comma separated (a new, empty directory).
        #[arg(long)]
        join: Option<String>,
        /// This server's id in the meta group (default: 1 with --init, random with --join; then
        /// recorded in the directory).
        #[arg(long)]
        id: Option<u64>,
        /// The address other servers and clients reach this one at, if not --listen.
        #[arg(long)]
        advertise: Option<String>,
        /// Copies of each block (with --init): 3 suits a cluster of three or more data servers.
        #[arg(long, default_value_t = 3)]
        replication: u32,
        /// Raft log entries between snapshots; the log before a snapshot is purged.
        #[arg(long, default_value_t = 20_000)]
        snapshot_every: u64,
        /// How long a client session lives without a heartbeat (its open unlinked files and
        /// uncommitted uploads go when it expires).
        #[arg(long, default_value_t = 60)]
        session_lease_secs: u64,
        /// With --join: the file system's join token (or a file holding it), which `--init`
        /// wrote to tls/join.token in the first meta server's directory.
        #[arg(long)]
        token: Option<String>,
    },
    /// Start a whole cluster on this machine (separate processes, ports and directories) and
    /// mount it; Ctrl-C stops it all. Running it again on the same --dir brings it back.
    DevCluster {
        /// Meta servers.
        #[arg(long, default_value_t = 3)]
        meta: usize,
        /// Data servers.
        #[arg(long, default_value_t = 4)]
        data: usize,
        /// Where the servers keep their state and logs.
        #[arg(long)]
        dir: PathBuf,
        /// Where to mount the file system.
        #[arg(long)]
        mount: PathBuf,
        /// First port: meta servers listen on the next ones, then data servers.
        #[arg(long, default_value_t = 7500)]
        base_port: u16,
        /// Copies of each block (for a new cluster).
        #[arg(long, default_value_t = 3)]
        replication: u32,
    },
    /// Change the meta group of a running file system.
    Cluster {
        #[command(subcommand)]
        change: ClusterChange,
    },
    /// Issue, revoke and list client credentials (with the administrator's --credential).
    Credential {
        #[command(subcommand)]
        action: CredentialAction,
    },
    /// Run a data server that stores blocks for the file system at --meta.
    Data {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7430")]
        listen: String,
        /// Meta server address(es), comma separated.
        #[arg(long)]
        meta: String,
        /// The address clients and other servers reach this one at, if not --listen.
        #[arg(long)]
        advertise: Option<String>,
        /// Failure domain (host, rack, zone): copies of a block go to different domains when
        /// there are enough. Default: the host name.
        #[arg(long)]
        domain: Option<String>,
        /// How fast the scrubber re-reads stored blocks to find corrupt ones.
        #[arg(long, default_value_t = 16)]
        scrub_mib_per_s: u64,
        /// Pause between two scrubs of the whole volume.
        #[arg(long, default_value_t = 60)]
        scrub_pause_secs: u64,
        /// How long a block must have been stored before meta is asked whether anything still
        /// needs it (uploads never committed, copies moved elsewhere are then deleted).
        #[arg(long, default_value_t = roles::ORPHAN_GRACE.as_secs())]
        orphan_grace_secs: u64,
        /// The file system's join token (or a file holding it), for a new data server.
        #[arg(long)]
        token: Option<String>,
    },
    /// Mount a Cairn file system served by --meta.
    Mount {
        /// Meta server address(es), comma separated.
        #[arg(long)]
        meta: String,
        #[arg(long)]
        mount: PathBuf,
        /// Where blocks read are cached on disk across mounts (a subdirectory per file system;
        /// default /var/cache/cairn as root, else ~/.cache/cairn).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Size of the on-disk cache; 0 turns it off.
        #[arg(long, default_value_t = 1024)]
        cache_mib: u64,
        /// Make every write visible to other clients when write() returns (write-through, no
        /// kernel data cache), instead of at close.
        #[arg(long)]
        strict: bool,
        /// Keep whole-file copies of large cached files in the cache directory and let the
        /// kernel read them directly (FUSE passthrough, root only): cached re-reads at local
        /// disk speed. Needs loop devices and mkfs.ext4 (the copies get a file system of their
        /// own). When the promise lease runs out, reads of a copy fail with EIO, through files
        /// already open too, whatever --on-partition says: such a read cannot wait.
        #[arg(long, conflicts_with = "strict")]
        passthrough: bool,
        /// What requests do once this client lost touch with meta for longer than its
        /// promise lease: wait (up to --timeout-secs, then EIO) or fail with EIO at once.
        #[arg(long, value_enum, default_value = "wait")]
        on_partition: OnPartition,
        /// How long a request keeps trying (another copy of a block, a new meta leader, a
        /// server coming back) before it fails with EIO.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout_secs: u64,
        /// The local address this client's connections leave from (on a host with several).
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
    },
    /// Run the same workloads on a one-node Cairn mount and on the local disk; print the ratio.
    Bench {
        /// Scratch directory on the disk to compare against (Cairn keeps its data there too).
        #[arg(long, default_value = "/var/tmp/cairn-bench")]
        dir: PathBuf,
        /// Size of the sequential file.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Small files created, statted, read and removed.
        #[arg(long, default_value_t = 10_000)]
        files: u64,
        /// 4 KiB random reads.
        #[arg(long, default_value_t = 20_000)]
        random_reads: u64,
        /// Runs; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Measure this existing Cairn mount (a cluster, say) instead of a one-node file system
        /// started in this process.
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// Show the state of a file system.
    Status {
        #[arg(long, default_value = "127.0.0.1:7420")]
        meta: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CredentialAction {
    /// Issue a client credential and write it (key and certificate) to --out.
    Issue {
        /// Any meta server of the file system, comma separated.
        #[arg(long)]
        meta: String,
        #[command(flatten)]
        options: credentials::IssueOptions,
    },
    /// Revoke a credential (by id or name): every request made with it is refused from then on.
    Revoke {
        #[arg(long)]
        meta: String,
        /// The credential's id or name.
        which: String,
    },
    /// List the credentials issued.
    List {
        #[arg(long)]
        meta: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterChange {
    /// Add a running meta server to the group (`cairn meta --join` does this by itself).
    AddMeta {
        /// Any meta server of the group, comma separated.
        #[arg(long)]
        meta: String,
        /// The new server's id (unique in the group).
        #[arg(long)]
        id: u64,
        /// The new server's address.
        #[arg(long)]
        address: String,
    },
    /// Remove a meta server from the group.
    RemoveMeta {
        /// Any meta server of the group, comma separated.
        #[arg(long)]
        meta: String,
        #[arg(long)]
        id: u64,
    },
    /// Start a new block-token key: tokens are issued with it at once, data servers accept it
    /// and the previous one, and the key before that is retired.
    RotateBlockKey {
        /// Any meta server of the group, comma separated.
        #[arg(long)]
        meta: String,
    },
    /// Take a data server out for good: its blocks are copied to the other servers first (from
    /// it if it still runs, else from their other copies), then it is removed.
    RemoveData {
        /// Any meta server of the group, comma separated.
        #[arg(long)]
        meta: String,
        /// The data server's id (`cairn status` lists them).
        #[arg(long)]
        id: u64,
        /// Remove it at once: blocks with no copy on another server are lost.
        #[arg(long)]
        force: bool,
        /// Start the drain and return instead of waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the drain before giving up (it goes on regardless).
        #[arg(long, default_value_t = 3600)]
        wait_secs: u64,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error,cairn=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // One provider for every TLS configuration of the process.
    let _ = (*cairn_trust::provider()).clone().install_default();
    if let Err(e) = run(cli) {
        eprintln!("cairn: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(4).build()?;
    let transport = if cli.plaintext { Transport::Plaintext } else { Transport::Tls };
    let credential = cli.credential;
    let connect_only = || security::install_client(credential.as_deref(), transport);
    let token = |given: Option<String>| given.as_deref().map(security::read_token).transpose();
    match cli.command {
        Command::Up { data, mount, listen } => roles::up(&runtime, data, mount, listen, transport),
        Command::Meta {
            dir,
            listen,
            init,
            join,
            id,
            advertise,
            replication,
            snapshot_every,
            session_lease_secs,
            token: given,
        } => {
            let token = token(given)?;
            runtime.block_on(roles::meta(roles::MetaStart {
                transport,
                token,
                dir,
                listen,
                init,
                join: join.as_deref().map(split).unwrap_or_default(),
                id,
                advertise,
                replication,
                snapshot_every,
                session_lease: std::time::Duration::from_secs(session_lease_secs.max(1)),
            }))
        }
        Command::DevCluster { meta, data, dir, mount, base_port, replication } => dev_cluster::run(
            &runtime,
            dev_cluster::DevCluster { metas: meta, datas: data, dir, mount, base_port, replication, transport },
        ),
        Command::Cluster { change } => {
            connect_only()?;
            match change {
                ClusterChange::AddMeta { meta, id, address } => {
                    runtime.block_on(cluster::add_meta_command(split(&meta), id, address))
                }
                ClusterChange::RemoveMeta { meta, id } => {
                    runtime.block_on(cluster::remove_meta_command(split(&meta), id))
                }
                ClusterChange::RotateBlockKey { meta } => {
                    runtime.block_on(cluster::rotate_block_key_command(split(&meta)))
                }
                ClusterChange::RemoveData { meta, id, force, no_wait, wait_secs } => {
                    let wait = (!no_wait).then(|| std::time::Duration::from_secs(wait_secs));
                    runtime.block_on(cluster::remove_data_command(split(&meta), id, force, wait))
                }
            }
        }
        Command::Credential { action } => {
            connect_only()?;
            match action {
                CredentialAction::Issue { meta, options } => {
                    runtime.block_on(credentials::issue_command(split(&meta), options))
                }
                CredentialAction::Revoke { meta, which } => {
                    runtime.block_on(credentials::revoke_command(split(&meta), which))
                }
                CredentialAction::List { meta, json } => {
                    runtime.block_on(credentials::list_command(split(&meta), json))
                }
            }
        }
        Command::Data {
            dir,
            listen,
            meta,
            advertise,
            domain,
            scrub_mib_per_s,
            scrub_pause_secs,
            orphan_grace_secs,
            token: given,
        } => {
            let token = token(given)?;
            let scrub = ScrubPolicy {
                bytes_per_second: scrub_mib_per_s.max(1) * 1024 * 1024,
                pause: std::time::Duration::from_secs(scrub_pause_secs),
            };
            runtime.block_on(roles::data(roles::DataStart {
                transport,
                token,
                dir,
                listen,
                advertise,
                meta: split(&meta),
                domain,
                scrub,
                orphan_grace: std::time::Duration::from_secs(orphan_grace_secs),
            }))
        }
        Command::Mount { meta, mount, cache_dir, cache_mib, strict, passthrough, on_partition, timeout_secs, bind } => {
            if let Some(ip) = bind {
                cairn_proto::net::set_source_address(ip);
            }
            if let (Some(certs), Some(path)) = (connect_only()?, credential.clone()) {
                runtime.spawn(renewal::keep_credential_current(path, certs));
            }
            let cache = roles::DiskCacheOptions { dir: cache_dir, bytes: cache_mib.saturating_mul(1024 * 1024) };
            let partition = match on_partition {
                OnPartition::Wait => PartitionPolicy::Wait,
                OnPartition::Eio => PartitionPolicy::Eio,
            };
            let timeout = std::time::Duration::from_secs(timeout_secs);
            roles::mount(
                &runtime,
                split(&meta),
                mount,
                cache,
                roles::MountModes { strict, passthrough, partition, timeout },
            )
        }
        Command::Bench { dir, size_mib, files, random_reads, runs, mount } => {
            let runs = runs.max(1);
            bench::bench(&runtime, bench::BenchOptions { dir, size_mib, files, random_reads, runs, mount, transport })
        }
        Command::Status { meta, json } => {
            connect_only()?;
            runtime.block_on(status::status(split(&meta), json))
        }
    }
}

fn split(addresses: &str) -> Vec<String> {
    addresses.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect()
}
