//! The fuzz targets on stable, in every test run: every file of the
//! committed corpora (`fuzz/corpus/<target>/`), then a seeded, bounded
//! mutation pass over them (bit flips, truncations, splices, duplicated
//! lines, huge numbers, odd bytes). A panic fails the test naming the
//! target, the seed and the input; a hang is bounded by the input size
//! (at most [`MAX_INPUT`] bytes) and a generous per-input time.
//!
//! `PULLDEPLOY_FUZZ_SEED` and `PULLDEPLOY_FUZZ_INPUTS` choose another seed
//! and more inputs for a longer local run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// No mutated input grows past this.
const MAX_INPUT: usize = 64 << 10;
/// Mutated inputs per target unless `PULLDEPLOY_FUZZ_INPUTS` says.
const INPUTS: usize = 3000;
/// One input of at most [`MAX_INPUT`] bytes through one parser: far more
/// than it takes on a loaded machine; more is a hang.
const SLOWEST: Duration = Duration::from_secs(10);

/// Replaces a number or goes in at a line's start or after a separator.
const HUGE: &[&str] = &[
    "18446744073709551616",
    "99999999999999999999999999999999999999",
    "-9223372036854775809",
    "4294967296",
    "-1",
    "0",
    "1e308",
    "NaN",
    "inf",
    "1000000000years",
    "+262143-12-31T23:59:59Z",
    "-262143-01-01T00:00:00Z",
    "Thu, 31 Dec 262143 23:59:59 UTC",
    "100%@99999999999999999999s",
    "0.0000001%@0s",
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Every file of the target's committed corpus, in name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    paths.sort();
    let files: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| {
        Keyring::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/keyring.asc"))
            .expect("fuzz/keyring.asc (made by fuzz/make-corpus.sh)")
    })
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One random change to `input`; `corpus` supplies splices.
fn mutate_once(rng: &mut StdRng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let at = |rng: &mut StdRng, len: usize| rng.random_range(0..=len);
    match rng.random_range(0..9) {
        // A bit flip.
        0 if !input.is_empty() => {
            let i = rng.random_range(0..input.len());
            input[i] ^= 1 << rng.random_range(0..8);
        }
        // A truncation.
        1 => {
            let len = at(rng, input.len());
            input.truncate(len);
        }
        // A splice: this input's head, another's tail.
        2 => {
            let other = &corpus[rng.random_range(0..corpus.len())];
            let head = at(rng, input.len());
            let tail = at(rng, other.len());
            input.truncate(head);
            input.extend_from_slice(&other[tail..]);
        }
        // A line duplicated, once or many times.
        3 => {
            let starts: Vec<usize> = std::iter::once(0)
                .chain(
                    input
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| **b == b'\n')
                        .map(|(i, _)| i + 1),
                )
                .filter(|i| *i < input.len())
                .collect();
            if let Some(&start) = starts.get(rng.random_range(0..starts.len().max(1))) {
                let end = input[start..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(input.len(), |i| start + i + 1);
                let line = input[start..end].to_vec();
                let times = if rng.random_bool(0.2) {
                    rng.random_range(2..2000)
                } else {
                    1
                };
                let copies: Vec<u8> = line.repeat(times);
                input.splice(end..end, copies);
            }
        }
        // A huge (or odd) number: over a run of digits, or inserted.
        4 => {
            let huge = HUGE[rng.random_range(0..HUGE.len())].as_bytes();
            let digits: Vec<usize> = (0..input.len())
                .filter(|&i| {
                    input[i].is_ascii_digit() && (i == 0 || !input[i - 1].is_ascii_digit())
                })
                .collect();
            if !digits.is_empty() && rng.random_bool(0.7) {
                let start = digits[rng.random_range(0..digits.len())];
                let end = input[start..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .map_or(input.len(), |i| start + i);
                input.splice(start..end, huge.iter().copied());
            } else {
                let i = at(rng, input.len());
                input.splice(i..i, huge.iter().copied());
            }
        }
        // A range deleted.
        5 if !input.is_empty() => {
            let start = rng.random_range(0..input.len());
            let end = rng.random_range(start..=input.len().min(start + 64));
            input.drain(start..end);
        }
        // Bytes the parsers split on, and some they never expect.
        6 => {
            const ODD: &[u8] = b"\n\r\t :=-[]\"'#%@.\0\xff\xc3";
            let i = at(rng, input.len());
            let n = rng.random_range(1..8);
            let bytes: Vec<u8> = (0..n)
                .map(|_| ODD[rng.random_range(0..ODD.len())])
                .collect();
            input.splice(i..i, bytes);
        }
        // Random bytes.
        7 => {
            let i = at(rng, input.len());
            let n = rng.random_range(1..16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            input.splice(i..i, bytes);
        }
        // A byte overwritten.
        _ if !input.is_empty() => {
            let i = rng.random_range(0..input.len());
            input[i] = rng.random();
        }
        _ => input.push(rng.random()),
    }
}

/// Runs `body` on `input`, failing with the target, the input (escaped,
/// cut) and how to reproduce it when it panics or takes longer than
/// [`SLOWEST`].
fn check(target: &str, what: &str, input: &[u8], body: &dyn Fn(&[u8])) {
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| body(input)));
    let took = started.elapsed();
    let shown = || {
        let cut = &input[..input.len().min(4096)];
        format!(
            "{} bytes: {:?}{}",
            input.len(),
            String::from_utf8_lossy(cut),
            if cut.len() < input.len() { "..." } else { "" }
        )
    };
    if outcome.is_err() {
        panic!(
            "fuzz target {target} panicked on {what} (keep it as fuzz/corpus/{target}/<name> once fixed): {}",
            shown()
        );
    }
    assert!(
        took <= SLOWEST,
        "fuzz target {target} took {took:?} on {what}: {}",
        shown()
    );
}

