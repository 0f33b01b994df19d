//! `PinnedRegion`: one page-aligned anonymous mapping, page-locked for the GPU when a CUDA
//! device is present.
//!
//! Lifecycle: `new` maps (huge pages if asked and available, else normal pages with a
//! transparent-huge-page hint), binds the untouched pages to a NUMA node with `mbind` when
//! [`crate::numa`] plans one ([`PinOptions::numa`]; the outcome is [`PinnedRegion::numa`]),
//! then registers the whole region with `cudaHostRegister`
//! (portable + mapped) when [`crate::cuda::device_runtime`] finds a device. Registering and
//! unregistering run with the region's device ([`PinOptions::device`]) current on the
//! calling thread (see [`crate::cuda`]). `Drop` unregisters *before* unmapping: unpinning inside the kernel's teardown of a dying process
//! is slow and stalls SIGKILL, and CUDA must never hold a registration of unmapped memory.
//!
//! This module is the only place that turns mapped memory into an owned region; it hands
//! out a base pointer and a length, and the owner (the pool or a staging buffer) decides who
//! may touch which bytes.
#![allow(clippy::disallowed_methods)] // the one door for mmap/munmap/mbind

use std::ptr::NonNull;

use crate::cuda;
use crate::error::{FreeKvError, Result};
use crate::numa::{self, MemPolicy, NumaPlacement, NumaReport, Plan};

const HUGE_PAGE: usize = 2 << 20;

/// How to back and pin a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinOptions {
    /// Register with CUDA when a device is present (no-op without one).
    pub pin: bool,
    /// Try `MAP_HUGETLB` first (falls back silently to normal pages).
    pub huge_pages: bool,
    /// CUDA device ordinal the region is pinned for: current on the calling thread while it
    /// is registered and unregistered, and the device of the events waited on for it.
    pub device: i32,
    /// NUMA node of the pages (see [`crate::numa`]): by default the node of `device` when the
    /// region is pinned on a host with more than one node.
    pub numa: NumaPlacement,
}

impl Default for PinOptions {
    fn default() -> Self {
        Self {
            pin: true,
            huge_pages: false,
            device: 0,
            numa: NumaPlacement::Device,
        }
    }
}

/// An owned, zero-filled, page-aligned host mapping.
#[derive(Debug)]
pub struct PinnedRegion {
    ptr: NonNull<u8>,
    len: usize,
    mapped_len: usize,
    registered: Option<&'static cuda::CudaRuntime>,
    huge: bool,
    device: i32,
    numa: NumaReport,
}

// SAFETY: the region is plain memory owned by this value; the raw pointer is only an
// address. Moving ownership to another thread is sound, and shared access only hands out
// the address (whoever dereferences it carries its own safety argument).
unsafe impl Send for PinnedRegion {}
// SAFETY: `&PinnedRegion` exposes no interior mutation: only `ptr()`/`len()` (see Send).
unsafe impl Sync for PinnedRegion {}

fn os_page() -> usize {
    // SAFETY: [1] sysconf has no memory preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

#[cfg(not(miri))]
fn map(len: usize, extra: libc::c_int) -> Option<NonNull<u8>> {
    // SAFETY: [1] a fresh private anonymous mapping with no address hint aliases nothing;
    // [2] the result is checked against MAP_FAILED before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(p.cast())
    }
}

/// # Safety
/// 1. `ptr`/`len` are exactly a mapping returned by [`map`], unmapped at most once.
#[cfg(not(miri))]
unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: [1] caller's contract: exactly one live mapping from `map`.
    unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
}

