//! The shadow descriptor table: the real GDT the guest runs under, built by the VMM from the
//! guest's own GDT (SDM Vol. 3 §3.4–3.5, §5.5; article challenges "资源控制" and "特权级压缩").
//!
//! The guest kernel really runs at CPL 3, so any descriptor the CPU may load for it must have
//! DPL 3 — and then the CPU would let the guest load it *without trapping*. A guest whose user
//! code selector happened to name a real DPL-3 descriptor could `iretq` into its "user mode"
//! without the VMM seeing the privilege change (the VMM would keep the kernel's shadow page
//! tables: no isolation). So the VMM decides, entry by entry, what the hardware may load:
//!
//! - **Each guest descriptor sits at its own index**, privilege compressed to DPL 3 and marked
//!   **not present**. Everything else of it (type, base, limit, L/D) is the guest's, so LAR,
//!   LSL, VERR and VERW — which run natively and ignore P — see the guest's own table with
//!   only the DPL (and P) changed.
//! - **Only the two descriptors the guest is running on are present**: the ones in its virtual
//!   CS and SS, encoded from the vCPU's descriptor caches (the hidden part the CPU would keep,
//!   even if the guest has since rewritten its table). The real CS and SS are those indices
//!   with RPL 3, so `mov ax, cs` shows the guest's own selector with RPL 3.
//! - So **every other segment load traps**: IRETQ/RETF/far JMP to another CS (#NP), MOV SS /
//!   LSS to another SS (#SS), MOV/POP/LFS/LGS of DS/ES/FS/GS (#NP), whatever selector layout
//!   the guest chose, and is emulated against the guest's table *in memory* (`segments.rs`).
//!   That is stricter than the one-table-per-mode scheme (a mode switch is exactly a change
//!   of CS and SS, so it always traps), and it makes coherence free: a guest that rewrites a
//!   descriptor and loads it again sees what it wrote, with no write tracking.
//! - A null SS (64-bit mode loads one on every interrupt to CPL 0 from user mode) cannot be
//!   real at CPL 3: the real SS is then the VMM's **null-SS stand-in**, a DPL-3 data
//!   descriptor in the reserved range, present only while it is needed. The same stand-in
//!   serves an SS whose selector names the same entry as CS (possible for a moment after a
//!   guest loads a new GDT and reloads CS first: the CPU keeps the old SS descriptor).
//!
//! **The reserved range** ([`FIRST_RESERVED_INDEX`] up to the end of the 64 KiB table) holds
//! the stand-in and the VMM's own descriptors (host code and data, TSS): address-space
//! compression applied to the descriptor table, like the VMM's PML4 slot. Guest descriptors
//! there are not shadowed (the real entries are the VMM's, all DPL 0 except the stand-in); a
//! guest may load them into DS/ES/FS/GS (emulated; the real register then holds null), but
//! running on one — CS or SS — stops the guest with a message naming the selector.
//!
//! The LDT is not shadowed: the real LDTR stays null, so every LDT selector load traps and is
//! emulated against the guest's LDT; running with CS or SS from the LDT stops the guest.

use super::descriptor::{is_null_selector, Descriptor};
use super::event::CpuStop;
use super::memory::{read_slice, GuestMemory};
use super::state::{SegReg, Segment, TableRegister, VCpu};
use shadow_mmu::{AccessKind, Privilege};

/// Entries of the real GDT: the whole 64 KiB a GDTR limit can cover.
pub const REAL_GDT_ENTRIES: usize = 8192;
/// The first index of the VMM's reserved range at the top of the real GDT; guest descriptors
/// at lower indices are shadowed at their own index.
pub const FIRST_RESERVED_INDEX: usize = 8187;
/// The real SS while the guest's virtual SS is null (RPL 3).
pub const NULL_SS_STAND_IN: u16 = (FIRST_RESERVED_INDEX as u16) << 3 | 3;
/// The host's code selector (DPL 0).
pub const HOST_CODE: u16 = ((FIRST_RESERVED_INDEX + 1) as u16) << 3;
/// The host's data selector (DPL 0); SYSCALL and SYSENTER load it as HOST_CODE + 8.
pub const HOST_DATA: u16 = ((FIRST_RESERVED_INDEX + 2) as u16) << 3;
/// The host's 64-bit TSS (two entries, the last of the table).
pub const HOST_TSS: u16 = ((FIRST_RESERVED_INDEX + 3) as u16) << 3;
const _: () = assert!(HOST_DATA == HOST_CODE + 8);
const _: () = assert!(HOST_TSS as usize / 8 + 2 == REAL_GDT_ENTRIES);

