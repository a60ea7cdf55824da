//! Differential chaos (docs/testing.md, "Differential chaos"): the `chaos` test guest's random
//! rounds run with the same seed natively on bare QEMU and under the VMM, and this module
//! compares what every round ended in. The guest prints one line per round (`r N vVV eERR
//! hDIGEST [rf]`, or `r N timer`); a round whose line differs in more than RF or a QEMU-shaped
//! error code is run again on both sides with
//! `show=N`, which prints every field, and is accepted only when the difference is one the
//! docs name: RFLAGS.RF in a fault's frame (QEMU's TCG does not set it, the SDM and the VMM
//! do), or a field that a listed virtualization hole's instruction on the round's path
//! explains (docs/virtualization-holes.md, "Differential chaos"), with the hole's documented
//! value where it has one. Anything else is a problem, reported with the round's instructions
//! (decoded here with iced-x86; the round's bytes are recomputed from the seed by the guest's
//! own generator) and the differing fields.

use std::collections::BTreeMap;

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind,
    Register, RflagsBits,
};

use crate::{Hole, Run};

// The guest's own generator; the host needs only the bytes (not the stack words' filter).
#[path = "../tests/guests/src/chaos_rounds.rs"]
#[allow(dead_code)]
mod chaos_rounds;

use chaos_rounds::{Rng, BLOB};

/// One run's settings (the guest's command line is `seed=N rounds=N user=0|1 diff=1`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The seed both sides run.
    pub seed: u64,
    /// Rounds per run.
    pub rounds: u64,
    /// Rounds at CPL 3 instead of CPL 0.
    pub user: bool,
}

impl Settings {
    /// The guest's command-line words, with `show=` when `show` is not empty.
    pub fn words(&self, show: &[u64]) -> Vec<String> {
        let mut words = vec![
            format!("seed={}", self.seed),
            format!("rounds={}", self.rounds),
            format!("user={}", u8::from(self.user)),
            "diff=1".to_string(),
        ];
        if !show.is_empty() {
            let list: Vec<String> = show.iter().map(u64::to_string).collect();
            words.push(format!("show={}", list.join(",")));
        }
        words
    }

    /// The code bytes of `round`, as the guest generated them.
    pub fn code(&self, round: u64) -> [u8; BLOB] {
        Rng::for_round(self.seed, round).code(true, !self.user)
    }

    /// The guest's code buffer from the round's first byte: its bytes, the `UD2` the guest
    /// puts after them and some of the `INT3` filling the rest of the page, so that an
    /// instruction that starts in the round's bytes and runs past them decodes as it ran.
    fn buffer(&self, round: u64) -> Vec<u8> {
        let mut buffer = self.code(round).to_vec();
        buffer.extend([0x0F, 0x0B]);
        buffer.extend([0xCC; 14]);
        buffer
    }
}

/// How a round ended, from its one-line summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An exception or interrupt: its vector, its error code, the digest of the rest of the
    /// state, whether RFLAGS.RF was set in the frame.
    Vector {
        vector: u8,
        error: Option<u64>,
        digest: u64,
        rf: bool,
    },
    /// The one-shot timer ended it (a loop): nothing deterministic to compare.
    Timer,
}

