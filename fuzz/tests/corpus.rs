//! Replays the committed corpus of each fuzz target (`fuzz/corpus/<target>/`: the inputs the
//! engine kept for the coverage they reach, minimized, and every crash it found, named
//! `crash-*`) through the target's function, so `cargo test` re-checks every promise on every
//! kept input with plain stable Rust and no engine. A failing input is named with its panic.

use std::path::Path;

/// Fewest inputs a target's corpus must hold: an empty or lost corpus fails instead of passing.
const MIN_INPUTS: usize = 20;

#[test]
fn every_corpus_input_keeps_every_promise() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut failures = Vec::new();
    for (name, target) in fuzz_targets::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(
            inputs.len() >= MIN_INPUTS,
            "{}: {} inputs, expected at least {MIN_INPUTS}",
            dir.display(),
            inputs.len()
        );
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {message}", input.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "failing inputs:\n{}",
        failures.join("\n")
    );
}
