//! `PageGeometry`, `HostPagePool` and `StagingBuffer`: thin wrappers over freekv-core.
//!
//! Page ids cross into Python as plain ints (the packed `(generation << 32) | slot`, always
//! a positive int64). Bookkeeping calls take the core pool's mutex for a few hundred
//! nanoseconds and do not release the GIL; mapping and pinning a new arena does.

use std::sync::Arc;

use freekv_core::{DType, HostPagePool, Kv, PageGeometry, PageId, PinOptions, PinnedRegion};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::errors::{to_py, InvalidGeometryError};
use crate::numa::{numa_placement, numa_policy, NumaArg};
use crate::tensor;

/// Shape of one host page: ``[num_layers][num_kv_heads][K|V][page_size][head_dim]``.
#[pyclass(frozen, module = "freekv_sglang._native", name = "PageGeometry")]
pub struct PyPageGeometry {
    pub inner: PageGeometry,
}

fn positive(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| InvalidGeometryError::new_err(format!("{name} must be positive, got {v}")))
}

fn index(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v)
        .map_err(|_| crate::errors::layout(format!("{name} must be non-negative, got {v}")))
}

#[pymethods]
impl PyPageGeometry {
    #[new]
    fn new(
        num_layers: i64,
        num_kv_heads: i64,
        page_size: i64,
        head_dim: i64,
        dtype: &str,
    ) -> PyResult<Self> {
        let inner = PageGeometry::new(
            positive("num_layers", num_layers)?,
            positive("num_kv_heads", num_kv_heads)?,
            positive("page_size", page_size)?,
            positive("head_dim", head_dim)?,
            DType::from_name(dtype).map_err(to_py)?,
        )
        .map_err(to_py)?;
        Ok(Self { inner })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.inner.num_kv_heads()
    }
    #[getter]
    fn page_size(&self) -> usize {
        self.inner.page_size()
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim()
    }
    /// The torch dtype name (``"bfloat16"``, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype().name()
    }
    #[getter]
    fn elem_size(&self) -> usize {
        self.inner.elem_size()
    }
    /// Bytes of one page (all layers).
    #[getter]
    fn page_bytes(&self) -> usize {
        self.inner.page_bytes()
    }
    /// Bytes of one (layer, kv_head) K+V chunk.
    #[getter]
    fn chunk_bytes(&self) -> usize {
        self.inner.chunk_bytes()
    }
    /// Bytes of one layer of a page.
    #[getter]
    fn layer_bytes(&self) -> usize {
        self.inner.layer_bytes()
    }

    /// Byte offset inside a page of the K (``kv=0``) or V (``kv=1``) block of
    /// (``layer``, ``kv_head``).
    fn offset(&self, layer: i64, kv_head: i64, kv: i64) -> PyResult<usize> {
        let kv = Kv::from_index(index("kv", kv)?).map_err(to_py)?;
        self.inner
            .offset(index("layer", layer)?, index("kv_head", kv_head)?, kv)
            .map_err(to_py)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Self>()
            .is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.hash(&mut h);
        h.finish()
    }

    fn __repr__(&self) -> String {
        let g = &self.inner;
        format!(
            "PageGeometry(num_layers={}, num_kv_heads={}, page_size={}, head_dim={}, dtype='{}')",
            g.num_layers(),
            g.num_kv_heads(),
            g.page_size(),
            g.head_dim(),
            g.dtype().name()
        )
    }
}

/// Converts Python ints to page ids (negative ints cannot be ids: stale).
pub fn page_ids(ids: &[i64]) -> PyResult<Vec<PageId>> {
    ids.iter()
        .map(|&raw| {
            u64::try_from(raw).map(PageId::from_raw).map_err(|_| {
                to_py(freekv_core::FreeKvError::StaleHandle {
                    id: raw as u64,
                    reason: "negative id".to_owned(),
                })
            })
        })
        .collect()
}

fn to_ints(ids: &[PageId]) -> Vec<i64> {
    // Ids are below 2^63 by construction (generation <= 2^31 - 1).
    ids.iter().map(|id| id.raw() as i64).collect()
}

/// The host arena of KV pages: a fixed number of pages, handed out as generation-checked
/// integer ids with reference counts. Pinned for the GPU when a CUDA device is present.
#[pyclass(frozen, module = "freekv_sglang._native", name = "HostPagePool")]
pub struct PyHostPagePool {
    pub inner: Arc<HostPagePool>,
    geometry: Py<PyPageGeometry>,
    arena: PyOnceLock<Py<PyAny>>,
}

