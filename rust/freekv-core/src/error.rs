//! The one error type of the crate.
//!
//! Every fallible operation returns [`Result<T>`]. The Python binding maps each variant to one
//! exception class (`freekv-py/src/errors.rs`), so a variant is a *kind* a caller can handle,
//! and its fields carry what a log line needs. The type is `Clone` because a failed conversion
//! job hands the same error to every waiter of its ticket.

/// Errors of the host KV pool, the page layout and the conversion workers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreeKvError {
    /// A page geometry with a zero or overflowing dimension, or an unknown dtype.
    #[error("invalid page geometry: {0}")]
    InvalidGeometry(String),
    /// The host arena could not be mapped, or the requested size holds no page.
    #[error("host allocation failed: {0}")]
    Allocation(String),
    /// `alloc` asked for more pages than are free. Nothing was allocated.
    #[error("host page pool exhausted: requested {requested} pages, {free} free of {capacity}")]
    PoolExhausted {
        /// Pages asked for.
        requested: usize,
        /// Pages free at the time of the call.
        free: usize,
        /// Pages in the pool.
        capacity: usize,
    },
    /// A page id whose generation is not the slot's current one (freed, reused or forged).
    #[error("stale page id {id:#x}: {reason}")]
    StaleHandle {
        /// The packed id as passed in.
        id: u64,
        /// What was wrong with it.
        reason: String,
    },
    /// A buffer or argument whose shape, size, dtype or index does not match the geometry.
    #[error("layout mismatch: {0}")]
    LayoutMismatch(String),
    /// A CUDA runtime call failed (or the runtime is needed and missing: `code` is -1).
    #[error("CUDA {op} failed with error {code}: {message}")]
    Cuda {
        /// The runtime function.
        op: String,
        /// The `cudaError_t` value, or -1 when no runtime could be loaded.
        code: i32,
        /// `cudaGetErrorString`, or why the runtime is missing.
        message: String,
    },
    /// Submission to (or a pending job of) conversion workers that are shut down.
    #[error("conversion workers are shut down")]
    WorkerShutdown,
    /// An explicitly requested NUMA node is not online on this host.
    #[error("NUMA node {node} is not online (online nodes: {online})")]
    NumaNodeUnavailable {
        /// The node asked for.
        node: u32,
        /// The host's online nodes, in sysfs list form (`0-1`).
        online: String,
    },
    /// Binding a region to an explicitly requested NUMA node failed (`mbind`).
    #[error("binding host memory to NUMA node {node} failed: {message}")]
    NumaBind {
        /// The node asked for.
        node: u32,
        /// The system's error.
        message: String,
    },
    /// A conversion job failed while running (its error text, or a caught panic).
    #[error("conversion job failed: {0}")]
    JobFailed(String),
    /// An internal consistency check of the pool failed (a bug, reported by `check_invariants`).
    #[error("pool invariant violated: {0}")]
    InvariantViolation(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, FreeKvError>;
