//! Guest memory as the emulator sees it: linear addresses, checked with the rights the guest
//! has, translated through the guest's own page tables (shadow-mmu does the walk in the kernel;
//! the tests use a flat model).
//!
//! One vocabulary at the boundary: [`GuestMemory`] takes a [`GuestVirtAddr`], which is canonical
//! by construction, so no implementation ever sees a non-canonical address. An instruction
//! computes a raw `u64`; the helpers here ([`read_slice`], [`write_slice`], [`read_obj`],
//! [`write_obj`], [`read_value`], [`write_value`]) turn it into a `GuestVirtAddr` once, where
//! the architectural fault is known (`stack`: #SS(0) rather than #GP(0)). An access that starts
//! canonical but runs across the canonical hole is still the implementation's to refuse, byte
//! for byte, as [`TranslateError::NonCanonical`].
//!
//! A translation failure becomes exactly what the instruction would raise on hardware: #PF with
//! the walk's error code and CR2, #GP(0) (or #SS(0) for stack accesses) for a non-canonical
//! address, or a typed stop when the guest points outside what it owns.

use super::event::{CpuStop, Event};
use shadow_mmu::shadow::{ShadowMmu, TranslateError};
use shadow_mmu::{AccessKind, FrameAllocator, GuestVirtAddr, HostMemory, Privilege};

/// Linear-address access to guest memory with the guest's access rights.
///
/// `gva` is where the access starts; an access that runs from there past the end of the
/// canonical lower half (or off the top of the address space) fails with
/// [`TranslateError::NonCanonical`] naming the first byte that is not canonical.
pub trait GuestMemory {
    /// Reads `buf.len()` bytes at `gva` as a `kind` access (read or fetch) made with
    /// `privilege`.
    fn read_linear(
        &mut self,
        gva: GuestVirtAddr,
        buf: &mut [u8],
        kind: AccessKind,
        privilege: Privilege,
    ) -> Result<(), TranslateError>;

    /// Writes `data` at `gva` as a write made with `privilege`.
    fn write_linear(
        &mut self,
        gva: GuestVirtAddr,
        data: &[u8],
        privilege: Privilege,
    ) -> Result<(), TranslateError>;
}

impl<M: HostMemory, A: FrameAllocator> GuestMemory for ShadowMmu<M, A> {
    fn read_linear(
        &mut self,
        gva: GuestVirtAddr,
        buf: &mut [u8],
        kind: AccessKind,
        privilege: Privilege,
    ) -> Result<(), TranslateError> {
        ShadowMmu::read_linear(self, gva, buf, kind, privilege)
    }

    fn write_linear(
        &mut self,
        gva: GuestVirtAddr,
        data: &[u8],
        privilege: Privilege,
    ) -> Result<(), TranslateError> {
        ShadowMmu::write_linear(self, gva, data, privilege)
    }
}

/// Why an emulated step did not complete: an exception for the guest, or a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Raise this event in the guest (the instruction does not retire).
    Raise(Event),
    /// The guest cannot go on.
    Stop(CpuStop),
}

impl From<Event> for Fault {
    fn from(e: Event) -> Self {
        Fault::Raise(e)
    }
}

impl From<CpuStop> for Fault {
    fn from(s: CpuStop) -> Self {
        Fault::Stop(s)
    }
}

/// The fault a failed data access raises; `stack` selects #SS(0) over #GP(0) for a
/// non-canonical address (SDM Vol. 3 §6.15, interrupt 12).
pub fn access_fault(e: TranslateError, stack: bool) -> Fault {
    match e {
        TranslateError::PageFault(pf) => Fault::Raise(Event::page_fault(pf)),
        TranslateError::NonCanonical(_) if stack => Fault::Raise(Event::ss(0)),
        TranslateError::NonCanonical(_) => Fault::Raise(Event::gp(0)),
        TranslateError::Stop(reason) => Fault::Stop(CpuStop::Memory(reason)),
    }
}

/// The linear address `raw` as a [`GuestVirtAddr`], or [`TranslateError::NonCanonical`]: the
/// one place a raw address an instruction computed enters the typed boundary.
pub fn canonical(raw: u64) -> Result<GuestVirtAddr, TranslateError> {
    GuestVirtAddr::new(raw).ok_or(TranslateError::NonCanonical(raw))
}

/// Reads `buf.len()` bytes at the raw linear address `addr` as a `kind` access with
/// `privilege`; a failure is the fault the access raises (`stack`: #SS(0) for a non-canonical
/// address).
pub fn read_slice<M: GuestMemory + ?Sized>(
    mem: &mut M,
    addr: u64,
    buf: &mut [u8],
    kind: AccessKind,
    privilege: Privilege,
    stack: bool,
) -> Result<(), Fault> {
    canonical(addr)
        .and_then(|gva| mem.read_linear(gva, buf, kind, privilege))
        .map_err(|e| access_fault(e, stack))
}

