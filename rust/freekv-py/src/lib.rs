//! `freekv_sglang._native`: thin pyo3 bindings over `freekv-core`.
use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", freekv_core::VERSION)?;
    Ok(())
}