/// The summary lines of a run, by round. A line may be preceded on the serial port by bytes
/// the round itself wrote to the UART, so `[guest] r ` is looked for anywhere in it.
pub fn rounds(serial: &str) -> BTreeMap<u64, End> {
    let mut out = BTreeMap::new();
    for line in serial.lines() {
        let Some(at) = line.find("[guest] r ") else {
            continue;
        };
        let words: Vec<&str> = line[at + 10..].split_whitespace().collect();
        let Some(round) = words.first().and_then(|w| w.parse().ok()) else {
            continue;
        };
        let end = match words[1..] {
            ["timer"] => Some(End::Timer),
            [v, e, h, ref rest @ ..] => {
                let vector = v
                    .strip_prefix('v')
                    .and_then(|v| u8::from_str_radix(v, 16).ok());
                let error = match e.strip_prefix('e') {
                    Some("-") => Some(None),
                    Some(e) => u64::from_str_radix(e, 16).ok().map(Some),
                    None => None,
                };
                let digest = h
                    .strip_prefix('h')
                    .and_then(|h| u64::from_str_radix(h, 16).ok());
                match (vector, error, digest) {
                    (Some(vector), Some(error), Some(digest)) => Some(End::Vector {
                        vector,
                        error,
                        digest,
                        rf: rest == ["rf"],
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(end) = end {
            out.insert(round, end);
        }
    }
    out
}

/// The fields of the rounds a run showed (`show r=N key=value ...`, several lines a round),
/// by round.
pub fn shown(serial: &str) -> BTreeMap<u64, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for line in serial.lines() {
        let Some(at) = line.find("[guest] show ") else {
            continue;
        };
        let fields: BTreeMap<String, String> = line[at + 13..]
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(round) = fields.get("r").and_then(|r| r.parse().ok()) {
            out.entry(round)
                .or_insert_with(BTreeMap::new)
                .extend(fields);
        }
    }
    out
}

/// The vectors of fault-class exceptions (SDM Vol. 3 Table 6-1): their frame's RFLAGS image
/// has RF = 1 (Vol. 3 §17.3.1.1), which the VMM pushes and QEMU's TCG does not.
const FAULT_VECTORS: [u8; 14] = [0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21];

/// A listed virtualization hole's instruction: what it is, the hole (a row of
/// docs/virtualization-holes.md) and, for the selector reads, the register whose value the
/// hole documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoleInstruction {
    /// `MOV r/m, CS` (hole `cs_selector`) or `MOV r/m, SS` (`ss_selector`): the RPL read is 3.
    SelectorRead(Register),
    /// `PUSHF`: pushes the real IF (`pushf_if_after_cli`).
    Pushf,
    /// `POPF`: IF and IOPL changes are ignored at the real CPL 3 (`popf_clears_if`).
    Popf,
    /// `LAR`: reads the shadow GDT's compressed DPL and present bit (`lar_*`).
    Lar,
}

/// Whether `instruction` is RCL or RCR: after one QEMU's TCG leaves SF, ZF, AF and PF (which
/// they do not affect) different natively and under the VMM (`qemu_lazy_flags`).
fn rotates_through_carry(instruction: &Instruction) -> bool {
    matches!(instruction.mnemonic(), Mnemonic::Rcl | Mnemonic::Rcr)
}

/// Whether `instruction` reads an arithmetic flag (SETcc, ADC, SBB, CMOVcc, RCL, ...): when it
/// faults QEMU's TCG pushes arithmetic flags that are not the ones before it, and different
/// ones natively and under the VMM (`qemu_lazy_flags`).
fn reads_arithmetic_flags(instruction: &Instruction) -> bool {
    instruction.rflags_read()
        & (RflagsBits::OF
            | RflagsBits::SF
            | RflagsBits::ZF
            | RflagsBits::AF
            | RflagsBits::CF
            | RflagsBits::PF)
        != 0
}

/// What a flag reader with a memory operand on `path` writes (`memory`, or a general
/// register's field): under the VMM the access may fault (a shadow page-table fill) and the
/// instruction run again from the flags QEMU pushed at that fault, which need not be the ones
/// it first read (`qemu_lazy_flags`), so its result may differ. Seen: seed 2000 at CPL 3,
/// round 97, `rcl dword [rbp-44h], 1` after `cmpsb` rotated another carry into the stack.
fn lazy_flags_destinations(path: &[Instruction]) -> Vec<String> {
    path.iter()
        .filter(|i| reads_arithmetic_flags(i))
        .filter(|i| (0..i.op_count()).any(|op| i.op_kind(op) == OpKind::Memory))
        .filter_map(|i| match i.op0_kind() {
            OpKind::Memory => Some("memory".to_string()),
            OpKind::Register if i.op0_register().is_gpr() => {
                Some(format!("{:?}", i.op0_register().full_register()).to_lowercase())
            }
            _ => None,
        })
        .collect()
}

/// The RFLAGS bits the SDM leaves undefined after some instruction of `path` (IMUL's SF, ZF,
/// AF and PF, ...): QEMU computes them one way natively and may compute them another way under
/// the VMM; no answer is wrong.
fn undefined_flags(path: &[Instruction]) -> u64 {
    let bits = path.iter().fold(0, |acc, i| acc | i.rflags_undefined());
    [
        (RflagsBits::OF, 0x800),
        (RflagsBits::SF, 0x80),
        (RflagsBits::ZF, 0x40),
        (RflagsBits::AF, 0x10),
        (RflagsBits::PF, 0x4),
        (RflagsBits::CF, 0x1),
    ]
    .iter()
    .filter(|(iced, _)| bits & iced != 0)
    .fold(0, |acc, (_, rflags)| acc | rflags)
}

/// Where native QEMU departs from the SDM and the VMM follows it, in how a round ends
/// (docs/virtualization-holes.md, "Differential chaos"): the name and the fields it accounts
/// for, when the round's difference is exactly that.
fn reference_deviation(
    user: bool,
    bytes: &[u8],
    code: u64,
    path: &[Instruction],
    native: &Event,
    vmm: &Event,
) -> Option<(&'static str, &'static [&'static str])> {
    let strict_at = |rip: u64| instruction_at(bytes, code, rip, true);
    let decodes_at = |rip: u64| strict_at(rip).map(|i| !i.is_invalid());
    let byte_at = |rip: u64| {
        rip.checked_sub(code)
            .and_then(|o| bytes.get(o as usize))
            .copied()
    };
    let lock_only_invalid = |rip: u64| {
        strict_at(rip).is_some_and(|i| i.is_invalid())
            && instruction_at(bytes, code, rip, false)
                .is_some_and(|i| !i.is_invalid() && i.has_lock_prefix())
    };
    match (native.vector, native.error, vmm.vector, vmm.error) {
        // A software INT n through a gate of lower DPL: #GP with the IDT index in bits 3..15,
        // (n << 3) | 2 (SDM Vol. 3 §6.13); QEMU's 64-bit path pushes (n << 4) | 2.
        (13, Some(n), 13, Some(v)) if int_gp_error_codes(n, v) && native.rip == vmm.rip => {
            Some(("qemu_int_gp_error_code", &["err"]))
        }
        // A far RET or IRET at CPL 3 pops its stack as a user access (error code U/S = 1);
        // QEMU's helpers read it with supervisor rights.
        (14, Some(n), 14, Some(v))
            if user
                && n & 4 == 0
                && v == n | 4
                && native.rip == vmm.rip
                && path.iter().any(|i| {
                    matches!(
                        i.mnemonic(),
                        Mnemonic::Retf | Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq
                    )
                }) =>
        {
            Some(("qemu_far_return_pops_as_supervisor", &["err"]))
        }
        // INT1 (F1, prefixes allowed) raises #DB as a trap (RIP after it); QEMU raises #UD.
        (6, None, 1, None)
            if strict_at(native.rip).is_some_and(|i| {
                i.mnemonic() == Mnemonic::Int1 && vmm.rip == native.rip + i.len() as u64
            }) =>
        {
            Some(("qemu_int1_undefined", &["vec", "rip"]))
        }
        // An undefined opcode (C6 /1, 8F /1, ...) with a memory operand whose address is not
        // canonical: #UD (decoding comes first, SDM Vol. 3 §6.9); QEMU computes the address
        // first and raises #GP(0).
        (13, Some(0), 6, None)
            if native.rip == vmm.rip
                && decodes_at(native.rip) == Some(false)
                && !lock_only_invalid(vmm.rip) =>
        {
            Some(("qemu_gp_before_ud", &["vec", "err"]))
        }
        // A LOCK prefix on an instruction that does not take it (RET FAR, POPF, STI, ...):
        // #UD (SDM Vol. 2A §2.1.1); QEMU runs the instruction as if the prefix were not there,
        // so natively the round goes on and anything after may differ.
        (_, _, 6, None)
            if lock_only_invalid(vmm.rip) && (native.vector, native.rip) != (6, vmm.rip) =>
        {
            Some(("qemu_lock_ignored", &["*"]))
        }
        // A REX prefix followed by a legacy prefix is ignored (SDM Vol. 2A §2.2.1); QEMU
        // applies it (here: a base register that makes the address non-canonical, #GP(0)),
        // and under the VMM that #GP traps and vmm-core's emulator, which ignores the REX,
        // runs the instruction: natively the round ends there, under the VMM it goes on.
        // A non-canonical address in a stack reference (RSP or RBP as the base, or an SS
        // override): #SS(0) (SDM Vol. 3 §6.15, interrupt 12; Vol. 1 §3.3.7.1); QEMU's TCG
        // raises #GP(0) for every non-canonical address. It shows only where vmm-core emulates
        // the instruction (`mov gs, ss:[rdx-52h]`): elsewhere QEMU raises it on both sides.
        (13, Some(0), 12, Some(0))
            if native.rip == vmm.rip
                && strict_at(native.rip).is_some_and(|i| {
                    i.memory_segment() == Register::SS
                        && (0..i.op_count()).any(|op| i.op_kind(op) == OpKind::Memory)
                }) =>
        {
            Some(("qemu_non_canonical_stack_gp", &["vec"]))
        }
        (13, Some(0), _, _)
            if vmm.rip != native.rip
                && byte_at(native.rip).is_some_and(|b| (0x40..=0x4F).contains(&b))
                && byte_at(native.rip + 1).is_some_and(legacy_prefix) =>
        {
            Some(("qemu_rex_before_prefix", &["*"]))
        }
        _ => None,
    }
}

/// Whether #GP error codes `native` and `vmm` are QEMU's and the SDM's for the same vector n
/// of an `INT n` through a gate of lower DPL: (n << 4) | 2 and (n << 3) | 2.
fn int_gp_error_codes(native: u64, vmm: u64) -> bool {
    native & 0xF == 2 && vmm & 7 == 2 && native >> 4 == vmm >> 3 && native != vmm
}

/// How a shown round ended: vector, error code, RIP.
#[derive(Debug, Clone, Copy)]
struct Event {
    vector: u64,
    error: Option<u64>,
    rip: u64,
}

impl HoleInstruction {
    fn of(instruction: &Instruction) -> Option<Self> {
        match instruction.mnemonic() {
            Mnemonic::Mov if matches!(instruction.op1_register(), Register::CS | Register::SS) => {
                Some(HoleInstruction::SelectorRead(instruction.op1_register()))
            }
            Mnemonic::Pushf | Mnemonic::Pushfq => Some(HoleInstruction::Pushf),
            Mnemonic::Popf | Mnemonic::Popfq => Some(HoleInstruction::Popf),
            Mnemonic::Lar => Some(HoleInstruction::Lar),
            _ => None,
        }
    }

    /// The hole's name in docs/virtualization-holes.md.
    fn hole(self) -> &'static str {
        match self {
            HoleInstruction::SelectorRead(Register::CS) => "cs_selector",
            HoleInstruction::SelectorRead(_) => "ss_selector",
            HoleInstruction::Pushf => "pushf_if_after_cli",
            HoleInstruction::Popf => "popf_clears_if",
            HoleInstruction::Lar => "lar_kernel_code",
        }
    }

    /// Whether the hole exists at this CPL: at CPL 3 the guest really runs at CPL 3, so only
    /// LAR (which reads the shadow GDT) still differs.
    fn applies(self, user: bool) -> bool {
        !user || self == HoleInstruction::Lar
    }
}

/// RFLAGS bits a hole may change: IF and IOPL (POPF), and the arithmetic flags a later
/// instruction computes from a value a hole changed.
const RFLAGS_POPF_BITS: u64 = 0x3200;
const RFLAGS_ARITHMETIC: u64 = 0x08D5;

/// The fields a hole may change: the general registers (RSP included), the round's memory,
/// the data segment registers and CR2 (a value a hole changed may be stored, loaded or used as
/// an address anywhere), RFLAGS as above. Never the vector, error code, RIP, CS or SS.
fn hole_may_change(field: &str) -> bool {
    ["memory", "cr2", "rsp"].contains(&field)
        || ["ds", "es", "fs", "gs"].contains(&field)
        || ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp"].contains(&field)
        || (field.starts_with('r') && field[1..].parse::<u8>().is_ok())
}

/// The instructions of a round's bytes at `code` (its linear address), decoded from the start
/// to the end of the buffer. Decoded as QEMU runs them rather than as the SDM allows them
/// (`NO_INVALID_CHECK`: QEMU ignores a misplaced LOCK prefix, say), and on past an
/// undecodable one (listed as `(bad)`: QEMU may run what iced-x86 rejects, such as C7 /1):
/// this is for finding the instructions a round may have run, so more is safer than fewer.
fn decode(bytes: &[u8], code: u64) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, code, DecoderOptions::NO_INVALID_CHECK);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let position = decoder.position();
        let instruction = decoder.decode();
        if decoder.position() == position {
            break;
        }
        out.push(instruction);
    }
    out
}