/// Sets the memory policy of `len` bytes at `ptr` to `policy` on `node` (`mbind(2)`, no
/// flags: pages already present are not moved, which is why it runs before the first touch).
#[cfg(not(miri))]
fn bind(ptr: NonNull<u8>, len: usize, node: u32, policy: MemPolicy) -> std::io::Result<()> {
    const BITS: usize = libc::c_ulong::BITS as usize;
    let node = node as usize;
    let mut mask: Vec<libc::c_ulong> = vec![0; node / BITS + 1];
    mask[node / BITS] |= 1 << (node % BITS);
    // The kernel reads `maxnode - 1` bits of the mask: pass one more than it holds.
    let maxnode = mask.len() * BITS + 1;
    // SAFETY: [1] `ptr..ptr+len` is a mapping owned by the caller, page-aligned (mmap's
    // result); [2] `mask` is readable for `maxnode - 1` bits and outlives the call; [3] mbind
    // only changes the policy of that range and writes no caller memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr.as_ptr(),
            len,
            policy.mode(),
            mask.as_ptr(),
            maxnode,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// Miri cannot run syscalls (nor does the memory it hands out come untouched).
#[cfg(miri)]
fn bind(_ptr: NonNull<u8>, _len: usize, _node: u32, _policy: MemPolicy) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

// Miri cannot run mmap: the same zeroed, page-aligned memory from the global allocator, so
// the pool and the workers can be checked under Miri.
#[cfg(miri)]
fn map(len: usize, extra: libc::c_int) -> Option<NonNull<u8>> {
    if extra != 0 {
        return None;
    }
    let layout = std::alloc::Layout::from_size_align(len, os_page()).ok()?;
    // SAFETY: [1] `len > 0` (checked by `PinnedRegion::new`), so the layout is non-zero.
    NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
}

/// # Safety
/// 1. `ptr`/`len` are exactly an allocation returned by [`map`], freed at most once.
#[cfg(miri)]
unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
    let layout = std::alloc::Layout::from_size_align(len, os_page()).expect("valid in map");
    // SAFETY: [1] caller's contract: allocated by `map` with this very layout.
    unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
}

impl PinnedRegion {
    /// Maps `len` bytes (rounded up to the page size), places them on a NUMA node as
    /// [`PinOptions::numa`] says, and pins them if a device is present.
    ///
    /// # Errors
    /// [`FreeKvError::Allocation`] when `len` is zero or the mapping fails;
    /// [`FreeKvError::NumaNodeUnavailable`] / [`FreeKvError::NumaBind`] when an explicit
    /// NUMA node is not online / cannot be bound;
    /// [`FreeKvError::Cuda`] when a device is present and registration fails.
    pub fn new(len: usize, opts: PinOptions) -> Result<Self> {
        if len == 0 {
            return Err(FreeKvError::Allocation("region of 0 bytes".to_owned()));
        }
        // Miri cannot dlopen: never pin there.
        let runtime = if opts.pin && !cfg!(miri) {
            cuda::device_runtime()
        } else {
            None
        };
        let online = match opts.numa {
            NumaPlacement::None => Vec::new(),
            _ => numa::online_nodes(),
        };
        let plan = numa::plan(
            opts.numa,
            runtime.map(|rt| (rt, opts.device)),
            &online,
            numa::device_node,
        )?;
        let round = |unit: usize| len.checked_next_multiple_of(unit);
        let mut mapping = None;
        if opts.huge_pages {
            if let Some(l) = round(HUGE_PAGE) {
                mapping = map(l, libc::MAP_HUGETLB).map(|p| (p, l, true));
            }
        }
        if mapping.is_none() {
            let l = round(os_page()).ok_or_else(|| {
                FreeKvError::Allocation(format!("{len} bytes overflow when page-aligned"))
            })?;
            let p = map(l, 0).ok_or_else(|| {
                FreeKvError::Allocation(format!(
                    "mmap of {l} bytes failed: {}",
                    std::io::Error::last_os_error()
                ))
            })?;
            #[cfg(not(miri))]
            if opts.huge_pages {
                // SAFETY: [1] `p..p+l` is the mapping just created; madvise is only a hint
                // and its failure (no THP support) is harmless.
                unsafe { libc::madvise(p.as_ptr().cast(), l, libc::MADV_HUGEPAGE) };
            }
            mapping = Some((p, l, false));
        }
        let (ptr, mapped_len, huge) =
            mapping.ok_or_else(|| FreeKvError::Allocation("no mapping".to_owned()))?;
        let mut region = Self {
            ptr,
            len,
            mapped_len,
            registered: None,
            huge,
            device: opts.device,
            numa: NumaReport::unplaced(String::new()),
        };
        // Before registration faults the pages in; on error `region`'s drop unmaps.
        region.numa = match plan {
            Plan::Skip(detail) => NumaReport::unplaced(detail),
            Plan::Bind {
                node,
                policy,
                strict,
                detail,
            } => match bind(ptr, mapped_len, node, policy) {
                Ok(()) => NumaReport {
                    node: Some(node),
                    policy: Some(policy),
                    detail: format!("{detail}, {}", policy.name()),
                },
                Err(e) if strict => {
                    return Err(FreeKvError::NumaBind {
                        node,
                        message: format!("mbind: {e}"),
                    })
                }
                Err(e) => NumaReport::unplaced(format!(
                    "{detail}: mbind to node {node} failed ({e}); pages left to the default policy"
                )),
            },
        };
        if let Some(rt) = runtime {
            // SAFETY: [1] the region is a live mapping owned by `region`, not registered
            // yet; [2] `Drop` unregisters before unmapping (set `registered` below); on
            // error nothing is registered and `region`'s drop only unmaps.
            unsafe { rt.host_register(opts.device, ptr.as_ptr(), mapped_len) }?;
            region.registered = Some(rt);
        }
        Ok(region)
    }

