//! The meta state machine fed arbitrary commands (what a Raft log entry decodes to) against an
//! in-memory database: a command may fail, but never panic or leave the database unreadable.
#![no_main]

use cairn_meta::model::Time;
use cairn_meta::namespace::Tables;
use cairn_meta::query::Query;
use cairn_meta::raft_types::Command;
use cairn_meta::store::{apply_command, open_memory_database};
use cairn_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use redb::ReadableDatabase;

/// Commands per input at most (each input starts from a fresh file system).
const COMMANDS_MAX: usize = 64;

fn apply(db: &redb::Database, command: Command) {
    let txn = db.begin_write().expect("a write transaction");
    // Errors are answers; only a panic is a finding.
    let _ = apply_command(&Tables::new(&txn), command);
    txn.commit().expect("committing");
}

fuzz_target!(|data: &[u8]| {
    let db = open_memory_database().expect("an in-memory database");
    apply(&db, Command::InitFs { fs_id: "fuzz".into(), now: Time { sec: 1, nsec: 0 } });
    apply(&db, Command::OpenSession { client_name: "fuzz".into(), now_ms: 0, lease_ms: 60_000 });
    // Each piece: a length byte, then either a whole command (postcard) or, mostly, one client
    // mutation (protobuf) from session 1, so the namespace code is what gets explored.
    let mut rest = data;
    let mut seq = 0;
    for _ in 0..COMMANDS_MAX {
        let Some((&len, tail)) = rest.split_first() else { break };
        let len = usize::from(len).min(tail.len());
        let (piece, tail) = tail.split_at(len);
        rest = tail;
        let Some((&kind, body)) = piece.split_first() else { continue };
        let now = Time { sec: 2 + seq as i64, nsec: 0 };
        if kind < 32 {
            if let Ok(command) = cairn_meta::model::decode::<Command>(body) {
                apply(&db, command);
            }
            continue;
        }
        let Ok(op) = pb::MutateRequest::decode(body) else { continue };
        seq += 1;
        let request = pb::MutateRequest {
            session: 1,
            seq,
            caller: op.caller.or(Some(pb::Caller::default())),
            op: op.op,
            confined_to: op.confined_to,
        };
        apply(&db, Command::Mutate { now, request: request.encode_to_vec() });
    }
    // Whatever happened, the namespace still reads.
    let query = Query::new(db.begin_read().expect("a read transaction"));
    if let Ok(root) = query.root() {
        let _ = query.readdir(Some(&root), b"", 1024);
    }
});