/// The instruction at `rip` among a round's bytes at `code`, decoded as the SDM defines them
/// (`strict`) or as QEMU runs them.
fn instruction_at(bytes: &[u8], code: u64, rip: u64, strict: bool) -> Option<Instruction> {
    let offset = rip.checked_sub(code)? as usize;
    let rest = bytes.get(offset..).filter(|rest| !rest.is_empty())?;
    let options = if strict {
        DecoderOptions::NONE
    } else {
        DecoderOptions::NO_INVALID_CHECK
    };
    Some(Decoder::with_ip(64, rest, rip, options).decode())
}

/// Every instruction the round's bytes can reach from their start: decoded linearly from the
/// start and from every branch target inside the buffer, ordered by address.
fn reachable(bytes: &[u8], code: u64) -> Vec<Instruction> {
    let mut found: BTreeMap<u64, Instruction> = BTreeMap::new();
    let mut starts = vec![code];
    while let Some(start) = starts.pop() {
        let offset = (start - code) as usize;
        for instruction in decode(&bytes[offset..], start) {
            if found.insert(instruction.ip(), instruction).is_some() {
                break;
            }
            let target = instruction.near_branch_target();
            if target >= code && target < code + bytes.len() as u64 && !found.contains_key(&target)
            {
                starts.push(target);
            }
        }
    }
    found.into_values().collect()
}