    /// Base address (page-aligned).
    #[must_use]
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    /// Usable length in bytes (as requested).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true (zero-length regions are rejected); for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether the region is registered with CUDA.
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.registered.is_some()
    }
    /// CUDA device ordinal the region is pinned for ([`PinOptions::device`]).
    #[must_use]
    pub fn device(&self) -> i32 {
        self.device
    }
    /// Whether `MAP_HUGETLB` backs the region.
    #[must_use]
    pub fn is_huge(&self) -> bool {
        self.huge
    }
    /// The region's NUMA placement: node and policy, or why none.
    #[must_use]
    pub fn numa(&self) -> &NumaReport {
        &self.numa
    }
}

impl Drop for PinnedRegion {
    fn drop(&mut self) {
        if let Some(rt) = self.registered.take() {
            // SAFETY: [1] registered in `new` and still mapped; [2] the region is being
            // dropped, so its owner has no work in flight on it (owners keep it alive until
            // their transfers complete). A failure leaves it pinned until unmap: log only.
            if let Err(e) = unsafe { rt.host_unregister(self.device, self.ptr.as_ptr()) } {
                eprintln!("freekv: {e}");
            }
        }
        // SAFETY: [1] `ptr`/`mapped_len` are exactly the mapping created in `new`, and this
        // is the only unmap; [2] no reference into it outlives `self` (owners hand out
        // views that keep the owner alive).
        unsafe { unmap(self.ptr, self.mapped_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_aligned_memory() {
        let r = PinnedRegion::new(10_000, PinOptions::default()).unwrap();
        assert_eq!(r.ptr().as_ptr() as usize % os_page(), 0);
        assert_eq!(r.len(), 10_000);
        // SAFETY: [1] the region is live and 10_000 bytes long; [2] nothing else aliases it.
        let s = unsafe { std::slice::from_raw_parts(r.ptr().as_ptr(), r.len()) };
        assert!(s.iter().all(|&b| b == 0));
    }

    #[test]
    fn huge_page_request_falls_back() {
        let r = PinnedRegion::new(
            3 << 20,
            PinOptions {
                pin: false,
                huge_pages: true,
                ..PinOptions::default()
            },
        )
        .unwrap();
        assert!(!r.is_pinned());
        assert_eq!(r.len(), 3 << 20);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "Miri aborts on impossible allocations instead of failing"
    )]
    fn impossible_sizes_are_typed_errors() {
        assert!(matches!(
            PinnedRegion::new(0, PinOptions::default()),
            Err(FreeKvError::Allocation(_))
        ));
        assert!(matches!(
            PinnedRegion::new(usize::MAX - 10, PinOptions::default()),
            Err(FreeKvError::Allocation(_))
        ));
        assert!(matches!(
            PinnedRegion::new(1 << 62, PinOptions::default()),
            Err(FreeKvError::Allocation(_))
        ));
    }
}
