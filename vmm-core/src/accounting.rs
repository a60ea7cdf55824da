//! Trap accounting: counts and costs per trap kind, and the exit table.
//!
//! Every trap the host handles is recorded under a [`TrapKind`] (the instruction class by its
//! mnemonic, the exception vector, the IRQ line, the forwarded system call, the page-fault
//! outcome) with its cost in whatever unit the caller measures (the kernel feeds `rdtsc` deltas;
//! under QEMU `-icount shift=0` these are instruction counts). At guest exit
//! [`Accounting::write_table`] prints one aligned line per kind, sorted by total cost, with a
//! totals line.
//!
//! The record API is shaped for a later per-phase breakdown: [`Accounting::record`] takes one
//! cost; [`Accounting::record_phases`] takes one cost per [`Phase`] (entry stub, decode,
//! emulate, shadow MMU, injection, exit), adds their sum to the same statistics, and keeps the
//! per-phase totals for [`Accounting::write_phase_table`]. Arithmetic saturates: a table never
//! wraps or panics, however long the guest runs.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// A system call the VMM forwarded from virtual user mode to the guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SyscallKind {
    /// SYSCALL (64-bit).
    Syscall,
    /// SYSENTER.
    Sysenter,
    /// A software interrupt used as a system call gate (`INT 0x80`-style), with its vector.
    SoftwareInterrupt(u8),
}

/// What the host did with a page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageFaultOutcome {
    /// A hidden fault: the shadow page tables were filled from the guest's, the guest never saw
    /// it.
    Fill,
    /// A true guest fault: reflected to the guest's #PF handler.
    Reflect,
    /// The fault stopped the guest (for example, it hit the VMM's own slot).
    Stop,
    /// A write to a guest page table the cached policy write-protects: emulated, then the
    /// shadow entries it changed were zapped.
    EmulatedWrite,
}

/// The kind of one trap, the key of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrapKind {
    /// An emulated instruction, named by its mnemonic as the emulator reports it ("CLI",
    /// "MOV CR3", "OUT").
    Instruction(&'static str),
    /// An exception by vector (the ones reflected to or raised for the guest).
    Exception(u8),
    /// A hardware interrupt by IRQ line (virtual IRQs injected, or host IRQs taken while the
    /// guest ran).
    Irq(u8),
    /// A system call forwarded to the guest kernel.
    SystemCall(SyscallKind),
    /// A page fault by outcome.
    PageFault(PageFaultOutcome),
    /// Anything else the host wants in the table ("HLT idle", "triple fault").
    Other(&'static str),
    /// A `#VMEXIT` of the hardware-assisted backend, by its exit code's name
    /// (`svm::exit::ExitCode::name`).
    VmExit(&'static str),
}

/// The SDM's mnemonic for exception `vector` (SDM vol. 3, table 6-1), if it has one.
pub fn exception_mnemonic(vector: u8) -> Option<&'static str> {
    crate::cpu::exception::exception(vector).map(|e| e.mnemonic)
}

impl fmt::Display for TrapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TrapKind::Instruction(mnemonic) => write!(f, "insn {mnemonic}"),
            TrapKind::Exception(vector) => match exception_mnemonic(vector) {
                Some(name) => write!(f, "exception {name}"),
                None => write!(f, "exception {vector:#04x}"),
            },
            TrapKind::Irq(line) => write!(f, "irq {line}"),
            TrapKind::SystemCall(SyscallKind::Syscall) => f.write_str("syscall SYSCALL"),
            TrapKind::SystemCall(SyscallKind::Sysenter) => f.write_str("syscall SYSENTER"),
            TrapKind::SystemCall(SyscallKind::SoftwareInterrupt(vector)) => {
                write!(f, "syscall INT {vector:#04x}")
            }
            TrapKind::PageFault(PageFaultOutcome::Fill) => f.write_str("#PF fill"),
            TrapKind::PageFault(PageFaultOutcome::Reflect) => f.write_str("#PF reflect"),
            TrapKind::PageFault(PageFaultOutcome::EmulatedWrite) => f.write_str("#PF PT write"),
            TrapKind::PageFault(PageFaultOutcome::Stop) => f.write_str("#PF stop"),
            TrapKind::Other(name) => f.write_str(name),
            TrapKind::VmExit(name) => write!(f, "exit {name}"),
        }
    }
}

