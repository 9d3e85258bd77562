//! The block volume: blocks written with arbitrary contents and claimed digests, the volume's
//! files damaged at arbitrary places, then reopened and read back. A lying or damaged block
//! must be refused, never served, and nothing may panic.
#![no_main]

use cairn_data::Volume;
use cairn_data::volume::NewBlock;
use cairn_proto::{BlockId, block_digest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, data)) = data.split_first() else { return };
    let dir = tempfile::tempdir().expect("a scratch directory");
    let volume = Volume::open(dir.path()).expect("a new volume");
    // Up to four blocks cut from the input; bits of the first byte make some claim a wrong
    // digest.
    let mut written = Vec::new();
    for (i, chunk) in data.chunks(data.len() / 4 + 1).take(4).enumerate() {
        let id = BlockId(i as u128 + 1);
        let (_, digest) = block_digest(chunk);
        let lies = shape & (1 << i) != 0;
        let claimed = if lies { [0u8; 32] } else { digest };
        match NewBlock::verified(id, &claimed, chunk.to_vec()) {
            Ok(block) => {
                assert!(claimed == digest, "a block whose digest lies was accepted");
                // Not synced: the damage below works on the files as written, durable or not.
                volume.append(vec![block], false).expect("appending");
                written.push((id, digest, chunk.to_vec()));
            }
            Err(_) => assert!(lies && claimed != digest, "a block with its true digest was refused"),
        }
    }
    drop(volume);
    // Damage: flip bytes of the volume's files at offsets the input chooses.
    if shape & 0x80 != 0 {
        for entry in std::fs::read_dir(dir.path()).expect("listing").flatten() {
            let path = entry.path();
            if let Ok(mut bytes) = std::fs::read(&path)
                && !bytes.is_empty()
            {
                for (k, &b) in data.iter().take(8).enumerate() {
                    let at = (usize::from(b) * 131 + k * 977) % bytes.len();
                    bytes[at] ^= 0x5a;
                }
                let _ = std::fs::write(&path, bytes);
            }
        }
    }
    let Ok(volume) = Volume::open(dir.path()) else { return };
    for (id, digest, original) in written {
        // A block that reads back whole is exactly the block that was written.
        if let Ok((_, pieces)) = volume.piece_hashes(id, &digest)
            && !pieces.is_empty()
            && let Ok(bytes) = volume.read_pieces(id, 0, pieces.len() - 1)
        {
            assert!(bytes == original, "block {id} read back differs from what was written");
        }
        let _ = volume.verify(id);
    }
});
