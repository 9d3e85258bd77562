//! The names this mount gave the kernel, by directory: a break of a directory makes the kernel
//! forget exactly these, and unlink and rename use them to tell which inode a name points to.

use std::collections::HashMap;

/// Names tracked at most. A name that does not fit is given to the kernel with no time to
/// live, so the kernel never holds a name this table does not know.
pub const KERNEL_NAMES_MAX: usize = 1 << 20;

#[derive(Default)]
pub struct KernelNames {
    by_dir: HashMap<u64, HashMap<Vec<u8>, u64>>,
    count: usize,
}

impl KernelNames {
    /// Records that `name` in `parent` points to `ino`; false when the table is full.
    pub fn insert(&mut self, parent: u64, name: &[u8], ino: u64) -> bool {
        let dir = self.by_dir.entry(parent).or_default();
        if let Some(existing) = dir.get_mut(name) {
            *existing = ino;
            return true;
        }
        if self.count >= KERNEL_NAMES_MAX {
            if dir.is_empty() {
                self.by_dir.remove(&parent);
            }
            return false;
        }
        dir.insert(name.to_vec(), ino);
        self.count += 1;
        true
    }

    pub fn get(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.by_dir.get(&parent)?.get(name).copied()
    }

    pub fn remove(&mut self, parent: u64, name: &[u8]) -> Option<u64> {
        let dir = self.by_dir.get_mut(&parent)?;
        let ino = dir.remove(name)?;
        self.count -= 1;
        if dir.is_empty() {
            self.by_dir.remove(&parent);
        }
        Some(ino)
    }

    /// Removes and returns every name recorded in `parent`.
    pub fn take_dir(&mut self, parent: u64) -> Vec<Vec<u8>> {
        let names: Vec<Vec<u8>> = self.by_dir.remove(&parent).map(|d| d.into_keys().collect()).unwrap_or_default();
        self.count -= names.len();
        names
    }

    /// Directories holding a name that points to `ino` (a scan: used on lock grants only).
    pub fn parents_of(&self, ino: u64) -> Vec<u64> {
        self.by_dir.iter().filter(|(_, names)| names.values().any(|&i| i == ino)).map(|(&p, _)| p).collect()
    }

    pub fn names_in(&self, parent: u64) -> Vec<Vec<u8>> {
        self.by_dir.get(&parent).map(|d| d.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        debug_assert_eq!(self.count, self.by_dir.values().map(HashMap::len).sum::<usize>());
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_inserts_and_removals() {
        let mut names = KernelNames::default();
        assert!(names.insert(1, b"a", 10));
        assert!(names.insert(1, b"a", 11));
        assert!(names.insert(1, b"b", 12));
        assert!(names.insert(2, b"c", 11));
        assert_eq!(names.len(), 3);
        assert_eq!(names.get(1, b"a"), Some(11));
        let mut parents = names.parents_of(11);
        parents.sort();
        assert_eq!(parents, vec![1, 2]);
        assert_eq!(names.remove(1, b"a"), Some(11));
        assert_eq!(names.take_dir(1), vec![b"b".to_vec()]);
        assert_eq!(names.len(), 1);
        assert!(names.names_in(1).is_empty());
    }
}
