//! Segment and gate descriptors (SDM Vol. 3 §3.4.5, §3.5, §6.14.1), read from the guest's own
//! virtual GDT/LDT/IDT through guest memory.
//!
//! Article challenge "特权级压缩": the guest's selectors are virtual, so every segment load it
//! makes traps and is checked here against *its* tables, never the VMM's real GDT.

/// A segment descriptor's fields (the hidden part of a segment register).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Base address (64-bit for system descriptors in long mode).
    pub base: u64,
    /// Limit in bytes, already scaled by the G bit: the offset of the last valid byte.
    pub limit: u32,
    /// The 4-bit type field.
    pub typ: u8,
    /// S: 1 for code/data, 0 for system descriptors.
    pub code_or_data: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// P.
    pub present: bool,
    /// L: 64-bit code segment.
    pub long: bool,
    /// D/B: default operand size 32 (or big stack).
    pub default_big: bool,
}

/// The 64-bit TSS's fields the CPU reads (SDM Vol. 3 §8.7, Figure 8-11): byte offsets.
pub mod tss {
    /// RSP0: the stack for a privilege change to CPL 0 (RSP1, RSP2 follow, 8 bytes apart).
    pub const RSP0: u64 = 4;
    /// IST1: the first interrupt stack table entry (IST2..7 follow, 8 bytes apart).
    pub const IST1: u64 = 36;
    /// The 16-bit I/O map base address.
    pub const IO_MAP_BASE: u64 = 0x66;
    /// The smallest limit of a 64-bit TSS: through the I/O map base field.
    pub const MIN_LIMIT: u64 = 0x67;
}

/// Bit position of the 4-bit type field in a descriptor's low quadword.
pub const TYPE_SHIFT: u32 = 40;

/// System descriptor types in IA-32e mode (SDM Vol. 3 Table 3-2).
pub mod system_type {
    /// LDT.
    pub const LDT: u8 = 0x2;
    /// 64-bit TSS, available.
    pub const TSS_AVAILABLE: u8 = 0x9;
    /// 64-bit TSS, busy.
    pub const TSS_BUSY: u8 = 0xB;
    /// 64-bit call gate.
    pub const CALL_GATE: u8 = 0xC;
    /// 64-bit interrupt gate.
    pub const INTERRUPT_GATE: u8 = 0xE;
    /// 64-bit trap gate.
    pub const TRAP_GATE: u8 = 0xF;
}

impl Descriptor {
    /// Decodes the low (or only) 8 bytes of a descriptor.
    pub fn from_raw(raw: u64) -> Self {
        let limit_raw = (raw & 0xFFFF) as u32 | (((raw >> 48) & 0xF) as u32) << 16;
        let granularity = raw & (1 << 55) != 0;
        Descriptor {
            base: ((raw >> 16) & 0xFF_FFFF) | (((raw >> 56) & 0xFF) << 24),
            limit: if granularity {
                (limit_raw << 12) | 0xFFF
            } else {
                limit_raw
            },
            typ: ((raw >> 40) & 0xF) as u8,
            code_or_data: raw & (1 << 44) != 0,
            dpl: ((raw >> 45) & 3) as u8,
            present: raw & (1 << 47) != 0,
            long: raw & (1 << 53) != 0,
            default_big: raw & (1 << 54) != 0,
        }
    }

    /// Encodes the descriptor's low 8 bytes: the inverse of [`Descriptor::from_raw`] (the G
    /// bit is set when the limit needs it; a limit that is not a whole number of 4 KiB pages
    /// above 1 MiB is rounded up, as G = 1 can only express).
    pub fn to_raw(&self) -> u64 {
        let (limit, granularity) = if self.limit > 0xF_FFFF {
            (u64::from(self.limit >> 12), 1u64)
        } else {
            (u64::from(self.limit), 0)
        };
        (limit & 0xFFFF)
            | ((self.base & 0xFF_FFFF) << 16)
            | (u64::from(self.typ & 0xF) << 40)
            | (u64::from(self.code_or_data) << 44)
            | (u64::from(self.dpl & 3) << 45)
            | (u64::from(self.present) << 47)
            | (((limit >> 16) & 0xF) << 48)
            | (u64::from(self.long) << 53)
            | (u64::from(self.default_big) << 54)
            | (granularity << 55)
            | (((self.base >> 24) & 0xFF) << 56)
    }

    /// Decodes a 16-byte system descriptor of long mode (LDT, TSS): bits 63:32 of the base
    /// come from the second quadword.
    pub fn from_raw_system(low: u64, high: u64) -> Self {
        let mut d = Descriptor::from_raw(low);
        d.base |= (high & 0xFFFF_FFFF) << 32;
        d
    }

    /// A code segment (S = 1, type bit 3 set).
    pub fn is_code(&self) -> bool {
        self.code_or_data && self.typ & 0x8 != 0
    }

    /// A data segment (S = 1, type bit 3 clear).
    pub fn is_data(&self) -> bool {
        self.code_or_data && self.typ & 0x8 == 0
    }

    /// A writable data segment.
    pub fn is_writable_data(&self) -> bool {
        self.is_data() && self.typ & 0x2 != 0
    }

    /// A readable code segment.
    pub fn is_readable_code(&self) -> bool {
        self.is_code() && self.typ & 0x2 != 0
    }

    /// A conforming code segment.
    pub fn is_conforming_code(&self) -> bool {
        self.is_code() && self.typ & 0x4 != 0
    }

