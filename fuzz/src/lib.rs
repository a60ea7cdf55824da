//! The coverage-guided fuzz targets of the VMM's two host-testable libraries (docs/fuzzing.md):
//! [`emulator`] (vmm-core: an arbitrary vCPU, instruction bytes and guest memory through the
//! calls the host makes on a trap) and [`shadow_mmu`] (guest page tables and steps through the
//! shadow MMU's property model). Each target is a plain function of the input bytes that
//! panics when a promise breaks: the engine's harness (`fuzz/libfuzzer`, built by
//! `fuzz/run.sh` with coverage instrumentation) calls it, and `cargo test` replays the
//! committed corpus (`fuzz/corpus/<target>/`) and every crash found so far through it
//! (`tests/corpus.rs`).

pub mod emulator;
pub mod shadow_mmu;

/// A target: its name (the directory of its corpus) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: [Target; 2] = [("emulator", emulator::run), ("shadow_mmu", shadow_mmu::run)];
