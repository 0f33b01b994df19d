//! `freekv_sglang._native`: thin pyo3 bindings over `freekv-core`.
//!
//! Module map: `errors` (one exception class per error kind), `tensor` (torch tensors in,
//! zero-copy torch views out), `numa` (the `numa=` argument of pools and buffers), `pool`
//! (`PageGeometry`, `HostPagePool`, `StagingBuffer`), `workers` (`ConversionWorkers`,
//! `Ticket`, `wait_all`). Each `Py*` type wraps the core type and adds only argument
//! conversion and GIL handling.
#![deny(unsafe_op_in_unsafe_fn)]

mod errors;
mod numa;
mod pool;
mod tensor;
mod workers;

use pyo3::prelude::*;

/// Where the CUDA runtime was loaded from and how many devices it sees, or why none was.
#[pyfunction]
fn cuda_runtime_info() -> String {
    freekv_core::cuda::describe()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", freekv_core::VERSION)?;
    errors::register(m)?;
    m.add_class::<pool::PyPageGeometry>()?;
    m.add_class::<pool::PyHostPagePool>()?;
    m.add_class::<pool::PyStagingBuffer>()?;
    m.add_class::<workers::PyConversionWorkers>()?;
    m.add_class::<workers::PyTicket>()?;
    m.add_class::<tensor::HostBytes>()?;
    m.add_function(wrap_pyfunction!(workers::wait_all, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_runtime_info, m)?)?;
    Ok(())
}