/// The part of the real GDT the shadow writes: every guest index and the stand-in.
pub const SHADOWED_ENTRIES: usize = FIRST_RESERVED_INDEX + 1;

/// The stand-in's descriptor: flat writable data, DPL 3, present.
const NULL_SS_STAND_IN_DESCRIPTOR: u64 = 0x00CF_F200_0000_FFFF;

const DESCRIPTOR_P: u64 = 1 << 47;
const DESCRIPTOR_DPL: u64 = 3 << 45;

/// A guest descriptor as it appears in the real GDT when the guest does not run on it: DPL 3
/// and not present, everything else the guest's own. The null descriptor stays null.
pub fn compressed_absent(raw: u64) -> u64 {
    if raw == 0 {
        0
    } else {
        (raw | DESCRIPTOR_DPL) & !DESCRIPTOR_P
    }
}

/// The real selectors the guest runs on, for the frame the host returns with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealSelectors {
    /// Real CS: the guest's CS index with RPL 3.
    pub cs: u16,
    /// Real SS: the guest's SS index with RPL 3, or [`NULL_SS_STAND_IN`].
    pub ss: u16,
}

/// What the real GDT holds for the guest, so each exit rewrites only what changed.
#[derive(Clone, Debug, Default)]
pub struct ShadowGdt {
    /// The guest GDTR the table was last built from (`None`: never built).
    built_for: Option<TableRegister>,
    /// Guest entries written at the last build (they are cleared on the next).
    built_entries: usize,
    /// For CS and SS: the real index made present, the descriptor put there, and the absent
    /// form it replaced.
    pinned: [Option<(usize, u64, u64)>; 2],
    /// The stand-in is present.
    stand_in: bool,
    /// The CS and SS selectors the table was last synced for, and the real selectors it
    /// returned: most exits change neither, and then there is nothing to do. (The selectors
    /// are the key, not the whole descriptor caches: for the same selectors in the same table a
    /// reloaded cache can only differ in what the real CPU ignores in 64-bit mode — base,
    /// limit, the accessed bit — or be unusable, which the far transfer that loaded it
    /// already refused.)
    last: Option<([u16; 2], RealSelectors)>,
    /// Full rebuilds so far (LGDT).
    pub rebuilds: u64,
}

impl ShadowGdt {
    /// An empty shadow: the first [`ShadowGdt::sync`] builds the whole table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The guest's table changed (`Effects::descriptor_table`): the next sync rebuilds it, so
    /// LAR/LSL/VERR/VERW see the change too.
    pub fn invalidate(&mut self) {
        self.built_for = None;
    }

    /// The real selectors, when nothing the table depends on changed since the last sync (the
    /// common case, checked first at every exit).
    #[inline]
    pub fn unchanged(&self, cpu: &VCpu) -> Option<RealSelectors> {
        let (key, selectors) = self.last?;
        let now = [
            cpu.seg[SegReg::Cs as usize].selector,
            cpu.seg[SegReg::Ss as usize].selector,
        ];
        (key == now && self.built_for == Some(cpu.gdtr)).then_some(selectors)
    }

