//! Torch tensors in and out, without raw pointers crossing into Python.
//!
//! In: [`cpu_tensor`] reads `data_ptr`, `shape`, `dtype`, `device` and contiguity from the
//! tensor object itself (while attached to the interpreter) and rejects anything that does
//! not fit with `LayoutMismatchError`.
//!
//! Out: [`HostBytes`] exposes a host region (the pool's arena or a staging buffer) through
//! the buffer protocol; [`torch_view`] wraps it with `torch.frombuffer`, which keeps the
//! `HostBytes` object (and with it the region) alive for as long as any view of it exists.

use std::ffi::c_int;
use std::sync::Arc;

use freekv_core::{DType, HostPagePool, PinnedRegion};
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

use crate::errors::layout;

static TENSOR_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A validated CPU tensor argument.
pub struct TensorArg {
    /// `data_ptr()`.
    pub ptr: usize,
    /// `numel() * element_size()`.
    pub nbytes: usize,
    /// `shape`.
    pub shape: Vec<usize>,
    /// The tensor, to keep it alive while a job uses its memory.
    pub obj: Py<PyAny>,
}

/// Validates `t` as a contiguous CPU tensor of `dtype` and reads its memory description.
pub fn cpu_tensor(t: &Bound<'_, PyAny>, name: &str, dtype: DType) -> PyResult<TensorArg> {
    let py = t.py();
    let tensor_type = TENSOR_TYPE.import(py, "torch", "Tensor")?;
    if !t.is_instance(tensor_type)? {
        return Err(layout(format!(
            "{name} must be a torch.Tensor, got {}",
            t.get_type().name()?
        )));
    }
    let device: String = t.getattr("device")?.getattr("type")?.extract()?;
    if device != "cpu" {
        return Err(layout(format!(
            "{name} must be a CPU tensor, got device {device}"
        )));
    }
    let got: String = t.getattr("dtype")?.str()?.extract()?;
    if got.strip_prefix("torch.") != Some(dtype.name()) {
        return Err(layout(format!(
            "{name} must have dtype torch.{}, got {got}",
            dtype.name()
        )));
    }
    if !t.call_method0("is_contiguous")?.extract::<bool>()? {
        return Err(layout(format!("{name} must be contiguous")));
    }
    let shape: Vec<usize> = t.getattr("shape")?.extract()?;
    let nbytes: usize = t.getattr("nbytes")?.extract()?;
    let ptr: usize = t.call_method0("data_ptr")?.extract()?;
    Ok(TensorArg {
        ptr,
        nbytes,
        shape,
        obj: t.clone().unbind(),
    })
}

/// The memory behind a [`HostBytes`] object.
enum Owner {
    Pool(Arc<HostPagePool>),
    Region(Arc<PinnedRegion>),
}

/// A writable buffer-protocol view of a host region (internal: use `arena_view`,
/// `page_view` or `StagingBuffer.view`).
#[pyclass(frozen, module = "freekv_sglang._native", name = "_HostBytes")]
pub struct HostBytes {
    owner: Owner,
}

impl HostBytes {
    fn span(&self) -> (*mut u8, usize) {
        match &self.owner {
            Owner::Pool(p) => (p.arena_ptr().as_ptr(), p.arena_len()),
            Owner::Region(r) => (r.ptr().as_ptr(), r.len()),
        }
    }
}

#[pymethods]
impl HostBytes {
    /// Buffer protocol: one writable, C-contiguous run of bytes.
    ///
    /// # Safety
    /// 1. `view` is a valid `Py_buffer` to fill, as passed by the interpreter.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        let (ptr, len) = slf.get().span();
        let len = ffi::Py_ssize_t::try_from(len)
            .map_err(|_| PyBufferError::new_err("region too large for a buffer"))?;
        // SAFETY: [1] `view` is the interpreter's Py_buffer (contract of this method);
        // [2] `ptr..ptr+len` is the live region owned by `slf`, and PyBuffer_FillInfo takes
        // a reference to `slf`, so the region outlives the view; [3] readonly = 0 because
        // the region is plain writable memory.
        let rc = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 0, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(PyErr::fetch(slf.py()))
        }
    }
}

/// A flat `torch.uint8` tensor over the pool's arena (zero copy).
pub fn pool_bytes<'py>(py: Python<'py>, pool: &Arc<HostPagePool>) -> PyResult<Bound<'py, PyAny>> {
    frombuffer(
        py,
        HostBytes {
            owner: Owner::Pool(Arc::clone(pool)),
        },
    )
}

/// A flat `torch.uint8` tensor over a staging region (zero copy).
pub fn region_bytes<'py>(py: Python<'py>, r: &Arc<PinnedRegion>) -> PyResult<Bound<'py, PyAny>> {
    frombuffer(
        py,
        HostBytes {
            owner: Owner::Region(Arc::clone(r)),
        },
    )
}

fn frombuffer<'py>(py: Python<'py>, bytes: HostBytes) -> PyResult<Bound<'py, PyAny>> {
    let torch = py.import("torch")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", torch.getattr("uint8")?)?;
    torch.call_method("frombuffer", (Bound::new(py, bytes)?,), Some(&kwargs))
}

/// Reinterprets a flat uint8 tensor as `dtype` with `shape` (a view, no copy).
pub fn torch_view<'py>(
    flat: &Bound<'py, PyAny>,
    dtype: DType,
    shape: Vec<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let torch = flat.py().import("torch")?;
    let typed = flat.call_method1("view", (torch.getattr(dtype.name())?,))?;
    typed.call_method1("view", (shape,))
}
