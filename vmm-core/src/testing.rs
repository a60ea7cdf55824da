//! The test rig of the virtual CPU, shared by its unit tests (`cpu/tests.rs`) and the fuzz
//! targets (`fuzz/`, which build this crate with the feature `testing`): a guest kernel's GDT,
//! IDT and TSS laid out in a flat page-granular memory ([`FlatMemory`], checked with the
//! hardware's rights), I/O ports that record writes, a fake host CPU for CPUID/RDTSC and a
//! one-vector interrupt controller. Never part of a VMM build.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

pub use crate::cpu::memory::flat::{FlatMemory, Rights, RO_KERNEL, RW_KERNEL, RW_USER};

use crate::cpu::descriptor::{encode_gate, encode_segment, Descriptor};
use crate::cpu::state::rflags;
use crate::cpu::{
    handle_instruction, Cause, CpuStop, Event, Gpr, Handled, HostCpu, Outcome, SegReg, Segment,
    TableRegister, VCpu,
};
use crate::devices::InterruptSource;
use crate::io::PortIo;

/// The guest kernel's code page (RIP at entry).
pub const CODE: u64 = 0x1000;
/// The guest's GDT ([`gdt_entries`]).
pub const GDT: u64 = 0x2000;
/// The guest's IDT: 256 gates, handler of vector v at [`HANDLERS`] + 0x10 * v.
pub const IDT: u64 = 0x3000;
/// The guest's 64-bit TSS (RSP0 = [`RSP0`], IST1 = [`IST1`], no I/O bitmap).
pub const TSS: u64 = 0x4000;
/// The guest kernel's stack top at entry.
pub const KSTACK_TOP: u64 = 0x9000;
/// TSS.RSP0: the stack an interrupt from user mode switches to.
pub const RSP0: u64 = 0xC000;
/// TSS.IST1: the stack of vector 2 (NMI).
pub const IST1: u64 = 0xE000;
/// A user code page (RIP of [`Rig::user`]).
pub const UCODE: u64 = 0x10000;
/// The user stack top of [`Rig::user`].
pub const USTACK_TOP: u64 = 0x21000;
/// A supervisor data page.
pub const DATA: u64 = 0x30000;
/// Handler of vector v is at HANDLERS + 0x10 * v.
pub const HANDLERS: u64 = 0x40000;

/// 64-bit kernel code selector.
pub const KCODE: u16 = 0x08;
/// Kernel data selector.
pub const KDATA: u16 = 0x10;
/// User data selector (RPL 3).
pub const UDATA: u16 = 0x1B;
/// 64-bit user code selector (RPL 3).
pub const UCODE_SEL: u16 = 0x23;
/// The TSS selector (a 16-byte system descriptor).
pub const TSS_SEL: u16 = 0x28;

/// I/O ports: every write recorded, reads answered from `values` (all ones where unset, as
/// from an empty bus).
#[derive(Default, Debug, Clone)]
pub struct Ports {
    /// Each write: port, size in bytes, value.
    pub writes: Vec<(u16, u8, u32)>,
    /// What a read of a port returns.
    pub values: BTreeMap<u16, u32>,
}

impl PortIo for Ports {
    fn port_read(&mut self, port: u16, size: u8) -> u32 {
        let mask = if size >= 4 {
            u32::MAX
        } else {
            (1u32 << (size * 8)) - 1
        };
        self.values.get(&port).copied().unwrap_or(u32::MAX) & mask
    }
    fn port_write(&mut self, port: u16, size: u8, value: u32) {
        self.writes.push((port, size, value));
    }
}

/// A host CPU whose CPUID answers echo the leaf and whose TSC is a constant.
#[derive(Debug)]
pub struct FakeCpu;
impl HostCpu for FakeCpu {
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
        [leaf, 0x1111, 0x2222, 0x3333]
    }
    fn rdtsc(&self) -> u64 {
        0x1234_5678_9ABC_DEF0
    }
}

/// An interrupt controller with at most one pending vector.
#[derive(Debug)]
pub struct Pic {
    /// The vector it will hand out, if any.
    pub pending: Option<u8>,
}
impl InterruptSource for Pic {
    fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
    fn acknowledge(&mut self) -> Option<u8> {
        self.pending.take()
    }
}

/// A guest with its vCPU, memory and ports, set up by [`Rig::kernel`] or [`Rig::user`].
#[derive(Debug, Clone)]
pub struct Rig {
    /// The virtual CPU.
    pub cpu: VCpu,
    /// Guest memory (linear = the flat model's page numbers).
    pub mem: FlatMemory,
    /// The I/O ports.
    pub ports: Ports,
}

/// The guest's GDT: null, kernel code/data (0x08, 0x10), user data/code (0x1B, 0x23), the
/// TSS (0x28, two entries), a not-present data segment (0x38) and a 32-bit code segment (0x40).
pub fn gdt_entries() -> Vec<u64> {
    let tss_low = 0x67 | ((TSS & 0xFF_FFFF) << 16) | (0x89u64 << 40) | ((TSS >> 24 & 0xFF) << 56);
    alloc::vec![
        0,
        encode_segment(true, true, 0, true, true),
        encode_segment(false, false, 0, true, true),
        encode_segment(false, false, 3, true, true),
        encode_segment(true, true, 3, true, true),
        tss_low,
        TSS >> 32,
        // 0x38: a not-present data segment; 0x40: a 32-bit code segment.
        encode_segment(false, false, 0, false, true),
        encode_segment(true, false, 0, true, true),
    ]
}

