//! The VMCB, AMD's virtual machine control block: one 4 KiB page the host hands to VMRUN, with a
//! control area (what to intercept, what to inject, why the guest exited) at offset 0 and the
//! guest's state save area at 0x400 (AMD APM vol. 2, appendix B, tables B-1 and B-2).
//!
//! It is VT-x's VMCS in AMD's words (docs/hardware-assist.md): the "guest-state area" is the save
//! area; the "host-state area" has no field here — VMRUN saves the host's state to the page named
//! by the `VM_HSAVE_PA` MSR and `#VMEXIT` restores it. Unlike the VMCS it is plain memory, read
//! and written with ordinary loads and stores, which is why this module can be host-tested: it
//! is a typed view over the page's bytes.

use super::intercept::Intercept;

/// Size of the VMCB page.
pub const VMCB_SIZE: usize = 4096;

/// Byte offsets of the fields this VMM uses (APM vol. 2, table B-1: control area).
mod control {
    pub const INTERCEPT_CR_READ: usize = 0x000;
    pub const INTERCEPT_CR_WRITE: usize = 0x002;
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    /// Two 32-bit vectors read as one 64-bit word: bit n = `Intercept` n.
    pub const INTERCEPT_MISC: usize = 0x00C;
    pub const IOPM_BASE_PA: usize = 0x040;
    pub const MSRPM_BASE_PA: usize = 0x048;
    pub const TSC_OFFSET: usize = 0x050;
    pub const GUEST_ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05C;
    /// V_TPR (bits 3:0), V_IRQ (8), V_INTR_PRIO (19:16), V_IGN_TPR (20), V_INTR_MASKING (24).
    pub const INT_CTL: usize = 0x060;
    /// Bit 0: the guest is in an interrupt shadow (after STI or MOV SS).
    pub const INTERRUPT_SHADOW: usize = 0x068;
    pub const EXIT_CODE: usize = 0x070;
    pub const EXIT_INFO_1: usize = 0x078;
    pub const EXIT_INFO_2: usize = 0x080;
    pub const EXIT_INT_INFO: usize = 0x088;
    /// Bit 0: nested paging on.
    pub const NESTED_CONTROL: usize = 0x090;
    pub const EVENT_INJECTION: usize = 0x0A8;
    pub const NESTED_CR3: usize = 0x0B0;
}

/// Byte offsets in the state save area (APM vol. 2, table B-2), from the start of the page.
mod save {
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const CPL: usize = 0x4CB;
    pub const EFER: usize = 0x4D0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5D8;
    pub const RAX: usize = 0x5F8;
    pub const CR2: usize = 0x640;
    pub const G_PAT: usize = 0x668;
}

/// A segment register as the save area holds it: the descriptor's attributes packed into 12
/// bits (type, S, DPL, P in bits 7:0 = descriptor bits 47:40; AVL, L, D/B, G in bits 11:8 =
/// descriptor bits 55:52), its limit expanded to bytes, and its base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmcbSegment {
    /// The selector.
    pub selector: u16,
    /// The packed attributes.
    pub attributes: u16,
    /// The limit, in bytes (the G bit already applied).
    pub limit: u32,
    /// The base address.
    pub base: u64,
}

impl VmcbSegment {
    /// The segment a selector loads from a legacy 8-byte descriptor (base and limit as the CPU
    /// computes them; the base's upper half is 0, as for any code or data segment).
    pub fn from_descriptor(selector: u16, descriptor: u64) -> Self {
        let limit_raw = (descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF_0000);
        let granular = descriptor & (1 << 55) != 0;
        let limit = if granular {
            (limit_raw << 12) | 0xFFF
        } else {
            limit_raw
        };
        let base = ((descriptor >> 16) & 0xFF_FFFF) | ((descriptor >> 32) & 0xFF00_0000);
        let attributes = (((descriptor >> 40) & 0xFF) | ((descriptor >> 44) & 0xF00)) as u16;
        Self {
            selector,
            attributes,
            limit: limit as u32,
            base,
        }
    }

    /// The descriptor-privilege level in the attributes.
    pub fn dpl(&self) -> u8 {
        ((self.attributes >> 5) & 3) as u8
    }
}

