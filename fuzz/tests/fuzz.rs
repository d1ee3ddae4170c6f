//! Runs every fuzz target: first its whole corpus, then `FUZZ_CASES` generated inputs (default
//! 3000 per target, a short pass for the test suite) from `FUZZ_SEED` (default fixed, so the
//! suite is repeatable; the long run picks one and prints it). A panicking input is written to
//! `fuzz/crashes/` and fails the run. Long run, with the release profile:
//!
//! ```text
//! FUZZ_CASES=1000000 FUZZ_SEED=random cargo test --release -p fuzz -- --nocapture
//! ```

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use fuzz::{mutate, structured, TARGETS};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        .collect()
}

#[test]
fn every_wire_decoder_survives_fuzzing() {
    let cases: u64 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = match std::env::var("FUZZ_SEED").as_deref() {
        Ok("random") => rand::random(),
        Ok(v) => v.parse().expect("FUZZ_SEED is a number or `random`"),
        Err(_) => 0x5eed,
    };
    // Findings are reported once below, not as a panic message per input.
    std::panic::set_hook(Box::new(|_| {}));
    let mut findings = Vec::new();
    for target in TARGETS {
        let started = Instant::now();
        let seeds = corpus(target.name);
        assert!(!seeds.is_empty(), "no corpus for {}", target.name);
        let mut rng = StdRng::seed_from_u64(seed ^ target.name.len() as u64);
        let mut run = 0u64;
        let inputs =
            seeds
                .iter()
                .cloned()
                .chain((0..cases).map(|_| match rng.random_range(0..10) {
                    0..=5 => {
                        let a = seeds.choose(&mut rng).expect("corpus");
                        let b = seeds.choose(&mut rng).expect("corpus");
                        mutate(&mut rng, a, b)
                    }
                    6..=8 => structured(&mut rng),
                    _ => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
                }));
        for input in inputs {
            run += 1;
            if std::env::var("FUZZ_TRACE").is_ok() {
                eprintln!("{} {run} {}", target.name, input.len());
            }
            if catch_unwind(AssertUnwindSafe(|| (target.run)(&input))).is_err() {
                let dir = root().join("crashes");
                let _ = std::fs::create_dir_all(&dir);
                let file = dir.join(format!("{}-{run}.bin", target.name));
                let _ = std::fs::write(&file, &input);
                findings.push(format!(
                    "{}: input {run} panics, saved to {}",
                    target.name,
                    file.display()
                ));
            }
        }
        println!(
            "fuzz {:<12} {run:>9} inputs in {:>6.2}s (seed {seed})",
            target.name,
            started.elapsed().as_secs_f64()
        );
    }
    let _ = std::panic::take_hook();
    assert!(findings.is_empty(), "findings:\n{}", findings.join("\n"));
}

/// Writes the seed corpus from `fuzz::seeds` (valid messages of each target). Run it after the
/// contract changes: `cargo test -p fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    for target in TARGETS {
        let dir = root().join("corpus").join(target.name);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in fuzz::seeds(target.name) {
            std::fs::write(dir.join(format!("{name}.msgpack")), bytes).expect("write seed");
        }
    }
}

/// Runs one saved input with its panic message shown:
/// `FUZZ_INPUT=fuzz/crashes/event-20.bin cargo test -p fuzz -- --ignored replay --nocapture`.
#[test]
#[ignore]
fn replay() {
    let path = PathBuf::from(std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT names a file"));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit_once('-'))
        .map(|(t, _)| t.to_string())
        .expect("<target>-<n>.bin");
    let input = std::fs::read(&path).expect("read input");
    let target = TARGETS.iter().find(|t| t.name == name).expect("a target");
    (target.run)(&input);
}
