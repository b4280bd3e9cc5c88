//! The audited unsafe corner: batched datagram syscalls (recvmmsg/sendmmsg) over preallocated
//! buffers, CPU pinning and real-time scheduling. Everything else in the crate is safe code.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::os::fd::RawFd;

use crate::spec::CpuId;

/// Preallocated buffers, addresses and headers for one batch of datagrams on one worker.
///
/// All pointers inside the headers point into boxed slices owned by this struct, which are never
/// reallocated, so the struct can move freely while the pointers stay valid.
pub struct MmsgBatch {
    slot_size: usize,
    data: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    recv_iov: Box<[libc::iovec]>,
    recv_hdrs: Box<[libc::mmsghdr]>,
    send_iov: Box<[libc::iovec]>,
    send_hdrs: Box<[libc::mmsghdr]>,
    /// For each slot: bytes received and whether the datagram was cut (MSG_TRUNC).
    received: Box<[(usize, bool)]>,
    /// Slots filled by the last receive: only they have an address to reply to.
    filled: usize,
}

// SAFETY: the raw pointers in the headers only point into the struct's own boxed slices; moving the
// struct to another thread moves their owner with them.
unsafe impl Send for MmsgBatch {}

impl MmsgBatch {
    pub fn new(slots: usize, slot_size: usize) -> MmsgBatch {
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero bytes is
        // a valid value.
        let zeroed_addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let zeroed_hdr: libc::mmsghdr = unsafe { mem::zeroed() };
        let empty_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut batch = MmsgBatch {
            slot_size,
            data: vec![0u8; slots * slot_size].into_boxed_slice(),
            addrs: vec![zeroed_addr; slots].into_boxed_slice(),
            recv_iov: vec![empty_iov; slots].into_boxed_slice(),
            recv_hdrs: vec![zeroed_hdr; slots].into_boxed_slice(),
            send_iov: vec![empty_iov; slots].into_boxed_slice(),
            send_hdrs: vec![zeroed_hdr; slots].into_boxed_slice(),
            received: vec![(0, false); slots].into_boxed_slice(),
            filled: 0,
        };
        let data = batch.data.as_mut_ptr();
        for i in 0..slots {
            // SAFETY: i * slot_size is within the data allocation of slots * slot_size bytes.
            batch.recv_iov[i].iov_base = unsafe { data.add(i * slot_size) }.cast();
            batch.recv_iov[i].iov_len = slot_size;
        }
        batch
    }

    pub fn slots(&self) -> usize {
        self.received.len()
    }