    /// Brings the real GDT (`real`: its first [`SHADOWED_ENTRIES`] entries) in line with the
    /// vCPU: rebuilt from guest memory when the guest loaded a new GDTR, the virtual CS and SS
    /// made present. Returns the real selectors to run the guest on. A guest running on a
    /// descriptor the VMM cannot shadow (reserved range, LDT, not 64-bit code) is a stop.
    pub fn sync<M: GuestMemory + ?Sized>(
        &mut self,
        cpu: &VCpu,
        mem: &mut M,
        real: &mut [u64],
    ) -> Result<RealSelectors, CpuStop> {
        if let Some(selectors) = self.unchanged(cpu) {
            return Ok(selectors);
        }
        let real = &mut real[..SHADOWED_ENTRIES];
        let cs = *cpu.segment(SegReg::Cs);
        let ss = *cpu.segment(SegReg::Ss);
        if self.built_for != Some(cpu.gdtr) {
            self.unpin(real);
            self.rebuild(cpu.gdtr, mem, real);
        }
        if !cs.cache.is_long_code() {
            return Err(CpuStop::Unsupported(
                "CS is not a 64-bit code segment (compatibility mode)",
            ));
        }
        let cs_index = shadow_index(cs.selector)?;
        // A null SS, or one whose selector names the same entry as CS (a guest that loaded a
        // new GDT and reloaded CS before SS: the CPU still holds the old SS descriptor, and one
        // real entry cannot be both code and stack), runs on the stand-in.
        let ss_index = if is_null_selector(ss.selector) || ss.selector & !3 == cs.selector & !3 {
            None
        } else {
            Some(shadow_index(ss.selector)?)
        };
        let want = [
            Some((cs_index, pinned_descriptor(&cs))),
            ss_index.map(|i| (i, pinned_descriptor(&ss))),
        ];
        if want != self.pinned.map(|p| p.map(|(i, d, _)| (i, d))) {
            self.unpin(real);
            for (slot, w) in self.pinned.iter_mut().zip(want) {
                if let Some((i, d)) = w {
                    *slot = Some((i, d, real[i]));
                    real[i] = d;
                }
            }
        }
        let stand_in = ss_index.is_none();
        if stand_in != self.stand_in {
            self.stand_in = stand_in;
            real[FIRST_RESERVED_INDEX] = if stand_in {
                NULL_SS_STAND_IN_DESCRIPTOR
            } else {
                0
            };
        }
        let selectors = RealSelectors {
            cs: (cs_index as u16) << 3 | 3,
            ss: ss_index.map_or(NULL_SS_STAND_IN, |i| (i as u16) << 3 | 3),
        };
        self.last = Some(([cs.selector, ss.selector], selectors));
        Ok(selectors)
    }

    /// Puts back the absent form of the pinned entries.
    fn unpin(&mut self, real: &mut [u64]) {
        // In reverse, so that were CS and SS ever one index, the older absent form wins.
        for slot in self.pinned.iter_mut().rev() {
            if let Some((i, _, before)) = slot.take() {
                real[i] = before;
            }
        }
    }

    /// Rewrites every guest entry from the guest's table in memory (absent form) and clears
    /// what the previous table had beyond the new one's end.
    fn rebuild<M: GuestMemory + ?Sized>(
        &mut self,
        gdtr: TableRegister,
        mem: &mut M,
        real: &mut [u64],
    ) {
        self.rebuilds += 1;
        let entries = ((usize::from(gdtr.limit) + 1) / 8).min(FIRST_RESERVED_INDEX);
        let mut i = 0;
        while i < entries {
            // One page of the guest's table at a time; an unreadable page shadows as null
            // descriptors (LGDT itself reads nothing: a load from it will fault when emulated).
            let at = gdtr.base.wrapping_add(8 * i as u64);
            let in_page = ((0x1000 - (at & 0xFFF)) / 8).max(1) as usize;
            let n = in_page.min(entries - i);
            let mut bytes = [0u8; 0x1000];
            let chunk = &mut bytes[..8 * n];
            let ok = read_slice(
                mem,
                at,
                chunk,
                AccessKind::Read,
                Privilege::Supervisor,
                false,
            )
            .is_ok();
            for (k, raw) in chunk.chunks_exact(8).enumerate() {
                let raw = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
                real[i + k] = if ok && i + k != 0 {
                    compressed_absent(raw)
                } else {
                    0
                };
            }
            i += n;
        }
        for slot in real.iter_mut().take(self.built_entries).skip(entries) {
            *slot = 0;
        }
        self.built_entries = entries;
        self.built_for = Some(gdtr);
    }
}

/// The real index for a selector the guest runs on (CS or SS).
fn shadow_index(selector: u16) -> Result<usize, CpuStop> {
    if selector & 4 != 0 {
        return Err(CpuStop::Unsupported(
            "running on a code or stack segment from the LDT",
        ));
    }
    let index = usize::from(selector >> 3);
    if index >= FIRST_RESERVED_INDEX {
        return Err(CpuStop::Unsupported(
            "running on a GDT entry in the VMM's reserved range (index 8187 and up)",
        ));
    }
    Ok(index)
}

