//! Every decoder a peer's bytes reach: the gRPC messages servers take, the Raft messages
//! between meta servers, TLS records after the handshake, join tokens and certificates. None may panic or allocate without bound.
#![no_main]

use cairn_meta::model::decode;
use cairn_meta::raft_types::{Command, TypeConfig};
use cairn_proto as pb;
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 13 {
        0 => {
            if let Ok(request) = pb::MutateRequest::decode(body)
                && let Some(op) = &request.op
            {
                let _ = op.named_inodes();
                let _ = op.changes_cached_state();
            }
        }
        1 => drop(pb::PutBlockChunk::decode(body)),
        2 => drop(pb::CallbackUp::decode(body)),
        3 => drop(pb::EnrollRequest::decode(body)),
        4 => drop(pb::GetBlockRequest::decode(body)),
        5 => drop(pb::ReadDirRequest::decode(body)),
        6 => drop(pb::PlaceBlocksRequest::decode(body)),
        7 => drop(decode::<AppendEntriesRequest<TypeConfig>>(body)),
        8 => drop(decode::<VoteRequest<TypeConfig>>(body)),
        9 => drop(decode::<Command>(body)),
        10 => drop(cairn_trust::JoinToken::parse(&String::from_utf8_lossy(body))),
        11 => open_records(body),
        _ => drop(cairn_trust::Peer::of_certificate(body)),
    }
});

/// Frames and opens TLS records from a peer's bytes as a connection's reader does.
fn open_records(body: &[u8]) {
    use cairn_proto::tls::record::Opener;
    use rustls::ConnectionTrafficSecrets;
    use rustls::crypto::cipher::{AeadKey, Iv};
    let secrets = ConnectionTrafficSecrets::Aes256Gcm { key: AeadKey::from([7; 32]), iv: Iv::from([9; 12]) };
    let Ok(mut opener) = Opener::new(0, &secrets) else { return };
    let mut wire = body.to_vec();
    let mut at = 0;
    while let Ok(Some(len)) = Opener::record_len(&wire[at..]) {
        if wire.len() - at < len {
            break;
        }
        let _ = opener.open(&mut wire[at..at + len]);
        at += len;
    }
}
