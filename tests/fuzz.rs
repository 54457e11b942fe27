//! The fuzz targets of `tests/fuzz/` on stable Rust, bounded, in every CI
//! run: each invariant check from `tunfwd::fuzz` runs over its seed corpus,
//! over random byte strings, and over mutated seeds (bytes flipped,
//! truncated, extended, length fields rewritten). Any panic fails the test
//! and proptest prints the shrunk input. `TUNFWD_FUZZ_CASES` raises the
//! number of cases per target (default 100000). No root needed.
//!
//! The open-ended search runs with cargo-fuzz (libFuzzer, nightly):
//! `cargo +nightly fuzz run --fuzz-dir tests/fuzz ip_validation`.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 4, "too few seeds in {}", dir.display());
    seeds
}

fn cases() -> u32 {
    std::env::var("TUNFWD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// One edit to a seed.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    /// Overwrite two bytes (a length or offset field) with a value.
    Word(usize, u16),
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for e in edits {
        match e {
            Edit::Flip(i, x) if !v.is_empty() => {
                let n = v.len();
                v[i % n] ^= x;
            }
            Edit::Truncate(n) => v.truncate(*n % (v.len() + 1)),
            Edit::Extend(b) => v.extend_from_slice(b),
            Edit::Word(i, w) if v.len() >= 2 => {
                let at = i % (v.len() - 1);
                v[at..at + 2].copy_from_slice(&w.to_be_bytes());
            }
            _ => {}
        }
    }
    v
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Edit::Flip(i, x)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Edit::Extend),
        2 => (any::<usize>(), any::<u16>()).prop_map(|(i, w)| Edit::Word(i, w)),
    ]
}

/// Seeds as they are, then random bytes and mutated seeds.
fn fuzz(target: &str, check: fn(&[u8])) {
    let seeds = corpus(target);
    for s in &seeds {
        check(s);
    }
    let max_len = seeds.iter().map(Vec::len).max().unwrap_or(0) + 64;
    let input = prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..max_len),
        3 => (proptest::sample::select(seeds), proptest::collection::vec(edit(), 1..6))
            .prop_map(|(s, e)| apply(&s, &e)),
    ];
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&input, |data| {
            check(&data);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{target}: {e}"));
}

#[test]
fn fuzz_ip_validation() {
    fuzz("ip_validation", tunfwd::fuzz::ip_validation);
}

#[test]
fn fuzz_vxlan_decode() {
    fuzz("vxlan_decode", tunfwd::fuzz::vxlan_decode);
}

#[test]
fn fuzz_virtio_header() {
    fuzz("virtio_header", tunfwd::fuzz::virtio_header);
}

#[test]
fn fuzz_split_coalesce() {
    fuzz("split_coalesce", tunfwd::fuzz::split_coalesce);
}

#[test]
fn fuzz_flow_queues() {
    fuzz("flow_queues", tunfwd::fuzz::flow_queues);
}

#[test]
fn fuzz_peer_table() {
    fuzz("peer_table", tunfwd::fuzz::peer_table);
}

#[cfg(feature = "wireguard")]
#[test]
fn fuzz_wg_receive() {
    fuzz("wg_receive", tunfwd::fuzz::wg_receive);
}