/// Where the cycles of one trap go (for the benchmark breakdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Hardware entry, the assembly stub saving guest registers, and copying them into the vCPU.
    EntryStub,
    /// Fetching and decoding the instruction.
    Decode,
    /// Emulating it.
    Emulate,
    /// Shadow page-table work.
    ShadowMmu,
    /// Choosing and delivering an event to the guest.
    Injection,
    /// Restoring guest state and returning to it.
    Exit,
}

impl Phase {
    /// Number of phases.
    pub const COUNT: usize = 6;
    /// Every phase, in trap order.
    pub const ALL: [Phase; Phase::COUNT] = [
        Phase::EntryStub,
        Phase::Decode,
        Phase::Emulate,
        Phase::ShadowMmu,
        Phase::Injection,
        Phase::Exit,
    ];
    /// Column name in the phase table.
    pub fn name(self) -> &'static str {
        match self {
            Phase::EntryStub => "entry",
            Phase::Decode => "decode",
            Phase::Emulate => "emulate",
            Phase::ShadowMmu => "shadow-mmu",
            Phase::Injection => "injection",
            Phase::Exit => "exit",
        }
    }
}

/// Count and cost statistics of one kind (or of the whole table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CostStats {
    count: u64,
    samples: u64,
    total: u64,
    min: u64,
    max: u64,
}

impl CostStats {
    /// Events recorded, with or without a cost.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Events recorded with a cost.
    pub fn samples(&self) -> u64 {
        self.samples
    }
    /// Sum of the costs.
    pub fn total(&self) -> u64 {
        self.total
    }
    /// Smallest cost, if any cost was recorded.
    pub fn min(&self) -> Option<u64> {
        (self.samples != 0).then_some(self.min)
    }
    /// Largest cost, if any cost was recorded.
    pub fn max(&self) -> Option<u64> {
        (self.samples != 0).then_some(self.max)
    }
    /// Integer mean cost (rounded down) over the events that had a cost.
    pub fn mean(&self) -> Option<u64> {
        self.total.checked_div(self.samples)
    }

    fn add_count(&mut self) {
        self.count = self.count.saturating_add(1);
    }

    fn add_sample(&mut self, cost: u64) {
        self.count = self.count.saturating_add(1);
        self.add_cost(cost);
    }

    fn add_cost(&mut self, cost: u64) {
        if self.samples == 0 {
            self.min = cost;
            self.max = cost;
        } else {
            self.min = self.min.min(cost);
            self.max = self.max.max(cost);
        }
        self.samples = self.samples.saturating_add(1);
        self.total = self.total.saturating_add(cost);
    }