/// How the host mirrors into the real register a data segment (DS/ES/FS/GS) the emulator
/// loaded: the guest's DS/ES/FS/GS live in the real registers while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSegmentLoad {
    /// Load this selector as it is: a null selector, or null for one the real GDT cannot hold
    /// (from the LDT, or in the reserved range; `mov r, ds` then reads 0).
    Direct(u16),
    /// Load `selector` while real entry `index` holds `descriptor` (present, DPL 3), then put the
    /// entry back: the register keeps the loaded copy, and the guest's other loads still trap.
    Through {
        /// The guest's selector.
        selector: u16,
        /// Its real GDT index.
        index: usize,
        /// The descriptor to hold there for the instant of the load.
        descriptor: u64,
    },
}

/// How to load the real register for the guest's data segment `seg`.
pub fn data_segment_load(seg: &Segment) -> DataSegmentLoad {
    let index = usize::from(seg.selector >> 3);
    if is_null_selector(seg.selector) {
        DataSegmentLoad::Direct(seg.selector)
    } else if seg.selector & 4 != 0 || index >= FIRST_RESERVED_INDEX {
        DataSegmentLoad::Direct(0)
    } else {
        DataSegmentLoad::Through {
            selector: seg.selector,
            index,
            descriptor: pinned_descriptor(seg),
        }
    }
}

/// Takes into the vCPU a data-segment selector the guest loaded without trapping (the real
/// register changed since the host last set it). Only a few loads do not trap — a null
/// selector, the current CS's or SS's, the null-SS stand-in — and each is what the CPU loaded
/// from the real GDT, so the descriptor cache follows from the selector. FS/GS bases come
/// separately from the real MSRs (`VCpu::absorb_segment_bases`).
pub fn absorb_native_load(cpu: &mut VCpu, seg: SegReg, selector: u16) {
    let same_entry =
        |s: &Segment| !is_null_selector(s.selector) && s.selector & !3 == selector & !3;
    let cs = *cpu.segment(SegReg::Cs);
    let ss = *cpu.segment(SegReg::Ss);
    let cache = if is_null_selector(selector) {
        Segment::null(0).cache
    } else if same_entry(&cs) {
        cs.cache
    } else if same_entry(&ss) {
        ss.cache
    } else if selector & !3 == NULL_SS_STAND_IN & !3 {
        Descriptor::from_raw(NULL_SS_STAND_IN_DESCRIPTOR)
    } else {
        // Nothing else is present in the real GDT: not a load the guest can have made.
        return;
    };
    cpu.seg[seg as usize] = Segment { selector, cache };
}

