//! The `cairn` command: one binary for every role (meta server, data server, mount) and the
//! tools around them.

mod bench;
mod layout;
mod roles;
mod status;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn: a distributed file system")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// This server's id in the meta group.
        #[arg(long, default_value_t = 1)]
        id: u64,
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
    },
    /// Mount a Cairn file system served by --meta.
    Mount {
        /// Meta server address(es), comma separated.
        #[arg(long)]
        meta: String,
        #[arg(long)]
        mount: PathBuf,
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

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error,cairn=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("cairn: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(4).build()?;
    match cli.command {
        Command::Up { data, mount, listen } => roles::up(&runtime, data, mount, listen),
        Command::Meta { dir, listen, init, id } => runtime.block_on(roles::meta(dir, listen, init, id)),
        Command::Data { dir, listen, meta } => runtime.block_on(roles::data(dir, listen, split(&meta))),
        Command::Mount { meta, mount } => roles::mount(&runtime, split(&meta), mount),
        Command::Bench { dir, size_mib, files, random_reads, runs } => {
            bench::bench(&runtime, bench::BenchOptions { dir, size_mib, files, random_reads, runs: runs.max(1) })
        }
        Command::Status { meta, json } => runtime.block_on(status::status(split(&meta), json)),
    }
}

fn split(addresses: &str) -> Vec<String> {
    addresses.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect()
}