/// Writes `data` at the raw linear address `addr` with `privilege`; a failure is the fault the
/// access raises (`stack`: #SS(0) for a non-canonical address).
pub fn write_slice<M: GuestMemory + ?Sized>(
    mem: &mut M,
    addr: u64,
    data: &[u8],
    privilege: Privilege,
    stack: bool,
) -> Result<(), Fault> {
    canonical(addr)
        .and_then(|gva| mem.write_linear(gva, data, privilege))
        .map_err(|e| access_fault(e, stack))
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
    impl Sealed for u128 {}
}

/// A fixed-size little-endian integer in guest memory: `u8`, `u16`, `u32`, `u64`, or `u128` (an
/// IDT gate or system descriptor read in one access). Sealed; see [`read_obj`] and
/// [`write_obj`].
pub trait LeInt: sealed::Sealed + Copy {
    /// The value's bytes.
    type Bytes: AsRef<[u8]> + AsMut<[u8]> + Default;
    /// The value these little-endian bytes encode.
    fn from_le(bytes: Self::Bytes) -> Self;
    /// The little-endian bytes of the value.
    fn to_le(self) -> Self::Bytes;
}

macro_rules! impl_le_int {
    ($($t:ty),*) => {$(
        impl LeInt for $t {
            type Bytes = [u8; core::mem::size_of::<$t>()];
            fn from_le(bytes: Self::Bytes) -> Self {
                <$t>::from_le_bytes(bytes)
            }
            fn to_le(self) -> Self::Bytes {
                self.to_le_bytes()
            }
        }
    )*};
}
impl_le_int!(u8, u16, u32, u64, u128);

/// Reads a `T` (little-endian) at the raw linear address `addr` in one data read with
/// `privilege` (`stack`: a stack access, #SS(0) when non-canonical).
pub fn read_obj<T: LeInt, M: GuestMemory + ?Sized>(
    mem: &mut M,
    addr: u64,
    privilege: Privilege,
    stack: bool,
) -> Result<T, Fault> {
    let mut bytes = T::Bytes::default();
    read_slice(
        mem,
        addr,
        bytes.as_mut(),
        AccessKind::Read,
        privilege,
        stack,
    )?;
    Ok(T::from_le(bytes))
}

/// Writes `value` (little-endian) at the raw linear address `addr` in one write with
/// `privilege` (`stack`: a stack access, #SS(0) when non-canonical).
pub fn write_obj<T: LeInt, M: GuestMemory + ?Sized>(
    mem: &mut M,
    addr: u64,
    value: T,
    privilege: Privilege,
    stack: bool,
) -> Result<(), Fault> {
    write_slice(mem, addr, value.to_le().as_ref(), privilege, stack)
}

/// Reads a little-endian value of `size` (1, 2, 4 or 8) bytes at the raw linear address
/// `addr`, for operands whose size the instruction decides (see [`read_obj`] for fixed ones).
pub fn read_value<M: GuestMemory + ?Sized>(
    mem: &mut M,
    addr: u64,
    size: usize,
    privilege: Privilege,
    stack: bool,
) -> Result<u64, Fault> {
    let mut bytes = [0u8; 8];
    let size = size.min(8);
    read_slice(
        mem,
        addr,
        &mut bytes[..size],
        AccessKind::Read,
        privilege,
        stack,
    )?;
    Ok(u64::from_le_bytes(bytes))
}

/// Writes the low `size` (1, 2, 4 or 8) bytes of `value`, little-endian, at the raw linear
/// address `addr` (see [`write_obj`] for fixed sizes).
pub fn write_value<M: GuestMemory + ?Sized>(
    mem: &mut M,
    addr: u64,
    size: usize,
    value: u64,
    privilege: Privilege,
    stack: bool,
) -> Result<(), Fault> {
    let bytes = value.to_le_bytes();
    write_slice(mem, addr, &bytes[..size.min(8)], privilege, stack)
}

/// A flat, page-granular test memory: present pages with U/S, R/W and NX rights, checked the
/// way the hardware checks them with CR0.WP = 1, so emulator tests see real #PF error codes.
/// For the unit tests and, with the feature `testing`, the fuzz targets (`crate::testing`).
#[cfg(any(test, feature = "testing"))]
#[allow(missing_docs)]
pub mod flat {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;
    use shadow_mmu::{PageFault, PageFaultErrorCode};

    /// Page rights.
    #[derive(Clone, Copy, Debug)]
    pub struct Rights {
        pub user: bool,
        pub writable: bool,
        pub executable: bool,
    }

