//! The virtual MSR file: RDMSR/WRMSR of the guest kernel land here (SDM Vol. 4 for the
//! indices, Vol. 3 §2.8.6 for the instructions' rules).
//!
//! Only the MSRs an OS kernel of this kind needs are modelled; any other index raises #GP(0) as
//! on a CPU without it, and is counted so the exit report can show what the guest probed.

use super::event::Event;
use super::state::{cr0, efer, SegReg, VCpu};
use alloc::vec::Vec;
use shadow_mmu::addr::is_canonical;

/// MSR indices (SDM Vol. 4, Table 2-2).
#[allow(missing_docs)]
pub mod index {
    pub const APIC_BASE: u32 = 0x1B;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const PAT: u32 = 0x277;
    pub const EFER: u32 = 0xC000_0080;
    pub const STAR: u32 = 0xC000_0081;
    pub const LSTAR: u32 = 0xC000_0082;
    pub const CSTAR: u32 = 0xC000_0083;
    pub const SFMASK: u32 = 0xC000_0084;
    pub const FS_BASE: u32 = 0xC000_0100;
    pub const GS_BASE: u32 = 0xC000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    pub const TSC_AUX: u32 = 0xC000_0103;
}

/// The value IA32_APIC_BASE reads as: the default base 0xFEE0_0000, BSP, enabled.
pub const APIC_BASE_VALUE: u64 = 0xFEE0_0900;
/// IA32_PAT's power-up value (SDM Vol. 3 §11.12.4).
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// Distinct unknown MSRs remembered for the report; the rest are only counted.
pub const MAX_UNKNOWN_MSRS: usize = 32;

/// One unknown MSR the guest touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownMsr {
    /// Its index.
    pub index: u32,
    /// RDMSRs of it.
    pub reads: u64,
    /// WRMSRs of it.
    pub writes: u64,
}

/// The MSRs that live only in the vCPU (EFER, FS/GS base live in [`VCpu`] itself).
#[derive(Clone, Debug, Default)]
pub struct MsrFile {
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_CSTAR.
    pub cstar: u64,
    /// IA32_FMASK.
    pub sfmask: u64,
    /// IA32_KERNEL_GS_BASE (swapped with GS base by SWAPGS).
    pub kernel_gs_base: u64,
    /// IA32_TSC_AUX.
    pub tsc_aux: u64,
    /// IA32_PAT.
    pub pat: u64,
    unknown: Vec<UnknownMsr>,
    unknown_overflow: u64,
}

impl MsrFile {
    /// Power-up values.
    pub fn new() -> Self {
        MsrFile {
            pat: PAT_RESET,
            ..Default::default()
        }
    }

    /// Unknown MSRs seen, in first-seen order.
    pub fn unknown(&self) -> &[UnknownMsr] {
        &self.unknown
    }

    /// Accesses to unknown MSRs beyond the first [`MAX_UNKNOWN_MSRS`] distinct ones.
    pub fn unknown_overflow(&self) -> u64 {
        self.unknown_overflow
    }

    fn count_unknown(&mut self, index: u32, write: bool) {
        let position = match self.unknown.iter().position(|u| u.index == index) {
            Some(i) => i,
            None if self.unknown.len() < MAX_UNKNOWN_MSRS => {
                self.unknown.push(UnknownMsr {
                    index,
                    reads: 0,
                    writes: 0,
                });
                self.unknown.len() - 1
            }
            None => {
                self.unknown_overflow += 1;
                return;
            }
        };
        if let Some(entry) = self.unknown.get_mut(position) {
            if write {
                entry.writes += 1;
            } else {
                entry.reads += 1;
            }
        }
    }
}

