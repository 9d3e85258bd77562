//! Client credentials: each request is held to what its credential allows (identity, read-only,
//! subtree, expiry, revocation), and meta applies POSIX permissions to that identity itself, so
//! a client that lies about who it is gains nothing.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use cairn_proto::{self as pb, data_client::DataClient, errno, meta_client::MetaClient, mutate_request::Op};
use cairn_testkit::{Cluster, wait_until};
use cairn_trust::block_token::{BlockAccess, BlockTokenKey};
use cairn_trust::files::AuthorityFiles;
use cairn_trust::{Subject, TrustFiles};
use tonic::Code;
use tonic::transport::Channel;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Issues a credential with `cairn credential issue` (as the administrator) and returns its file.
fn issue(cluster: &Cluster, name: &str, scope: &[&str]) -> PathBuf {
    let out = cluster.dir.path().join(format!("{name}.cred"));
    let output = Command::new(common::bin())
        .args(["credential", "issue", "--meta", &cluster.meta_addresses(), "--name", name])
        .args(["--out", out.to_str().unwrap()])
        .args(cluster.client_args())
        .args(scope)
        .output()
        .unwrap();
    assert!(output.status.success(), "issuing {name}: {}", String::from_utf8_lossy(&output.stderr));
    out
}

fn cli(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    Command::new(common::bin()).args(args).args(cluster.client_args()).output().unwrap()
}

async fn meta_as(address: &str, credential: &Path) -> Result<MetaClient<Channel>, String> {
    let channel = cairn::security::connect_with(address, credential).await.map_err(|e| format!("{e:#}"))?;
    Ok(MetaClient::new(channel))
}

async fn open_session(meta: &mut MetaClient<Channel>) -> Result<pb::OpenSessionReply, tonic::Status> {
    meta.open_session(pb::OpenSessionRequest { client_name: "test".into() }).await.map(|r| r.into_inner())
}

fn caller(uid: u32, gid: u32) -> Option<pb::Caller> {
    Some(pb::Caller { uid, gid, groups: vec![] })
}

fn mutation(session: u64, seq: u64, who: Option<pb::Caller>, op: Op) -> pb::MutateRequest {
    pb::MutateRequest { session, seq, caller: who, op: Some(op), confined_to: 0 }
}

fn create(parent: pb::FileHandle, name: &str) -> Op {
    Op::Create(pb::CreateOp {
        parent: Some(parent),
        name: name.as_bytes().to_vec(),
        kind: pb::FileKind::Regular as i32,
        perm: 0o644,
        ..Default::default()
    })
}

fn handle(attr: &pb::Attr) -> pb::FileHandle {
    pb::FileHandle { ino: attr.ino, generation: attr.generation }
}

