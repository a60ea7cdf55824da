//! CPUID as the guest sees it: the host's answers with the hypervisor bit set, a vendor leaf at
//! 0x4000_0000, and every feature this virtual CPU does not virtualise hidden, so a guest never
//! tries a control bit that would be a #GP here (SDM Vol. 2 "CPUID").

/// The signature in EBX, ECX, EDX of leaf 0x4000_0000 (12 ASCII bytes).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"TrapEmulVMM!";
/// Highest hypervisor leaf.
pub const HYPERVISOR_MAX_LEAF: u32 = 0x4000_0001;

/// The two things of the host CPU the emulator passes on to the guest, filtered: its CPUID
/// answers and its time-stamp counter (the kernel executes the instructions; the tests use
/// tables and counters).
pub trait HostCpu {
    /// EAX, EBX, ECX, EDX for `leaf`/`subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The time-stamp counter, for an RDTSC the guest's CR4.TSD made trap.
    fn rdtsc(&self) -> u64;
}

/// Leaf 1 ECX: DTES64(2), MONITOR(3), DS-CPL(4), VMX(5), SMX(6), EST(7), TM2(8), SDBG(11),
/// FMA(12), xTPR(14), PDCM(15), PCID(17), DCA(18), x2APIC(21), TSC-deadline(24), XSAVE(26),
/// OSXSAVE(27), AVX(28), F16C(29): each needs a control bit (CR4.VMXE/SMXE/PCIDE/OSXSAVE),
/// MSRs (debug store, thermal, performance, x2APIC) or register state (AVX, behind XSAVE)
/// that this CPU does not virtualise.
const LEAF1_ECX_HIDDEN: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14)
    | (1 << 15)
    | (1 << 17)
    | (1 << 18)
    | (1 << 21)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29);