    /// Adds another kind's statistics into this one (for the totals line).
    fn merge(&mut self, other: &CostStats) {
        self.count = self.count.saturating_add(other.count);
        if other.samples != 0 {
            if self.samples == 0 {
                self.min = other.min;
                self.max = other.max;
            } else {
                self.min = self.min.min(other.min);
                self.max = self.max.max(other.max);
            }
            self.samples = self.samples.saturating_add(other.samples);
            self.total = self.total.saturating_add(other.total);
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Entry {
    stats: CostStats,
    phases: [u64; Phase::COUNT],
}

/// The table of traps by kind.
///
/// A vector indexed through a small open-addressing hash of the kind rather than a tree: it is
/// updated on every trap, where a tree lookup comparing kind names cost a few hundred
/// instructions (measured under icount); this is a cheap hash and usually one comparison.
#[derive(Debug, Clone)]
pub struct Accounting {
    entries: Vec<(TrapKind, Entry)>,
    /// Hash slots: (the kind's `slot_key`, index + 1 into `entries`); index 0 = empty.
    slots: [(u64, u16); SLOTS],
    phases_recorded: bool,
}

const SLOT_BITS: u32 = 7;
const SLOTS: usize = 1 << SLOT_BITS;

/// A kind and where its row was last found in an [`Accounting`] table, for a caller that books
/// the same kind on many traps ([`Accounting::record_in`]). Checked on every use, so a table
/// cleared or rebuilt since only costs one new lookup.
#[derive(Clone, Copy, Debug)]
pub struct KindRow {
    kind: TrapKind,
    index: usize,
}

impl KindRow {
    /// The row of `kind`, not looked up yet.
    pub const fn new(kind: TrapKind) -> Self {
        Self {
            kind,
            index: usize::MAX,
        }
    }

    /// The kind this row books.
    pub fn kind(&self) -> TrapKind {
        self.kind
    }
}

impl Default for Accounting {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            slots: [(0, 0); SLOTS],
            phases_recorded: false,
        }
    }
}

/// A kind as one number, the slot table's key: its variant and its number, or the address of its
/// name with the variant in bits 52 and up. Names are `&'static str` literals, so one literal
/// has one address; the same name at two addresses (two literals) has two keys, which
/// `index_of` points at the same entry. A name's key is at least 2^52 and a number's below
/// 2^20, and two names of different variants would need addresses exactly 2^52 apart: keys
/// are never shared.
fn slot_key(kind: &TrapKind) -> u64 {
    let name = |s: &str, variant: u64| s.as_ptr() as u64 ^ variant << 52;
    match *kind {
        TrapKind::Exception(v) => 0x1_0000 | u64::from(v),
        TrapKind::Irq(v) => 0x2_0000 | u64::from(v),
        TrapKind::SystemCall(SyscallKind::Syscall) => 0x3_0000,
        TrapKind::SystemCall(SyscallKind::Sysenter) => 0x3_0001,
        TrapKind::SystemCall(SyscallKind::SoftwareInterrupt(v)) => 0x3_0100 | u64::from(v),
        TrapKind::PageFault(outcome) => 0x4_0000 | outcome as u64,
        TrapKind::Instruction(s) => name(s, 1),
        TrapKind::Other(s) => name(s, 2),
        TrapKind::VmExit(s) => name(s, 3),
    }
}

/// `a == b`, but names that are the same `&'static str` (the usual case: the emulator names an
/// instruction with a literal) compare by address and length instead of byte by byte (measured
/// under icount: the byte comparison cost ~60 instructions a trap).
fn same_kind(a: &TrapKind, b: &TrapKind) -> bool {
    match (a, b) {
        (TrapKind::Instruction(x), TrapKind::Instruction(y))
        | (TrapKind::Other(x), TrapKind::Other(y))
        | (TrapKind::VmExit(x), TrapKind::VmExit(y)) => core::ptr::eq(*x, *y) || x == y,
        _ => a == b,
    }
}

impl Accounting {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry of `kind`, created empty on first use.
    fn entry(&mut self, kind: TrapKind) -> &mut Entry {
        let index = self.index_of(kind);
        &mut self.entries[index].1
    }

