//! The virtual CPU's architectural state: what the guest kernel believes the machine holds.
//!
//! The guest really runs at CPL 3 with IOPL 0 (on its own CS/SS descriptors, compressed to DPL 3
//! in the shadow descriptor table, `shadow_gdt`); everything here is the
//! *virtual* value it would see on bare metal (article challenge "特权级压缩 / ring compression":
//! the virtual CPL and RFLAGS.IF/IOPL live here, not in the real registers). The real registers
//! carry only what the hardware can hold for the guest without giving it the machine: the
//! general registers and the arithmetic flags ([`rflags::HARDWARE_OWNED`]).

use super::descriptor::Descriptor;
use super::msr::MsrFile;

/// RFLAGS bits (SDM Vol. 1 §3.4.3, Vol. 3 §2.3).
pub mod rflags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Bit 1 reads as 1.
    pub const FIXED: u64 = 1 << 1;
    /// Parity.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Trap (single step).
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u64 = 1 << 9;
    /// Direction.
    pub const DF: u64 = 1 << 10;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u64 = 3 << 12;
    /// Nested task.
    pub const NT: u64 = 1 << 14;
    /// Resume.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Alignment check.
    pub const AC: u64 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u64 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u64 = 1 << 20;
    /// CPUID available.
    pub const ID: u64 = 1 << 21;
    /// The arithmetic flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
    /// The bits the guest's *real* RFLAGS carries while it runs: the hardware updates them
    /// without trapping (POPF and IRET set NT at any CPL), so the real value is the truth for
    /// them. Everything else (IF, IOPL, RF, VM, VIF, VIP) is virtual and lives in
    /// [`super::VCpu::rflags`]. NT is safe to hand the guest because every way into the host
    /// clears it: interrupt and exception delivery (SDM Vol. 3 §6.12.1), SYSCALL through
    /// IA32_FMASK, and the SYSENTER stub itself (an IRET with NT set would #GP in the host).
    pub const HARDWARE_OWNED: u64 = STATUS | TF | DF | NT | AC | ID;
    /// Every bit that exists; the others are reserved and read as 0.
    pub const DEFINED: u64 =
        STATUS | FIXED | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;
    /// The I/O privilege level field of `value`.
    pub fn iopl(value: u64) -> u8 {
        ((value >> 12) & 3) as u8
    }
}

/// CR0 bits (SDM Vol. 3 §2.5).
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// x87 emulation.
    pub const EM: u64 = 1 << 2;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Extension type (reads as 1).
    pub const ET: u64 = 1 << 4;
    /// Numeric error.
    pub const NE: u64 = 1 << 5;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Alignment mask.
    pub const AM: u64 = 1 << 18;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
    /// Every bit that exists; a write of the other bits of CR0[31:0] is ignored, of
    /// CR0[63:32] is #GP(0).
    pub const DEFINED: u64 = PE | MP | EM | TS | ET | NE | WP | AM | NW | CD | PG;
}

/// CR4 bits the virtual CPU offers (SDM Vol. 3 §2.5). The rest are reserved *for this CPU*:
/// CPUID hides the features behind them, so setting one is a #GP as on a CPU without it.
pub mod cr4 {
    /// Page size extensions (ignored in long mode).
    pub const PSE: u64 = 1 << 4;
    /// Physical address extension (must stay set in long mode).
    pub const PAE: u64 = 1 << 5;
    /// Machine-check enable.
    pub const MCE: u64 = 1 << 6;
    /// Global pages.
    pub const PGE: u64 = 1 << 7;
    /// RDPMC at any CPL.
    pub const PCE: u64 = 1 << 8;
    /// FXSAVE/FXRSTOR and SSE.
    pub const OSFXSR: u64 = 1 << 9;
    /// Unmasked SIMD exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// User-mode instruction prevention (SGDT/SIDT/SLDT/STR/SMSW at CPL > 0 fault).
    pub const UMIP: u64 = 1 << 11;
    /// RDTSC only at CPL 0.
    pub const TSD: u64 = 1 << 2;
    /// Debugging extensions.
    pub const DE: u64 = 1 << 3;
    /// Every bit a guest may set.
    pub const DEFINED: u64 = TSD | DE | PSE | PAE | MCE | PGE | PCE | OSFXSR | OSXMMEXCPT | UMIP;
}