impl Rig {
    /// The guest kernel at CPL 0 with its GDT, IDT (interrupt gates, DPL 0, except vector 0x80
    /// DPL 3 and 3 DPL 3; vector 0x81 a trap gate; vector 2 uses IST1) and TSS loaded.
    pub fn kernel() -> Rig {
        let mut mem = FlatMemory::default();
        for (at, len) in [
            (CODE, 0x1000),
            (GDT, 0x1000),
            (IDT, 0x1000),
            (TSS, 0x1000),
            (0x5000, 0x9000),
            (DATA, 0x1000),
            (HANDLERS, 0x1000),
        ] {
            mem.map(at, len, RW_KERNEL);
        }
        mem.map(UCODE, 0x1000, RW_USER);
        mem.map(0x20000, 0x1000, RW_USER);
        let gdt: Vec<u8> = gdt_entries().iter().flat_map(|d| d.to_le_bytes()).collect();
        mem.poke(GDT, &gdt);
        for v in 0..256u64 {
            let dpl = if v == 0x80 || v == 3 { 3 } else { 0 };
            let typ = if v == 0x81 { 0xF } else { 0xE };
            let ist = if v == 2 { 1 } else { 0 };
            let [lo, hi] = encode_gate(HANDLERS + 0x10 * v, KCODE, ist, typ, dpl, true);
            mem.poke(IDT + 16 * v, &lo.to_le_bytes());
            mem.poke(IDT + 16 * v + 8, &hi.to_le_bytes());
        }
        mem.poke(TSS + 4, &RSP0.to_le_bytes());
        mem.poke(TSS + 36, &IST1.to_le_bytes());
        mem.poke(TSS + 0x66, &0x68u16.to_le_bytes());
        let mut cpu = VCpu::at_entry(
            CODE,
            KSTACK_TOP,
            0,
            0x100000,
            TableRegister {
                base: GDT,
                limit: (gdt.len() - 1) as u16,
            },
        );
        cpu.idtr = TableRegister {
            base: IDT,
            limit: 0xFFF,
        };
        let tr_desc = Descriptor::from_raw_system(gdt_entries()[5], gdt_entries()[6]);
        cpu.tr = Segment {
            selector: TSS_SEL,
            cache: tr_desc,
        };
        cpu.take_effects();
        Rig {
            cpu,
            mem,
            ports: Ports::default(),
        }
    }

    /// A guest user program at CPL 3 with IF = 1.
    pub fn user() -> Rig {
        let mut rig = Rig::kernel();
        rig.cpu.cpl = 3;
        rig.cpu.rip = UCODE;
        rig.cpu.set_reg(Gpr::Rsp, USTACK_TOP);
        rig.cpu.rflags |= rflags::IF;
        let ucode = Descriptor::from_raw(encode_segment(true, true, 3, true, true));
        let udata = Descriptor::from_raw(encode_segment(false, false, 3, true, true));
        rig.cpu.set_segment(
            SegReg::Cs,
            Segment {
                selector: UCODE_SEL,
                cache: ucode,
            },
        );
        rig.cpu.set_segment(
            SegReg::Ss,
            Segment {
                selector: UDATA,
                cache: udata,
            },
        );
        rig.cpu.take_effects();
        rig
    }

    /// Puts `bytes` at RIP.
    pub fn code(&mut self, bytes: &[u8]) {
        let rip = self.cpu.rip;
        self.mem.poke(rip, bytes);
    }

    /// Handles the instruction at RIP for `cause`, checking that the decode phase is marked
    /// first.
    pub fn run_cause(&mut self, cause: Cause) -> Result<Handled, CpuStop> {
        let mut phases = Vec::new();
        let result = handle_instruction(
            &mut self.cpu,
            &mut self.mem,
            &mut self.ports,
            &FakeCpu,
            cause,
            &mut |p| phases.push(p),
        );
        // Decode is always marked first, then emulate, then injection if a fault was raised.
        assert_eq!(phases.first(), Some(&crate::accounting::Phase::Decode));
        result
    }

    /// Handles the instruction at RIP as the #GP(0) it raised at real CPL 3.
    pub fn run(&mut self) -> Result<Handled, CpuStop> {
        self.run_cause(Cause::Fault(Event::gp(0)))
    }

    /// Runs and expects the instruction to retire.
    pub fn ok(&mut self, bytes: &[u8]) -> Handled {
        self.code(bytes);
        let h = self.run().expect("stopped");
        assert_eq!(h.outcome, Outcome::Emulated, "{h:?}");
        h
    }

    /// Runs and expects `event` to be delivered for it.
    pub fn raises(&mut self, bytes: &[u8], vector: u8, code: Option<u32>) {
        self.code(bytes);
        let h = self.run().expect("stopped");
        match h.outcome {
            Outcome::Delivered(e) | Outcome::Reflected(e) => {
                assert_eq!((e.vector, e.error_code), (vector, code), "{h:?}");
            }
            other => panic!("expected vector {vector}, got {other:?}"),
        }
        assert_eq!(
            self.cpu.rip,
            HANDLERS + 0x10 * u64::from(vector),
            "at the handler"
        );
        assert_eq!(self.cpu.cpl, 0);
    }

    /// The quadword `slot` entries above RSP.
    pub fn stack(&self, slot: u64) -> u64 {
        self.mem.peek_u64(self.cpu.reg(Gpr::Rsp) + 8 * slot)
    }
}