    /// Receives up to `slots()` datagrams. Without `wait` it never blocks; with `wait` (on a blocking
    /// socket) it sleeps until the first datagram or the socket's receive timeout, then takes what
    /// else is queued without blocking (MSG_WAITFORONE). Returns how many arrived (0 when none).
    pub fn recv(&mut self, fd: RawFd, wait: bool) -> io::Result<usize> {
        let n_slots = self.slots();
        for i in 0..n_slots {
            let hdr = &mut self.recv_hdrs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.recv_iov[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
        self.filled = 0;
        // SAFETY: every header points at a live sockaddr_storage and a live iovec of slot_size bytes
        // inside self; the kernel writes at most those lengths. n_slots is the headers' length.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.recv_hdrs.as_mut_ptr(),
                n_slots as libc::c_uint,
                if wait {
                    libc::MSG_WAITFORONE
                } else {
                    libc::MSG_DONTWAIT
                },
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        let n = n as usize;
        self.filled = n;
        for i in 0..n {
            let hdr = &self.recv_hdrs[i];
            let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.received[i] = ((hdr.msg_len as usize).min(self.slot_size), truncated);
        }
        Ok(n)
    }

    /// The source port of slot `i` of the last receive (None for a slot that holds no inet address).
    pub fn source_port(&self, i: usize) -> Option<u16> {
        let addr = self.addrs.get(i)?;
        let port_be = match i32::from(addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into this sockaddr_storage,
                // which is larger and suitably aligned for it.
                let v4 = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                v4.sin_port
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6 (family AF_INET6).
                let v6 = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                v6.sin6_port
            }
            _ => return None,
        };
        Some(u16::from_be(port_be))
    }

    /// Slot `i` of the last receive: its bytes (mutable, replies are written in place) and whether the
    /// kernel cut the datagram because it was longer than a slot.
    pub fn datagram(&mut self, i: usize) -> (&mut [u8], bool) {
        let (len, truncated) = self.received[i];
        let start = i * self.slot_size;
        (&mut self.data[start..start + len], truncated)
    }

    /// Sends replies in place: `replies` lists (slot, reply length) pairs; each goes back to the
    /// address slot `slot` came from. Retries short batches; a reply the kernel refuses with an error
    /// other than would-block is skipped. An entry naming a slot the last receive did not fill, or a
    /// length beyond the slot size, is never handed to the kernel: it counts as refused. Returns (sent, sent bytes,
    /// refused).
    pub fn send(&mut self, fd: RawFd, replies: &[(u16, u16)]) -> (usize, usize, usize) {
        let data = self.data.as_mut_ptr();
        let mut n = 0;
        let mut invalid = 0;
        for &(slot, len) in replies {
            let (slot, len) = (slot as usize, len as usize);
            if slot >= self.filled || len > self.slot_size || n == self.slots() {
                invalid += 1;
                continue;
            }
            let k = n;
            n += 1;
            // SAFETY: slot < filled <= slots was checked above, so slot * slot_size + len <= slots * slot_size,
            // the length of data: the iovec lies inside the buffer.
            self.send_iov[k].iov_base = unsafe { data.add(slot * self.slot_size) }.cast();
            self.send_iov[k].iov_len = len;
            let hdr = &mut self.send_hdrs[k].msg_hdr;
            hdr.msg_name = (&mut self.addrs[slot] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = self.recv_hdrs[slot].msg_hdr.msg_namelen;
            hdr.msg_iov = &mut self.send_iov[k];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
        let (mut sent, mut bytes, mut refused) = (0usize, 0usize, invalid);
        let mut start = 0;
        let mut would_block_rounds = 0;
        while start < n {
            // SAFETY: headers start..n are initialised above and point into self's live buffers.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.send_hdrs[start..].as_mut_ptr(),
                    (n - start) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                let r = r as usize;
                for k in start..start + r {
                    bytes += self.send_iov[k].iov_len;
                }
                sent += r;
                start += r;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock if would_block_rounds < 100 => {
                    // The socket's send buffer is full: wait for room rather than lose a reply.
                    would_block_rounds += 1;
                    wait_writable(fd, 10);
                }
                _ => {
                    // This datagram is refused (unreachable address, buffer still full): skip it.
                    refused += 1;
                    start += 1;
                }
            }
        }
        (sent, bytes, refused)
    }
}

/// Sleeps until `fd` is readable or `timeout_ms` passes.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, count 1.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// Enables socket busy polling: SO_PREFER_BUSY_POLL, SO_BUSY_POLL (microseconds) and, when given,
/// SO_BUSY_POLL_BUDGET (packets per poll). Minimum kernel 5.11 for the last two.
pub fn set_busy_poll(fd: RawFd, usecs: u32, budget: Option<u32>) -> io::Result<()> {
    const SO_PREFER_BUSY_POLL: libc::c_int = 69;
    const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
    let set = |opt: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: value is a live c_int on the stack and its exact size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    set(SO_PREFER_BUSY_POLL, 1)?;
    set(libc::SO_BUSY_POLL, usecs as libc::c_int)?;
    if let Some(budget) = budget {
        set(SO_BUSY_POLL_BUDGET, budget as libc::c_int)?;
    }
    Ok(())
}

fn wait_writable(fd: RawFd, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, count 1.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// Blocks the signals `serve` handles itself (SIGINT, SIGTERM, SIGQUIT, SIGHUP) in the calling thread
/// and every thread it spawns afterwards, so they are taken only by [`wait_for_signal`] and none of
/// them kills the process by default.
pub fn block_handled_signals() -> io::Result<()> {
    handled_signals().thread_block()?;
    Ok(())
}

fn handled_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal;
    let mut set = nix::sys::signal::SigSet::empty();
    for signal in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGQUIT,
        Signal::SIGHUP,
    ] {
        set.add(signal);
    }
    set
}

/// Waits up to `timeout` for one of the handled signals (blocked beforehand); returns it.
pub fn wait_for_signal(timeout: std::time::Duration) -> Option<nix::sys::signal::Signal> {
    let set = handled_signals();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set is a valid sigset_t, the info pointer may be null, ts is a valid timespec.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (r > 0)
        .then(|| nix::sys::signal::Signal::try_from(r).ok())
        .flatten()
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> io::Result<Vec<CpuId>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .map(CpuId)
        .collect())
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: CpuId) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu.0)
        .map_err(|_| io::Error::other(format!("CPU {cpu} is beyond the kernel's CPU set size")))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Switches the calling thread to SCHED_FIFO at `priority` (1..=99).