/// Whether `b` is a legacy prefix (SDM Vol. 2A §2.1.1).
fn legacy_prefix(b: u8) -> bool {
    matches!(
        b,
        0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0x66 | 0x67 | 0xF0 | 0xF2 | 0xF3
    )
}

/// The round's bytes as QEMU reads them: a REX prefix followed by legacy prefixes is ignored
/// by the CPU (SDM Vol. 2A §2.2.1) but applied by QEMU (`qemu_rex_before_prefix`), so each
/// such REX is moved after its run of prefixes, where iced-x86 applies it too. Every
/// instruction keeps its address and length.
fn qemu_order(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let mut at = 0;
    while at < out.len() {
        let run = out[at + 1..]
            .iter()
            .take_while(|&&b| legacy_prefix(b))
            .count();
        if (0x40..=0x4F).contains(&out[at]) && run > 0 {
            out[at..=at + run].rotate_left(1);
            at += run;
        }
        at += 1;
    }
    out
}

/// The instructions the round ran, as far as its bytes tell, as the SDM and as QEMU decode
/// them (`qemu_order`; more is safer than fewer): for each, the straight line from its start
/// to the instruction at the frame's RIP when it gets there without a branch, else every
/// instruction it could reach.
fn path(bytes: &[u8], code: u64, rip: u64) -> Vec<Instruction> {
    let mut instructions = path_as_decoded(bytes, code, rip);
    let qemu = qemu_order(bytes);
    if qemu != bytes {
        instructions.extend(path_as_decoded(&qemu, code, rip));
    }
    instructions
}

/// `path` for one decoding of the bytes.
fn path_as_decoded(bytes: &[u8], code: u64, rip: u64) -> Vec<Instruction> {
    let linear = decode(bytes, code);
    if let Some(at) = linear.iter().position(|i| i.ip() == rip) {
        if linear[..at]
            .iter()
            .all(|i| i.flow_control() == FlowControl::Next)
        {
            return linear[..=at].to_vec();
        }
    }
    reachable(bytes, code)
}