/// RDMSR: the value of MSR `index`, or #GP(0) for an MSR this CPU does not have.
pub fn read_msr(cpu: &mut VCpu, index: u32) -> Result<u64, Event> {
    let m = &cpu.msr;
    Ok(match index {
        index::APIC_BASE => APIC_BASE_VALUE,
        index::SYSENTER_CS => m.sysenter_cs,
        index::SYSENTER_ESP => m.sysenter_esp,
        index::SYSENTER_EIP => m.sysenter_eip,
        index::PAT => m.pat,
        index::EFER => cpu.efer,
        index::STAR => m.star,
        index::LSTAR => m.lstar,
        index::CSTAR => m.cstar,
        index::SFMASK => m.sfmask,
        index::FS_BASE => cpu.fs_base(),
        index::GS_BASE => cpu.gs_base(),
        index::KERNEL_GS_BASE => m.kernel_gs_base,
        index::TSC_AUX => m.tsc_aux,
        _ => {
            cpu.msr.count_unknown(index, false);
            return Err(Event::gp(0));
        }
    })
}

fn canonical(value: u64) -> Result<u64, Event> {
    if is_canonical(value) {
        Ok(value)
    } else {
        Err(Event::gp(0))
    }
}

/// WRMSR: writes MSR `index` with the checks of the manual (reserved bits, canonical
/// addresses); #GP(0) when a check fails or the MSR does not exist.
pub fn write_msr(cpu: &mut VCpu, index: u32, value: u64) -> Result<(), Event> {
    match index {
        index::APIC_BASE => {
            // The local APIC is not virtualised: its base is fixed.
            if value != APIC_BASE_VALUE {
                return Err(Event::gp(0));
            }
        }
        index::SYSENTER_CS => cpu.msr.sysenter_cs = value & 0xFFFF_FFFF,
        index::SYSENTER_ESP => cpu.msr.sysenter_esp = canonical(value)?,
        index::SYSENTER_EIP => cpu.msr.sysenter_eip = canonical(value)?,
        index::PAT => {
            // Each byte must be a valid memory type: 0, 1, 4, 5, 6 or 7 (SDM Vol. 3 §11.12.2).
            if value
                .to_le_bytes()
                .iter()
                .any(|b| !matches!(b, 0 | 1 | 4..=7))
            {
                return Err(Event::gp(0));
            }
            cpu.msr.pat = value;
        }
        index::EFER => write_efer(cpu, value)?,
        index::STAR => cpu.msr.star = value,
        index::LSTAR => cpu.msr.lstar = canonical(value)?,
        index::CSTAR => cpu.msr.cstar = canonical(value)?,
        index::SFMASK => {
            if value >> 32 != 0 {
                return Err(Event::gp(0));
            }
            cpu.msr.sfmask = value;
        }
        index::FS_BASE => {
            let v = canonical(value)?;
            cpu.set_segment_base(SegReg::Fs, v);
        }
        index::GS_BASE => {
            let v = canonical(value)?;
            cpu.set_segment_base(SegReg::Gs, v);
        }
        index::KERNEL_GS_BASE => cpu.msr.kernel_gs_base = canonical(value)?,
        index::TSC_AUX => {
            if value >> 32 != 0 {
                return Err(Event::gp(0));
            }
            cpu.msr.tsc_aux = value;
        }
        _ => {
            cpu.msr.count_unknown(index, true);
            return Err(Event::gp(0));
        }
    }
    Ok(())
}

/// IA32_EFER (SDM Vol. 3 §2.2.1, §9.8.5): reserved bits and a change of LME while paging is on
/// are #GP; LMA is read-only (it follows LME & PG).
fn write_efer(cpu: &mut VCpu, value: u64) -> Result<(), Event> {
    if value & !efer::DEFINED != 0 {
        return Err(Event::gp(0));
    }
    let paging = cpu.cr0 & cr0::PG != 0;
    if paging && (value ^ cpu.efer) & efer::LME != 0 {
        return Err(Event::gp(0));
    }
    let new = (value & !efer::LMA) | (cpu.efer & efer::LMA);
    if (new ^ cpu.efer) & efer::NXE != 0 {
        cpu.note(|e| e.paging_mode = true);
    }
    cpu.efer = new;
    Ok(())
}
