//! `cli; hlt` with nothing to wake it: the VMM must report a guest halted forever, not hang.
#![no_std]
#![no_main]

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::println(format_args!("cli-hlt: halting with interrupts off"));
    test_guests::halt_forever()
}