/// Debug-register values and bits (SDM Vol. 3 §17.2).
pub mod dr {
    /// DR6 as it reads with no debug condition recorded (its reserved bits read as 1).
    pub const DR6_INIT: u64 = 0xFFFF_0FF0;
    /// DR6 bits software can see change: B0–B3, BD, BS, BT.
    pub const DR6_STATUS: u64 = 0xE00F;
    /// DR6.BS: the #DB was a single-step trap.
    pub const DR6_BS: u64 = 1 << 14;
    /// DR6.BD: the #DB was DR7.GD's general detect.
    pub const DR6_BD: u64 = 1 << 13;
    /// DR7.GD: the next MOV to or from a debug register raises #DB.
    pub const DR7_GD: u64 = 1 << 13;
    /// DR7 after reset (bit 10 reads as 1).
    pub const DR7_INIT: u64 = 0x400;
    /// DR7 bits that exist (the rest of 31:0 are reserved 0; 63:32 must be 0).
    pub const DR7_DEFINED: u64 = 0xFFFF_23FF;
    /// DR7's local and global enables of breakpoints 0–3.
    pub const DR7_ENABLES: u64 = 0xFF;
}

/// IA32_EFER bits (SDM Vol. 3 §2.2.1).
pub mod efer {
    /// SYSCALL/SYSRET enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active (read-only).
    pub const LMA: u64 = 1 << 10;
    /// Execute-disable enable.
    pub const NXE: u64 = 1 << 11;
    /// Every bit a guest may set.
    pub const DEFINED: u64 = SCE | LME | LMA | NXE;
}

/// General registers in the encoding order of the manual (ModRM/REX numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Gpr {
    Rax = 0,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

/// The six segment registers, in encoding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum SegReg {
    Es = 0,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// A segment register: the visible selector and the hidden part loaded from its descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// The visible selector (index, TI, RPL).
    pub selector: u16,
    /// The descriptor cache (base, limit, type, DPL, L/D bits).
    pub cache: Descriptor,
}

impl Segment {
    /// A null selector with requested privilege `rpl` (what 64-bit mode loads into SS on a
    /// privilege change).
    pub fn null(rpl: u8) -> Self {
        Segment {
            selector: u16::from(rpl & 3),
            cache: Descriptor::default(),
        }
    }

    /// Requested privilege level of the selector.
    pub fn rpl(&self) -> u8 {
        (self.selector & 3) as u8
    }
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableRegister {
    /// Linear base address.
    pub base: u64,
    /// Limit: the offset of the last valid byte.
    pub limit: u16,
}

/// What the caller must apply to the real machine after the vCPU changed: the vCPU cannot touch
/// the MMU or the real MSRs itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// CR3 was written: switch the shadow address space to this guest CR3.
    pub cr3_load: Option<u64>,
    /// INVLPG of this linear address: zap it in both shadow views.
    pub invlpg: Option<u64>,
    /// CR0.WP, CR4.PGE or EFER.NXE changed: give the MMU the new [`VCpu::paging_mode`].
    pub paging_mode: bool,
    /// A TLB flush of everything (CR4.PGE toggled, or CR0.PG changed).
    pub flush_all: bool,
    /// The virtual CPL changed: switch between the shadow kernel and user views.
    pub privilege: bool,
    /// FS or GS base changed (WRMSR, SWAPGS, segment load): reload the real bases.
    pub segment_bases: bool,
    /// CR0, CR4 or an MSR was written: the real bits that follow the guest's (EFER.SCE,
    /// SYSENTER_CS, CR0.TS/EM/MP/AM, CR4.OSFXSR/OSXMMEXCPT/TSD) must be recomputed.
    pub controls: bool,
    /// The guest's GDT changed in a way the VMM made (LTR marks the TSS busy in it) or the
    /// GDTR was loaded: rebuild the shadow descriptor table from it.
    pub descriptor_table: bool,
}

impl Effects {
    /// Whether there is nothing to apply.
    #[inline]
    pub fn is_empty(&self) -> bool {
        *self == Effects::default()
    }
}

