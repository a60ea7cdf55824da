//! The guest's DS, ES, FS and GS live in the real segment registers while it runs, like its
//! general registers, so `mov ax, ds` and `push fs` show the guest's own selectors.
//!
//! The shadow descriptor table (vmm-core `cpu::shadow_gdt`) keeps every guest descriptor absent
//! except the current CS and SS, so a data-segment load normally traps and is emulated into the
//! vCPU; on the way out the host then loads the same selector into the real register, making
//! its descriptor present for that one instruction (the CPU keeps the loaded copy, and a
//! segment register is never reloaded from the table behind the guest's back). A few loads do
//! not trap — a null selector, the selectors of the current CS or SS, the null-SS stand-in —
//! and each trap entry takes those, and the real FS/GS bases (which a native load of FS or GS
//! changes), back into the vCPU.

use core::sync::atomic::{compiler_fence, Ordering};
use vmm_core::cpu::shadow_gdt::{self, DataSegmentLoad};
use vmm_core::cpu::{SegReg, VCpu};
use x86::segmentation::SegmentSelector;

/// The four registers, in the order of [`DataSegments::real`].
const REGISTERS: [SegReg; 4] = [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs];

/// What the real data-segment registers held when the guest was last entered.
pub struct DataSegments {
    real: [u16; 4],
}

fn read_real() -> [u16; 4] {
    [
        x86::segmentation::es().bits(),
        x86::segmentation::ds().bits(),
        x86::segmentation::fs().bits(),
        x86::segmentation::gs().bits(),
    ]
}

impl DataSegments {
    /// Starts from what the registers hold now (the first exit loads the guest's).
    pub fn new() -> Self {
        Self { real: read_real() }
    }

    /// At trap entry: what the guest loaded without trapping since the last exit (vmm-core
    /// decides what each selector means), and the real FS/GS bases.
    pub fn absorb(&mut self, cpu: &mut VCpu) {
        let now = read_real();
        for ((seg, real), now) in REGISTERS.iter().zip(self.real.iter_mut()).zip(now) {
            if *real != now {
                *real = now;
                shadow_gdt::absorb_native_load(cpu, *seg, now);
            }
        }
        // SAFETY: IA32_FS_BASE exists in long mode; reading it has no side effects.
        let fs_base = unsafe { x86::msr::rdmsr(x86::msr::IA32_FS_BASE) };
        // SAFETY: likewise for IA32_GS_BASE.
        let gs_base = unsafe { x86::msr::rdmsr(x86::msr::IA32_GS_BASE) };
        cpu.absorb_segment_bases(fs_base, gs_base);
    }

    /// On the way out: loads each register whose virtual selector the emulator changed, through
    /// its guest descriptor made present for the instant of the load (`real_gdt` is the guest
    /// part of the real GDT). Returns whether FS or GS was loaded (its base must then be
    /// written again: a load sets the base from the descriptor).
    pub fn publish(&mut self, cpu: &VCpu, real_gdt: &mut [u64]) -> bool {
        let wanted = REGISTERS.map(|seg| cpu.segment(seg).selector);
        if wanted == self.real {
            return false;
        }
        let mut fs_gs = false;
        for (i, seg) in REGISTERS.iter().enumerate() {
            let want = *cpu.segment(*seg);
            if want.selector == self.real[i] {
                continue;
            }
            let loaded = match shadow_gdt::data_segment_load(&want) {
                DataSegmentLoad::Direct(selector) => {
                    load(*seg, selector);
                    selector
                }
                DataSegmentLoad::Through {
                    selector,
                    index,
                    descriptor,
                } => {
                    let Some(entry) = real_gdt.get_mut(index) else {
                        continue;
                    };
                    let kept = *entry;
                    let entry: *mut u64 = entry;
                    // SAFETY: `entry` points into the real GDT slice we hold. The writes are
                    // volatile because the CPU reads the entry behind the compiler's back (the
                    // segment load below names no memory): a plain store and its restore
                    // would be dead stores to the compiler, and were removed.
                    unsafe { entry.write_volatile(descriptor) };
                    load(*seg, selector);
                    // SAFETY: as above.
                    unsafe { entry.write_volatile(kept) };
                    selector
                }
            };
            self.real[i] = loaded;
            fs_gs |= matches!(seg, SegReg::Fs | SegReg::Gs);
        }
        fs_gs
    }
}

/// Loads a real data-segment register (the CPU reads the descriptor from the real GDT; the
/// fences keep the compiler's stores to that table on their side of the load).
fn load(seg: SegReg, selector: u16) {
    let sel = SegmentSelector::from_raw(selector);
    compiler_fence(Ordering::SeqCst);
    // For every arm: the selector is null or names a present DPL-3 code or data descriptor the
    // caller just wrote, so the load cannot fault.
    match seg {
        // SAFETY: 64-bit mode ignores the ES base and limit, so the host does not depend on ES.
        SegReg::Es => unsafe { x86::segmentation::load_es(sel) },
        // SAFETY: 64-bit mode ignores the DS base and limit, so the host does not depend on DS.
        SegReg::Ds => unsafe { x86::segmentation::load_ds(sel) },
        // SAFETY: the host never addresses through FS; the load also sets the FS base, which
        // the caller writes again afterwards.
        SegReg::Fs => unsafe { x86::segmentation::load_fs(sel) },
        // SAFETY: as for FS: the host never addresses through GS.
        _ => unsafe { x86::segmentation::load_gs(sel) },
    }
    compiler_fence(Ordering::SeqCst);
}
