//! libFuzzer entry of the emulator target (`fuzz_targets::emulator`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::emulator::run(data));
