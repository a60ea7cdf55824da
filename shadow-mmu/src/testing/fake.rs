//! Vec-backed fakes of the machine traits, and a small builder of guest page tables.
// The entry-bit constants are named as in the manual; each says itself what it is.
#![allow(missing_docs)]

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::entry_offset;
use crate::shadow::{FastMap, MmuConfig, Policy, ShadowMmu, VMM_PML4_SLOT};
use crate::walk::PagingMode;

/// Host RAM: frames created on first write or zeroing; reading a frame that was never written
/// or zeroed panics (it would be a VMM bug). Every shadow and guest table read goes through
/// here, so frames are found by index, not by a search: the fuzz target's build traces every
/// comparison, and a tree's or a hash table's comparisons were most of its time. The frames
/// the tests use lie in two dense ranges (the low RAM the tests place by hand, and
/// `FakeAllocator`'s frames from `ALLOCATOR_BASE` up); any other frame goes to a map.
#[derive(Debug, Default)]
pub struct FakeMemory {
    /// Frames below `LOW_FRAMES` pages, by frame number.
    low: Vec<Option<Box<[u8; 4096]>>>,
    /// `FakeAllocator`'s frames, by frame number less `ALLOCATOR_BASE`'s.
    allocated: Vec<Option<Box<[u8; 4096]>>>,
    other: FastMap<u64, Box<[u8; 4096]>>,
}

/// Where `FakeAllocator` starts handing out frames.
const ALLOCATOR_BASE: u64 = 0x1_0000_0000;
/// The low range: the first 64 MiB.
const LOW_FRAMES: u64 = (64 << 20) / PAGE_SIZE;
/// The allocator range held densely: 1 GiB of frames.
const ALLOCATED_FRAMES: u64 = (1 << 30) / PAGE_SIZE;

/// Where a frame lives in `FakeMemory`.
enum Slot {
    Low(usize),
    Allocated(usize),
    Other(u64),
}

fn slot(base: u64) -> Slot {
    let n = base / PAGE_SIZE;
    if n < LOW_FRAMES {
        Slot::Low(n as usize)
    } else if let Some(i) = n
        .checked_sub(ALLOCATOR_BASE / PAGE_SIZE)
        .filter(|&i| i < ALLOCATED_FRAMES)
    {
        Slot::Allocated(i as usize)
    } else {
        Slot::Other(base)
    }
}

fn dense_mut(v: &mut Vec<Option<Box<[u8; 4096]>>>, i: usize) -> &mut [u8; 4096] {
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    v[i].get_or_insert_with(|| Box::new([0; 4096]))
}

impl FakeMemory {
    fn frame(&self, hpa: HostPhysAddr) -> (&[u8; 4096], usize) {
        let base = hpa.as_u64() & !(PAGE_SIZE - 1);
        let f = match slot(base) {
            Slot::Low(i) => self.low.get(i).and_then(Option::as_deref),
            Slot::Allocated(i) => self.allocated.get(i).and_then(Option::as_deref),
            Slot::Other(b) => self.other.get(&b).map(|f| &**f),
        };
        let f = f.unwrap_or_else(|| panic!("read of unknown host frame {base:#x}"));
        (f, (hpa.as_u64() - base) as usize)
    }
    fn frame_mut(&mut self, hpa: HostPhysAddr) -> (&mut [u8; 4096], usize) {
        let base = hpa.as_u64() & !(PAGE_SIZE - 1);
        let f = match slot(base) {
            Slot::Low(i) => dense_mut(&mut self.low, i),
            Slot::Allocated(i) => dense_mut(&mut self.allocated, i),
            Slot::Other(b) => self.other.entry(b).or_insert_with(|| Box::new([0; 4096])),
        };
        (f, (hpa.as_u64() - base) as usize)
    }
}

impl HostMemory for FakeMemory {
    fn read_u64(&self, hpa: HostPhysAddr) -> u64 {
        let (f, o) = self.frame(hpa);
        u64::from_le_bytes(f[o..o + 8].try_into().unwrap())
    }
    fn write_u64(&mut self, hpa: HostPhysAddr, value: u64) {
        let (f, o) = self.frame_mut(hpa);
        f[o..o + 8].copy_from_slice(&value.to_le_bytes());
    }
    fn zero_frame(&mut self, frame: HostPhysAddr) {
        let (f, _) = self.frame_mut(frame);
        f.fill(0);
    }
    fn read_bytes(&self, hpa: HostPhysAddr, buf: &mut [u8]) {
        let (f, o) = self.frame(hpa);
        buf.copy_from_slice(&f[o..o + buf.len()]);
    }
    fn write_bytes(&mut self, hpa: HostPhysAddr, data: &[u8]) {
        let (f, o) = self.frame_mut(hpa);
        f[o..o + data.len()].copy_from_slice(data);
    }
}

