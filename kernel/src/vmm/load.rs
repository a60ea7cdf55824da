//! Loading the guest: vmm-core's loader validates the ELF and writes its segments and the boot
//! area into guest-physical memory through the shadow MMU's P2M (host frames allocated on first
//! touch), and the boot CR3 is loaded into a new shadow MMU.

use super::host::{DirectMap, HostFrames};
use super::Mmu;
use crate::memory::{paging, phys_to_virt};
use crate::multiboot::Module;
use shadow_mmu::shadow::{MmuConfig, Policy};
use shadow_mmu::{GuestPhysAddr, PagingMode};
use vmm_core::config::{HostConfig, ShadowPolicy};
use vmm_core::loader::{self, EntryState, GuestPhysWrite, LoadError};

/// Shadow page-table pages the VMM may keep alive at once (roots included): 4 MiB.
const SHADOW_QUOTA: usize = 1024;

/// Guest RAM as the loader writes it: through the shadow MMU's P2M, frames allocated on first
/// touch.
struct LoadTarget<'a> {
    mmu: &'a mut Mmu,
}

impl GuestPhysWrite for LoadTarget<'_> {
    fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        self.mmu
            .write_guest_phys(GuestPhysAddr::new(gpa), bytes)
            .is_ok()
    }
}

/// Validates the guest module, loads it with the guest command line, and builds its shadow MMU.
/// Any problem with the image is a configuration error naming it (exit 0x14).
pub(super) fn load(config: &HostConfig<'_>, module: &Module) -> (Mmu, EntryState) {
    let len = (module.range.end.saturating_sub(module.range.start)) as usize;
    // SAFETY: the module's physical range was reserved from the frame allocator at boot, so
    // nothing else writes it, and the direct map covers all RAM.
    let image = unsafe { core::slice::from_raw_parts(phys_to_virt(module.range.start), len) };
    let ram_bytes = u64::from(config.guest_mem_mib) << 20;
    let fail = |why: LoadError| -> ! {
        crate::exit::config_error(format_args!("guest image '{}': {why}", module.name()))
    };
    let parsed = loader::parse_guest(image, ram_bytes).unwrap_or_else(|e| fail(e));
    let policy = match config.shadow {
        ShadowPolicy::Flush => Policy::Flush,
        ShadowPolicy::Cached => Policy::Cached,
    };
    let mmu_config = MmuConfig {
        ram_bytes,
        shadow_quota: SHADOW_QUOTA,
        policy,
        vmm_root: shadow_mmu::HostPhysAddr::new(paging::host_root()),
        mode: PagingMode::ENTRY,
        guest_cr3: 0,
    };
    let mut mmu = Mmu::new(DirectMap, HostFrames, mmu_config).unwrap_or_else(|e| {
        crate::exit::config_error(format_args!("cannot create the shadow MMU: {e:?}"))
    });
    mmu.set_emulator_fill(config.emulator_fill);
    mmu.set_unsync(config.unsync);
    mmu.set_sharing(config.shadow_share);
    mmu.set_prefetch(config.prefetch);
    let entry = loader::load_guest(
        &mut LoadTarget { mmu: &mut mmu },
        image,
        &parsed,
        ram_bytes,
        config.guest_cmdline,
    )
    .unwrap_or_else(|e| fail(e));
    if let Err(why) = mmu.load_cr3(entry.cr3) {
        crate::exit::config_error(format_args!("the guest's boot page tables: {why:?}"));
    }
    log::info!(
        "guest: '{}' loaded: {} PT_LOAD segment(s), entry {:#x}, {} MiB RAM, boot area {:#x}..{:#x}, command line '{}'",
        module.name(),
        parsed.segments.len(),
        entry.rip,
        config.guest_mem_mib,
        entry.boot_info.boot_area_start,
        entry.boot_info.boot_area_end,
        config.guest_cmdline
    );
    (mmu, entry)
}