    /// Pages by linear page number.
    #[derive(Debug, Default, Clone)]
    pub struct FlatMemory {
        pub pages: BTreeMap<u64, (Rights, Vec<u8>)>,
        /// Linear pages whose access is a stop (the VMM range, say).
        pub stop_pages: Vec<u64>,
        pub writes: usize,
    }

    pub const RW_KERNEL: Rights = Rights {
        user: false,
        writable: true,
        executable: true,
    };
    pub const RW_USER: Rights = Rights {
        user: true,
        writable: true,
        executable: true,
    };
    pub const RO_KERNEL: Rights = Rights {
        user: false,
        writable: false,
        executable: true,
    };

    impl FlatMemory {
        pub fn map(&mut self, gva: u64, len: u64, rights: Rights) {
            let first = gva >> 12;
            let last = gva.saturating_add(len.max(1) - 1) >> 12;
            for page in first..=last {
                self.pages
                    .entry(page)
                    .or_insert_with(|| (rights, alloc::vec![0; 4096]))
                    .0 = rights;
            }
        }

        pub fn poke(&mut self, gva: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                let a = gva.wrapping_add(i as u64);
                let page = self
                    .pages
                    .get_mut(&(a >> 12))
                    .expect("poke into an unmapped page");
                page.1[(a & 0xFFF) as usize] = *b;
            }
        }

        pub fn peek(&self, gva: u64, len: usize) -> Vec<u8> {
            (0..len as u64)
                .map(|i| {
                    let a = gva.wrapping_add(i);
                    self.pages
                        .get(&(a >> 12))
                        .map_or(0xEE, |p| p.1[(a & 0xFFF) as usize])
                })
                .collect()
        }

        pub fn peek_u64(&self, gva: u64) -> u64 {
            let b = self.peek(gva, 8);
            u64::from_le_bytes(b.try_into().unwrap())
        }