#[test]
fn every_request_is_held_to_its_credential() {
    let mut cluster = common::cluster();
    let address = cluster.metas[0].address.clone();
    let alice = issue(&cluster, "alice", &["--uids", "1000-1999", "--gids", "1000-1999"]);
    let reader = issue(&cluster, "reader", &["--read-only"]);
    let doomed = issue(&cluster, "doomed", &[]);
    let brief = issue(&cluster, "brief", &["--expires", "3s"]);
    let brief_until = SystemTime::now() + Duration::from_secs(3);
    let listed = cli(&cluster, &["credential", "list", "--meta", &cluster.meta_addresses(), "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(4), "{listed}");
    let rt = runtime();

    rt.block_on(async {
        // Root is squashed: alice's claim to be root does not open the root-owned root
        // directory, and her own ids pass where their bits allow.
        let mut meta = meta_as(&address, &alice).await.unwrap();
        let session = open_session(&mut meta).await.unwrap();
        let root = session.root.unwrap();
        let as_root = mutation(session.session, 1, caller(0, 0), create(root, "by-root"));
        assert_eq!(meta.mutate(as_root).await.unwrap().into_inner().errno, errno::EACCES);

        // Read-only: reads are served, changes get EROFS, and no block may be placed.
        let mut ro = meta_as(&address, &reader).await.unwrap();
        let ro_session = open_session(&mut ro).await.unwrap();
        assert!(ro_session.read_only);
        let write = mutation(ro_session.session, 1, caller(0, 0), create(root, "by-reader"));
        assert_eq!(ro.mutate(write).await.unwrap().into_inner().errno, errno::EROFS);
        assert!(cluster.metas[0].log().contains("the credential is read-only"), "no log line for the refused write");
        let place = ro
            .place_blocks(pb::PlaceBlocksRequest { count: 1, exclude: vec![], session: ro_session.session })
            .await
            .unwrap_err();
        assert_eq!(place.code(), Code::PermissionDenied, "{place}");
        let request = pb::GetAttrRequest { target: Some(root), session: ro_session.session, caller: None };
        assert_eq!(ro.get_attr(request).await.unwrap().into_inner().errno, 0);

        // A session is its opener's alone.
        let hijack = mutation(ro_session.session, 2, caller(1000, 1000), create(root, "hijacked"));
        let error = meta.mutate(hijack).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
        assert!(error.message().contains("belongs to another"), "{error}");

        // Revoked: refused from the next request on, with a log line.
        let mut revoked = meta_as(&address, &doomed).await.unwrap();
        open_session(&mut revoked).await.expect("not revoked yet");
        let output = cli(&cluster, &["credential", "revoke", "--meta", &cluster.meta_addresses(), "doomed"]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let error = open_session(&mut revoked).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
        assert!(error.message().contains("revoked"), "{error}");
        assert!(cluster.metas[0].log().contains("was revoked"), "no log line for the revoked credential");

        // Forged: a certificate of this authority naming a credential never issued (as if
        // someone had the key but no record) is refused.
        let (authority, _) = AuthorityFiles::load(&cluster.metas[0].dir).unwrap();
        let (key_pem, request) = cairn_trust::new_key_and_request().unwrap();
        let subject = Subject::Client { credential: "999".into() };
        let cert = authority.sign(&request, &subject, Duration::from_secs(600)).unwrap();
        let forged = TrustFiles {
            authority_pem: authority.cert_pem().into(),
            chain_pem: format!("{cert}{}", authority.cert_pem()),
            key_pem,
        };
        let forged_path = cluster.dir.path().join("forged.cred");
        forged.save_bundle(&forged_path).unwrap();
        let mut unknown = meta_as(&address, &forged_path).await.unwrap();
        let error = open_session(&mut unknown).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
        assert!(error.message().contains("not one this file system issued"), "{error}");

        // Expired: once past its expiry, the credential no longer even connects.
        let mut short = meta_as(&address, &brief).await.unwrap();
        open_session(&mut short).await.expect("not expired yet");
        wait_until("the short credential to expire", Duration::from_secs(10), || {
            SystemTime::now() > brief_until + Duration::from_secs(1)
        })
        .unwrap();
        let error = open_session(&mut short).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
        assert!(error.message().contains("expired"), "{error}");
        let fresh = match meta_as(&address, &brief).await {
            Ok(mut client) => open_session(&mut client).await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        assert!(fresh.is_err(), "an expired credential connected again");
    });
    wait_until("the expired certificate's refusal in the log", Duration::from_secs(10), || {
        cluster.metas[0].log().contains("TLS handshake failed")
    })
    .unwrap();

    // The server goes on serving everyone else, and a read-only mount is read-only.
    assert!(cluster.status().is_some());
    if common::can_mount() {
        let admin = cluster.mount().unwrap();
        std::fs::write(admin.join("notes"), b"for everyone").unwrap();
        let mount = cluster.mount_as(&reader).unwrap();
        assert_eq!(std::fs::read(mount.join("notes")).unwrap(), b"for everyone");
        let error = std::fs::write(mount.join("notes"), b"changed").unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");
    }
}

/// Runs `script` with sh in `dir` as uid:gid with supplementary `groups`; returns its success
/// and its output.
fn sh_as(dir: &Path, uid: u32, gid: u32, groups: &[u32], script: &str) -> (bool, String) {
    let mut command = Command::new("setpriv");
    command.args([format!("--reuid={uid}"), format!("--regid={gid}")]);
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        command.arg(format!("--groups={}", list.join(",")));
    }
    let output = command.args(["sh", "-c", script]).current_dir(dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn allowed(dir: &Path, uid: u32, gid: u32, groups: &[u32], script: &str) -> String {
    let (ok, output) = sh_as(dir, uid, gid, groups, script);
    assert!(ok, "{uid}:{gid} was refused `{script}`: {output}");
    output
}

fn refused(dir: &Path, uid: u32, gid: u32, groups: &[u32], script: &str, why: &str) {
    let (ok, output) = sh_as(dir, uid, gid, groups, script);
    assert!(!ok, "{uid}:{gid} was allowed `{script}`");
    assert!(output.contains(why), "`{script}` as {uid}:{gid} failed, but not with {why:?}: {output}");
}

#[test]
fn permissions_hold_between_two_client_identities() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let admin = cluster.mount().unwrap();
    // The layout, made as root through the administrator's (unsquashed) mount.
    let setup = "mkdir shared team private && chmod 1777 shared \
                 && chown 1000:1500 team && chmod 770 team && chown 1000:1000 private && chmod 700 private";
    allowed(&admin, 0, 0, &[], setup);
    let alice = issue(&cluster, "alice", &["--uids", "1000-1999", "--gids", "1000-1999"]);
    let bob = issue(&cluster, "bob", &["--uids", "2000-2999", "--gids", "1500,2000-2999"]);
    let a = cluster.mount_as(&alice).unwrap();
    let b = cluster.mount_as(&bob).unwrap();

    // Owner and other, in a sticky directory.
    allowed(&a, 1000, 1000, &[], "echo hi > shared/a.txt && chmod 644 shared/a.txt");
    assert_eq!(allowed(&b, 2000, 2000, &[], "cat shared/a.txt"), "hi\n");
    refused(&b, 2000, 2000, &[], "echo more >> shared/a.txt", "Permission denied");
    refused(&b, 2000, 2000, &[], "rm -f shared/a.txt", "Operation not permitted");
    refused(&b, 2000, 2000, &[], "chmod 666 shared/a.txt", "Operation not permitted");
    allowed(&b, 2000, 2000, &[], "echo bob > shared/b.txt");
    allowed(&a, 1000, 1000, &[], "rm shared/a.txt");

    // Group: 1500 may use the team directory, others may not, nor anyone the private one.
    allowed(&b, 2000, 2000, &[1500], "touch team/b.txt && ls team");
    refused(&b, 2001, 2001, &[], "ls team", "Permission denied");
    refused(&b, 2000, 2000, &[1500], "ls private", "Permission denied");
    allowed(&a, 1000, 1000, &[], "echo mine > private/p.txt");

    // Root squash: root on alice's machine acts as nobody. Its kernel lets root through, so
    // these refusals are meta's.
    allowed(&a, 0, 0, &[], "touch shared/root.txt");
    assert_eq!(std::fs::metadata(admin.join("shared/root.txt")).unwrap().uid(), 65534);
    refused(&a, 0, 0, &[], "ls private", "Permission denied");
    refused(&a, 0, 0, &[], "cat private/p.txt", "Permission denied");
    refused(&a, 0, 0, &[], "rm -f shared/b.txt", "Operation not permitted");
    refused(&a, 0, 0, &[], "chown 0 shared/root.txt", "Operation not permitted");
    refused(&a, 0, 0, &[], "mknod shared/mem c 1 1", "Operation not permitted");
    refused(&a, 0, 0, &[], "setfattr -n security.label -v x shared/root.txt", "Operation not permitted");
    // A directory closed on this very mount: the names its kernel cached while anyone could
    // search it are forgotten once the change is answered (without that, the kernel would
    // use them for anyone until the promise lease runs out, up to 5 s).
    allowed(&a, 1000, 1000, &[], "mkdir shared/closing && echo x > shared/closing/f && cat shared/closing/f");
    assert_eq!(allowed(&a, 0, 0, &[], "cat shared/closing/f"), "x\n");
    allowed(&a, 1000, 1000, &[], "chmod 700 shared/closing");
    wait_until("the kernel to forget the closed directory's names", Duration::from_secs(2), || {
        !sh_as(&a, 0, 0, &[], "cat shared/closing/f").0
    })
    .unwrap();
    refused(&a, 0, 0, &[], "cat shared/closing/f", "Permission denied");
    // An id outside alice's ranges acts as nobody too, even with the team's group on hand.
    refused(&a, 2000, 1500, &[1500], "touch team/c.txt", "Permission denied");

    // A client that lies to meta about who it is gets what its credential allows, no more.
    let rt = runtime();
    rt.block_on(async {
        let address = cluster.metas[0].address.clone();
        let mut meta = meta_as(&address, &bob).await.unwrap();
        let session = open_session(&mut meta).await.unwrap();
        let root = session.root.unwrap();
        let lookup = |parent: pb::FileHandle, name: &str, who: Option<pb::Caller>| pb::LookupRequest {
            parent: Some(parent),
            name: name.as_bytes().to_vec(),
            session: 0,
            caller: who,
        };
        let shared = meta.lookup(lookup(root, "shared", caller(2000, 2000))).await.unwrap().into_inner();
        let private = meta.lookup(lookup(root, "private", caller(2000, 2000))).await.unwrap().into_inner();
        let (shared, private) = (handle(&shared.attr.unwrap()), handle(&private.attr.unwrap()));
        let denied = meta.lookup(lookup(private, "p.txt", caller(1000, 1000))).await.unwrap().into_inner();
        assert_eq!(denied.errno, errno::EACCES, "bob's credential read alice's private directory as 1000");
        let unlink = Op::Unlink(pb::UnlinkOp { parent: Some(shared), name: b"b.txt".to_vec(), ..Default::default() });
        let as_root = mutation(session.session, 1, caller(0, 0), unlink.clone());
        assert_eq!(meta.mutate(as_root).await.unwrap().into_inner().errno, errno::EPERM);
        let as_owner = mutation(session.session, 2, caller(2000, 2000), unlink);
        assert_eq!(meta.mutate(as_owner).await.unwrap().into_inner().errno, 0);
    });

    // A credential confined to the team directory sees it as its root and nothing outside.
    let team = issue(&cluster, "team", &["--subtree", "/team", "--uids", "2000-2999", "--gids", "1500"]);
    let t = cluster.mount_as(&team).unwrap();
    assert_eq!(allowed(&t, 2000, 1500, &[], "ls"), "b.txt\n");
    rt.block_on(async {
        let address = cluster.metas[0].address.clone();
        let real_root = open_session(&mut common::meta_client(&cluster, &address).await.unwrap()).await.unwrap().root;
        let mut meta = meta_as(&address, &team).await.unwrap();
        let session = open_session(&mut meta).await.unwrap();
        assert_ne!(session.root, real_root);
        let outside = pb::GetAttrRequest { target: real_root, session: 0, caller: None };
        assert_eq!(meta.get_attr(outside).await.unwrap().into_inner().errno, errno::EACCES);
        // Its root's ".." is itself, as in a chroot.
        let up =
            pb::LookupRequest { parent: session.root, name: b"..".to_vec(), session: 0, caller: caller(2000, 1500) };
        let up = meta.lookup(up).await.unwrap().into_inner();
        assert_eq!(up.attr.map(|a| a.ino), session.root.map(|h| h.ino));
    });
}

async fn block_of(meta: &mut MetaClient<Channel>, root: pb::FileHandle, name: &str) -> (pb::BlockRef, String) {
    let request = pb::LookupRequest { parent: Some(root), name: name.into(), session: 0, caller: caller(1000, 1000) };
    let attr = meta.lookup(request).await.unwrap().into_inner().attr.unwrap();
    let request = pb::GetExtentsRequest {
        target: Some(handle(&attr)),
        offset: 0,
        len: u64::MAX,
        session: 0,
        caller: caller(1000, 1000),
    };
    let reply = meta.get_extents(request).await.unwrap().into_inner();
    let block = reply.extents.iter().find_map(|e| e.block.clone()).expect("a file of blocks");
    let address = reply.servers.iter().find(|s| block.servers.contains(&s.id)).unwrap().address.clone();
    (block, address)
}

/// A read of `block`'s first bytes: Ok, or the refusal's code and message.
async fn read_block(data: &mut DataClient<Channel>, block: pb::BlockRef) -> Result<(), (Code, String)> {
    let request = pb::GetBlockRequest { block: Some(block), offset: 0, len: 1000 };
    match data.get_block(request).await {
        Ok(reply) => match reply.into_inner().message().await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err((Code::Unknown, "empty stream".into())),
            Err(s) => Err((s.code(), s.message().to_string())),
        },
        Err(s) => Err((s.code(), s.message().to_string())),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn data_servers_serve_a_client_only_what_meta_gave_it_a_token_for() {
    if !common::can_mount() {
        return;
    }
    let mut cluster = common::cluster();
    let admin = cluster.mount().unwrap();
    let (a_bytes, b_bytes) = (cairn_testkit::pattern(1, 300_000), cairn_testkit::pattern(2, 300_000));
    std::fs::write(admin.join("a"), &a_bytes).unwrap();
    std::fs::write(admin.join("b"), &b_bytes).unwrap();
    let alice = issue(&cluster, "alice", &[]);
    let (authority, _) = AuthorityFiles::load(&cluster.metas[0].dir).unwrap();
    let epoch0 = BlockTokenKey::derive(&authority.key_pem(), 0);
    let address = cluster.metas[0].address.clone();
    let rt = runtime();
    let old_token = rt.block_on(async {
        let mut meta = meta_as(&address, &alice).await.unwrap();
        let session = open_session(&mut meta).await.unwrap();
        let root = session.root.unwrap();
        let (a, data_address) = block_of(&mut meta, root, "a").await;
        let (b, _) = block_of(&mut meta, root, "b").await;
        assert!(!a.token.is_empty(), "meta gave no block token");
        let channel = cairn::security::connect_with(&data_address, &alice).await.unwrap();
        let mut data = DataClient::new(channel);

        read_block(&mut data, a.clone()).await.expect("a block read with its token");
        let missing = read_block(&mut data, pb::BlockRef { token: vec![], ..a.clone() }).await.unwrap_err();
        assert_eq!(missing.0, Code::PermissionDenied, "{missing:?}");
        assert!(missing.1.contains("missing"), "{missing:?}");
        // Nor may it have copies dropped by naming blocks it was not given.
        let report = pb::ReportBadBlockRequest {
            block: Some(pb::BlockRef { token: vec![], ..b.clone() }),
            server: b.servers[0],
            what: "made up".into(),
        };
        let error = meta.report_bad_block(report).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
        let other = read_block(&mut data, pb::BlockRef { token: a.token.clone(), ..b.clone() }).await.unwrap_err();
        assert_eq!(other.0, Code::PermissionDenied, "block A's token opened block B: {other:?}");
        let expired = epoch0.issue(BlockAccess::Read, pb::BlockId::of(&a).0, now_ms() - 1_000);
        let expired = read_block(&mut data, pb::BlockRef { token: expired, ..a.clone() }).await.unwrap_err();
        assert_eq!(expired.0, Code::PermissionDenied, "{expired:?}");
        assert!(expired.1.contains("expired"), "{expired:?}");

        // Uploads: only with a write token for the uploader's own session.
        let upload = |token: Vec<u8>| {
            let block =
                pb::BlockRef { id_hi: session.session, id_lo: 77, len: 4, digest: vec![0; 32], servers: vec![], token };
            tokio_stream::iter(vec![pb::PutBlockChunk {
                block: Some(block),
                data: vec![1, 2, 3, 4].into(),
                sync: true,
                ..Default::default()
            }])
        };
        let error = data.put_block(upload(vec![])).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
        let someone_elses = epoch0.issue(BlockAccess::Write, u128::from(session.session + 1) << 64, now_ms() + 60_000);
        let error = data.put_block(upload(someone_elses)).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "{error}");
        let as_read = epoch0.issue(BlockAccess::Read, u128::from(session.session) << 64, now_ms() + 60_000);
        let error = data.put_block(upload(as_read)).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied, "a read token stored a block: {error}");
        (a, data_address)
    });
    assert!(
        cluster.datas.iter().any(|d| d.log().contains("refused a block request")),
        "no log line for a refused token"
    );

    // Rotation: a token from before one rotation still passes; after a second, it is refused.
    let rotate = || {
        let output = cli(&cluster, &["cluster", "rotate-block-key", "--meta", &cluster.meta_addresses()]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    let (a, data_address) = old_token;
    rotate();
    rt.block_on(async {
        let mut data = DataClient::new(cairn::security::connect_with(&data_address, &alice).await.unwrap());
        read_block(&mut data, a.clone()).await.expect("a token of the previous key");
    });
    rotate();
    let mut refused = None;
    wait_until("the data server to retire the first key", Duration::from_secs(10), || {
        rt.block_on(async {
            let mut data = DataClient::new(cairn::security::connect_with(&data_address, &alice).await.unwrap());
            refused = read_block(&mut data, a.clone()).await.err();
        });
        refused.as_ref().is_some_and(|(code, _)| *code == Code::PermissionDenied)
    })
    .unwrap();
    // A fresh mount reads with the new key's tokens.
    let fresh = cluster.mount().unwrap();
    assert_eq!(std::fs::read(fresh.join("a")).unwrap(), a_bytes);
    assert_eq!(std::fs::read(fresh.join("b")).unwrap(), b_bytes);
}
