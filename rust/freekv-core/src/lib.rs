//! freekv-core: the host side of FreeKV's KV offload (pure Rust, no Python, no SGLang).
//!
//! Module map, lowest layer first (a module only uses those above it in this list):
//!
//! - [`error`]: [`FreeKvError`], the one error type;
//! - [`layout`]: [`DType`], [`PageGeometry`] and the only stride arithmetic (pure);
//! - [`cuda`]: the dynamically loaded CUDA runtime (registration and event waits only, each
//!   with the pool's device current on the calling thread);
//! - [`numa`]: [`NumaPlacement`] and the node a region's pages should come from (sysfs, and
//!   a device's PCI bus id through [`cuda`]);
//! - [`pinned`]: [`PinnedRegion`], an mmap'd arena bound to its NUMA node (`mbind`) and
//!   pinned through [`cuda`] when a device is present;
//! - [`convert`]: NHD <-> HND conversion of one page layer on byte slices (pure, safe);
//! - [`pool`]: [`HostPagePool`], page ids with generations, reference counts;
//! - [`worker`]: [`ConversionWorkers`], a bounded job queue served by N threads.
//!
//! Tests: `cargo test -p freekv-core` (unit, property and stress tests; `tests/cuda_device.rs`
//! builds a stand-in `libcudart` from `tests/fake_cudart/` with the system C compiler and
//! loads it through `FREEKV_CUDART` to check every CUDA call on a host without CUDA), and
//! under Miri `cargo +nightly miri test -p freekv-core --lib` (there the arena comes from
//! the global allocator instead of mmap, CUDA is never loaded, sysfs is not read and `mbind`
//! is not called, and x86 streaming stores are off).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod convert;
pub mod cuda;
pub mod error;
pub mod layout;
pub mod numa;
pub mod pinned;
pub mod pool;
pub mod worker;

pub use error::{FreeKvError, Result};
pub use layout::{DType, Kv, PageGeometry};
pub use numa::{MemPolicy, NumaPlacement, NumaReport};
pub use pinned::{PinOptions, PinnedRegion};
pub use pool::{HostPagePool, PageId, PageTable};
pub use worker::{ConversionJob, ConversionWorkers, CudaEventHandle, RawBuffer, Ticket};

/// Crate version, exposed to Python for diagnostics.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