    /// A 64-bit code segment (L = 1, D = 0).
    pub fn is_long_code(&self) -> bool {
        self.is_code() && self.long && !self.default_big
    }
}

/// Whether `selector` is a null selector: index 0 in the GDT, whatever its RPL (SDM Vol. 3
/// §3.4.2).
#[inline]
pub fn is_null_selector(selector: u16) -> bool {
    selector & !3 == 0
}

/// An IDT gate of long mode (16 bytes, SDM Vol. 3 Figure 6-8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    /// Handler offset.
    pub offset: u64,
    /// Code-segment selector of the handler.
    pub selector: u16,
    /// Interrupt-stack-table index (0: no IST).
    pub ist: u8,
    /// Gate type (0xE interrupt, 0xF trap; anything else is invalid in the IDT of long mode).
    pub typ: u8,
    /// Whether the S bit is (wrongly) set: a code/data descriptor in the IDT.
    pub code_or_data: bool,
    /// Gate DPL: the highest CPL allowed to reach it with INT n.
    pub dpl: u8,
    /// P.
    pub present: bool,
}

impl Gate {
    /// Decodes the two quadwords of a gate.
    pub fn from_raw(low: u64, high: u64) -> Self {
        Gate {
            offset: (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | ((high & 0xFFFF_FFFF) << 32),
            selector: ((low >> 16) & 0xFFFF) as u16,
            ist: ((low >> 32) & 0x7) as u8,
            typ: ((low >> 40) & 0xF) as u8,
            code_or_data: low & (1 << 44) != 0,
            dpl: ((low >> 45) & 3) as u8,
            present: low & (1 << 47) != 0,
        }
    }

    /// An interrupt gate (delivery clears IF) rather than a trap gate.
    pub fn is_interrupt_gate(&self) -> bool {
        self.typ == system_type::INTERRUPT_GATE
    }

    /// A valid long-mode IDT gate type.
    pub fn is_valid_type(&self) -> bool {
        !self.code_or_data
            && (self.typ == system_type::INTERRUPT_GATE || self.typ == system_type::TRAP_GATE)
    }
}

/// Encodes a gate: the inverse of [`Gate::from_raw`], for tests and for guests built in tests.
pub fn encode_gate(
    offset: u64,
    selector: u16,
    ist: u8,
    typ: u8,
    dpl: u8,
    present: bool,
) -> [u64; 2] {
    let low = (offset & 0xFFFF)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | (u64::from(typ & 0xF) << 40)
        | (u64::from(dpl & 3) << 45)
        | (u64::from(present) << 47)
        | ((offset & 0xFFFF_0000) << 32);
    [low, offset >> 32]
}

/// Encodes a flat code or data descriptor (base 0, limit 4 GiB) for tests.
pub fn encode_segment(
    code: bool,
    long: bool,
    dpl: u8,
    present: bool,
    writable_or_readable: bool,
) -> u64 {
    let typ: u64 = if code { 0x8 } else { 0 } | if writable_or_readable { 0x2 } else { 0 };
    0xFFFF
        | (0xF << 48)
        | (typ << 40)
        | (1 << 44)
        | (u64::from(dpl & 3) << 45)
        | (u64::from(present) << 47)
        | (u64::from(long) << 53)
        | (u64::from(!long) << 54)
        | (1 << 55)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_gdt_decodes_as_64_bit_code_and_flat_data() {
        let code = Descriptor::from_raw(boot::BOOT_GDT[1]);
        assert!(code.is_long_code() && code.present && code.dpl == 0 && code.is_readable_code());
        let data = Descriptor::from_raw(boot::BOOT_GDT[2]);
        assert!(data.is_writable_data() && data.present && data.limit == 0xFFFF_FFFF);
    }

    #[test]
    fn segment_descriptors_round_trip_through_to_raw() {
        for raw in [
            boot::BOOT_GDT[1],
            boot::BOOT_GDT[2],
            encode_segment(true, true, 3, true, true),
            encode_segment(false, false, 3, false, true),
            0x0040_9300_1234_00FF, // byte granular, base 0x1234 << 16
        ] {
            assert_eq!(Descriptor::from_raw(raw).to_raw(), raw, "{raw:#x}");
        }
    }

    #[test]
    fn gates_round_trip_through_their_encoding() {
        let [lo, hi] = encode_gate(0xFFFF_8000_1234_5678, 0x08, 2, 0xE, 3, true);
        let g = Gate::from_raw(lo, hi);
        assert_eq!(g.offset, 0xFFFF_8000_1234_5678);
        assert_eq!(
            (g.selector, g.ist, g.typ, g.dpl, g.present),
            (0x08, 2, 0xE, 3, true)
        );
        assert!(g.is_interrupt_gate() && g.is_valid_type());
    }

    #[test]
    fn system_descriptors_take_the_high_base_from_the_second_quadword() {
        // A 64-bit available TSS at 0xFFFF_8000_0001_2000, limit 0x67.
        let low = 0x67 | (0x2000 << 16) | (0x01u64 << 32) | (0x89u64 << 40);
        let d = Descriptor::from_raw_system(low, 0xFFFF_8000);
        assert_eq!(d.base, 0xFFFF_8000_0001_2000);
        assert_eq!(d.typ, system_type::TSS_AVAILABLE);
        assert!(!d.code_or_data && d.present && d.limit == 0x67);
    }
}
