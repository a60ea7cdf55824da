//! P2M tests: first-touch allocation and zeroing, RAM bounds, accesses that cross frames.

use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::machine::HostMemory;
use crate::p2m::{GuestPhysMemory, GuestRam, MemoryError, P2m};
use crate::testing::fake::{FakeAllocator, FakeMemory};

#[test]
fn frames_are_allocated_zeroed_on_first_touch_and_reused() {
    let mut mem = FakeMemory::default();
    let mut alloc = FakeAllocator::new(4);
    let mut p2m = P2m::new(0x10_0000);
    // A recycled host frame holding garbage must come back zeroed.
    let dirty = HostPhysAddr::new(0x1_0000_1000);
    mem.write_u64(dirty, 0xdead_beef);
    let f = p2m.host_frame(7, &mut mem, &mut alloc).unwrap();
    assert_eq!(f, dirty);
    assert_eq!(mem.read_u64(f), 0);
    assert_eq!(p2m.host_frame(7, &mut mem, &mut alloc).unwrap(), f);
    assert_eq!(p2m.frames_used(), 1);
    assert_eq!(p2m.guest_frame_of(f), Some(7));
    // Reads of untouched frames cost nothing.
    let mut b = [0xffu8; 16];
    p2m.read(GuestPhysAddr::new(0x5000), &mut b, &mem).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(p2m.frames_used(), 1);
}

#[test]
fn bounds_and_frame_crossing() {
    let mut mem = FakeMemory::default();
    let mut alloc = FakeAllocator::new(2);
    let mut p2m = P2m::new(0x2000);
    let data: std::vec::Vec<u8> = (0..32u8).collect();
    p2m.write(GuestPhysAddr::new(0xff0), &data, &mut mem, &mut alloc)
        .unwrap();
    let mut back = [0u8; 32];
    p2m.read(GuestPhysAddr::new(0xff0), &mut back, &mem)
        .unwrap();
    assert_eq!(&back[..], &data[..]);
    assert_eq!(p2m.frames_used(), 2);
    assert_eq!(
        p2m.write(GuestPhysAddr::new(0x1ff8), &[0; 16], &mut mem, &mut alloc),
        Err(MemoryError::OutsideRam(GuestPhysAddr::new(0x2000)))
    );
    assert_eq!(
        p2m.read(GuestPhysAddr::new(u64::MAX - 3), &mut back, &mem),
        Err(MemoryError::OutsideRam(GuestPhysAddr::new(u64::MAX - 3)))
    );
    assert!(matches!(
        p2m.host_frame(2, &mut mem, &mut alloc),
        Err(MemoryError::OutsideRam(_))
    ));
    let mut small = P2m::new(0x10_0000);
    let mut none = FakeAllocator::new(0);
    assert_eq!(
        small.host_frame(0, &mut mem, &mut none),
        Err(MemoryError::OutOfHostFrames)
    );
    let mut ram = GuestRam {
        p2m: &mut p2m,
        mem: &mut mem,
        alloc: &mut alloc,
    };
    assert_eq!(
        ram.read_u64(GuestPhysAddr::new(0x1000)).unwrap(),
        u64::from_le_bytes([16, 17, 18, 19, 20, 21, 22, 23])
    );
    assert!(ram.read_u64(GuestPhysAddr::new(0x2000)).is_err());
    p2m.release_all(&mut alloc);
    assert!(alloc.live.is_empty());
}