/// The round's instructions in Intel syntax, `; `-separated, each at its offset from the
/// round's first byte at `code`.
fn listing(instructions: &[Instruction], code: u64) -> String {
    let mut formatter = IntelFormatter::new();
    let mut text = Vec::new();
    for instruction in instructions {
        let mut s = String::new();
        formatter.format(instruction, &mut s);
        text.push(format!("+{:x}: {s}", instruction.ip().wrapping_sub(code)));
    }
    text.join("; ")
}

/// What comparing one seed found.
#[derive(Debug, Default)]
pub struct Report {
    /// Rounds whose outcome was compared (ended by an exception on both sides).
    pub compared: u64,
    /// Rounds both sides ended on the timer (not comparable).
    pub timer: u64,
    /// Rounds one side ended on the timer and the other by an exception: they ran long enough
    /// for the one-shot timer on one side, and how many instructions fit before it is the
    /// machine's speed, which traps change (not comparable).
    pub timer_one_side: u64,
    /// The round at which the VMM stopped the guest because QEMU's IRET entered virtual-8086
    /// mode in long mode (`qemu_iret_to_vm86`); the rounds after it are not compared.
    pub vm86_stop: Option<u64>,
    /// Compared rounds whose RFLAGS.RF differed as QEMU's fault frames differ.
    pub rf_only: u64,
    /// Compared rounds whose #GP error code differed as QEMU's `qemu_int_gp_error_code`.
    pub int_gp_error_code: u64,
    /// Differing rounds accepted as a listed hole, one line each.
    pub accepted: Vec<String>,
    /// Everything else: each a failure, with what the round did.
    pub problems: Vec<String>,
}

/// How many differing rounds one seed shows in full at most (eight a rerun of both sides).
const SHOWN_AT_MOST: usize = 32;

/// Compares one seed: `boot(native, words)` runs the chaos guest natively or under the VMM
/// with the guest command-line `words`; `holes` is the trap backend's holes table.
pub fn compare_seed(
    settings: Settings,
    boot: impl Fn(bool, &[String]) -> Run,
    holes: &[Hole],
) -> Report {
    let mut report = Report::default();
    let words = settings.words(&[]);
    let (native, vmm) = (boot(true, &words), boot(false, &words));
    let label = format!(
        "seed {} at CPL {}",
        settings.seed,
        if settings.user { 3 } else { 0 }
    );
    let (native_rounds, vmm_rounds) = (rounds(&native.serial), rounds(&vmm.serial));
    let mut last = settings.rounds;
    for (side, run) in [("natively", &native), ("under the VMM", &vmm)] {
        if run.status != 0 || !run.has_line(&format!("chaos: {} rounds survived", settings.rounds))
        {
            let stop = run
                .lines()
                .find(|l| l.contains("guest stopped") || l.contains("PANIC"))
                .unwrap_or("");
            // QEMU's IRET may pop RFLAGS.VM = 1 in long mode, from stack bytes the guest could
            // not keep clear (a misaligned IRET reads VM from any bit); real CPUs do not enter
            // virtual-8086 mode there and the VMM stops such a guest (`qemu_iret_to_vm86`).
            // The rounds before are compared; the one it stopped in and those after are not.
            if side == "under the VMM" && stop.contains("entered virtual-8086 mode") {
                let round = vmm_rounds.keys().next_back().map_or(1, |r| r + 1);
                report.vm86_stop = Some(round);
                report.accepted.push(format!(
                    "{label}: round {round}: the VMM stopped the guest where QEMU's IRET entered \
                     virtual-8086 mode (qemu_iret_to_vm86); later rounds not compared"
                ));
                last = round - 1;
                continue;
            }
            report.problems.push(format!(
                "{label}: the run did not finish {side} (status {}) {stop}\n{run}",
                run.status
            ));
        }
    }
    let mut to_show = Vec::new();
    for round in 1..=last {
        let (Some(n), Some(v)) = (native_rounds.get(&round), vmm_rounds.get(&round)) else {
            report.problems.push(format!(
                "{label}: round {round} has no summary line on both sides"
            ));
            break;
        };
        match (*n, *v) {
            (End::Timer, End::Timer) => report.timer += 1,
            (End::Timer, _) | (_, End::Timer) => report.timer_one_side += 1,
            (
                End::Vector {
                    vector,
                    error,
                    digest,
                    rf,
                },
                End::Vector {
                    vector: vmm_vector,
                    error: vmm_error,
                    digest: vmm_digest,
                    rf: vmm_rf,
                },
            ) if (vector, digest) == (vmm_vector, vmm_digest) => {
                // Equal but for RF and the error code: each must be equal or differ exactly as
                // QEMU departs from the SDM (docs/virtualization-holes.md).
                let rf_ok = rf == vmm_rf
                    || (!rf
                        && vmm_rf
                        && FAULT_VECTORS.contains(&vector)
                        && !software_interrupt_possible(&settings.code(round), vector));
                let error_ok = error == vmm_error
                    || (vector == 13
                        && matches!((error, vmm_error), (Some(n), Some(v)) if int_gp_error_codes(n, v)));
                if !(rf_ok && error_ok) {
                    to_show.push(round);
                    continue;
                }
                report.compared += 1;
                report.rf_only += u64::from(rf != vmm_rf);
                report.int_gp_error_code += u64::from(error != vmm_error);
            }
            _ => to_show.push(round),
        }
    }
    if to_show.is_empty() {
        return report;
    }
    // Each rerun shows up to eight rounds (the guest's `show=` list); at most four reruns.
    let mut native_show = BTreeMap::new();
    let mut vmm_show = BTreeMap::new();
    for batch in to_show.chunks(8).take(SHOWN_AT_MOST / 8) {
        let words = settings.words(batch);
        native_show.extend(shown(&boot(true, &words).serial));
        vmm_show.extend(shown(&boot(false, &words).serial));
    }
    let shown_rounds: Vec<u64> = to_show.iter().copied().take(SHOWN_AT_MOST).collect();
    for round in &to_show[shown_rounds.len()..] {
        report.problems.push(format!(
            "{label}: round {round} differs too (not shown: only the first {SHOWN_AT_MOST} are)"
        ));
    }
    for round in shown_rounds {
        let (Some(n), Some(v)) = (native_show.get(&round), vmm_show.get(&round)) else {
            report.problems.push(format!(
                "{label}: round {round} differs ({:?} natively, {:?} under the VMM) and its \
                 rerun with show={round} printed no fields on both sides (not deterministic?)",
                native_rounds.get(&round),
                vmm_rounds.get(&round)
            ));
            continue;
        };
        match classify(&settings, round, n, v, holes) {
            Ok(line) => report.accepted.push(format!("{label}: {line}")),
            Err(problem) => report.problems.push(format!("{label}: {problem}")),
        }
    }
    report
}

