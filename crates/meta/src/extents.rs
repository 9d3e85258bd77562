//! A file's data map: non-overlapping extents sorted by offset, kept per 64 MiB chunk of the
//! file's address space. Pure logic, no I/O: a write shadows what it overlaps, a truncate or a
//! hole punch cuts. Ranges that no extent covers read as zeros.

use serde::{Deserialize, Serialize};

/// Address space covered by one stored extent list.
pub const CHUNK_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// `len` bytes of block `id` starting at `offset` within it.
    Block { id: u128, offset: u32 },
    /// Bytes stored in the metadata itself (small writes).
    Inline(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// File offset of the first byte.
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// The part of this extent within `[start, end)`, if any.
    pub fn slice(&self, start: u64, end: u64) -> Option<Extent> {
        let from = self.offset.max(start);
        let to = self.end().min(end);
        if from >= to {
            return None;
        }
        let skip = from - self.offset;
        let len = to - from;
        let source = match &self.source {
            Source::Block { id, offset } => Source::Block { id: *id, offset: offset + skip as u32 },
            Source::Inline(data) => Source::Inline(data[skip as usize..(skip + len) as usize].to_vec()),
        };
        Some(Extent { offset: from, len, source })
    }

    pub fn block_id(&self) -> Option<u128> {
        match self.source {
            Source::Block { id, .. } => Some(id),
            Source::Inline(_) => None,
        }
    }
}

/// Removes `[start, end)` from a sorted, non-overlapping extent list.
pub fn cut(extents: &mut Vec<Extent>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    let mut kept = Vec::with_capacity(extents.len() + 1);
    for extent in extents.drain(..) {
        if extent.end() <= start || extent.offset >= end {
            kept.push(extent);
            continue;
        }
        if let Some(left) = extent.slice(extent.offset, start) {
            kept.push(left);
        }
        if let Some(right) = extent.slice(end, extent.end()) {
            kept.push(right);
        }
    }
    *extents = kept;
    debug_assert!(is_well_formed(extents));
}

/// Puts `new` over whatever it overlaps.
pub fn overlay(extents: &mut Vec<Extent>, new: Extent) {
    if new.len == 0 {
        return;
    }
    cut(extents, new.offset, new.end());
    let at = extents.partition_point(|e| e.offset < new.offset);
    extents.insert(at, new);
    debug_assert!(is_well_formed(extents));
}

/// Sorted by offset, non-empty, non-overlapping, and inline data as long as the extent.
pub fn is_well_formed(extents: &[Extent]) -> bool {
    extents.iter().all(|e| {
        e.len > 0
            && match &e.source {
                Source::Inline(data) => data.len() as u64 == e.len,
                Source::Block { .. } => true,
            }
    }) && extents.windows(2).all(|pair| pair[0].end() <= pair[1].offset)
}

/// Splits an extent at chunk boundaries: (chunk index, piece) pairs.
pub fn split_by_chunk(extent: &Extent) -> Vec<(u64, Extent)> {
    let mut pieces = Vec::new();
    let mut at = extent.offset;
    while at < extent.end() {
        let chunk = at / CHUNK_BYTES;
        let chunk_end = (chunk + 1) * CHUNK_BYTES;
        if let Some(piece) = extent.slice(at, chunk_end) {
            pieces.push((chunk, piece));
        }
        at = chunk_end;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block(offset: u64, len: u64, id: u128) -> Extent {
        Extent { offset, len, source: Source::Block { id, offset: 0 } }
    }

    /// Reads a byte of the model: which (block id, offset in block) or inline byte it maps to.
    fn byte_at(extents: &[Extent], at: u64) -> Option<(u128, u64)> {
        extents.iter().find(|e| e.offset <= at && at < e.end()).map(|e| match &e.source {
            Source::Block { id, offset } => (*id, *offset as u64 + (at - e.offset)),
            Source::Inline(data) => (u128::MAX, data[(at - e.offset) as usize] as u64),
        })
    }

    #[test]
    fn overlay_splits_the_extent_below() {
        let mut extents = vec![block(0, 100, 1)];
        overlay(&mut extents, block(40, 10, 2));
        assert_eq!(extents.len(), 3);
        assert_eq!(byte_at(&extents, 39), Some((1, 39)));
        assert_eq!(byte_at(&extents, 40), Some((2, 0)));
        assert_eq!(byte_at(&extents, 50), Some((1, 50)));
    }

    #[test]
    fn inline_data_is_sliced() {
        let mut extents = vec![Extent { offset: 0, len: 4, source: Source::Inline(vec![1, 2, 3, 4]) }];
        cut(&mut extents, 1, 3);
        assert_eq!(extents[0].source, Source::Inline(vec![1]));
        assert_eq!(extents[1].source, Source::Inline(vec![4]));
    }

    proptest! {
        // The extent list agrees byte for byte with a flat model after any sequence of writes
        // and cuts.
        #[test]
        fn matches_a_flat_model(ops in prop::collection::vec((0u64..300, 1u64..80, any::<bool>()), 1..60)) {
            let mut extents = Vec::new();
            let mut model: Vec<Option<(u128, u64)>> = vec![None; 400];
            for (i, (offset, len, is_cut)) in ops.into_iter().enumerate() {
                let id = i as u128 + 1;
                if is_cut {
                    cut(&mut extents, offset, offset + len);
                    for b in offset..offset + len { model[b as usize] = None; }
                } else {
                    overlay(&mut extents, block(offset, len, id));
                    for b in offset..offset + len { model[b as usize] = Some((id, b - offset)); }
                }
                prop_assert!(is_well_formed(&extents));
            }
            for (at, expected) in model.iter().enumerate() {
                prop_assert_eq!(byte_at(&extents, at as u64), *expected);
            }
        }

        #[test]
        fn chunk_split_covers_the_extent(offset in 0u64..(3 * CHUNK_BYTES), len in 1u64..(2 * CHUNK_BYTES)) {
            let pieces = split_by_chunk(&block(offset, len, 9));
            prop_assert_eq!(pieces.iter().map(|(_, p)| p.len).sum::<u64>(), len);
            for (chunk, piece) in &pieces {
                prop_assert_eq!(piece.offset / CHUNK_BYTES, *chunk);
                prop_assert_eq!((piece.end() - 1) / CHUNK_BYTES, *chunk);
            }
        }
    }
}