/// CR0 bits that act on instructions the guest runs natively: TS, EM and MP (x87/SSE #NM and
/// #UD, lazy FPU switching) and AM (alignment checks at CPL 3).
pub const REAL_CR0_FOLLOWS: u64 = cr0::TS | cr0::EM | cr0::MP | cr0::AM;
/// CR4 bits that act on instructions the guest runs natively: OSFXSR and OSXMMEXCPT (SSE), TSD
/// (RDTSC faults above CPL 0: with it set, the guest kernel's own RDTSC traps and is emulated).
pub const REAL_CR4_FOLLOWS: u64 = cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::TSD;

/// What the real CPU must hold for the guest where it acts on the guest's state without a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealControls {
    /// The real CR0's [`REAL_CR0_FOLLOWS`] bits.
    pub cr0: u64,
    /// The real CR4's [`REAL_CR4_FOLLOWS`] bits.
    pub cr4: u64,
    /// Real EFER.SCE: SYSCALL enters the VMM, or is #UD at the instruction itself (only the CPU
    /// knows where an instruction with prefixes began).
    pub syscall: bool,
    /// Real SYSENTER enters the VMM, or is #GP at the instruction (it would lose the RIP).
    pub sysenter: bool,
}

/// The virtual CPU.
#[derive(Clone, Debug)]
pub struct VCpu {
    /// General registers, indexed by [`Gpr`].
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// The full virtual RFLAGS (see [`rflags::HARDWARE_OWNED`] for which half the real
    /// register holds while the guest runs).
    pub rflags: u64,
    /// The guest's current privilege level: 0 while its kernel runs, 3 for its user programs.
    pub cpl: u8,
    /// Virtual CR0.
    pub cr0: u64,
    /// Virtual CR2: the last page-fault linear address delivered to the guest.
    pub cr2: u64,
    /// Virtual CR3: the guest's page-table root (guest-physical).
    pub cr3: u64,
    /// Virtual CR4.
    pub cr4: u64,
    /// Virtual CR8, the task-priority register (4 bits).
    pub cr8: u64,
    /// Virtual IA32_EFER.
    pub efer: u64,
    /// Virtual GDTR.
    pub gdtr: TableRegister,
    /// Virtual IDTR.
    pub idtr: TableRegister,
    /// Virtual LDTR.
    pub ldtr: Segment,
    /// Virtual task register.
    pub tr: Segment,
    /// Segment registers, indexed by [`SegReg`].
    pub seg: [Segment; 6],
    /// The virtual MSR file.
    pub msr: MsrFile,
    /// Virtual DR0–DR3 (breakpoint addresses).
    pub dr_address: [u64; 4],
    /// Virtual DR6 (debug status).
    pub dr6: u64,
    /// Virtual DR7 (debug control).
    pub dr7: u64,
    /// STI/MOV SS interrupt shadow: interrupts stay blocked while RIP is this address (the
    /// instruction after STI or MOV SS), SDM Vol. 3 §6.8.3.
    pub interrupt_shadow: Option<u64>,
    /// The guest executed HLT with interrupts enabled and waits for one.
    pub halted: bool,
    /// The RIP the guest was last resumed at (see [`VCpu::trapped_at`]).
    resumed_at: u64,
    /// MAXPHYADDR this CPU reports (CPUID.80000008H:EAX[7:0]) and the shadow MMU's walks use:
    /// physical-address bits at and above it are reserved in CR3 and in paging entries.
    pub max_phys_bits: u8,
    /// Not architectural: whether the emulator takes its fast paths (the host option
    /// `fastpath=`): a predictable second instruction run in the same trap
    /// ([`super::coalesce`]), MOV CRn and INVLPG built without the decoder. Off by default,
    /// which is the reference behaviour.
    pub fast_paths: bool,
    effects: Effects,
    /// Whether `effects` holds anything: kept with every write to it, so that the check on
    /// every trap is one load (comparing the whole record cost ~18 instructions under icount).
    effects_pending: bool,
}

