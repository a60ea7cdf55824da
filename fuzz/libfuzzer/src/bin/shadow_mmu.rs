//! libFuzzer entry of the shadow MMU target (`fuzz_targets::shadow_mmu`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::shadow_mmu::run(data));
