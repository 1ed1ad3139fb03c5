// SPDX-License-Identifier: Apache-2.0
//! A small mutator for the bounded fuzz runs under `cargo test`: start
//! from a committed corpus entry and flip, insert, delete or truncate a
//! few bytes, as libFuzzer would, so stable Rust exercises the same
//! targets without a fuzzing engine.

use proptest::prelude::*;

/// A bounded run of `cases` cases that leaves no persistence files.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One edit of a byte string. Positions wrap around its length.
#[derive(Debug, Clone)]
pub enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

pub fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip(at, bit)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Insert(at, byte)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

/// `seed` with `edits` applied in order.
pub fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for edit in edits {
        let len = out.len();
        match *edit {
            Edit::Flip(at, bit) if len > 0 => out[at % len] ^= 1 << bit,
            Edit::Insert(at, byte) => out.insert(at % (len + 1), byte),
            Edit::Delete(at) if len > 0 => {
                out.remove(at % len);
            }
            Edit::Truncate(at) => out.truncate(at % (len + 1)),
            _ => {}
        }
    }
    out
}

/// A seed of `target`'s corpus (read once per run) with `edits` applied.
pub fn edited(target: &'static str, pick: &prop::sample::Index, edits: &[Edit]) -> Vec<u8> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock, PoisonError};
    type Corpora = HashMap<&'static str, Vec<Vec<u8>>>;
    static CORPORA: OnceLock<Mutex<Corpora>> = OnceLock::new();
    let mut corpora = CORPORA
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let seeds = corpora.entry(target).or_insert_with(|| corpus(target));
    apply(pick.get::<Vec<u8>>(seeds), edits)
}

/// Every file of `fuzz/corpus/<target>/`, sorted by name.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).expect("corpus file"))
        .collect();
    assert!(!seeds.is_empty(), "{} is empty", dir.display());
    seeds
}