        fn check(
            &self,
            gva: u64,
            len: usize,
            kind: AccessKind,
            privilege: Privilege,
        ) -> Result<(), TranslateError> {
            for i in 0..len as u64 {
                // Off the top of the address space is not canonical either (as in the shadow
                // MMU): the access does not wrap around to 0.
                let a = gva.wrapping_add(i);
                if gva.checked_add(i).is_none() || !shadow_mmu::addr::is_canonical(a) {
                    return Err(TranslateError::NonCanonical(a));
                }
                if self.stop_pages.contains(&(a >> 12)) {
                    return Err(TranslateError::Stop(shadow_mmu::StopReason::VmmRange {
                        gva: GuestVirtAddr::new(a).unwrap(),
                    }));
                }
                let mut code = PageFaultErrorCode::empty();
                if kind == AccessKind::Write {
                    code |= PageFaultErrorCode::WRITE;
                }
                if kind == AccessKind::Fetch {
                    code |= PageFaultErrorCode::INSTRUCTION_FETCH;
                }
                if privilege == Privilege::User {
                    code |= PageFaultErrorCode::USER;
                }
                let denied = match self.pages.get(&(a >> 12)) {
                    None => true,
                    Some((r, _)) => {
                        code |= PageFaultErrorCode::PRESENT;
                        (privilege == Privilege::User && !r.user)
                            || (kind == AccessKind::Write && !r.writable)
                            || (kind == AccessKind::Fetch && !r.executable)
                    }
                };
                if denied {
                    return Err(TranslateError::PageFault(PageFault {
                        error_code: code,
                        cr2: GuestVirtAddr::new(a).unwrap(),
                    }));
                }
            }
            Ok(())
        }
    }

    impl GuestMemory for FlatMemory {
        fn read_linear(
            &mut self,
            gva: GuestVirtAddr,
            buf: &mut [u8],
            kind: AccessKind,
            privilege: Privilege,
        ) -> Result<(), TranslateError> {
            let gva = gva.as_u64();
            self.check(gva, buf.len(), kind, privilege)?;
            let data = self.peek(gva, buf.len());
            buf.copy_from_slice(&data);
            Ok(())
        }

        fn write_linear(
            &mut self,
            gva: GuestVirtAddr,
            data: &[u8],
            privilege: Privilege,
        ) -> Result<(), TranslateError> {
            let gva = gva.as_u64();
            self.check(gva, data.len(), AccessKind::Write, privilege)?;
            self.writes += 1;
            self.poke(gva, data);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::flat::{FlatMemory, RW_KERNEL};
    use super::*;

    /// The last canonical lower-half page, mapped.
    const EDGE: u64 = 0x0000_7FFF_FFFF_F000;

    fn memory() -> FlatMemory {
        let mut mem = FlatMemory::default();
        mem.map(EDGE, 0x1000, RW_KERNEL);
        mem
    }

    #[test]
    fn typed_values_are_little_endian_and_round_trip() {
        let mut mem = memory();
        let s = Privilege::Supervisor;
        write_obj(&mut mem, EDGE, 0x1122_3344_5566_7788u64, s, false).unwrap();
        assert_eq!(
            mem.peek(EDGE, 8),
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(read_obj::<u16, _>(&mut mem, EDGE + 1, s, false), Ok(0x6677));
        assert_eq!(read_obj::<u32, _>(&mut mem, EDGE, s, true), Ok(0x5566_7788));
        write_obj(&mut mem, EDGE + 0x10, u128::MAX - 1, s, false).unwrap();
        assert_eq!(read_obj(&mut mem, EDGE + 0x10, s, false), Ok(u128::MAX - 1));
        write_obj(&mut mem, EDGE + 0x20, 0xABu8, s, true).unwrap();
        assert_eq!(read_value(&mut mem, EDGE + 0x20, 1, s, false), Ok(0xAB));
    }

    #[test]
    fn a_non_canonical_address_is_gp_or_ss_and_never_reaches_memory() {
        let mut mem = NeverAsked;
        let s = Privilege::Supervisor;
        let (gp, ss) = (Fault::Raise(Event::gp(0)), Fault::Raise(Event::ss(0)));
        for raw in [HOLE, 0xFFFF_7FFF_FFFF_FFF8, 0x8000_0000_0000_0000] {
            assert_eq!(read_obj::<u64, _>(&mut mem, raw, s, false), Err(gp));
            assert_eq!(read_obj::<u64, _>(&mut mem, raw, s, true), Err(ss));
            assert_eq!(write_obj(&mut mem, raw, 1u64, s, false), Err(gp));
            assert_eq!(write_obj(&mut mem, raw, 1u64, s, true), Err(ss));
            assert_eq!(read_value(&mut mem, raw, 2, s, true), Err(ss));
            assert_eq!(write_value(&mut mem, raw, 2, 0, s, false), Err(gp));
            let mut buf = [0u8; 4];
            let fetch = read_slice(&mut mem, raw, &mut buf, AccessKind::Fetch, s, false);
            assert_eq!(fetch, Err(gp));
        }
    }

    #[test]
    fn an_access_running_into_the_canonical_hole_is_gp_or_ss_and_writes_nothing() {
        let mut mem = memory();
        let s = Privilege::Supervisor;
        let last = HOLE - 4;
        assert_eq!(
            read_obj::<u64, _>(&mut mem, last, s, false),
            Err(Fault::Raise(Event::gp(0)))
        );
        assert_eq!(
            write_obj(&mut mem, last, u64::MAX, s, true),
            Err(Fault::Raise(Event::ss(0)))
        );
        assert_eq!(mem.writes, 0);
        assert_eq!(mem.peek(last, 4), [0; 4]);
        assert_eq!(read_obj::<u32, _>(&mut mem, last, s, true), Ok(0));
    }

    /// Found by the fuzz target `emulator`: the flat test memory let an access that starts on
    /// the last byte of the address space wrap around to 0, where the shadow MMU (and the
    /// `GuestMemory` contract) refuse it as not canonical. A model bug, fixed in the model.
    #[test]
    fn an_access_running_off_the_top_of_the_address_space_is_gp_and_writes_nothing() {
        let mut mem = FlatMemory::default();
        mem.map(0xFFFF_FFFF_FFFF_F000, 0x1000, RW_KERNEL);
        mem.map(0, 0x1000, RW_KERNEL);
        let s = Privilege::Supervisor;
        assert_eq!(
            write_obj(&mut mem, u64::MAX - 3, u64::MAX, s, false),
            Err(Fault::Raise(Event::gp(0)))
        );
        assert_eq!(
            read_obj::<u16, _>(&mut mem, u64::MAX, s, true),
            Err(Fault::Raise(Event::ss(0)))
        );
        assert_eq!(mem.writes, 0);
        assert_eq!(read_obj::<u32, _>(&mut mem, u64::MAX - 3, s, false), Ok(0));
    }

    /// The first non-canonical address above the lower half.
    const HOLE: u64 = shadow_mmu::addr::LOWER_HALF_END;

    /// A guest memory that must never be asked: the helpers refuse a non-canonical address
    /// before any implementation sees it.
    struct NeverAsked;

    impl GuestMemory for NeverAsked {
        fn read_linear(
            &mut self,
            gva: GuestVirtAddr,
            _: &mut [u8],
            _: AccessKind,
            _: Privilege,
        ) -> Result<(), TranslateError> {
            panic!("read_linear({gva:?})")
        }

        fn write_linear(
            &mut self,
            gva: GuestVirtAddr,
            _: &[u8],
            _: Privilege,
        ) -> Result<(), TranslateError> {
            panic!("write_linear({gva:?})")
        }
    }
}
