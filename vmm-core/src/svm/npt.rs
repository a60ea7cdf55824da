//! Nested page tables: the host's map from guest-physical to host-physical addresses, walked by
//! the CPU after the guest's own tables (APM vol. 2 §15.25; VT-x's EPT). This is the article's
//! "MMU virtualization" in hardware: the guest keeps its page tables to itself, CR3 loads and
//! page-table writes no longer exit, and the shadow page tables of trap-and-emulate disappear.
//!
//! The tables are filled on first touch, like the shadow tables: a guest access to an unmapped
//! guest-physical page exits with a nested page fault, and [`NestedPageTables::map`] maps the
//! host frame the P2M gives that page (allocating it on first touch). They use the host's own
//! 4-level long-mode format; every entry has U/S set, because the CPU treats every nested walk
//! as a user access (§15.25.5).

use shadow_mmu::{FrameAllocator, HostMemory, HostPhysAddr};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const ENTRIES: u64 = 512;

/// The flags of every nested entry: present, writable, user. Never no-execute: the guest's own
/// tables decide what it may execute.
pub const NESTED_ENTRY_FLAGS: u64 = PRESENT | WRITABLE | USER;

/// Why a page could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedMapError {
    /// The host has no frame left for a table.
    OutOfHostFrames,
    /// The guest-physical address is beyond what 4-level tables map (52 bits).
    AddressTooLarge,
}

/// A nested page-table hierarchy: its root, and how many table frames it holds.
#[derive(Debug)]
pub struct NestedPageTables {
    root: HostPhysAddr,
    tables: usize,
    mapped: usize,
}

impl NestedPageTables {
    /// An empty hierarchy (a zeroed root).
    pub fn new<M: HostMemory, A: FrameAllocator>(
        mem: &mut M,
        alloc: &mut A,
    ) -> Result<Self, NestedMapError> {
        let root = alloc
            .allocate_frame()
            .ok_or(NestedMapError::OutOfHostFrames)?;
        mem.zero_frame(root);
        Ok(Self {
            root,
            tables: 1,
            mapped: 0,
        })
    }

    /// The root, for the VMCB's `N_CR3`.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Table frames in use, root included.
    pub fn tables(&self) -> usize {
        self.tables
    }

    /// Pages mapped.
    pub fn mapped(&self) -> usize {
        self.mapped
    }

    fn index(gpa: u64, level: u32) -> u64 {
        (gpa >> (12 + 9 * (level - 1))) & (ENTRIES - 1)
    }

    /// Maps the 4 KiB guest-physical page of `gpa` to host frame `frame`, building the tables
    /// on the way.
    pub fn map<M: HostMemory, A: FrameAllocator>(
        &mut self,
        gpa: u64,
        frame: HostPhysAddr,
        mem: &mut M,
        alloc: &mut A,
    ) -> Result<(), NestedMapError> {
        if gpa >> 52 != 0 {
            return Err(NestedMapError::AddressTooLarge);
        }
        let mut table = self.root;
        for level in (2..=4).rev() {
            let slot = HostPhysAddr::new(table.as_u64() + Self::index(gpa, level) * 8);
            let entry = mem.read_u64(slot);
            table = if entry & PRESENT != 0 {
                HostPhysAddr::new(entry & ADDRESS_MASK)
            } else {
                let next = alloc
                    .allocate_frame()
                    .ok_or(NestedMapError::OutOfHostFrames)?;
                mem.zero_frame(next);
                mem.write_u64(slot, next.as_u64() | NESTED_ENTRY_FLAGS);
                self.tables += 1;
                next
            };
        }
        let slot = HostPhysAddr::new(table.as_u64() + Self::index(gpa, 1) * 8);
        if mem.read_u64(slot) & PRESENT == 0 {
            self.mapped += 1;
        }
        mem.write_u64(slot, (frame.as_u64() & ADDRESS_MASK) | NESTED_ENTRY_FLAGS);
        Ok(())
    }

    /// The host frame `gpa`'s page maps to, if any (what the CPU's nested walk finds).
    pub fn translate<M: HostMemory>(&self, gpa: u64, mem: &M) -> Option<HostPhysAddr> {
        if gpa >> 52 != 0 {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let entry = mem.read_u64(HostPhysAddr::new(
                table.as_u64() + Self::index(gpa, level) * 8,
            ));
            if entry & PRESENT == 0 {
                return None;
            }
            table = HostPhysAddr::new(entry & ADDRESS_MASK);
        }
        Some(table)
    }