    /// The index of `kind` in `entries`, added when new.
    fn index_of(&mut self, kind: TrapKind) -> usize {
        let key = slot_key(&kind);
        // Fibonacci hashing: the key's top bits, spread by the golden-ratio multiplier.
        let start = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOT_BITS)) as usize;
        for probe in 0..SLOTS {
            let slot = (start + probe) % SLOTS;
            match self.slots[slot] {
                (_, 0) => {
                    // A kind seen before under another name address keeps its one entry.
                    let index = match self.entries.iter().position(|(k, _)| *k == kind) {
                        Some(index) => index,
                        None => {
                            self.entries.push((kind, Entry::default()));
                            self.entries.len() - 1
                        }
                    };
                    self.slots[slot] = (key, (index + 1) as u16);
                    return index;
                }
                (k, n) if k == key => return usize::from(n) - 1,
                _ => {}
            }
        }
        // More kinds than slots (never in practice): a plain scan.
        match self.entries.iter().position(|(k, _)| *k == kind) {
            Some(i) => i,
            None => {
                self.entries.push((kind, Entry::default()));
                self.entries.len() - 1
            }
        }
    }

    fn find(&self, kind: &TrapKind) -> Option<&Entry> {
        self.entries.iter().find(|(k, _)| k == kind).map(|(_, e)| e)
    }

    /// One trap of `kind` that cost `cost` (cycles, or instructions under icount).
    pub fn record(&mut self, kind: TrapKind, cost: u64) {
        self.entry(kind).stats.add_sample(cost);
    }

    /// One trap of the kind `row` names: like [`Accounting::record`], through the row's
    /// remembered index when it is still the kind's (one comparison instead of a hash probe;
    /// measured under icount: ~80 instructions a trap less for the fast lane, which books the
    /// same few kinds on every trap).
    pub fn record_in(&mut self, row: &mut KindRow, cost: u64) {
        let current = self
            .entries
            .get(row.index)
            .is_some_and(|(k, _)| same_kind(k, &row.kind));
        if !current {
            row.index = self.index_of(row.kind);
        }
        if let Some((_, entry)) = self.entries.get_mut(row.index) {
            entry.stats.add_sample(cost);
        }
    }

    /// One trap of `kind` whose cost was not measured (it counts, it does not move the mean).
    pub fn count(&mut self, kind: TrapKind) {
        self.entry(kind).stats.add_count();
    }

    /// One trap of `kind` with its cost split by phase (indexed as [`Phase::ALL`]); the sum is
    /// its cost in the main table.
    pub fn record_phases(&mut self, kind: TrapKind, phases: &[u64; Phase::COUNT]) {
        let entry = self.entry(kind);
        let mut sum = 0u64;
        for (slot, cost) in entry.phases.iter_mut().zip(phases) {
            *slot = slot.saturating_add(*cost);
            sum = sum.saturating_add(*cost);
        }
        entry.stats.add_sample(sum);
        self.phases_recorded = true;
    }

    /// Statistics of one kind.
    pub fn get(&self, kind: &TrapKind) -> Option<&CostStats> {
        self.find(kind).map(|e| &e.stats)
    }

    /// Per-phase cost totals of one kind (zeros when only [`Accounting::record`] was used).
    pub fn phase_totals(&self, kind: &TrapKind) -> Option<&[u64; Phase::COUNT]> {
        self.find(kind).map(|e| &e.phases)
    }

    /// Every kind recorded with its statistics, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&TrapKind, &CostStats)> {
        let mut rows: Vec<_> = self.entries.iter().map(|(k, e)| (k, &e.stats)).collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows.into_iter()
    }

    /// Number of distinct kinds recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The statistics of all kinds together.
    pub fn totals(&self) -> CostStats {
        let mut totals = CostStats::default();
        for (_, entry) in &self.entries {
            totals.merge(&entry.stats);
        }
        totals
    }

    /// Forgets everything (for a new measurement phase).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.slots = [(0, 0); SLOTS];
        self.phases_recorded = false;
    }

    /// Kinds sorted the way the table shows them: total cost descending, then count
    /// descending, then kind.
    fn sorted(&self) -> Vec<(&TrapKind, &Entry)> {
        let mut rows: Vec<_> = self.entries.iter().map(|(k, e)| (k, e)).collect();
        rows.sort_by(|(ka, a), (kb, b)| {
            b.stats
                .total
                .cmp(&a.stats.total)
                .then(b.stats.count.cmp(&a.stats.count))
                .then(ka.cmp(kb))
        });
        rows
    }

    /// The exit table: columns kind, count, total, mean, min, max, right-aligned numbers, one
    /// line per kind sorted by total descending, then a `total` line. Kinds without a measured
    /// cost show `-` for mean, min and max.
    pub fn write_table(&self, w: &mut impl fmt::Write) -> fmt::Result {
        const HEADERS: [&str; 6] = ["kind", "count", "total", "mean", "min", "max"];
        let mut rows: Vec<[String; 6]> = self
            .sorted()
            .into_iter()
            .map(|(kind, entry)| row(kind.to_string(), &entry.stats))
            .collect();
        rows.push(row(String::from("total"), &self.totals()));
        let mut widths = HEADERS.map(str::len);
        for r in &rows {
            for (width, cell) in widths.iter_mut().zip(r) {
                *width = (*width).max(cell.len());
            }
        }
        write_row(w, &HEADERS.map(String::from), &widths)?;
        for r in &rows {
            write_row(w, r, &widths)?;
        }
        Ok(())
    }

    /// The per-phase breakdown: kind, then the total cost of each [`Phase`], for the kinds
    /// recorded with [`Accounting::record_phases`]. Writes nothing if none were.
    pub fn write_phase_table(&self, w: &mut impl fmt::Write) -> fmt::Result {
        if !self.phases_recorded {
            return Ok(());
        }
        let mut header = Vec::with_capacity(Phase::COUNT + 1);
        header.push(String::from("kind"));
        header.extend(Phase::ALL.iter().map(|p| p.name().to_string()));
        let mut rows = alloc::vec![header];
        for (kind, entry) in self.sorted() {
            if entry.phases.iter().all(|p| *p == 0) {
                continue;
            }
            let mut r = Vec::with_capacity(Phase::COUNT + 1);
            r.push(kind.to_string());
            r.extend(entry.phases.iter().map(|p| p.to_string()));
            rows.push(r);
        }
        let mut widths = [0usize; Phase::COUNT + 1];
        for r in &rows {
            for (width, cell) in widths.iter_mut().zip(r) {
                *width = (*width).max(cell.len());
            }
        }
        for r in &rows {
            write_row(w, r, &widths)?;
        }
        Ok(())
    }
}

