//! Lab 7: measure a new trap (docs/labs/lab7-measure-a-trap.md).
//!
//! The guest kernel's `bench` mode (`guest-kernel/src/bench.rs`) times privileged operations
//! in a loop; the VMM counts the traps each one causes. You add one operation: a privileged
//! instruction the bench does not measure yet. Built with the feature `lab7`
//! (`./run-qemu.sh --lab 7` does that), the bench lists your [`OP`] last, so
//! `-- bench op=<its CSV name>` runs it. Then you measure it natively, under trap-and-emulate
//! and under `backend=svm`, and write what you found in `labs/lab7_report.md`.
//!
//! This file is a module of the guest kernel's `bench`: it may use the bench's own helpers
//! (`super::time_kernel`, `super::opaque`, `super::Ctx`, `super::Op`; docs/benchmarks.md,
//! "Adding an operation") and the guest kernel's `crate::arch`. It runs at the guest's CPL 0,
//! where your instruction is legal: under trap-and-emulate it traps into the VMM because the
//! guest kernel really runs at CPL 3.
//!
//! Build it alone: `cargo build --release --target x86_64-unknown-none --target-dir target/lab
//! -p guest-kernel --features guest-kernel/lab7`.

// The skeleton does not use its parameter and imports yet; delete this line when done.
#![allow(unused_variables, unused_imports)]

use super::{opaque, time_kernel, Ctx, Op};
use core::arch::asm;

/// Your operation. `label` is the table's name; its CSV name (and `op=` name) is the label in
/// lower case with `_` for every run of other characters (`"mov cr8 (write)"` is
/// `mov_cr8_write`). Name it after the instruction and what it does, and give it no name the
/// bench already has (the bench refuses two ops of one name).
pub const OP: Op = Op {
    label: "lab 7 (your instruction)",
    measure,
};

/// Times `c.iters` executions of your instruction: `Some((iterations, total))`, the loop's own
/// cost already subtracted (`time_kernel(c.iters, c.overhead, |i| ...)` does that, with
/// interrupts off), or `None` if it cannot run.
///
/// The instruction must be one the guest kernel may execute at CPL 0 without changing anything
/// that matters (write back the value you read; reload the value that is there), and one the
/// bench does not measure yet (its ops: `OPS` in guest-kernel/src/bench.rs). Write it with
/// `asm!` and a `// SAFETY:` comment saying why it is harmless.
fn measure(c: &Ctx) -> Option<(u64, u64)> {
    todo!("lab 7: time one privileged instruction")
}