impl VCpu {
    /// The entry state of docs/writing-a-guest.md: long mode, CPL 0, IF = 0, paging on, IDTR
    /// limit 0, the boot GDT's selectors 0x08 (code) and 0x10 (data) loaded.
    pub fn at_entry(rip: u64, rsp: u64, rdi: u64, cr3: u64, gdtr: TableRegister) -> Self {
        let code = Descriptor::from_raw(boot::BOOT_GDT[1]);
        let data = Descriptor::from_raw(boot::BOOT_GDT[2]);
        let cs = Segment {
            selector: boot::BOOT_CODE_SELECTOR,
            cache: code,
        };
        let ds = Segment {
            selector: boot::BOOT_DATA_SELECTOR,
            cache: data,
        };
        let mut gpr = [0; 16];
        gpr[Gpr::Rsp as usize] = rsp;
        gpr[Gpr::Rdi as usize] = rdi;
        VCpu {
            gpr,
            rip,
            rflags: boot::ENTRY_RFLAGS,
            cpl: 0,
            cr0: boot::ENTRY_CR0,
            cr2: 0,
            cr3,
            cr4: boot::ENTRY_CR4,
            cr8: 0,
            efer: boot::ENTRY_EFER,
            gdtr,
            idtr: TableRegister { base: 0, limit: 0 },
            ldtr: Segment::null(0),
            tr: Segment::null(0),
            seg: [ds, cs, ds, ds, Segment::null(0), Segment::null(0)],
            msr: MsrFile::new(),
            dr_address: [0; 4],
            dr6: dr::DR6_INIT,
            dr7: dr::DR7_INIT,
            interrupt_shadow: None,
            halted: false,
            resumed_at: rip,
            max_phys_bits: shadow_mmu::PagingMode::ENTRY.max_phys_bits,
            fast_paths: false,
            effects: Effects::default(),
            effects_pending: false,
        }
    }

    /// A general register.
    pub fn reg(&self, r: Gpr) -> u64 {
        self.gpr[r as usize]
    }

    /// Sets a general register.
    pub fn set_reg(&mut self, r: Gpr, value: u64) {
        self.gpr[r as usize] = value;
    }

    /// A segment register.
    pub fn segment(&self, s: SegReg) -> &Segment {
        &self.seg[s as usize]
    }

    /// Sets a segment register (selector and hidden part).
    pub fn set_segment(&mut self, s: SegReg, value: Segment) {
        let bases_before = (
            self.seg[SegReg::Fs as usize].cache.base,
            self.seg[SegReg::Gs as usize].cache.base,
        );
        self.seg[s as usize] = value;
        if bases_before
            != (
                self.seg[SegReg::Fs as usize].cache.base,
                self.seg[SegReg::Gs as usize].cache.base,
            )
        {
            self.effects.segment_bases = true;
            self.effects_pending = true;
        }
    }

    /// FS base (the hidden part; IA32_FS_BASE reads and writes it).
    pub fn fs_base(&self) -> u64 {
        self.seg[SegReg::Fs as usize].cache.base
    }

    /// GS base (the hidden part; IA32_GS_BASE reads and writes it).
    pub fn gs_base(&self) -> u64 {
        self.seg[SegReg::Gs as usize].cache.base
    }

    /// Takes in the real FS and GS bases, the truth while the guest runs (a native load of FS
    /// or GS sets them from the descriptor): no effect to apply, they are already real.
    #[inline]
    pub fn absorb_segment_bases(&mut self, fs_base: u64, gs_base: u64) {
        self.seg[SegReg::Fs as usize].cache.base = fs_base;
        self.seg[SegReg::Gs as usize].cache.base = gs_base;
    }

    /// Sets FS or GS base, recording that the real base must follow.
    pub fn set_segment_base(&mut self, s: SegReg, base: u64) {
        if self.seg[s as usize].cache.base != base {
            self.seg[s as usize].cache.base = base;
            self.effects.segment_bases = true;
            self.effects_pending = true;
        }
    }