/// Whether the round's bytes hold `INT vector` (CD ib): the frame of a software interrupt has
/// RF as it was, so a round that may have ended by one is not accepted by the vector alone.
fn software_interrupt_possible(code: &[u8], vector: u8) -> bool {
    code.windows(2).any(|w| w == [0xCD, vector])
}

/// Accepts a differing round as listed holes (`Ok`: the line saying which) or explains why not.
fn classify(
    settings: &Settings,
    round: u64,
    native: &BTreeMap<String, String>,
    vmm: &BTreeMap<String, String>,
    holes: &[Hole],
) -> Result<String, String> {
    let number = |fields: &BTreeMap<String, String>, key: &str| {
        fields
            .get(key)
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
    };
    let code_address = number(native, "code").unwrap_or(0);
    let bytes = settings.buffer(round);
    let rip = number(native, "rip").unwrap_or(0);
    let path = &path(&bytes, code_address, rip)[..];
    let instructions = decode(&bytes, code_address);
    let mut differing: Vec<(String, String, String)> = Vec::new();
    for (key, n) in native {
        let v = vmm.get(key).cloned().unwrap_or_else(|| "(none)".into());
        if key != "r" && key != "bytes" && *n != v {
            differing.push((key.clone(), n.clone(), v));
        }
    }
    for (key, v) in vmm {
        if !native.contains_key(key) {
            differing.push((key.clone(), "(none)".into(), v.clone()));
        }
    }
    let describe = |differing: &[(String, String, String)]| {
        differing
            .iter()
            .map(|(k, n, v)| format!("{k}: native {n}, VMM {v}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let event = |fields: &BTreeMap<String, String>| Event {
        vector: number(fields, "vec").unwrap_or(u64::MAX),
        error: number(fields, "err"),
        rip: number(fields, "rip").unwrap_or(0),
    };
    let deviation = reference_deviation(
        settings.user,
        &bytes,
        code_address,
        path,
        &event(native),
        &event(vmm),
    );
    if let Some((_, fields)) = deviation {
        differing.retain(|(key, _, _)| fields != ["*"] && !fields.contains(&key.as_str()));
    }
    let hole_instructions: Vec<HoleInstruction> = path
        .iter()
        .filter_map(HoleInstruction::of)
        .filter(|h| h.applies(settings.user))
        .collect();
    let vector = number(native, "vec").unwrap_or(u64::MAX);
    let software = software_interrupt_possible(&bytes, vector as u8)
        && rip.checked_sub(2).is_some_and(|at| {
            at >= code_address && bytes.get((at - code_address) as usize) == Some(&0xCD)
        });
    let mut unexplained = Vec::new();
    let mut lazy_flags = false;
    let lazy_flags_written = lazy_flags_destinations(path);
    for (field, n, v) in &differing {
        let explained = match field.as_str() {
            "rflags" => {
                let (Some(n), Some(v)) = (number(native, "rflags"), number(vmm, "rflags")) else {
                    unexplained.push((field.clone(), n.clone(), v.clone()));
                    continue;
                };
                let mut bits = n ^ v;
                // RF: QEMU does not push it for a fault; the VMM does, as the SDM says.
                if bits & (1 << 16) != 0
                    && v & (1 << 16) != 0
                    && FAULT_VECTORS.contains(&(vector as u8))
                    && !software
                {
                    bits &= !(1 << 16);
                }
                if hole_instructions.contains(&HoleInstruction::Popf) {
                    bits &= !RFLAGS_POPF_BITS;
                }
                let faulting_reader = instruction_at(&bytes, code_address, rip, false)
                    .is_some_and(|i| reads_arithmetic_flags(&i));
                if bits & RFLAGS_ARITHMETIC != 0
                    && (faulting_reader || path.iter().any(rotates_through_carry))
                {
                    bits &= !RFLAGS_ARITHMETIC;
                    lazy_flags = true;
                }
                bits &= !undefined_flags(path);
                if !hole_instructions.is_empty() {
                    bits &= !RFLAGS_ARITHMETIC;
                }
                bits == 0
            }
            field if lazy_flags_written.iter().any(|w| w == field) => {
                lazy_flags = true;
                true
            }
            field => !hole_instructions.is_empty() && hole_may_change(field),
        };
        if !explained {
            unexplained.push((field.clone(), n.clone(), v.clone()));
        }
    }
    let what = format!(
        "round {round} ({}; vector {:#x}, RIP {})",
        listing(&instructions, code_address),
        vector,
        native.get("rip").map(String::as_str).unwrap_or("?")
    );
    if !unexplained.is_empty() {
        let holes_seen: Vec<&str> = hole_instructions.iter().map(|h| h.hole()).collect();
        return Err(format!(
            "{what} differs in what no listed hole explains: {}{}",
            describe(&unexplained),
            if holes_seen.is_empty() {
                String::new()
            } else {
                format!(" (hole instructions on its path: {holes_seen:?})")
            }
        ));
    }
    let mut names: Vec<&str> = hole_instructions.iter().map(|h| h.hole()).collect();
    // Every hole must be a row of the holes table, and a selector read whose destination
    // still holds the native selector must hold the documented VMM value.
    for name in &names {
        if !holes.iter().any(|row| row.name == *name) {
            return Err(format!(
                "{what}: explained by hole {name}, which docs/virtualization-holes.md does not list"
            ));
        }
    }
    for h in &hole_instructions {
        let Some(row) = holes.iter().find(|row| row.name == h.hole()) else {
            continue;
        };
        if let (HoleInstruction::SelectorRead(_), Some((native_value, vmm_value))) =
            (h, &row.values)
        {
            let parse = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            let (Some(documented_native), Some(documented_vmm)) =
                (parse(native_value), parse(vmm_value))
            else {
                continue;
            };
            for (field, _, _) in &differing {
                let (Some(n), Some(v)) = (number(native, field), number(vmm, field)) else {
                    continue;
                };
                if n & 0xFFFF == documented_native && v & 0xFFFF != documented_vmm {
                    return Err(format!(
                        "{what}: {field} holds the selector {documented_native:#x} natively but \
                         {:#x} under the VMM, where {} documents {documented_vmm:#x}",
                        v & 0xFFFF,
                        h.hole()
                    ));
                }
            }
        }
    }
    names.extend(deviation.map(|(name, _)| name));
    if lazy_flags {
        names.push("qemu_lazy_flags");
    }
    if names.is_empty() {
        names.push("RF and the undefined flags");
    }
    Ok(format!(
        "{what}: {} explained by {}",
        describe(&differing),
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_show_lines_are_parsed() {
        let serial = "[guest] r 1 v0e e4 h00000000000000ff rf\nxx[guest] r 2 timer\n\
                      [guest] show r=3 vec=0xd rax=0x5\n[guest] r 4 garbage\n\
                      [guest] show r=3 rbx=0x6\n";
        let r = rounds(serial);
        assert_eq!(
            r.get(&1),
            Some(&End::Vector {
                vector: 0xe,
                error: Some(4),
                digest: 0xff,
                rf: true
            })
        );
        assert_eq!(r.get(&2), Some(&End::Timer));
        assert_eq!(r.len(), 2);
        let s = shown(serial);
        assert_eq!(s[&3]["rax"], "0x5");
        assert_eq!(s[&3]["rbx"], "0x6");
    }

    #[test]
    fn the_host_draws_the_guests_bytes() {
        // Round 1 of seed 1 as the guest printed it (`show=1`, CPL 0, differential).
        let settings = Settings {
            seed: 1,
            rounds: 1,
            user: false,
        };
        let hex: String = settings
            .code(1)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, "399f1b908d600b1847464fce367d9a850ba9dc8a2390c570");
    }

    #[test]
    fn the_int_gp_deviation_is_exact() {
        assert!(int_gp_error_codes(0x32, 0x1a)); // INT3 at CPL 3
        assert!(int_gp_error_codes(0x9a2, 0x4d2)); // INT 0x9A
        assert!(!int_gp_error_codes(0x1a, 0x1a));
        assert!(!int_gp_error_codes(0x32, 0x18)); // the IDT bit lost
        assert!(!int_gp_error_codes(0x32, 0x22)); // another vector
    }

    /// Whether `instruction` loads RFLAGS from memory (POPF, IRET).
    fn loads_rflags(instruction: &Instruction) -> bool {
        matches!(
            instruction.mnemonic(),
            Mnemonic::Popf | Mnemonic::Popfq | Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq
        )
    }

    #[test]
    fn the_path_includes_what_qemu_runs_after_a_rex_before_a_legacy_prefix() {
        // Seed 2021, round 120: REX.WX, DS, MOV EDI, imm32 as the SDM reads it; QEMU applies
        // the REX (MOV RDI, imm64), which runs the POPF at +0xb that set NT natively.
        let bytes = [
            0x4a, 0x3e, 0xbf, 0x66, 0xcb, 0x9f, 0x93, 0x11, 0xb6, 0x92, 0x18, 0x9d, 0x13, 0x56,
            0x5b, 0x2f,
        ];
        assert_eq!(qemu_order(&bytes)[..3], [0x3e, 0x4a, 0xbf]);
        assert_eq!(qemu_order(&bytes)[3..], bytes[3..]);
        let code = 0x1000;
        let sdm = path_as_decoded(&bytes, code, code + 0xf);
        assert!(!sdm.iter().any(loads_rflags), "{}", listing(&sdm, code));
        let both = path(&bytes, code, code + 0xf);
        assert!(
            both.iter()
                .any(|i| i.mnemonic() == Mnemonic::Popfq && i.ip() == code + 0xb),
            "{}",
            listing(&both, code)
        );
        // Without a REX before a prefix, QEMU reads the bytes as the SDM does.
        assert_eq!(qemu_order(&[0x3e, 0x4a, 0xbf]), [0x3e, 0x4a, 0xbf]);
        assert_eq!(qemu_order(&[0x48, 0x89, 0xc3]), [0x48, 0x89, 0xc3]);
    }

    #[test]
    fn a_flag_reader_with_a_memory_operand_may_write_another_result() {
        let code = 0x1000;
        // Seed 2000, round 97: CMPSB; RCL dword [rbp-44h], 1; INT 5Eh.
        let bytes = [0xa6, 0xd1, 0x55, 0xbc, 0xcd, 0x5e];
        let path = path(&bytes, code, code + 4);
        assert_eq!(lazy_flags_destinations(&path), ["memory"]);
        // ADC RAX, [RBX] may load another sum into RAX; ADC RAX, RBX cannot fault.
        let adc = decode(&[0x48, 0x13, 0x03, 0x48, 0x11, 0xd8], code);
        assert_eq!(lazy_flags_destinations(&adc), ["rax"]);
        // A store that reads no flag, and a flag reader without memory: nothing.
        let none = decode(&[0x89, 0x03, 0x0f, 0x92, 0xc0], code);
        assert!(lazy_flags_destinations(&none).is_empty());
    }

    #[test]
    fn an_ss_relative_non_canonical_address_is_qemus_gp_only_for_a_stack_reference() {
        let code = 0x1000;
        let at = |vector, error| Event {
            vector,
            error: Some(error),
            rip: code,
        };
        // Seed 3012, round 463: SS: MOV GS, [RDX-52h] with RDX not canonical.
        let ss_override = [0x36, 0x8e, 0x6a, 0xae];
        let path = path(&ss_override, code, code);
        assert_eq!(
            reference_deviation(false, &ss_override, code, &path, &at(13, 0), &at(12, 0)),
            Some(("qemu_non_canonical_stack_gp", &["vec"][..]))
        );
        // MOV GS, [RSP+R12*8+disp32]: RSP as the base is a stack reference too.
        let rsp_base = [0x4e, 0x8e, 0xac, 0xe4, 0x14, 0x7e, 0xc5, 0x00];
        let path = path_as_decoded(&rsp_base, code, code);
        assert!(
            reference_deviation(true, &rsp_base, code, &path, &at(13, 0), &at(12, 0)).is_some()
        );
        // MOV GS, [RDX-52h] without the override: a #SS would be the VMM's mistake.
        let ds = [0x8e, 0x6a, 0xae];
        let path = path_as_decoded(&ds, code, code);
        assert_eq!(
            reference_deviation(false, &ds, code, &path, &at(13, 0), &at(12, 0)),
            None
        );
    }

    #[test]
    fn hole_instructions_are_recognised() {
        let of = |bytes: &[u8]| decode(bytes, 0x1000).first().and_then(HoleInstruction::of);
        assert_eq!(
            of(&[0x8C, 0xC8]),
            Some(HoleInstruction::SelectorRead(Register::CS))
        );
        assert_eq!(
            of(&[0x8C, 0xD0]),
            Some(HoleInstruction::SelectorRead(Register::SS))
        );
        assert_eq!(of(&[0x8C, 0xD8]), None); // mov eax, ds: not a hole
        assert_eq!(of(&[0x9C]), Some(HoleInstruction::Pushf));
        assert_eq!(of(&[0x9D]), Some(HoleInstruction::Popf));
        assert_eq!(of(&[0x0F, 0x02, 0xC0]), Some(HoleInstruction::Lar));
    }
}
