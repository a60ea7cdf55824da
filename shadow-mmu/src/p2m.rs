//! The P2M: guest frame number -> host frame, allocated and zeroed the first time the guest (or
//! the VMM on its behalf) touches a frame (docs/design.md, "Memory layout"; the article's
//! "VMM 分配一页物理内存").
//!
//! Guest-physical memory is `[0, ram_bytes)`. An address outside it is a typed
//! [`MemoryError::OutsideRam`], which the fault path turns into a stop reason today (an MMIO hook
//! later); nothing here panics on a guest-chosen address.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::addr::{page_pieces, GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::ENTRY_SIZE;

/// Why a guest-physical access could not be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryError {
    /// The guest-physical address lies outside the guest's RAM.
    OutsideRam(GuestPhysAddr),
    /// The host has no free frame left to back this guest frame.
    OutOfHostFrames,
}

/// Guest-physical memory as the page walker sees it: aligned 8-byte loads and stores.
pub trait GuestPhysMemory {
    /// Reads the 8-byte entry at `gpa` (8-byte aligned).
    fn read_u64(&mut self, gpa: GuestPhysAddr) -> Result<u64, MemoryError>;
    /// Writes the 8-byte entry at `gpa` (8-byte aligned).
    fn write_u64(&mut self, gpa: GuestPhysAddr, value: u64) -> Result<(), MemoryError>;
}

/// Guest frames per leaf of the map (one host page of entries).
const CHUNK: usize = 512;

/// The guest-physical to host-physical map of one guest: a two-level radix table indexed by
/// guest frame number (every guest page walk looks frames up here, so a lookup is two array
/// indexings, not a tree search), and the reverse map.
#[derive(Debug)]
pub struct P2m {
    ram_bytes: u64,
    /// `chunks[gfn / 512][gfn % 512]` = host frame address, 0 when not touched yet.
    chunks: Vec<Option<Box<[u64; CHUNK]>>>,
    frames_used: usize,
    /// Host frame -> guest frame (a hash map: looked up whenever a shadow leaf is replaced).
    owners: crate::shadow::FastMap<u64, u64>,
}

impl P2m {
    /// An empty map for a guest with `ram_bytes` of RAM (rounded down to whole frames).
    pub fn new(ram_bytes: u64) -> Self {
        let ram_bytes = ram_bytes & !(PAGE_SIZE - 1);
        let frames = (ram_bytes / PAGE_SIZE) as usize;
        let mut chunks = Vec::new();
        chunks.resize_with(frames.div_ceil(CHUNK), || None);
        Self {
            ram_bytes,
            chunks,
            frames_used: 0,
            owners: crate::shadow::FastMap::default(),
        }
    }

    /// The guest's RAM size in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// True when `gpa` is inside guest RAM.
    pub fn contains(&self, gpa: GuestPhysAddr) -> bool {
        gpa.as_u64() < self.ram_bytes
    }

    /// Number of host frames currently backing guest RAM.
    pub fn frames_used(&self) -> usize {
        self.frames_used
    }

    /// The host frame already backing guest frame `gfn`, if it was touched.
    pub fn lookup(&self, gfn: u64) -> Option<HostPhysAddr> {
        let chunk = self.chunks.get((gfn / CHUNK as u64) as usize)?.as_ref()?;
        match chunk.get((gfn % CHUNK as u64) as usize) {
            Some(&0) | None => None,
            Some(&hpa) => Some(HostPhysAddr::new(hpa)),
        }
    }

    /// The guest frame a host frame backs, if it is one of this guest's frames.
    pub fn guest_frame_of(&self, frame: HostPhysAddr) -> Option<u64> {
        self.owners.get(&frame.as_u64()).copied()
    }

