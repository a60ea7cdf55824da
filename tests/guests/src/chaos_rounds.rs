//! The chaos guest's round generator (`src/bin/chaos.rs`), in a file of its own because the
//! host compiles it too (`src/chaos.rs` of the test runner includes it with `#[path]`): the
//! host recomputes each round's bytes from the seed to decode the instructions of a round
//! that differed, so both sides must draw them the same way. Pure code, no I/O, no `unsafe`.

/// Each round's random bytes (the guest follows them with a `ud2`).
pub const BLOB: usize = 24;

/// The round's generator: xorshift64, seeded from the run's seed and the round number, so a
/// round's bytes and start state do not depend on what earlier rounds did.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator of round `round` (from 1) of the run with `seed`.
    pub fn for_round(seed: u64, round: u64) -> Self {
        let mixed =
            (seed ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Rng(mixed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// The round's code bytes: the generator's first draws, filtered as [`filter`] says in the
    /// differential mode. The rest of the round's start state is drawn after them.
    pub fn code(&mut self, differential: bool, cpl0: bool) -> [u8; BLOB] {
        let mut code = [0u8; BLOB];
        for chunk in code.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        if differential {
            filter(&mut code, cpl0);
        }
        code
    }
}

/// Replaces, in a round of the differential mode, the bytes of instructions whose result is
/// not the CPU's to decide, so that native and VMM runs can be compared (the plain mode runs
/// them all): the time and entropy sources RDTSC, RDTSCP, RDRAND and RDSEED, and at CPL 0 (at
/// CPL 3 they fault anyway) RDMSR, WRMSR and RDPMC (the MSRs and counters are the machine's:
/// QEMU answers 0 for an MSR it does not know, the VMM #GP), port I/O (IN, OUT, INS, OUTS: the VMM's machine has a PIC, a PIT,
/// a UART and the exit port, QEMU's has many more devices, and a write to the reset or exit
/// port ends the run), CLI (native interrupts then stay off and a loop after it hangs the
/// machine: nothing ends the round) and STI (QEMU 7.2's TCG can keep the interrupt shadow of an
/// STI followed by a jump into a loop for good, so the one-shot timer never ends the round
/// natively: seed 2022 at CPL 0, round 470, `sti; jns $`; asterinas PR 537 describes the same
/// QEMU bug). Each such opcode byte becomes a NOP (0x90) wherever it appears, an operand byte
/// included.
pub fn filter(code: &mut [u8], cpl0: bool) {
    for i in 0..code.len() {
        let next = code.get(i + 1).copied();
        match code[i] {
            0xE4..=0xE7 | 0xEC..=0xEF | 0x6C..=0x6F | 0xFA | 0xFB if cpl0 => code[i] = 0x90,
            // 0F 31 RDTSC; 0F 01 F9 RDTSCP; 0F C7 /6 RDRAND and /7 RDSEED (register forms).
            0x0F if next == Some(0x31) => code[i + 1] = 0x90,
            // 0F 30 WRMSR, 0F 32 RDMSR, 0F 33 RDPMC.
            0x0F if cpl0 && matches!(next, Some(0x30 | 0x32 | 0x33)) => code[i + 1] = 0x90,
            0x0F if next == Some(0x01) && code.get(i + 2) == Some(&0xF9) => code[i + 2] = 0x90,
            0x0F if next == Some(0xC7) && code.get(i + 2).is_some_and(|m| *m >= 0xF0) => {
                code[i + 2] = 0x90
            }
            _ => {}
        }
    }
}

/// RFLAGS.VM, cleared in every word of the round's stack in the differential mode: QEMU's 32-bit IRET enters
/// virtual-8086 mode in long mode, which real CPUs do not (docs/ARCHITECTURE.md), and the VMM
/// then stops the guest, which would end every comparison within a few hundred rounds.
pub const STACK_WORD_CLEARED: u64 = 1 << 17;

/// RFLAGS.IF, set in every word of the round's stack in the differential mode: a POPF or IRET
/// of a stack word that cleared IF would natively keep the one-shot timer out, and a loop or
/// HLT after it would hang the machine (under the VMM IF stays set, hole `popf_clears_if`).
pub const STACK_WORD_SET: u64 = 1 << 9;
