//! placeholder
#![no_std]
#![no_main]

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::exit(boot::exit_code::FAILURE)
}