/// A typed view of one VMCB page.
#[derive(Debug)]
pub struct Vmcb<'a> {
    bytes: &'a mut [u8; VMCB_SIZE],
}

impl<'a> Vmcb<'a> {
    /// The VMCB in `bytes` (a page the caller owns; the kernel passes the direct-map view of
    /// the frame VMRUN is given).
    pub fn new(bytes: &'a mut [u8; VMCB_SIZE]) -> Self {
        Self { bytes }
    }

    fn read<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(field) = self.bytes.get(offset..offset + N) {
            out.copy_from_slice(field);
        }
        out
    }

    fn write(&mut self, offset: usize, value: &[u8]) {
        if let Some(field) = self.bytes.get_mut(offset..offset + value.len()) {
            field.copy_from_slice(value);
        }
    }

    fn u64_at(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.read(offset))
    }

    fn set_u64(&mut self, offset: usize, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }

    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.read(offset))
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Zeroes the whole page.
    pub fn clear(&mut self) {
        self.bytes.fill(0);
    }

    // --- Control area ---

    /// Turns on the intercept of one instruction or event.
    pub fn set_intercept(&mut self, intercept: Intercept) {
        let word = self.u64_at(control::INTERCEPT_MISC) | 1 << intercept as u32;
        self.set_u64(control::INTERCEPT_MISC, word);
    }

    /// Turns off the intercept of one instruction or event.
    pub fn clear_intercept(&mut self, intercept: Intercept) {
        let word = self.u64_at(control::INTERCEPT_MISC) & !(1 << intercept as u32);
        self.set_u64(control::INTERCEPT_MISC, word);
    }

    /// Whether `intercept` is on.
    pub fn intercepts(&self, intercept: Intercept) -> bool {
        self.u64_at(control::INTERCEPT_MISC) & 1 << intercept as u32 != 0
    }

    /// Intercepts exceptions by vector (bit n = vector n).
    pub fn set_exception_intercepts(&mut self, vectors: u32) {
        self.set_u32(control::INTERCEPT_EXCEPTIONS, vectors);
    }

    /// The exceptions intercepted (bit n = vector n).
    pub fn exception_intercepts(&self) -> u32 {
        self.u32_at(control::INTERCEPT_EXCEPTIONS)
    }

    /// Intercepts reads and writes of control registers (bit n = CRn).
    pub fn set_cr_intercepts(&mut self, reads: u16, writes: u16) {
        self.write(control::INTERCEPT_CR_READ, &reads.to_le_bytes());
        self.write(control::INTERCEPT_CR_WRITE, &writes.to_le_bytes());
    }

    /// Physical addresses of the I/O and MSR permission maps.
    pub fn set_permission_maps(&mut self, iopm: u64, msrpm: u64) {
        self.set_u64(control::IOPM_BASE_PA, iopm);
        self.set_u64(control::MSRPM_BASE_PA, msrpm);
    }

    /// Added to the TSC the guest reads.
    pub fn set_tsc_offset(&mut self, offset: u64) {
        self.set_u64(control::TSC_OFFSET, offset);
    }

    /// The guest's address-space identifier: its TLB entries are tagged with it, so VMRUN and
    /// `#VMEXIT` need not flush the TLB (VT-x's VPID). Never 0, which is the host's.
    pub fn set_guest_asid(&mut self, asid: u32) {
        self.set_u32(control::GUEST_ASID, asid);
    }

    /// The guest's ASID.
    pub fn guest_asid(&self) -> u32 {
        self.u32_at(control::GUEST_ASID)
    }

    /// TLB_CONTROL: 0 = flush nothing at VMRUN, 1 = flush the whole TLB.
    pub fn set_tlb_control(&mut self, control: u8) {
        self.write(control::TLB_CONTROL, &[control]);
    }

    /// The virtual-interrupt control word (`INT_CTL`).
    pub fn int_ctl(&self) -> u32 {
        self.u32_at(control::INT_CTL)
    }

    /// Sets the virtual-interrupt control word (`INT_CTL`).
    pub fn set_int_ctl(&mut self, value: u32) {
        self.set_u32(control::INT_CTL, value);
    }

    /// Whether the guest is in an interrupt shadow (the instruction after STI or MOV SS).
    pub fn interrupt_shadow(&self) -> bool {
        self.u64_at(control::INTERRUPT_SHADOW) & 1 != 0
    }

    /// Sets or clears the guest's interrupt shadow.
    pub fn set_interrupt_shadow(&mut self, on: bool) {
        self.set_u64(control::INTERRUPT_SHADOW, u64::from(on));
    }

    /// Why the guest exited (`EXITCODE`).
    pub fn exit_code(&self) -> u64 {
        self.u64_at(control::EXIT_CODE)
    }

    /// `EXITINFO1`: the exit's first detail (the I/O port and kind, the MSR direction, the
    /// nested page fault's error code...).
    pub fn exit_info_1(&self) -> u64 {
        self.u64_at(control::EXIT_INFO_1)
    }

    /// `EXITINFO2`: the exit's second detail (the RIP after an IN/OUT, the faulting GPA...).
    pub fn exit_info_2(&self) -> u64 {
        self.u64_at(control::EXIT_INFO_2)
    }

    /// `EXITINTINFO`: an event the guest was being delivered when it exited (valid in bit 31),
    /// which the host must re-inject.
    pub fn exit_int_info(&self) -> u64 {
        self.u64_at(control::EXIT_INT_INFO)
    }

    /// Sets the exit code (the tests' stand-in for the CPU's `#VMEXIT`).
    pub fn set_exit(&mut self, code: u64, info_1: u64, info_2: u64) {
        self.set_u64(control::EXIT_CODE, code);
        self.set_u64(control::EXIT_INFO_1, info_1);
        self.set_u64(control::EXIT_INFO_2, info_2);
    }

    /// Nested paging on, with `ncr3` the nested page tables' root (VT-x's EPT pointer).
    pub fn enable_nested_paging(&mut self, ncr3: u64) {
        self.set_u64(control::NESTED_CONTROL, 1);
        self.set_u64(control::NESTED_CR3, ncr3);
    }

    /// The nested page tables' root.
    pub fn nested_cr3(&self) -> u64 {
        self.u64_at(control::NESTED_CR3)
    }

    /// `EVENTINJ`: the event VMRUN delivers to the guest before its first instruction.
    pub fn event_injection(&self) -> u64 {
        self.u64_at(control::EVENT_INJECTION)
    }

    /// Sets `EVENTINJ` (see `super::event::EventInjection`).
    pub fn set_event_injection(&mut self, value: u64) {
        self.set_u64(control::EVENT_INJECTION, value);
    }

    // --- State save area ---

    fn segment_at(&self, offset: usize) -> VmcbSegment {
        VmcbSegment {
            selector: u16::from_le_bytes(self.read(offset)),
            attributes: u16::from_le_bytes(self.read(offset + 2)),
            limit: self.u32_at(offset + 4),
            base: self.u64_at(offset + 8),
        }
    }

    fn set_segment_at(&mut self, offset: usize, segment: VmcbSegment) {
        self.write(offset, &segment.selector.to_le_bytes());
        self.write(offset + 2, &segment.attributes.to_le_bytes());
        self.set_u32(offset + 4, segment.limit);
        self.set_u64(offset + 8, segment.base);
    }

    /// A segment register of the guest.
    pub fn segment(&self, register: SegmentRegister) -> VmcbSegment {
        self.segment_at(register.offset())
    }

    /// Sets a segment register of the guest.
    pub fn set_segment(&mut self, register: SegmentRegister, segment: VmcbSegment) {
        self.set_segment_at(register.offset(), segment);
    }

    /// The guest's CPL (the save area keeps it apart from CS, as SS.DPL).
    pub fn cpl(&self) -> u8 {
        self.read::<1>(save::CPL)[0]
    }

    /// Sets the guest's CPL.
    pub fn set_cpl(&mut self, cpl: u8) {
        self.write(save::CPL, &[cpl]);
    }

    /// A 64-bit register of the save area.
    pub fn get(&self, register: SavedRegister) -> u64 {
        self.u64_at(register.offset())
    }

    /// Sets a 64-bit register of the save area.
    pub fn set(&mut self, register: SavedRegister, value: u64) {
        self.set_u64(register.offset(), value);
    }
}