fn row(kind: String, stats: &CostStats) -> [String; 6] {
    let opt = |v: Option<u64>| v.map_or_else(|| String::from("-"), |v| v.to_string());
    [
        kind,
        stats.count.to_string(),
        stats.total.to_string(),
        opt(stats.mean()),
        opt(stats.min()),
        opt(stats.max()),
    ]
}

/// The first cell left-aligned, the others right-aligned, two spaces apart, no trailing blanks.
fn write_row(w: &mut impl fmt::Write, cells: &[String], widths: &[usize]) -> fmt::Result {
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i == 0 {
            if cells.len() == 1 {
                w.write_str(cell)?;
            } else {
                write!(w, "{cell:<width$}")?;
            }
        } else {
            write!(w, "  {cell:>width$}")?;
        }
    }
    w.write_char('\n')
}

/// The exit table, then the phase table if phases were recorded.
impl fmt::Display for Accounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_table(f)?;
        self.write_phase_table(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn record_counts_and_costs() {
        let mut acc = Accounting::new();
        acc.record(TrapKind::Instruction("CLI"), 100);
        acc.record(TrapKind::Instruction("CLI"), 300);
        acc.record(TrapKind::Instruction("CLI"), 200);
        let cli = acc.get(&TrapKind::Instruction("CLI")).copied().unwrap();
        assert_eq!(cli.count(), 3);
        assert_eq!(cli.total(), 600);
        assert_eq!(cli.min(), Some(100));
        assert_eq!(cli.max(), Some(300));
        assert_eq!(cli.mean(), Some(200));
        assert_eq!(acc.get(&TrapKind::Irq(0)), None);
    }

    #[test]
    fn the_same_name_at_two_addresses_is_one_kind() {
        let mut acc = Accounting::new();
        let name = alloc::string::String::from("MOV CR3");
        // A name built at run time cannot share the literal's address.
        let leaked: &'static str = alloc::boxed::Box::leak(name.into_boxed_str());
        assert!(!core::ptr::eq(leaked, "MOV CR3"));
        acc.record(TrapKind::Instruction("MOV CR3"), 10);
        acc.record(TrapKind::Instruction(leaked), 30);
        acc.record(TrapKind::Instruction("MOV CR3"), 20);
        let e = acc.get(&TrapKind::Instruction("MOV CR3")).copied().unwrap();
        assert_eq!((e.count(), e.total()), (3, 60));
        let mut table = alloc::string::String::new();
        acc.write_table(&mut table).unwrap();
        assert_eq!(table.matches("insn MOV CR3").count(), 1, "{table}");
    }

    #[test]
    fn uncosted_events_count_without_moving_the_mean() {
        let mut acc = Accounting::new();
        acc.count(TrapKind::Irq(4));
        assert_eq!(acc.get(&TrapKind::Irq(4)).unwrap().mean(), None);
        acc.record(TrapKind::Irq(4), 10);
        acc.count(TrapKind::Irq(4));
        let irq = acc.get(&TrapKind::Irq(4)).unwrap();
        assert_eq!((irq.count(), irq.samples(), irq.mean()), (3, 1, Some(10)));
    }

    #[test]
    fn kinds_are_distinct_keys() {
        let mut acc = Accounting::new();
        acc.record(TrapKind::Exception(13), 1);
        acc.record(TrapKind::Exception(14), 1);
        acc.record(TrapKind::Irq(13), 1);
        acc.record(TrapKind::SystemCall(SyscallKind::Syscall), 1);
        acc.record(
            TrapKind::SystemCall(SyscallKind::SoftwareInterrupt(0x80)),
            1,
        );
        acc.record(TrapKind::PageFault(PageFaultOutcome::Fill), 1);
        acc.record(TrapKind::PageFault(PageFaultOutcome::Reflect), 1);
        assert_eq!(acc.len(), 7);
    }

    #[test]
    fn labels() {
        assert_eq!(TrapKind::Instruction("MOV CR3").to_string(), "insn MOV CR3");
        assert_eq!(TrapKind::Exception(13).to_string(), "exception #GP");
        assert_eq!(TrapKind::Exception(0x1F).to_string(), "exception 0x1f");
        assert_eq!(TrapKind::Irq(4).to_string(), "irq 4");
        assert_eq!(
            TrapKind::SystemCall(SyscallKind::SoftwareInterrupt(0x80)).to_string(),
            "syscall INT 0x80"
        );
        assert_eq!(
            TrapKind::SystemCall(SyscallKind::Sysenter).to_string(),
            "syscall SYSENTER"
        );
        assert_eq!(
            TrapKind::PageFault(PageFaultOutcome::Stop).to_string(),
            "#PF stop"
        );
    }

    #[test]
    fn table_is_sorted_aligned_and_totalled() {
        let mut acc = Accounting::new();
        acc.record(TrapKind::Instruction("CLI"), 10);
        acc.record(TrapKind::Instruction("CLI"), 30);
        acc.record(TrapKind::PageFault(PageFaultOutcome::Fill), 1000);
        acc.count(TrapKind::Irq(0));
        let text = acc.to_string();
        let expected = "\
kind      count  total  mean   min   max
#PF fill      1   1000  1000  1000  1000
insn CLI      2     40    20    10    30
irq 0         1      0     -     -     -
total         4   1040   346    10  1000
";
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_table_has_header_and_zero_total() {
        let acc = Accounting::new();
        let mut text = String::new();
        acc.write_table(&mut text).unwrap();
        assert_eq!(
            text,
            "kind   count  total  mean  min  max\ntotal      0      0     -    -    -\n"
        );
    }

    #[test]
    fn costs_saturate_instead_of_wrapping() {
        let mut acc = Accounting::new();
        acc.record(TrapKind::Other("x"), u64::MAX);
        acc.record(TrapKind::Other("x"), 5);
        let x = acc.get(&TrapKind::Other("x")).unwrap();
        assert_eq!(x.total(), u64::MAX);
        assert_eq!(x.min(), Some(5));
        assert_eq!(acc.totals().total(), u64::MAX);
    }

    #[test]
    fn phases_sum_into_the_main_table() {
        let mut acc = Accounting::new();
        let kind = TrapKind::Instruction("OUT");
        acc.record_phases(kind, &[10, 20, 30, 0, 5, 15]);
        acc.record_phases(kind, &[10, 20, 30, 0, 5, 15]);
        let stats = acc.get(&kind).unwrap();
        assert_eq!(
            (stats.count(), stats.total(), stats.mean()),
            (2, 160, Some(80))
        );
        assert_eq!(acc.phase_totals(&kind), Some(&[20, 40, 60, 0, 10, 30]));
        let mut text = String::new();
        acc.write_phase_table(&mut text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                "kind      entry  decode  emulate  shadow-mmu  injection  exit",
                "insn OUT     20      40       60           0         10    30",
            ]
        );
    }

    #[test]
    fn phase_table_is_empty_without_phases() {
        let mut acc = Accounting::new();
        acc.record(TrapKind::Irq(1), 3);
        let mut text = String::new();
        acc.write_phase_table(&mut text).unwrap();
        assert!(text.is_empty());
        acc.clear();
        assert!(acc.is_empty());
    }
}

