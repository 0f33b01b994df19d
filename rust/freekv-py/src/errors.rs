//! One Python exception class per `FreeKvError` variant, all under `FreeKVError`.
//!
//! `to_py` is the only mapping from core errors to Python; every binding method returns
//! `PyResult` through it, so a caller can `except PoolExhaustedError:` and never has to parse
//! messages.

use freekv_core::FreeKvError;
use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

create_exception!(
    freekv_sglang._native,
    FreeKVError,
    PyRuntimeError,
    "Base class of every error raised by freekv_sglang._native."
);
create_exception!(
    freekv_sglang._native,
    InvalidGeometryError,
    FreeKVError,
    "A page geometry with a non-positive or overflowing dimension, or an unknown dtype."
);
create_exception!(
    freekv_sglang._native,
    AllocationError,
    FreeKVError,
    "The host arena (or a staging buffer) could not be mapped, or holds no page."
);
create_exception!(
    freekv_sglang._native,
    PoolExhaustedError,
    FreeKVError,
    "alloc() asked for more pages than are free; nothing was allocated."
);
create_exception!(
    freekv_sglang._native,
    StaleHandleError,
    FreeKVError,
    "A page id that was released (its generation is gone), out of range, or forged."
);
create_exception!(
    freekv_sglang._native,
    LayoutMismatchError,
    FreeKVError,
    "A tensor or index whose device, dtype, shape, contiguity or range does not fit the pool."
);
create_exception!(
    freekv_sglang._native,
    CudaError,
    FreeKVError,
    "A CUDA runtime call failed, or a CUDA event was given and no runtime is loaded."
);
create_exception!(
    freekv_sglang._native,
    NumaNodeError,
    FreeKVError,
    "An explicitly requested NUMA node is not online on this host (or is not a node number)."
);
create_exception!(
    freekv_sglang._native,
    NumaBindError,
    FreeKVError,
    "Binding host memory to an explicitly requested NUMA node failed (mbind)."
);
create_exception!(
    freekv_sglang._native,
    WorkerShutdownError,
    FreeKVError,
    "Submission to, or a cancelled job of, conversion workers that are shut down."
);
create_exception!(
    freekv_sglang._native,
    JobFailedError,
    FreeKVError,
    "A conversion job failed while running (its message says why)."
);
create_exception!(
    freekv_sglang._native,
    InvariantViolationError,
    FreeKVError,
    "check_invariants() found the pool's bookkeeping inconsistent (a bug)."
);

/// Maps a core error to its Python exception.
pub fn to_py(e: FreeKvError) -> PyErr {
    let msg = e.to_string();
    match e {
        FreeKvError::InvalidGeometry(_) => InvalidGeometryError::new_err(msg),
        FreeKvError::Allocation(_) => AllocationError::new_err(msg),
        FreeKvError::PoolExhausted { .. } => PoolExhaustedError::new_err(msg),
        FreeKvError::StaleHandle { .. } => StaleHandleError::new_err(msg),
        FreeKvError::LayoutMismatch(_) => LayoutMismatchError::new_err(msg),
        FreeKvError::Cuda { .. } => CudaError::new_err(msg),
        FreeKvError::NumaNodeUnavailable { .. } => NumaNodeError::new_err(msg),
        FreeKvError::NumaBind { .. } => NumaBindError::new_err(msg),
        FreeKvError::WorkerShutdown => WorkerShutdownError::new_err(msg),
        FreeKvError::JobFailed(_) => JobFailedError::new_err(msg),
        FreeKvError::InvariantViolation(_) => InvariantViolationError::new_err(msg),
    }
}

/// A `LayoutMismatchError` with a message.
pub fn layout(msg: String) -> PyErr {
    LayoutMismatchError::new_err(format!("layout mismatch: {msg}"))
}

/// Registers the exception classes on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FreeKVError", py.get_type::<FreeKVError>())?;
    m.add(
        "InvalidGeometryError",
        py.get_type::<InvalidGeometryError>(),
    )?;
    m.add("AllocationError", py.get_type::<AllocationError>())?;
    m.add("PoolExhaustedError", py.get_type::<PoolExhaustedError>())?;
    m.add("StaleHandleError", py.get_type::<StaleHandleError>())?;
    m.add("LayoutMismatchError", py.get_type::<LayoutMismatchError>())?;
    m.add("CudaError", py.get_type::<CudaError>())?;
    m.add("NumaNodeError", py.get_type::<NumaNodeError>())?;
    m.add("NumaBindError", py.get_type::<NumaBindError>())?;
    m.add("WorkerShutdownError", py.get_type::<WorkerShutdownError>())?;
    m.add("JobFailedError", py.get_type::<JobFailedError>())?;
    m.add(
        "InvariantViolationError",
        py.get_type::<InvariantViolationError>(),
    )?;
    Ok(())
}
