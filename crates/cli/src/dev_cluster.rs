//! `cairn dev-cluster`: a whole cluster on one machine, each server its own process with its own
//! port and directory, and a mount; stopped together on Ctrl-C. Run it again on the same
//! directory and the same cluster comes back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::security::{self, Transport};

pub struct DevCluster {
    pub metas: usize,
    pub datas: usize,
    pub dir: PathBuf,
    pub mount: PathBuf,
    /// First port; meta servers take the next ones, then data servers.
    pub base_port: u16,
    pub replication: u32,
    pub transport: Transport,
}

/// The servers this command started, stopped (SIGTERM, then SIGKILL) when dropped.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in self.0.iter_mut().rev() {
            // SAFETY: signalling a child this process started and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, child) in self.0.iter_mut().rev() {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("cairn: {name} did not stop in time; killing it");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

fn spawn(children: &mut Children, dir: &Path, name: &str, args: &[String]) -> Result<()> {
    let bin = std::env::current_exe().context("finding the cairn binary")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .with_context(|| format!("opening the log of {name}"))?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    children.0.push((name.to_string(), child));
    Ok(())
}

fn wait_for(what: &str, timeout: Duration, children: &mut Children, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        for (name, child) in children.0.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}) while waiting for {what}: see its log");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

pub fn run(runtime: &tokio::runtime::Runtime, spec: DevCluster) -> Result<()> {
    if spec.metas == 0 || spec.datas == 0 {
        bail!("a cluster needs at least one meta and one data server");
    }
    crate::roles::check_mount_point(&spec.mount)?;
    std::fs::create_dir_all(&spec.dir).with_context(|| format!("creating {}", spec.dir.display()))?;
    let logs = spec.dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let address = |i: usize| format!("127.0.0.1:{}", spec.base_port as usize + i);
    let meta_addresses: Vec<String> = (0..spec.metas).map(address).collect();
    let meta_list = meta_addresses.join(",");
    let mut children = Children(Vec::new());
    let first_dir = spec.dir.join("meta0");
    let token = cairn_trust::files::AuthorityFiles::token_path(&first_dir).display().to_string();
    let credential = security::admin_credential_path(&first_dir);
    // Every server and the mount: TLS with what the first meta server made, or plaintext.
    let secured = |mut args: Vec<String>, with: &[String]| {
        match spec.transport {
            Transport::Tls => args.extend(with.iter().cloned()),
            Transport::Plaintext => args.push("--plaintext".into()),
        }
        args
    };
    if spec.transport == Transport::Plaintext {
        security::install_plaintext();
    }
    for (i, listen) in meta_addresses.iter().enumerate() {
        let dir = spec.dir.join(format!("meta{i}"));
        let mut args =
            vec!["meta".into(), "--dir".into(), dir.display().to_string(), "--listen".into(), listen.clone()];
        if !dir.join("cairn.json").exists() {
            if i == 0 {
                args.extend(["--init".into(), "--replication".into(), spec.replication.to_string()]);
            } else {
                args.extend(["--join".into(), meta_addresses[0].clone(), "--id".into(), (i + 1).to_string()]);
            }
        }
        let args = secured(args, &if i == 0 { vec![] } else { vec!["--token".into(), token.clone()] });
        spawn(&mut children, &logs, &format!("meta{i}"), &args)?;
        if i == 0 && spec.transport == Transport::Tls {
            wait_for("the file system's authority", Duration::from_secs(30), &mut children, || credential.exists())?;
            security::install_client(Some(&credential), Transport::Tls)?;
        }
        if i == 0 {
            // The first server creates the file system before the others ask to join it.
            let first = vec![meta_addresses[0].clone()];
            wait_for("the first meta server", Duration::from_secs(30), &mut children, || {
                runtime.block_on(crate::status::leader_known(&first))
            })?;
        }
    }
    for i in 0..spec.datas {
        let dir = spec.dir.join(format!("data{i}"));
        let args = vec![
            "data".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--listen".into(),
            address(spec.metas + i),
            "--meta".into(),
            meta_list.clone(),
            "--domain".into(),
            format!("dev{i}"),
        ];
        let args = secured(args, &["--token".into(), token.clone()]);
        spawn(&mut children, &logs, &format!("data{i}"), &args)?;
    }
    wait_for("every server to report in", Duration::from_secs(60), &mut children, || {
        runtime.block_on(crate::status::healthy(&meta_addresses))
    })?;
    let mut mount_args: Vec<String> =
        vec!["mount".into(), "--meta".into(), meta_list.clone(), "--mount".into(), spec.mount.display().to_string()];
    mount_args.extend(["--cache-dir".into(), spec.dir.join("cache").display().to_string()]);
    let mount_args = secured(mount_args, &["--credential".into(), credential.display().to_string()]);
    spawn(&mut children, &logs, "mount", &mount_args)?;
    wait_for("the mount", Duration::from_secs(30), &mut children, || cairn_mount::mount::is_mount_point(&spec.mount))?;
    runtime.block_on(crate::status::status(meta_addresses.clone(), false))?;
    println!("Cairn cluster mounted at {}; logs in {}", spec.mount.display(), logs.display());
    match spec.transport {
        Transport::Tls => println!("  status:  cairn status --meta {meta_list} --credential {}", credential.display()),
        Transport::Plaintext => println!("  status:  cairn status --meta {meta_list} --plaintext"),
    }
    println!("Press Ctrl-C to unmount and stop every server.");
    runtime.block_on(crate::roles::wait_for_signal())?;
    eprintln!("cairn: stopping the cluster");
    // The mount goes first (it was started last), while the servers can answer its last flushes.
    drop(children);
    Ok(())
}