pub fn set_fifo_priority(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; param is a valid sched_param on the stack.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switches the calling thread, and only it, to `uid` and `gid` with `gid` as its only group. The raw
/// system calls act on one thread (glibc's wrappers would signal every thread to follow); each
/// thread of set-up calls this itself (see `privilege`).
pub fn set_thread_ids(uid: u32, gid: u32) -> io::Result<()> {
    let groups = [gid];
    let check = |r: libc::c_long| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: setgroups reads one gid_t from `groups`, which lives on this stack frame.
    check(unsafe { libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) })?;
    // SAFETY: setresgid and setresuid take plain integers and touch no memory of ours.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })
}

/// Locks all current and future pages in memory.
pub fn lock_all_memory() -> io::Result<()> {
    nix::sys::mman::mlockall(
        nix::sys::mman::MlockAllFlags::MCL_CURRENT | nix::sys::mman::MlockAllFlags::MCL_FUTURE,
    )?;
    Ok(())
}

/// Gives the heap memory glibc keeps after frees back to the kernel, in every arena. For after a
/// one-off burst of allocations, such as a CPU profile's symbolization: freed memory below a live
/// allocation otherwise stays resident for the life of the process. A no-op on other C libraries.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

#[cfg(test)]
mod test {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_receives_and_replies_in_place() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        client.send(b"hello").unwrap();
        client.send(&[7u8; 40]).unwrap();
        let mut batch = MmsgBatch::new(4, 32);
        let mut n = 0;
        for _ in 0..100 {
            n += batch.recv(server.as_raw_fd(), false).unwrap();
            if n == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(n, 2);
        let (first, cut) = batch.datagram(0);
        assert_eq!((&*first, cut), (&b"hello"[..], false));
        first.copy_from_slice(b"HELLO");
        let (second, cut) = batch.datagram(1);
        assert_eq!((second.len(), cut), (32, true));
        assert_eq!(batch.send(server.as_raw_fd(), &[(0, 5)]), (1, 5, 0));
        let mut buf = [0u8; 16];
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let got = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"HELLO");
    }

    #[test]
    fn send_refuses_entries_outside_the_batch() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        client.send(b"ping").unwrap();
        let mut batch = MmsgBatch::new(2, 32);
        let mut n = 0;
        for _ in 0..100 {
            n += batch.recv(server.as_raw_fd(), false).unwrap();
            if n == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(n, 1);
        // A slot beyond the batch, a slot the receive did not fill (no peer address) and a length
        // beyond the slot never reach the kernel.
        assert_eq!(
            batch.send(server.as_raw_fd(), &[(2, 4), (1, 4), (0, 33)]),
            (0, 0, 3)
        );
        // A valid entry beside them still goes out.
        assert_eq!(batch.send(server.as_raw_fd(), &[(7, 1), (0, 4)]), (1, 4, 1));
        let mut buf = [0u8; 16];
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let got = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"ping");
    }
}
