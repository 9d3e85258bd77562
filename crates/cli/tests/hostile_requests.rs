//! Requests sent straight to the RPC ports, as a buggy or hostile client would: each gets a
//! clear error and the servers keep serving everyone else.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use cairn_proto::{self as pb, errno, mutate_request::Op};
use cairn_trust::block_token::{BlockAccess, BlockTokenKey};
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn bad_requests_get_clear_errors_and_servers_keep_serving() {
    let cluster = common::cluster();
    let meta_address = cluster.metas[0].address.clone();
    let data_address = cluster.datas[0].address.clone();

    // Garbage bytes instead of HTTP/2.
    for address in [&cluster.metas[0].address, &cluster.datas[0].address] {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage \x01\x02").unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }

    runtime().block_on(async {
        let mut meta = common::meta_client(&cluster, &meta_address).await.unwrap();
        let session =
            meta.open_session(pb::OpenSessionRequest { client_name: "hostile".into() }).await.unwrap().into_inner();
        let root = session.root.unwrap();

        // Unknown and stale handles.
        let reply = meta
            .get_attr(pb::GetAttrRequest {
                target: Some(pb::FileHandle { ino: 987_654, generation: 1 }),
                session: 0,
                caller: None,
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().errno, errno::ESTALE);
        let stale = pb::FileHandle { ino: root.ino, generation: root.generation + 1 };
        let reply = meta.get_attr(pb::GetAttrRequest { target: Some(stale), session: 0, caller: None }).await.unwrap();
        assert_eq!(reply.into_inner().errno, errno::ESTALE);
        let reply = meta.get_attr(pb::GetAttrRequest { target: None, session: 0, caller: None }).await.unwrap();
        assert_eq!(reply.into_inner().errno, errno::EINVAL);

        // Names with '/' or NUL, and names that are too long.
        for (name, expected) in [
            (b"a/b".to_vec(), errno::EINVAL),
            (b"a\0b".to_vec(), errno::EINVAL),
            (vec![b'x'; 256], errno::ENAMETOOLONG),
        ] {
            let reply = meta
                .lookup(pb::LookupRequest { parent: Some(root), name: name.clone(), session: 0, caller: None })
                .await
                .unwrap();
            assert_eq!(reply.into_inner().errno, expected);
            let create = pb::MutateRequest {
                session: session.session,
                seq: 1 + name.len() as u64,
                caller: Some(pb::Caller::default()),
                confined_to: 0,
                op: Some(Op::Create(pb::CreateOp {
                    parent: Some(root),
                    name,
                    kind: pb::FileKind::Regular as i32,
                    perm: 0o644,
                    ..Default::default()
                })),
            };
            assert_eq!(meta.mutate(create).await.unwrap().into_inner().errno, expected);
        }

        // A mutation without an operation, and one from a session that does not exist.
        let empty = pb::MutateRequest { session: session.session, seq: 99, caller: None, op: None, confined_to: 0 };
        assert_eq!(meta.mutate(empty).await.unwrap_err().code(), Code::InvalidArgument);
        let unknown_session = pb::MutateRequest {
            session: 123_456_789,
            seq: 1,
            caller: None,
            op: Some(Op::Release(pb::ReleaseOp { target: Some(root) })),
            confined_to: 0,
        };
        assert_eq!(meta.mutate(unknown_session).await.unwrap_err().code(), Code::FailedPrecondition);

        // Huge offsets and lengths.
        let file = pb::MutateRequest {
            session: session.session,
            seq: 1000,
            caller: Some(pb::Caller::default()),
            confined_to: 0,
            op: Some(Op::Create(pb::CreateOp {
                parent: Some(root),
                name: b"f".to_vec(),
                kind: pb::FileKind::Regular as i32,
                perm: 0o644,
                ..Default::default()
            })),
        };
        let attr = meta.mutate(file).await.unwrap().into_inner().attr.unwrap();
        let handle = pb::FileHandle { ino: attr.ino, generation: attr.generation };
        let reply = meta
            .get_extents(pb::GetExtentsRequest {
                target: Some(handle),
                offset: u64::MAX,
                len: u64::MAX,
                session: 0,
                caller: None,
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().errno, 0);
        let commit = pb::MutateRequest {
            session: session.session,
            seq: 1001,
            caller: Some(pb::Caller::default()),
            confined_to: 0,
            op: Some(Op::Commit(pb::CommitOp {
                target: Some(handle),
                extents: vec![pb::Extent {
                    offset: u64::MAX - 1,
                    len: 10,
                    inline_data: vec![0; 10],
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        assert_eq!(meta.mutate(commit).await.unwrap().into_inner().errno, errno::EINVAL);
        let huge_size = pb::MutateRequest {
            session: session.session,
            seq: 1002,
            caller: Some(pb::Caller::default()),
            confined_to: 0,
            op: Some(Op::SetAttr(pb::SetAttrOp { target: Some(handle), size: Some(u64::MAX), ..Default::default() })),
        };
        assert_eq!(meta.mutate(huge_size).await.unwrap().into_inner().errno, errno::EFBIG);
        let inline_lie = pb::MutateRequest {
            session: session.session,
            seq: 1003,
            caller: Some(pb::Caller::default()),
            confined_to: 0,
            op: Some(Op::Commit(pb::CommitOp {
                target: Some(handle),
                extents: vec![pb::Extent { offset: 0, len: 1 << 30, inline_data: vec![1; 10], ..Default::default() }],
                ..Default::default()
            })),
        };
        assert_eq!(meta.mutate(inline_lie).await.unwrap().into_inner().errno, errno::EINVAL);
        let placement = meta
            .place_blocks(pb::PlaceBlocksRequest { count: 1_000_000, exclude: vec![], session: session.session })
            .await
            .unwrap_err();
        assert_eq!(placement.code(), Code::InvalidArgument);

        // A message over the size limit is refused by the transport.
        let oversized =
            pb::LookupRequest { parent: Some(root), name: vec![b'y'; 16 * 1024 * 1024], session: 0, caller: None };
        let error = meta.lookup(oversized).await.unwrap_err();
        assert!(
            matches!(error.code(), Code::OutOfRange | Code::ResourceExhausted | Code::Internal | Code::Unknown),
            "{error}"
        );

        // The data server: unknown blocks, impossible ranges, lying uploads.
        // (With valid block tokens, made here from the authority's key: what is tested is
        // what the server does past the token check.)
        let mut data = common::data_client(&cluster, &data_address).await.unwrap();
        let (authority, _) = cairn_trust::files::AuthorityFiles::load(&cluster.metas[0].dir).unwrap();
        let key = BlockTokenKey::derive(&authority.key_pem(), 0);
        let far = u64::MAX;
        let unknown = pb::BlockRef {
            id_hi: 1,
            id_lo: 2,
            len: 10,
            digest: vec![0; 32],
            servers: vec![],
            token: key.issue(BlockAccess::Read, (1u128 << 64) | 2, far),
        };
        let write_token = key.issue(BlockAccess::Write, 1u128 << 64, far);
        let writable = |block: pb::BlockRef| pb::BlockRef { token: write_token.clone(), ..block };
        let error =
            data.get_block(pb::GetBlockRequest { block: Some(unknown.clone()), offset: 0, len: 10 }).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound);
        let too_big = pb::BlockRef { len: u32::MAX, ..unknown.clone() };
        let upload = data
            .put_block(tokio_stream::iter(vec![pb::PutBlockChunk {
                block: Some(writable(too_big)),
                data: vec![0; 10].into(),
                sync: true,
                ..Default::default()
            }]))
            .await;
        assert_eq!(upload.unwrap_err().code(), Code::InvalidArgument);
        let liar = pb::BlockRef { len: 10, ..unknown.clone() };
        let upload = data
            .put_block(tokio_stream::iter(vec![pb::PutBlockChunk {
                block: Some(writable(liar)),
                data: vec![0; 10].into(),
                sync: true,
                ..Default::default()
            }]))
            .await;
        assert_eq!(upload.unwrap_err().code(), Code::InvalidArgument, "data that does not match its digest is refused");
        let short = pb::BlockRef { len: 100, ..unknown.clone() };
        let upload = data
            .put_block(tokio_stream::iter(vec![pb::PutBlockChunk {
                block: Some(writable(short)),
                data: vec![0; 10].into(),
                sync: true,
                ..Default::default()
            }]))
            .await;
        assert_eq!(upload.unwrap_err().code(), Code::InvalidArgument);
        let endless_chain = data
            .put_block(tokio_stream::iter(vec![pb::PutBlockChunk {
                block: Some(writable(pb::BlockRef { len: 10, ..unknown.clone() })),
                data: vec![0; 10].into(),
                forward: vec!["127.0.0.1:1".into(); 100],
                ..Default::default()
            }]))
            .await;
        assert_eq!(endless_chain.unwrap_err().code(), Code::InvalidArgument, "a forwarding chain is bounded");
        let deletes = pb::DeleteBlocksRequest { blocks: vec![unknown.clone(); 200_000] };
        assert!(data.delete_blocks(deletes).await.is_err());

        // After all of that, both servers still answer ordinary requests.
        let status = meta.status(pb::StatusRequest::default()).await.unwrap().into_inner();
        assert_eq!(status.role, "leader");
        data.status(pb::DataStatusRequest {}).await.unwrap();
        let mut fresh = common::meta_client(&cluster, &meta_address).await.unwrap();
        fresh.get_attr(pb::GetAttrRequest { target: Some(root), session: 0, caller: None }).await.unwrap();
    });
}