/// A bump allocator with a free list and an optional limit; it checks double frees.
#[derive(Debug)]
pub struct FakeAllocator {
    next: u64,
    free: Vec<u64>,
    pub live: BTreeSet<u64>,
    pub limit: usize,
    /// Every frame given back, in order.
    pub freed: Vec<u64>,
}

impl FakeAllocator {
    pub fn new(limit: usize) -> Self {
        Self {
            next: ALLOCATOR_BASE,
            free: Vec::new(),
            live: BTreeSet::new(),
            limit,
            freed: Vec::new(),
        }
    }
}

impl FrameAllocator for FakeAllocator {
    fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
        if self.live.len() >= self.limit {
            return None;
        }
        let f = self.free.pop().unwrap_or_else(|| {
            self.next += PAGE_SIZE;
            self.next
        });
        assert!(self.live.insert(f));
        Some(HostPhysAddr::new(f))
    }
    fn deallocate_frame(&mut self, frame: HostPhysAddr) {
        assert!(
            self.live.remove(&frame.as_u64()),
            "double free of {frame:?}"
        );
        self.free.push(frame.as_u64());
        self.freed.push(frame.as_u64());
    }
}

/// The VMM root the tests hand over: its slot `VMM_PML4_SLOT` holds this (user bit set on purpose, the MMU
/// must clear it).
pub const VMM_ROOT: u64 = 0x1000;
pub const VMM_SLOT_ENTRY: u64 = 0x2000 | 0b111;

pub type Mmu = ShadowMmu<FakeMemory, FakeAllocator>;

pub const P: u64 = 1;
pub const RW: u64 = 2;
pub const US: u64 = 4;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const PS: u64 = 1 << 7;
pub const G: u64 = 1 << 8;
pub const XD: u64 = 1 << 63;

/// Guest RAM used by the tests: 16 MiB.
pub const RAM: u64 = 16 << 20;

pub fn mmu(policy: Policy, quota: usize, cr3: u64) -> Mmu {
    mmu_with(policy, quota, cr3, PagingMode::ENTRY, usize::MAX)
}

pub fn mmu_with(
    policy: Policy,
    quota: usize,
    cr3: u64,
    mode: PagingMode,
    host_frames: usize,
) -> Mmu {
    let mut mem = FakeMemory::default();
    mem.zero_frame(HostPhysAddr::new(VMM_ROOT));
    mem.write_u64(
        HostPhysAddr::new(VMM_ROOT + entry_offset(VMM_PML4_SLOT)),
        VMM_SLOT_ENTRY,
    );
    ShadowMmu::new(
        mem,
        FakeAllocator::new(host_frames),
        MmuConfig {
            ram_bytes: RAM,
            shadow_quota: quota,
            policy,
            vmm_root: HostPhysAddr::new(VMM_ROOT),
            mode,
            guest_cr3: cr3,
        },
    )
    .unwrap()
}

/// Writes one guest-physical u64.
pub fn poke(m: &mut Mmu, gpa: u64, v: u64) {
    m.write_guest_phys(GuestPhysAddr::new(gpa), &v.to_le_bytes())
        .unwrap();
}

/// Reads one guest-physical u64.
pub fn peek(m: &Mmu, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    m.read_guest_phys(GuestPhysAddr::new(gpa), &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Maps `gva` -> `frame` with a 4 KiB page through the tables at `tables` (PML4, PDPT, PD, PT
/// guest-physical addresses); upper entries get `upper` flags, the leaf `leaf` flags.
pub fn map_4k(m: &mut Mmu, tables: [u64; 4], gva: u64, frame: u64, upper: u64, leaf: u64) {
    let idx = |l: u32| (gva >> (12 + 9 * (l - 1))) & 0x1ff;
    poke(m, tables[0] + idx(4) * 8, tables[1] | upper);
    poke(m, tables[1] + idx(3) * 8, tables[2] | upper);
    poke(m, tables[2] + idx(2) * 8, tables[3] | upper);
    poke(m, tables[3] + idx(1) * 8, frame | leaf);
}