impl PyHostPagePool {
    fn arena<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let t = self.arena.get_or_try_init(py, || {
            let g = self.inner.geometry();
            let flat = tensor::pool_bytes(py, &self.inner)?;
            let shape = vec![
                self.inner.capacity_pages(),
                g.num_layers(),
                g.num_kv_heads(),
                2,
                g.page_size(),
                g.head_dim(),
            ];
            Ok::<_, PyErr>(tensor::torch_view(&flat, g.dtype(), shape)?.unbind())
        })?;
        Ok(t.bind(py).clone())
    }
}

#[pymethods]
impl PyHostPagePool {
    #[new]
    #[pyo3(
        signature = (
            geometry, capacity_bytes, pin = true, huge_pages = false, device = 0,
            numa = NumaArg::device()
        ),
        text_signature = "(geometry, capacity_bytes, pin=True, huge_pages=False, device=0, \
                          numa='device')"
    )]
    fn new(
        py: Python<'_>,
        geometry: Bound<'_, PyPageGeometry>,
        capacity_bytes: i64,
        pin: bool,
        huge_pages: bool,
        device: i32,
        numa: Option<NumaArg>,
    ) -> PyResult<Self> {
        let g = geometry.get().inner;
        let bytes = usize::try_from(capacity_bytes).map_err(|_| {
            crate::errors::AllocationError::new_err(format!(
                "capacity_bytes must be non-negative, got {capacity_bytes}"
            ))
        })?;
        let opts = PinOptions {
            pin,
            huge_pages,
            device,
            numa: numa_placement(numa)?,
        };
        let inner = py
            .detach(|| HostPagePool::new(g, bytes, opts))
            .map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(inner),
            geometry: geometry.unbind(),
            arena: PyOnceLock::new(),
        })
    }

    #[getter]
    fn geometry(&self, py: Python<'_>) -> Py<PyPageGeometry> {
        self.geometry.clone_ref(py)
    }
    #[getter]
    fn capacity_pages(&self) -> usize {
        self.inner.capacity_pages()
    }
    #[getter]
    fn used_pages(&self) -> usize {
        self.inner.used_pages()
    }
    #[getter]
    fn free_pages(&self) -> usize {
        self.inner.free_pages()
    }
    /// Whether the arena is registered with CUDA (False on a host without a GPU).
    #[getter]
    fn is_pinned(&self) -> bool {
        self.inner.is_pinned()
    }
    /// CUDA device ordinal of the pool: current while the arena is pinned and unpinned, and
    /// while conversion workers wait on job events.
    #[getter]
    fn device(&self) -> i32 {
        self.inner.device()
    }
    /// NUMA node the arena's pages are bound to, or None (see ``numa_placement``).
    #[getter]
    fn numa_node(&self) -> Option<u32> {
        self.inner.numa().node
    }
    /// The memory policy of that binding (``"MPOL_BIND"``, ``"MPOL_PREFERRED"``), or None.
    #[getter]
    fn numa_policy(&self) -> Option<&'static str> {
        numa_policy(self.inner.numa())
    }
    /// Why the arena is on ``numa_node``, or why it is on no node in particular (for a log
    /// line: ``"GPU 1's node, PCI 0000:3b:00.0, MPOL_PREFERRED"``, ``"single NUMA node"``).
    #[getter]
    fn numa_placement(&self) -> String {
        self.inner.numa().detail.clone()
    }

    /// Allocates ``n`` pages (reference count 1 each); all or nothing.
    fn alloc(&self, n: i64) -> PyResult<Vec<i64>> {
        let n = usize::try_from(n)
            .map_err(|_| crate::errors::layout(format!("n must be non-negative, got {n}")))?;
        self.inner.alloc(n).map(|ids| to_ints(&ids)).map_err(to_py)
    }
    /// Adds one holder to each id.
    fn retain(&self, ids: Vec<i64>) -> PyResult<()> {
        self.inner.retain(&page_ids(&ids)?).map_err(to_py)
    }
    /// Drops one holder from each id; returns how many pages were freed.
    fn release(&self, ids: Vec<i64>) -> PyResult<usize> {
        self.inner.release(&page_ids(&ids)?).map_err(to_py)
    }
    /// Current number of holders of a live id.
    fn refcount(&self, id: i64) -> PyResult<u32> {
        self.inner.refcount(page_ids(&[id])?[0]).map_err(to_py)
    }
    /// Arena slot of a live id (the first axis of ``arena_view()``).
    fn index_of(&self, id: i64) -> PyResult<usize> {
        self.inner.index_of(page_ids(&[id])?[0]).map_err(to_py)
    }
    /// Arena slots of live ids, in order, validated under one lock (one call for a batch of
    /// pages instead of one per page).
    fn indices_of(&self, ids: Vec<i64>) -> PyResult<Vec<usize>> {
        self.inner.indices_of(&page_ids(&ids)?).map_err(to_py)
    }
    /// Raises ``InvariantViolationError`` if the free list and reference counts disagree.
    fn check_invariants(&self) -> PyResult<()> {
        self.inner.check_invariants().map_err(to_py)
    }

    /// The whole arena as a tensor ``[capacity_pages, num_layers, num_kv_heads, 2,
    /// page_size, head_dim]`` of the pool's dtype, aliasing the pool's memory.
    fn arena_view<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.arena(py)
    }

    /// One live page as a tensor ``[num_layers, num_kv_heads, 2, page_size, head_dim]``,
    /// aliasing the pool's memory.
    fn page_view<'py>(&self, py: Python<'py>, id: i64) -> PyResult<Bound<'py, PyAny>> {
        let slot = self.index_of(id)?;
        self.arena(py)?.get_item(slot)
    }

    fn __repr__(&self) -> String {
        format!(
            "HostPagePool(capacity_pages={}, used_pages={}, page_bytes={}, is_pinned={})",
            self.inner.capacity_pages(),
            self.inner.used_pages(),
            self.inner.geometry().page_bytes(),
            if self.inner.is_pinned() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// A page-aligned host buffer, pinned when a CUDA device is present: the staging area a
/// device-to-host copy fills before a conversion job reads it.
#[pyclass(frozen, module = "freekv_sglang._native", name = "StagingBuffer")]
pub struct PyStagingBuffer {
    region: Arc<PinnedRegion>,
}

#[pymethods]
impl PyStagingBuffer {
    #[new]
    #[pyo3(
        signature = (nbytes, pin = true, device = 0, numa = NumaArg::device()),
        text_signature = "(nbytes, pin=True, device=0, numa='device')"
    )]
    fn new(
        py: Python<'_>,
        nbytes: i64,
        pin: bool,
        device: i32,
        numa: Option<NumaArg>,
    ) -> PyResult<Self> {
        let n = usize::try_from(nbytes).map_err(|_| {
            crate::errors::AllocationError::new_err(format!(
                "nbytes must be non-negative, got {nbytes}"
            ))
        })?;
        let opts = PinOptions {
            pin,
            huge_pages: false,
            device,
            numa: numa_placement(numa)?,
        };
        let region = py.detach(|| PinnedRegion::new(n, opts)).map_err(to_py)?;
        Ok(Self {
            region: Arc::new(region),
        })
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.region.len()
    }
    #[getter]
    fn is_pinned(&self) -> bool {
        self.region.is_pinned()
    }
    /// CUDA device ordinal the buffer is pinned for.
    #[getter]
    fn device(&self) -> i32 {
        self.region.device()
    }
    /// NUMA node the buffer's pages are bound to, or None (see ``numa_placement``).
    #[getter]
    fn numa_node(&self) -> Option<u32> {
        self.region.numa().node
    }
    /// The memory policy of that binding, or None.
    #[getter]
    fn numa_policy(&self) -> Option<&'static str> {
        numa_policy(self.region.numa())
    }
    /// Why the buffer is on ``numa_node``, or why on no node in particular.
    #[getter]
    fn numa_placement(&self) -> String {
        self.region.numa().detail.clone()
    }
    /// The buffer as a flat tensor of ``dtype`` (default uint8), aliasing its memory.
    #[pyo3(signature = (dtype = "uint8"))]
    fn view<'py>(&self, py: Python<'py>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
        let flat = tensor::region_bytes(py, &self.region)?;
        if dtype == "uint8" {
            return Ok(flat);
        }
        let d = DType::from_name(dtype).map_err(to_py)?;
        let n = self.region.len() / d.size();
        tensor::torch_view(
            &flat.call_method1("narrow", (0, 0, n * d.size()))?,
            d,
            vec![n],
        )
    }
}
