//! The machine as this crate sees it: host frames reached through [`HostMemory`] and handed out by
//! a [`FrameAllocator`].
//!
//! The host kernel implements both with its direct map of physical RAM and its physical frame
//! allocator; tests implement them with a `Vec`. Shadow page tables live in host frames too (the
//! real CPU walks them), so they are read and written through [`HostMemory`] as well.
//!
//! No SDM section: this seam is what lets every rule of the "页表虚拟化" challenge be tested on the
//! host instead of only under QEMU.

use crate::addr::HostPhysAddr;

/// Access to host-physical memory (the kernel's direct map).
///
/// Addresses passed in are always inside frames this crate got from its [`FrameAllocator`];
/// 8-byte accesses are 8-byte aligned and byte ranges never cross a 4 KiB frame.
pub trait HostMemory {
    /// Reads the 8-byte little-endian value at `hpa`.
    fn read_u64(&self, hpa: HostPhysAddr) -> u64;
    /// Writes the 8-byte little-endian value at `hpa`.
    fn write_u64(&mut self, hpa: HostPhysAddr, value: u64);
    /// Fills the 4 KiB frame at `frame` with zeros.
    fn zero_frame(&mut self, frame: HostPhysAddr);
    /// Copies `buf.len()` bytes starting at `hpa` into `buf` (never crosses a frame).
    fn read_bytes(&self, hpa: HostPhysAddr, buf: &mut [u8]);
    /// Copies `data` to `hpa` (never crosses a frame).
    fn write_bytes(&mut self, hpa: HostPhysAddr, data: &[u8]);
}

/// The host's physical frame allocator (4 KiB frames).
pub trait FrameAllocator {
    /// A free 4 KiB frame, or `None` when the host has none left.
    fn allocate_frame(&mut self) -> Option<HostPhysAddr>;
    /// Gives back a frame obtained from [`FrameAllocator::allocate_frame`].
    fn deallocate_frame(&mut self, frame: HostPhysAddr);
}
