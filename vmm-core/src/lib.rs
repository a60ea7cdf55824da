//! vmm-core: the CPU half of a trap-and-emulate VMM.
//!
//! This crate holds the virtual CPU (registers, virtual RFLAGS/CPL, control registers,
//! descriptor-table registers, the virtual MSR file), the emulator for every privileged
//! instruction that traps when a de-privileged guest kernel runs at CPL 3 (decoded with
//! `iced-x86`), event delivery through the guest's own IDT, the injection policy, and the virtual
//! devices (8259A pair, 8254, 16550, isa-debug-exit) behind a port bus.
//!
//! It never touches hardware: guest memory, the console and the clock are reached through small
//! traits, so every architectural rule is unit-tested on the host.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod accounting;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod io;
mod labs;
pub mod loader;
pub mod svm;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trace;