/// The corpus, then the seeded mutations of it.
fn run(target: &str, seed_offset: u64, body: &dyn Fn(&[u8])) {
    let corpus = corpus(target);
    for (i, input) in corpus.iter().enumerate() {
        check(target, &format!("corpus file #{i}"), input, body);
    }
    let seed = env_number("PULLDEPLOY_FUZZ_SEED", 0x5eed_f022) ^ seed_offset;
    let inputs = env_number("PULLDEPLOY_FUZZ_INPUTS", INPUTS as u64);
    let mut rng = StdRng::seed_from_u64(seed);
    for n in 0..inputs {
        let mut input = corpus[rng.random_range(0..corpus.len())].clone();
        for _ in 0..rng.random_range(1..=4) {
            mutate_once(&mut rng, &mut input, &corpus);
            input.truncate(MAX_INPUT);
        }
        check(
            target,
            &format!("mutation #{n} of seed {seed:#x} (PULLDEPLOY_FUZZ_SEED={seed})"),
            &input,
            body,
        );
    }
}

#[test]
fn fuzz_inrelease_corpus_and_mutations() {
    run("inrelease", 1, &|data| inrelease(keyring(), data));
}

#[test]
fn fuzz_release_gpg_corpus_and_mutations() {
    run("release_gpg", 2, &|data| release_gpg(keyring(), data));
}

#[test]
fn fuzz_release_corpus_and_mutations() {
    run("release", 3, &release);
}

#[test]
fn fuzz_packages_corpus_and_mutations() {
    run("packages", 4, &packages);
}

#[test]
fn fuzz_rollout_corpus_and_mutations() {
    run("rollout", 5, &rollout);
}

#[test]
fn the_mutations_change_inputs_and_stay_bounded() {
    // A pass that returned its input unchanged would test the corpus only.
    let corpus = corpus("release");
    let mut rng = StdRng::seed_from_u64(1);
    let mut changed = 0;
    for _ in 0..500 {
        let mut input = corpus[0].clone();
        mutate_once(&mut rng, &mut input, &corpus);
        input.truncate(MAX_INPUT);
        assert!(input.len() <= MAX_INPUT);
        changed += usize::from(input != corpus[0]);
    }
    assert!(
        changed > 400,
        "only {changed} of 500 mutations changed the input"
    );
}