/// Leaf 1 EDX: VME(1) (no CR4.VME/PVI), MTRR(12) and MCA(14) (no such MSRs), PSN(18), DS(21),
/// ACPI(22), TM(29) and PBE(31) (their MSRs are not modelled either).
const LEAF1_EDX_HIDDEN: u32 =
    (1 << 1) | (1 << 12) | (1 << 14) | (1 << 18) | (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
/// Leaf 1 ECX bit 31: "running under a hypervisor".
pub const HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 7 EBX bits kept: BMI1(3), BMI2(8), ERMS(9), RDSEED(18), ADX(19). FSGSBASE, SMEP,
/// SMAP, INVPCID, SGX, AVX2/AVX-512 and the rest need state this CPU does not virtualise.
const LEAF7_EBX_KEPT: u32 = (1 << 3) | (1 << 8) | (1 << 9) | (1 << 18) | (1 << 19);
/// Leaf 7 ECX bits kept: UMIP(2), which CR4.UMIP backs.
const LEAF7_ECX_KEPT: u32 = 1 << 2;
/// Leaf 0x8000_0001 ECX: SVM(2) hidden.
const EXT1_ECX_HIDDEN: u32 = 1 << 2;
/// Leaf 0x8000_0001 EDX: RDTSCP(27) hidden: it runs natively at CPL 3 and would return the
/// host's IA32_TSC_AUX, not the virtual one the guest writes with WRMSR.
const EXT1_EDX_HIDDEN: u32 = 1 << 27;
/// Leaf 0x8000_0001 EDX: 1-GiB pages (26) always offered, whatever the host has: shadow-mmu's
/// walker maps a PDPTE with PS = 1 as a 1-GiB page and the shadow splits it into 4-KiB
/// entries, so the guest must be told (a CPU without Page1GB would make that PS bit reserved,
/// SDM Vol. 3 §4.5 Table 4-15).
pub const EXT1_EDX_PAGE1GB: u32 = 1 << 26;

/// Whether loading a null selector into FS or GS in 64-bit mode clears its base, as on the
/// vendor the guest sees (vendor and family pass through): Intel processors clear it (SDM
/// Vol. 3 §3.4.4 gives no exception for a null selector); AMD's (and Hygon's) keep it unless
/// CPUID.80000021H:EAX[6] (NullSelectorClearsBase) says otherwise. The guest's own null loads
/// at real CPL 3 do not trap, so the emulation must agree with what the hardware does.
pub fn null_selector_clears_base(host: &dyn HostCpu) -> bool {
    let [_, b, c, d] = host.cpuid(0, 0);
    let amd_like = matches!(
        (b, d, c),
        (0x6874_7541, 0x6974_6E65, 0x444D_4163) | (0x6F67_7948, 0x6E65_476E, 0x656E_6975)
    );
    if !amd_like {
        return true;
    }
    let max_ext = host.cpuid(0x8000_0000, 0)[0];
    max_ext >= 0x8000_0021 && host.cpuid(0x8000_0021, 0)[0] & (1 << 6) != 0
}

/// The virtual CPU's answer to CPUID `leaf`/`subleaf`.
pub fn virtual_cpuid(host: &dyn HostCpu, leaf: u32, subleaf: u32) -> [u32; 4] {
    match leaf {
        0x4000_0000 => {
            let sig = HYPERVISOR_SIGNATURE;
            let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
            [HYPERVISOR_MAX_LEAF, word(0), word(4), word(8)]
        }
        0x4000_0001..=0x4FFF_FFFF => [0; 4],
        _ => {
            let mut r = host.cpuid(leaf, subleaf);
            match leaf {
                1 => {
                    r[2] = (r[2] & !LEAF1_ECX_HIDDEN) | HYPERVISOR_BIT;
                    r[3] &= !LEAF1_EDX_HIDDEN;
                }
                7 => {
                    if subleaf == 0 {
                        r = [0, r[1] & LEAF7_EBX_KEPT, r[2] & LEAF7_ECX_KEPT, 0];
                    } else {
                        r = [0; 4];
                    }
                }
                // 0xD: XSAVE state (XSAVE hidden); 6: thermal and power management (HWP and
                // the rest are MSRs); 0xA: performance monitoring (its counters are MSRs).
                0xD | 6 | 0xA => r = [0; 4],
                0x8000_0001 => {
                    r[2] &= !EXT1_ECX_HIDDEN;
                    r[3] = (r[3] & !EXT1_EDX_HIDDEN) | EXT1_EDX_PAGE1GB;
                }
                0x8000_0008 => {
                    // EAX[7:0] MAXPHYADDR: the one the shadow MMU's walks and MOV CR3 check
                    // (bits above it are reserved); EAX[15:8]: 48 linear-address bits (4-level
                    // paging, no LA57).
                    let phys = u32::from(shadow_mmu::PagingMode::ENTRY.max_phys_bits);
                    r[0] = (r[0] & !0xFFFF) | (48 << 8) | phys;
                }
                _ => {}
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct AllOnes;
    impl HostCpu for AllOnes {
        fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
            if leaf == 0 {
                [0xD, 0x756E_6547, 0x6C65_746E, 0x4965_6E69]
            } else {
                [u32::MAX; 4]
            }
        }
        fn rdtsc(&self) -> u64 {
            0
        }
    }

    #[test]
    fn leaf_1_sets_the_hypervisor_bit_and_hides_vmx() {
        let r = virtual_cpuid(&AllOnes, 1, 0);
        assert_ne!(r[2] & HYPERVISOR_BIT, 0);
        assert_eq!(r[2] & (1 << 5), 0, "VMX hidden");
        assert_eq!(r[2] & (1 << 26), 0, "XSAVE hidden");
        assert_eq!(r[3] & (1 << 1), 0, "VME hidden");
        assert_ne!(r[3] & (1 << 11), 0, "SEP (SYSENTER) kept");
    }

    #[test]
    fn features_without_emulated_state_are_hidden() {
        let l1 = virtual_cpuid(&AllOnes, 1, 0);
        for (bit, name) in [
            (2, "DTES64"),
            (4, "DS-CPL"),
            (7, "EST"),
            (8, "TM2"),
            (11, "SDBG"),
            (12, "FMA"),
            (14, "xTPR"),
            (15, "PDCM"),
            (17, "PCID"),
            (18, "DCA"),
            (24, "TSC deadline"),
            (27, "OSXSAVE"),
        ] {
            assert_eq!(l1[2] & (1 << bit), 0, "leaf 1 ECX {name} hidden");
        }
        for (bit, name) in [(18, "PSN"), (21, "DS"), (29, "TM"), (31, "PBE")] {
            assert_eq!(l1[3] & (1 << bit), 0, "leaf 1 EDX {name} hidden");
        }
        for (bit, name) in [(0, "SSE3"), (13, "CX16"), (23, "POPCNT"), (30, "RDRAND")] {
            assert_ne!(l1[2] & (1 << bit), 0, "leaf 1 ECX {name} kept");
        }
        let ext1 = virtual_cpuid(&AllOnes, 0x8000_0001, 0);
        assert_eq!(ext1[3] & (1 << 27), 0, "RDTSCP hidden");
        assert_ne!(ext1[3] & (1 << 11), 0, "SYSCALL kept");
        assert_ne!(ext1[3] & (1 << 20), 0, "NX kept");
        assert_eq!(virtual_cpuid(&AllOnes, 6, 0), [0; 4], "thermal/power leaf");
        assert_eq!(virtual_cpuid(&AllOnes, 0xA, 0), [0; 4], "perfmon leaf");
    }

    /// Every CR4 bit that has a CPUID feature flag: offered by CPUID exactly when MOV CR4
    /// accepts it (SDM Vol. 3 §2.5, Vol. 2 "CPUID").
    #[test]
    fn cpuid_offers_exactly_the_cr4_bits_mov_cr4_accepts() {
        use crate::cpu::state::cr4;
        // (CR4 bit, leaf, register index, CPUID bit)
        let pairs: &[(u32, u32, usize, u32)] = &[
            (0, 1, 3, 1),   // VME
            (1, 1, 3, 1),   // PVI
            (3, 1, 3, 2),   // DE
            (4, 1, 3, 3),   // PSE
            (5, 1, 3, 6),   // PAE
            (6, 1, 3, 7),   // MCE
            (7, 1, 3, 13),  // PGE
            (9, 1, 3, 24),  // OSFXSR / FXSR
            (10, 1, 3, 25), // OSXMMEXCPT / SSE
            (11, 7, 2, 2),  // UMIP
            (12, 7, 2, 16), // LA57
            (13, 1, 2, 5),  // VMXE
            (14, 1, 2, 6),  // SMXE
            (16, 7, 1, 0),  // FSGSBASE
            (17, 1, 2, 17), // PCIDE
            (18, 1, 2, 26), // OSXSAVE / XSAVE
            (19, 7, 2, 23), // KL
            (20, 7, 1, 7),  // SMEP
            (21, 7, 1, 20), // SMAP
            (22, 7, 2, 3),  // PKE
            (23, 7, 2, 7),  // CET
            (24, 7, 2, 31), // PKS
        ];
        for &(bit, leaf, reg, feature) in pairs {
            let offered = virtual_cpuid(&AllOnes, leaf, 0)[reg] & (1 << feature) != 0;
            let accepted = cr4::DEFINED & (1 << bit) != 0;
            assert_eq!(offered, accepted, "CR4 bit {bit}");
        }
    }

    /// An AMD host with (`clears` = true) or without NullSelectorClearsBase.
    struct Amd {
        clears: bool,
    }
    impl HostCpu for Amd {
        fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
            match leaf {
                // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD".
                0 => [0x10, 0x6874_7541, 0x444D_4163, 0x6974_6E65],
                0x8000_0000 => [0x8000_0021, 0, 0, 0],
                0x8000_0021 => [u32::from(self.clears) << 6, 0, 0, 0],
                _ => [0; 4],
            }
        }
        fn rdtsc(&self) -> u64 {
            0
        }
    }

    #[test]
    fn a_null_selector_clears_the_base_on_intel_and_keeps_it_on_amd() {
        assert!(null_selector_clears_base(&AllOnes), "GenuineIntel");
        assert!(!null_selector_clears_base(&Amd { clears: false }));
        assert!(null_selector_clears_base(&Amd { clears: true }));
    }

    struct NoFeatures;
    impl HostCpu for NoFeatures {
        fn cpuid(&self, _leaf: u32, _subleaf: u32) -> [u32; 4] {
            [0; 4]
        }
        fn rdtsc(&self) -> u64 {
            0
        }
    }

    #[test]
    fn one_gib_pages_are_offered_as_the_walker_maps_them() {
        for host in [&AllOnes as &dyn HostCpu, &NoFeatures] {
            let r = virtual_cpuid(host, 0x8000_0001, 0);
            assert_ne!(r[3] & EXT1_EDX_PAGE1GB, 0, "Page1GB");
        }
    }

    #[test]
    fn address_sizes_are_the_ones_the_vcpu_checks() {
        let r = virtual_cpuid(&AllOnes, 0x8000_0008, 0);
        assert_eq!(r[0] & 0xFF, 40, "MAXPHYADDR of the shadow MMU and MOV CR3");
        assert_eq!((r[0] >> 8) & 0xFF, 48, "4-level paging");
    }

    #[test]
    fn the_hypervisor_leaf_names_the_vmm() {
        let r = virtual_cpuid(&AllOnes, 0x4000_0000, 0);
        assert_eq!(r[0], HYPERVISOR_MAX_LEAF);
        let mut sig = [0u8; 12];
        for (i, w) in r[1..].iter().enumerate() {
            sig[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&sig, HYPERVISOR_SIGNATURE);
    }

    #[test]
    fn svm_and_unvirtualised_structured_features_are_hidden() {
        assert_eq!(virtual_cpuid(&AllOnes, 0x8000_0001, 0)[2] & (1 << 2), 0);
        let l7 = virtual_cpuid(&AllOnes, 7, 0);
        assert_eq!(l7[1] & (1 << 7), 0, "SMEP hidden");
        assert_eq!(l7[1] & 1, 0, "FSGSBASE hidden");
        assert_ne!(l7[2] & (1 << 2), 0, "UMIP kept");
        assert_eq!(
            virtual_cpuid(&AllOnes, 0, 0)[1],
            0x756E_6547,
            "vendor passes through"
        );
    }
}