    /// Gives every table frame back (not the mapped frames: they are the P2M's).
    pub fn release<M: HostMemory, A: FrameAllocator>(self, mem: &M, alloc: &mut A) {
        fn free<M: HostMemory, A: FrameAllocator>(
            table: HostPhysAddr,
            level: u32,
            mem: &M,
            alloc: &mut A,
        ) {
            if level > 1 {
                for i in 0..ENTRIES {
                    let entry = mem.read_u64(HostPhysAddr::new(table.as_u64() + i * 8));
                    if entry & PRESENT != 0 {
                        free(
                            HostPhysAddr::new(entry & ADDRESS_MASK),
                            level - 1,
                            mem,
                            alloc,
                        );
                    }
                }
            }
            alloc.deallocate_frame(table);
        }
        free(self.root, 4, mem, alloc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    /// Host memory as a map of frames.
    #[derive(Default)]
    struct Host {
        frames: BTreeMap<u64, [u64; 512]>,
    }

    impl HostMemory for Host {
        fn read_u64(&self, hpa: HostPhysAddr) -> u64 {
            let a = hpa.as_u64();
            self.frames
                .get(&(a & !0xFFF))
                .map_or(0, |f| f[(a & 0xFFF) as usize / 8])
        }
        fn write_u64(&mut self, hpa: HostPhysAddr, value: u64) {
            let a = hpa.as_u64();
            self.frames.entry(a & !0xFFF).or_insert([0; 512])[(a & 0xFFF) as usize / 8] = value;
        }
        fn zero_frame(&mut self, frame: HostPhysAddr) {
            self.frames.insert(frame.as_u64(), [0; 512]);
        }
        fn read_bytes(&self, _: HostPhysAddr, _: &mut [u8]) {}
        fn write_bytes(&mut self, _: HostPhysAddr, _: &[u8]) {}
    }

    /// Frames from 1 MiB up, at most `limit` of them; freed ones are recorded.
    struct Frames {
        handed_out: u64,
        limit: u64,
        freed: Vec<u64>,
    }

    impl Frames {
        fn new(limit: u64) -> Self {
            Self {
                handed_out: 0,
                limit,
                freed: Vec::new(),
            }
        }
    }

    impl FrameAllocator for Frames {
        fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
            if self.handed_out == self.limit {
                return None;
            }
            self.handed_out += 1;
            Some(HostPhysAddr::new(0x10_0000 + self.handed_out * 0x1000))
        }
        fn deallocate_frame(&mut self, frame: HostPhysAddr) {
            self.freed.push(frame.as_u64());
        }
    }

    #[test]
    fn maps_translate_and_share_tables() {
        let (mut host, mut alloc) = (Host::default(), Frames::new(100));
        let mut npt = NestedPageTables::new(&mut host, &mut alloc).unwrap();
        npt.map(
            0x20_3000,
            HostPhysAddr::new(0x900_0000),
            &mut host,
            &mut alloc,
        )
        .unwrap();
        npt.map(
            0x20_4000,
            HostPhysAddr::new(0x901_0000),
            &mut host,
            &mut alloc,
        )
        .unwrap();
        // Two pages of one 2 MiB region share the PDPT, PD and PT: 4 tables.
        assert_eq!((npt.tables(), npt.mapped()), (4, 2));
        assert_eq!(
            npt.translate(0x20_3000, &host),
            Some(HostPhysAddr::new(0x900_0000))
        );
        assert_eq!(
            npt.translate(0x20_4FFF, &host),
            Some(HostPhysAddr::new(0x901_0000))
        );
        assert_eq!(npt.translate(0x20_5000, &host), None);
        // Every entry on the way is present, writable and user (APM §15.25.5).
        let pml4e = host.read_u64(npt.root());
        assert_eq!(pml4e & 0xFFF, NESTED_ENTRY_FLAGS);
        // Remapping a page does not count twice.
        npt.map(
            0x20_3000,
            HostPhysAddr::new(0x902_0000),
            &mut host,
            &mut alloc,
        )
        .unwrap();
        assert_eq!(npt.mapped(), 2);
        assert_eq!(
            npt.translate(0x20_3000, &host),
            Some(HostPhysAddr::new(0x902_0000))
        );
        assert_eq!(
            npt.map(1 << 52, HostPhysAddr::new(0), &mut host, &mut alloc),
            Err(NestedMapError::AddressTooLarge)
        );
        npt.release(&host, &mut alloc);
        assert_eq!(alloc.freed.len(), 4);
    }

    #[test]
    fn running_out_of_frames_is_an_error() {
        let (mut host, mut alloc) = (Host::default(), Frames::new(2));
        let mut npt = NestedPageTables::new(&mut host, &mut alloc).unwrap();
        assert_eq!(
            npt.map(0x1000, HostPhysAddr::new(0x5000), &mut host, &mut alloc),
            Err(NestedMapError::OutOfHostFrames)
        );
        assert_eq!(npt.translate(0x1000, &host), None);
    }
}