    /// The host frame backing guest frame `gfn`, allocated and zeroed on first touch.
    pub fn host_frame<M: HostMemory, A: FrameAllocator>(
        &mut self,
        gfn: u64,
        mem: &mut M,
        alloc: &mut A,
    ) -> Result<HostPhysAddr, MemoryError> {
        if let Some(f) = self.lookup(gfn) {
            return Ok(f);
        }
        let gpa = GuestPhysAddr::new(gfn.saturating_mul(PAGE_SIZE));
        if gfn >= self.ram_bytes / PAGE_SIZE {
            return Err(MemoryError::OutsideRam(gpa));
        }
        let Some(slot) = self.chunks.get_mut((gfn / CHUNK as u64) as usize) else {
            return Err(MemoryError::OutsideRam(gpa));
        };
        let frame = alloc.allocate_frame().ok_or(MemoryError::OutOfHostFrames)?;
        mem.zero_frame(frame);
        let chunk = slot.get_or_insert_with(|| Box::new([0; CHUNK]));
        if let Some(entry) = chunk.get_mut((gfn % CHUNK as u64) as usize) {
            *entry = frame.as_u64();
        }
        self.frames_used += 1;
        self.owners.insert(frame.as_u64(), gfn);
        Ok(frame)
    }

    /// Reads guest-physical bytes; untouched frames read as zeros without being allocated.
    pub fn read<M: HostMemory>(
        &self,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
        mem: &M,
    ) -> Result<(), MemoryError> {
        self.check_range(gpa, buf.len())?;
        for (at, range) in page_pieces(gpa.as_u64(), buf.len()) {
            let chunk = &mut buf[range];
            match self.lookup(at / PAGE_SIZE) {
                Some(f) => mem.read_bytes(HostPhysAddr::new(f.as_u64() + at % PAGE_SIZE), chunk),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }

    /// Writes guest-physical bytes, allocating frames on first touch.
    pub fn write<M: HostMemory, A: FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        data: &[u8],
        mem: &mut M,
        alloc: &mut A,
    ) -> Result<(), MemoryError> {
        self.check_range(gpa, data.len())?;
        for (at, range) in page_pieces(gpa.as_u64(), data.len()) {
            let f = self.host_frame(at / PAGE_SIZE, mem, alloc)?;
            mem.write_bytes(HostPhysAddr::new(f.as_u64() + at % PAGE_SIZE), &data[range]);
        }
        Ok(())
    }

    /// Gives every host frame back to `alloc` and empties the map.
    pub fn release_all<A: FrameAllocator>(&mut self, alloc: &mut A) {
        for chunk in self.chunks.iter_mut() {
            if let Some(entries) = chunk.take() {
                for &hpa in entries.iter().filter(|&&hpa| hpa != 0) {
                    alloc.deallocate_frame(HostPhysAddr::new(hpa));
                }
            }
        }
        self.frames_used = 0;
        self.owners.clear();
    }

    /// Rejects a range that does not lie entirely inside RAM, naming its first outside byte.
    fn check_range(&self, gpa: GuestPhysAddr, len: usize) -> Result<(), MemoryError> {
        let end = gpa.as_u64().checked_add(len as u64);
        match end {
            Some(end) if end <= self.ram_bytes => Ok(()),
            _ => Err(MemoryError::OutsideRam(GuestPhysAddr::new(
                gpa.as_u64().max(self.ram_bytes),
            ))),
        }
    }
}

/// [`GuestPhysMemory`] over a [`P2m`]: what the walker uses on real guest memory.
#[derive(Debug)]
pub struct GuestRam<'a, M, A> {
    /// The guest's P2M.
    pub p2m: &'a mut P2m,
    /// Host memory behind it.
    pub mem: &'a mut M,
    /// Where first-touch frames come from.
    pub alloc: &'a mut A,
}

impl<M: HostMemory, A: FrameAllocator> GuestPhysMemory for GuestRam<'_, M, A> {
    fn read_u64(&mut self, gpa: GuestPhysAddr) -> Result<u64, MemoryError> {
        if !self.p2m.contains(gpa) {
            return Err(MemoryError::OutsideRam(gpa));
        }
        // Reading an untouched frame needs no host frame: it reads as zeros.
        Ok(match self.p2m.lookup(gpa.frame_number()) {
            Some(f) => self.mem.read_u64(HostPhysAddr::new(
                f.as_u64() + (gpa.page_offset() & !(ENTRY_SIZE - 1)),
            )),
            None => 0,
        })
    }

    fn write_u64(&mut self, gpa: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        let f = self
            .p2m
            .host_frame(gpa.frame_number(), self.mem, self.alloc)?;
        self.mem.write_u64(
            HostPhysAddr::new(f.as_u64() + (gpa.page_offset() & !(ENTRY_SIZE - 1))),
            value,
        );
        Ok(())
    }
}
