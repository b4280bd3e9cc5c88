//! The global counter in shared memory: the first page of the XDP program's `counter` array map
//! (created with BPF_F_MMAPABLE), mapped into the process. The program adds with a BPF atomic
//! fetch-and-add and userspace with an atomic fetch_add on the same eight bytes, so requests answered
//! in the kernel and by the kernel-socket fallback all land on one exact counter.
#![allow(unsafe_code)]

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::Counter;

/// A counter living in an mmapped BPF array map. Minimum kernel version: 5.5 (BPF_F_MMAPABLE).
pub struct MappedCounter {
    page: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through AtomicU64 operations; it is valid for
// the lifetime of the struct and may be used from any thread.
unsafe impl Send for MappedCounter {}
// SAFETY: as above: all access is atomic.
unsafe impl Sync for MappedCounter {}

impl MappedCounter {
    /// Maps the value area of an array map whose first element is the u64 counter.
    pub fn map(map_fd: impl AsFd) -> io::Result<MappedCounter> {
        let len = page_size();
        // SAFETY: a shared, read-write mapping of a BPF_F_MMAPABLE array map; the kernel sizes the
        // map's value area to whole pages, so one page is in range. Nothing else in this process
        // aliases it as non-atomic memory.
        let page = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(len).expect("page size is not zero"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                map_fd,
                0,
            )
        }?;
        Ok(MappedCounter {
            page: page.cast::<AtomicU64>(),
            len,
        })
    }

    fn cell(&self) -> &AtomicU64 {
        // SAFETY: the page is mapped, page aligned (so 8-byte aligned) and lives as long as self.
        unsafe { self.page.as_ref() }
    }
}

impl Counter for MappedCounter {
    #[inline]
    fn fetch_add(&self, delta: u64) -> u64 {
        self.cell().fetch_add(delta, Ordering::AcqRel)
    }

    #[inline]
    fn load(&self) -> u64 {
        self.cell().load(Ordering::Acquire)
    }
}

impl Drop for MappedCounter {
    fn drop(&mut self) {
        // SAFETY: page/len come from the mmap in map(); no reference to it outlives self.
        unsafe { nix::sys::mman::munmap(self.page.cast(), self.len) }.ok();
    }
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|n| n as usize)
        .unwrap_or(4096)
}