/// The present, DPL-3 real descriptor for a loaded segment, from its descriptor cache: what
/// the real GDT holds for the guest's CS and SS, and, for the instant the host loads it, for a
/// data segment the guest loaded through the emulator.
fn pinned_descriptor(seg: &Segment) -> u64 {
    let mut d = seg.cache;
    d.dpl = 3;
    d.present = true;
    d.to_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::descriptor::{encode_segment, Descriptor};
    use crate::cpu::memory::flat::{FlatMemory, RW_KERNEL};

    const GDT: u64 = 0x5000;

    fn real() -> std::vec::Vec<u64> {
        std::vec![0u64; REAL_GDT_ENTRIES]
    }

    /// A guest with the "low" layout: user data 0x1b, user code 0x23 (the VMM's old real
    /// selectors), kernel 0x08/0x10.
    fn low_layout_guest() -> (VCpu, FlatMemory) {
        let table = [
            0,
            encode_segment(true, true, 0, true, true),
            encode_segment(false, false, 0, true, true),
            encode_segment(false, false, 3, true, true),
            encode_segment(true, true, 3, true, true),
        ];
        let mut mem = FlatMemory::default();
        mem.map(GDT, 0x1000, RW_KERNEL);
        mem.map(0x9000, 0x1000, RW_KERNEL);
        for (i, d) in table.iter().enumerate() {
            mem.poke(GDT + 8 * i as u64, &d.to_le_bytes());
        }
        let cpu = VCpu::at_entry(
            0x1000,
            0x2000,
            0,
            0,
            TableRegister {
                base: GDT,
                limit: 5 * 8 - 1,
            },
        );
        (cpu, mem)
    }

    #[test]
    fn only_the_guests_cs_and_ss_are_present_and_user_descriptors_trap_in_kernel_mode() {
        let (cpu, mut mem) = low_layout_guest();
        let mut real = real();
        let mut shadow = ShadowGdt::new();
        let sel = shadow.sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!(sel, RealSelectors { cs: 0x0B, ss: 0x13 });
        let d = |i: usize| Descriptor::from_raw(real[i]);
        assert!(d(1).present && d(1).dpl == 3 && d(1).is_long_code());
        assert!(d(2).present && d(2).dpl == 3 && d(2).is_writable_data());
        // The guest's user descriptors are there (LAR sees them) but absent: IRETQ to 0x23 or
        // MOV SS 0x1b from the virtual kernel traps.
        assert!(!d(3).present && d(3).dpl == 3 && d(3).is_writable_data());
        assert!(!d(4).present && d(4).dpl == 3 && d(4).is_long_code());
        assert_eq!(real[0], 0);
        assert_eq!(real[FIRST_RESERVED_INDEX], 0, "stand-in absent");
    }

    #[test]
    fn a_mode_switch_moves_the_present_entries_and_a_null_ss_uses_the_stand_in() {
        let (mut cpu, mut mem) = low_layout_guest();
        let mut real = real();
        let mut shadow = ShadowGdt::new();
        shadow.sync(&cpu, &mut mem, &mut real).unwrap();
        // Virtual user mode on 0x23/0x1b.
        let user_code = Descriptor::from_raw(encode_segment(true, true, 3, true, true));
        let user_data = Descriptor::from_raw(encode_segment(false, false, 3, true, true));
        cpu.set_segment(
            SegReg::Cs,
            Segment {
                selector: 0x23,
                cache: user_code,
            },
        );
        cpu.set_segment(
            SegReg::Ss,
            Segment {
                selector: 0x1b,
                cache: user_data,
            },
        );
        cpu.set_cpl(3);
        let sel = shadow.sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!(sel, RealSelectors { cs: 0x23, ss: 0x1b });
        let present = |r: &[u64], i: usize| Descriptor::from_raw(r[i]).present;
        assert!(
            !present(&real, 1) && !present(&real, 2),
            "kernel entries absent"
        );
        assert!(present(&real, 3) && present(&real, 4));
        // An interrupt to the virtual kernel: CS 0x08, null SS.
        cpu.set_segment(
            SegReg::Cs,
            Segment {
                selector: 0x08,
                cache: Descriptor::from_raw(encode_segment(true, true, 0, true, true)),
            },
        );
        cpu.set_segment(SegReg::Ss, Segment::null(0));
        cpu.set_cpl(0);
        let sel = shadow.sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!(
            sel,
            RealSelectors {
                cs: 0x0B,
                ss: NULL_SS_STAND_IN
            }
        );
        assert!(present(&real, 1) && !present(&real, 2));
        assert!(!present(&real, 3) && !present(&real, 4));
        assert!(present(&real, FIRST_RESERVED_INDEX));
    }

    #[test]
    fn an_ss_naming_the_cs_entry_runs_on_the_stand_in() {
        // The boot GDT's SS 0x10 still cached, CS reloaded as 0x10 from a Linux-style table.
        let (mut cpu, mut mem) = low_layout_guest();
        let mut cs = *cpu.segment(SegReg::Cs);
        cs.selector = 0x10;
        cpu.set_segment(SegReg::Cs, cs);
        let mut real = real();
        let sel = ShadowGdt::new().sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!(
            sel,
            RealSelectors {
                cs: 0x13,
                ss: NULL_SS_STAND_IN
            }
        );
        assert!(Descriptor::from_raw(real[2]).is_long_code());
    }

    #[test]
    fn a_new_gdtr_rebuilds_from_memory_and_clears_the_old_tables_tail() {
        let (mut cpu, mut mem) = low_layout_guest();
        let mut real = real();
        let mut shadow = ShadowGdt::new();
        shadow.sync(&cpu, &mut mem, &mut real).unwrap();
        // A shorter table elsewhere with the same kernel descriptors.
        let other = 0x9000;
        for i in 0..3u64 {
            let d = mem.peek_u64(GDT + 8 * i);
            mem.poke(other + 8 * i, &d.to_le_bytes());
        }
        cpu.gdtr = TableRegister {
            base: other,
            limit: 3 * 8 - 1,
        };
        shadow.sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!((real[3], real[4]), (0, 0));
        assert_eq!(shadow.rebuilds, 2);
        // An invalidation (LTR wrote the busy bit) rebuilds the same table again.
        shadow.invalidate();
        shadow.sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!(shadow.rebuilds, 3);
        assert!(Descriptor::from_raw(real[1]).present, "CS pinned again");
    }

    #[test]
    fn the_pinned_entries_come_from_the_descriptor_cache_not_from_memory() {
        let (cpu, mut mem) = low_layout_guest();
        // The guest overwrites its loaded code descriptor with zeros: the CPU keeps running on
        // the cached one, and so must the real CS.
        mem.poke(GDT + 8, &[0; 8]);
        let mut real = real();
        let sel = ShadowGdt::new().sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!(sel.cs, 0x0B);
        assert!(Descriptor::from_raw(real[1]).is_long_code());
    }

    #[test]
    fn running_on_a_reserved_or_ldt_selector_is_a_stop() {
        let (mut cpu, mut mem) = low_layout_guest();
        let mut cs = *cpu.segment(SegReg::Cs);
        cs.selector = HOST_CODE;
        cpu.set_segment(SegReg::Cs, cs);
        let mut real = real();
        assert!(ShadowGdt::new().sync(&cpu, &mut mem, &mut real).is_err());
        cs.selector = 0x0C;
        cpu.set_segment(SegReg::Cs, cs);
        assert!(ShadowGdt::new().sync(&cpu, &mut mem, &mut real).is_err());
    }

    #[test]
    fn a_guest_table_reaching_into_the_reserved_range_is_cut_off() {
        let (mut cpu, mut mem) = low_layout_guest();
        cpu.gdtr.limit = 0xFFFF;
        let mut real = real();
        ShadowGdt::new().sync(&cpu, &mut mem, &mut real).unwrap();
        assert_eq!(real[FIRST_RESERVED_INDEX], 0);
        assert!(real[SHADOWED_ENTRIES..].iter().all(|&d| d == 0));
    }

    #[test]
    fn data_segment_loads_go_through_their_own_entry_or_are_null() {
        let data = Descriptor::from_raw(encode_segment(false, false, 3, true, true));
        match data_segment_load(&Segment {
            selector: 0x2b,
            cache: data,
        }) {
            DataSegmentLoad::Through {
                selector,
                index,
                descriptor,
            } => {
                assert_eq!((selector, index), (0x2b, 5));
                let d = Descriptor::from_raw(descriptor);
                assert!(d.present && d.dpl == 3 && d.is_writable_data());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            data_segment_load(&Segment::null(0)),
            DataSegmentLoad::Direct(0)
        );
        for selector in [0x0f, HOST_CODE | 3] {
            // From the LDT, or in the reserved range: the real register holds null.
            let seg = Segment {
                selector,
                cache: data,
            };
            assert_eq!(data_segment_load(&seg), DataSegmentLoad::Direct(0));
        }
    }

    #[test]
    fn a_native_data_segment_load_takes_the_cache_of_what_the_cpu_loaded() {
        let (mut cpu, _) = low_layout_guest();
        let ss_cache = cpu.segment(SegReg::Ss).cache;
        // The guest's own SS selector into DS.
        absorb_native_load(&mut cpu, SegReg::Ds, 0x10);
        assert_eq!(cpu.segment(SegReg::Ds).selector, 0x10);
        assert_eq!(cpu.segment(SegReg::Ds).cache, ss_cache);
        // Null into FS.
        absorb_native_load(&mut cpu, SegReg::Fs, 0);
        assert_eq!(*cpu.segment(SegReg::Fs), Segment::null(0));
        // The stand-in into ES.
        absorb_native_load(&mut cpu, SegReg::Es, NULL_SS_STAND_IN);
        assert!(cpu.segment(SegReg::Es).cache.is_writable_data());
        // A selector nothing present names: left as it was.
        let gs = *cpu.segment(SegReg::Gs);
        absorb_native_load(&mut cpu, SegReg::Gs, 0x23);
        assert_eq!(*cpu.segment(SegReg::Gs), gs);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// One step a guest can take that the shadow must follow.
        #[derive(Clone, Debug)]
        enum Step {
            /// Load CS (64-bit code) or SS (data) with the selector at `index`, RPL `rpl`.
            Cs {
                index: u16,
                rpl: u8,
            },
            Ss {
                index: u16,
                rpl: u8,
            },
            NullSs,
            /// Rewrite the guest's descriptor at `index` in memory.
            Rewrite {
                index: u16,
                raw: u64,
            },
            /// LGDT with a new limit (entries) over the same table, or LTR-style invalidation.
            Lgdt {
                entries: u16,
            },
            Invalidate,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (1u16..40, 0u8..4).prop_map(|(index, rpl)| Step::Cs { index, rpl }),
                (1u16..40, 0u8..4).prop_map(|(index, rpl)| Step::Ss { index, rpl }),
                Just(Step::NullSs),
                (0u16..40, any::<u64>()).prop_map(|(index, raw)| Step::Rewrite { index, raw }),
                (1u16..48).prop_map(|entries| Step::Lgdt { entries }),
                Just(Step::Invalidate),
            ]
        }

        proptest! {
            /// Whatever the guest does, the real GDT holds exactly: its current CS and SS (with
            /// the stand-in for a null SS or one naming CS's entry) present at DPL 3, every
            /// other guest entry absent, and nothing at all past the guest's table; and the
            /// real selectors returned name present DPL-3 descriptors of the right kind.
            #[test]
            fn only_the_current_cs_and_ss_are_ever_present(steps in proptest::collection::vec(step(), 1..40)) {
                let (mut cpu, mut mem) = low_layout_guest();
                let mut real = real();
                let mut shadow = ShadowGdt::new();
                let code = Descriptor::from_raw(encode_segment(true, true, 0, true, true));
                let data = Descriptor::from_raw(encode_segment(false, false, 0, true, true));
                for step in steps {
                    match step {
                        Step::Cs { index, rpl } => cpu.set_segment(SegReg::Cs, Segment { selector: index << 3 | u16::from(rpl), cache: code }),
                        Step::Ss { index, rpl } => cpu.set_segment(SegReg::Ss, Segment { selector: index << 3 | u16::from(rpl), cache: data }),
                        Step::NullSs => cpu.set_segment(SegReg::Ss, Segment::null(0)),
                        Step::Rewrite { index, raw } => mem.poke(GDT + 8 * u64::from(index), &raw.to_le_bytes()),
                        Step::Lgdt { entries } => cpu.gdtr.limit = entries * 8 - 1,
                        Step::Invalidate => shadow.invalidate(),
                    }
                    let sel = shadow.sync(&cpu, &mut mem, &mut real).unwrap();
                    let cs = usize::from(cpu.segment(SegReg::Cs).selector >> 3);
                    let ss_sel = cpu.segment(SegReg::Ss).selector;
                    let stand_in = is_null_selector(ss_sel) || ss_sel & !3 == cpu.segment(SegReg::Cs).selector & !3;
                    let ss = usize::from(ss_sel >> 3);
                    for (i, raw) in real.iter().enumerate().take(SHADOWED_ENTRIES) {
                        let d = Descriptor::from_raw(*raw);
                        let expected = i == cs || (i == ss && !stand_in) || (i == FIRST_RESERVED_INDEX && stand_in);
                        prop_assert_eq!(d.present, expected, "entry {} after {:?}", i, cpu.segment(SegReg::Cs));
                        if d.present {
                            prop_assert_eq!(d.dpl, 3);
                        }
                    }
                    let entries = (usize::from(cpu.gdtr.limit) + 1) / 8;
                    prop_assert!(real[entries.max(48)..FIRST_RESERVED_INDEX].iter().all(|&r| r == 0));
                    let rcs = Descriptor::from_raw(real[usize::from(sel.cs >> 3)]);
                    prop_assert!(rcs.present && rcs.is_long_code() && sel.cs & 3 == 3);
                    let rss = Descriptor::from_raw(real[usize::from(sel.ss >> 3)]);
                    prop_assert!(rss.present && rss.is_writable_data() && sel.ss & 3 == 3);
                }
            }
        }
    }
}