    /// Virtual RFLAGS.IF.
    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & rflags::IF != 0
    }

    /// Sets or clears the virtual RFLAGS.IF.
    pub fn set_interrupts_enabled(&mut self, enabled: bool) {
        if enabled {
            self.rflags |= rflags::IF;
        } else {
            self.rflags &= !rflags::IF;
        }
    }

    /// What the real CPU must hold for the guest now ([`RealControls`]): CR0.TS/EM/MP and
    /// CR4.OSFXSR/OSXMMEXCPT/TSD as the guest set them; CR0.AM only in virtual user mode (the
    /// guest kernel really runs at CPL 3 too, where alignment checks would apply to it and never
    /// do natively, SDM Vol. 3 §6.15 #AC); SYSCALL as EFER.SCE says; SYSENTER once the guest's
    /// SYSENTER_CS is not null.
    #[inline]
    pub fn real_controls(&self) -> RealControls {
        let cr0_mask = if self.cpl == 3 {
            REAL_CR0_FOLLOWS
        } else {
            REAL_CR0_FOLLOWS & !cr0::AM
        };
        RealControls {
            cr0: self.cr0 & cr0_mask,
            cr4: self.cr4 & REAL_CR4_FOLLOWS,
            syscall: self.efer & efer::SCE != 0,
            sysenter: !super::descriptor::is_null_selector(self.msr.sysenter_cs as u16),
        }
    }

    /// The host returns to the guest at RIP: remembered for [`VCpu::trapped_at`].
    #[inline]
    pub fn resumed(&mut self) {
        self.resumed_at = self.rip;
    }

    /// A trap came from the guest at `rip`. Anywhere but where it was resumed, an instruction
    /// retired natively since, which ends an RF = 1 that an IRET restored: RF holds off
    /// instruction breakpoints for one instruction only (SDM Vol. 3 §17.3.1.1), and must not be
    /// pushed by a later event.
    #[inline]
    pub fn trapped_at(&mut self, rip: u64) {
        if rip != self.resumed_at {
            self.rflags &= !rflags::RF;
        }
    }

    /// Virtual IOPL.
    pub fn iopl(&self) -> u8 {
        rflags::iopl(self.rflags)
    }

    /// Whether CLI/STI are allowed now: CPL <= IOPL (CR4.PVI is not offered), SDM Vol. 2 "CLI".
    pub fn may_toggle_interrupts(&self) -> bool {
        self.cpl <= self.iopl()
    }

    /// Sets the virtual CPL, recording a view switch when it changes.
    pub fn set_cpl(&mut self, cpl: u8) {
        if self.cpl != cpl {
            self.cpl = cpl;
            self.effects.privilege = true;
            self.effects_pending = true;
        }
    }

    /// The privilege data accesses made by the current instruction have.
    pub fn privilege(&self) -> shadow_mmu::Privilege {
        if self.cpl == 3 {
            shadow_mmu::Privilege::User
        } else {
            shadow_mmu::Privilege::Supervisor
        }
    }

    /// The paging controls the shadow MMU must honour, from CR0, CR4 and EFER.
    pub fn paging_mode(&self, max_phys_bits: u8) -> shadow_mmu::PagingMode {
        shadow_mmu::PagingMode {
            cr0_wp: self.cr0 & cr0::WP != 0,
            efer_nxe: self.efer & efer::NXE != 0,
            cr4_pge: self.cr4 & cr4::PGE != 0,
            max_phys_bits,
        }
    }

    /// Records effects for the caller.
    pub fn note(&mut self, f: impl FnOnce(&mut Effects)) {
        f(&mut self.effects);
        self.effects_pending = !self.effects.is_empty();
    }

    /// Whether effects are waiting for the caller (without taking them).
    #[inline]
    pub fn has_effects(&self) -> bool {
        self.effects_pending
    }

    /// What the caller must apply since the last call; clears the record.
    pub fn take_effects(&mut self) -> Effects {
        self.effects_pending = false;
        core::mem::take(&mut self.effects)
    }

    /// Merges the guest's real RFLAGS (as the trap frame holds it) into the virtual one.
    pub fn merge_hardware_rflags(&mut self, real: u64) {
        self.rflags = (self.rflags & !rflags::HARDWARE_OWNED)
            | (real & rflags::HARDWARE_OWNED)
            | rflags::FIXED;
    }

    /// The RFLAGS value the guest must really run with: its arithmetic flags, IF = 1 (the host
    /// keeps its interrupts), IOPL = 0 (so CLI/STI/IN/OUT/HLT trap).
    #[cfg(not(feature = "lab2"))]
    pub fn real_rflags(&self) -> u64 {
        (self.rflags & rflags::HARDWARE_OWNED) | rflags::IF | rflags::FIXED
    }

    /// Lab 2 (docs/labs/lab2-virtual-if.md): the student's real RFLAGS
    /// (labs/lab2_virtual_if.rs).
    #[cfg(feature = "lab2")]
    pub fn real_rflags(&self) -> u64 {
        crate::labs::lab2::real_rflags(self)
    }
}