/// The segment registers and descriptor-table registers of the save area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // the architectural names
pub enum SegmentRegister {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Gdtr,
    Ldtr,
    Idtr,
    Tr,
}

impl SegmentRegister {
    fn offset(self) -> usize {
        match self {
            Self::Es => save::ES,
            Self::Cs => save::CS,
            Self::Ss => save::SS,
            Self::Ds => save::DS,
            Self::Fs => save::FS,
            Self::Gs => save::GS,
            Self::Gdtr => save::GDTR,
            Self::Ldtr => save::LDTR,
            Self::Idtr => save::IDTR,
            Self::Tr => save::TR,
        }
    }
}

/// The 64-bit registers of the save area this VMM reads or writes. The other general registers
/// are not in the VMCB: the kernel's VMRUN stub saves and restores them around VMRUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // the architectural names
pub enum SavedRegister {
    Efer,
    Cr0,
    Cr2,
    Cr3,
    Cr4,
    Dr6,
    Dr7,
    Rflags,
    Rip,
    Rsp,
    Rax,
    /// The guest's PAT, used for its accesses when nested paging is on.
    GPat,
}

impl SavedRegister {
    fn offset(self) -> usize {
        match self {
            Self::Efer => save::EFER,
            Self::Cr0 => save::CR0,
            Self::Cr2 => save::CR2,
            Self::Cr3 => save::CR3,
            Self::Cr4 => save::CR4,
            Self::Dr6 => save::DR6,
            Self::Dr7 => save::DR7,
            Self::Rflags => save::RFLAGS,
            Self::Rip => save::RIP,
            Self::Rsp => save::RSP,
            Self::Rax => save::RAX,
            Self::GPat => save::G_PAT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;

    fn page() -> Box<[u8; VMCB_SIZE]> {
        Box::new([0; VMCB_SIZE])
    }

    /// The fields land at the offsets of APM vol. 2 tables B-1 and B-2.
    #[test]
    fn fields_are_at_the_manuals_offsets() {
        let mut bytes = page();
        let mut vmcb = Vmcb::new(&mut bytes);
        vmcb.set(SavedRegister::Rip, 0x1122_3344_5566_7788);
        vmcb.set(SavedRegister::Efer, 0x1D00);
        vmcb.set_guest_asid(7);
        vmcb.enable_nested_paging(0xABC000);
        vmcb.set_intercept(Intercept::Vmrun);
        vmcb.set_intercept(Intercept::Intr);
        vmcb.set_cpl(3);
        vmcb.set_segment(
            SegmentRegister::Cs,
            VmcbSegment {
                selector: 0x08,
                attributes: 0xA9B,
                limit: 0xFFFF_FFFF,
                base: 0,
            },
        );
        assert_eq!(bytes[0x578], 0x88);
        assert_eq!(bytes[0x57F], 0x11);
        assert_eq!(&bytes[0x4D0..0x4D2], &[0x00, 0x1D]);
        assert_eq!(bytes[0x58], 7);
        assert_eq!(bytes[0x90], 1);
        assert_eq!(&bytes[0xB0..0xB3], &[0x00, 0xC0, 0xAB]);
        // VMRUN is bit 32 of the 64-bit intercept word at 0x0C, i.e. bit 0 of the word at 0x10.
        assert_eq!(bytes[0x10], 1);
        assert_eq!(bytes[0x0C], 1);
        assert_eq!(bytes[0x4CB], 3);
        assert_eq!(&bytes[0x410..0x414], &[0x08, 0x00, 0x9B, 0x0A]);
    }

    /// The attribute packing of the save area: descriptor bits 47:40 and 55:52.
    #[test]
    fn segments_from_descriptors() {
        let code = VmcbSegment::from_descriptor(0x08, 0x00AF_9A00_0000_FFFF);
        assert_eq!(code.attributes, 0xA9A);
        assert_eq!(code.limit, 0xFFFF_FFFF);
        assert_eq!(code.base, 0);
        assert_eq!(code.dpl(), 0);
        let data = VmcbSegment::from_descriptor(0x2B, 0x00CF_F200_0000_FFFF);
        assert_eq!(data.attributes, 0xCF2);
        assert_eq!(data.dpl(), 3);
        let small = VmcbSegment::from_descriptor(0x10, 0x1200_9234_5678_0FFF);
        assert_eq!(small.limit, 0xFFF);
        assert_eq!(small.base, 0x1234_5678);
    }
}