#[cfg(test)]
mod hash_tests {
    use super::*;

    /// Many kinds, recorded in an interleaved order, each land in their own row.
    #[test]
    fn every_kind_keeps_its_own_row() {
        let mut a = Accounting::new();
        let names = ["CLI", "STI", "HLT", "IN", "OUT", "MOV CR3", "LGDT", "IRETQ"];
        for round in 0..3u64 {
            for (i, n) in names.iter().enumerate() {
                a.record(TrapKind::Instruction(n), round + i as u64);
            }
            for v in 0..32u8 {
                a.record(TrapKind::Exception(v), 1);
                a.record(TrapKind::Irq(v % 16), 1);
            }
        }
        assert_eq!(a.len(), names.len() + 32 + 16);
        assert_eq!(a.get(&TrapKind::Instruction("MOV CR3")).unwrap().count(), 3);
        assert_eq!(a.get(&TrapKind::Irq(3)).unwrap().count(), 6);
        // A name equal in content but from another place is the same kind.
        let owned = std::string::String::from("CLI");
        let leaked: &'static str = std::boxed::Box::leak(owned.into_boxed_str());
        a.record(TrapKind::Instruction(leaked), 0);
        assert_eq!(a.get(&TrapKind::Instruction("CLI")).unwrap().count(), 4);
    }

    /// A remembered row books into the same entry `record` does, and stays right after the
    /// table is cleared or other kinds arrive first.
    #[test]
    fn kind_rows_book_like_record() {
        let mut a = Accounting::new();
        let mut row = KindRow::new(TrapKind::Instruction("IN"));
        a.record(TrapKind::Instruction("IN"), 10);
        a.record_in(&mut row, 20);
        a.record_in(&mut row, 30);
        let stats = a.get(&TrapKind::Instruction("IN")).unwrap();
        assert_eq!(
            (stats.count(), stats.total(), stats.min()),
            (3, 60, Some(10))
        );
        assert_eq!(a.len(), 1);
        a.clear();
        a.record(TrapKind::Exception(13), 1);
        a.record(TrapKind::Instruction("OUT"), 1);
        a.record_in(&mut row, 7);
        assert_eq!(a.get(&TrapKind::Instruction("IN")).unwrap().total(), 7);
        assert_eq!(a.get(&TrapKind::Exception(13)).unwrap().total(), 1);
        assert_eq!(row.kind(), TrapKind::Instruction("IN"));
    }
}
