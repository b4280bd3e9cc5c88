//! The audited unsafe corner of the AF_XDP datapath: the UMEM area (an anonymous mapping registered
//! with the kernel) and bounds-checked access to its frames.
#![allow(unsafe_code)]

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use xdpilone::{Umem, UmemConfig};

/// An anonymous, page-aligned mapping that backs one UMEM. It outlives the `Umem` and every ring
/// built on it because `UmemArea` owns them in the right drop order (see [`UmemArea::drop`]).
pub struct UmemArea {
    base: NonNull<u8>,
    len: usize,
    umem: Option<Umem>,
}

impl UmemArea {
    /// Maps `frame_count * frame_size` bytes and registers them with the kernel as a UMEM.
    /// `huge_pages` asks for MAP_HUGETLB.
    pub fn new(config: UmemConfig, frame_count: u32, huge_pages: bool) -> io::Result<UmemArea> {
        let len = frame_count as usize * config.frame_size as usize;
        let len_nz =
            NonZeroUsize::new(len).ok_or_else(|| io::Error::other("UMEM of zero bytes"))?;
        let mut flags =
            nix::sys::mman::MapFlags::MAP_PRIVATE | nix::sys::mman::MapFlags::MAP_POPULATE;
        if huge_pages {
            flags |= nix::sys::mman::MapFlags::MAP_HUGETLB;
        }
        // SAFETY: a fresh anonymous mapping aliases nothing; we own it until munmap in drop.
        let base = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len_nz,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                flags,
            )
        }?
        .cast::<u8>();
        let area = NonNull::slice_from_raw_parts(base, len);
        // SAFETY: the area is page aligned (mmap), len bytes long, and lives until drop, which
        // drops the Umem first.
        let umem = match unsafe { Umem::new(config, area) } {
            Ok(u) => u,
            Err(e) => {
                // SAFETY: base/len come from the mmap above and nothing else refers to them.
                unsafe { nix::sys::mman::munmap(base.cast(), len) }.ok();
                return Err(io::Error::from_raw_os_error(e.get_raw().abs()));
            }
        };
        Ok(UmemArea {
            base,
            len,
            umem: Some(umem),
        })
    }

    pub fn umem(&self) -> &Umem {
        self.umem.as_ref().expect("present until drop")
    }

    /// The bytes of a descriptor (`addr`, `len`), or None when it points outside the area.
    pub fn bytes_mut(&mut self, addr: u64, len: u32) -> Option<&mut [u8]> {
        let start = usize::try_from(addr).ok()?;
        let end = start.checked_add(len as usize)?;
        if end > self.len {
            return None;
        }
        // SAFETY: [start, end) lies inside our mapping; &mut self guarantees no other Rust reference
        // into the area exists while this one lives. The kernel only writes frames that are on the
        // fill ring, and a descriptor we read from the RX ring is ours until we hand it back.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(start), len as usize) })
    }
}

impl Drop for UmemArea {
    fn drop(&mut self) {
        // The Umem (and the kernel's registration with it) goes first, then the memory.
        drop(self.umem.take());
        // SAFETY: base/len come from mmap in new(); nothing refers to the area any more.
        unsafe { nix::sys::mman::munmap(self.base.cast(), self.len) }.ok();
    }
}
