//! How many operations of each kind a checker ran and how long they took.

use std::time::Duration;

/// Count and total time per kind of operation, in the order the kinds were first seen.
#[derive(Default)]
pub struct OpTimes(Vec<(&'static str, u64, Duration)>);

impl OpTimes {
    pub fn add(&mut self, kind: &'static str, took: Duration) {
        match self.0.iter_mut().find(|(name, _, _)| *name == kind) {
            Some((_, count, time)) => {
                *count += 1;
                *time += took;
            }
            None => self.0.push((kind, 1, took)),
        }
    }

    /// One line per kind, its name right-aligned in `width` characters.
    pub fn report(&self, width: usize) -> String {
        self.0
            .iter()
            .map(|(name, count, time)| {
                let mean = if *count > 0 { *time / *count as u32 } else { Duration::ZERO };
                format!("{name:>width$}: {count:>7} ops, {time:>12.3?} total, {mean:>10.3?} mean\n")
            })
            .collect()
    }
}
