//! `ConversionWorkers` and `Ticket`: Python handles over the core worker pool.
//!
//! Every argument is extracted and validated while attached to the interpreter (tensor
//! pointers, shapes, dtypes), then the interpreter is released around anything that can
//! block: submitting to a full queue, waiting on tickets, shutdown. Worker threads never
//! touch Python objects except to drop the job's keep-alive (the tensors), which pyo3 defers
//! to the next time a thread holds the interpreter.

use std::sync::Arc;

use freekv_core::{ConversionJob, ConversionWorkers, CudaEventHandle, RawBuffer, Ticket};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::{layout, to_py};
use crate::pool::{page_ids as parse_ids, PyHostPagePool};
use crate::tensor::{cpu_tensor, TensorArg};

/// Completion handle of one conversion job.
#[pyclass(frozen, module = "freekv_sglang._native", name = "Ticket")]
pub struct PyTicket {
    inner: Ticket,
}

#[pymethods]
impl PyTicket {
    /// Blocks (without holding the GIL) until the job finishes; raises its error.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let t = self.inner.clone();
        py.detach(move || t.wait()).map_err(to_py)
    }
    /// Whether the job has finished, successfully or not.
    fn done(&self) -> bool {
        self.inner.done()
    }
}

/// Waits for every ticket (without holding the GIL), then raises the first error, if any.
#[pyfunction]
pub fn wait_all(py: Python<'_>, tickets: Vec<PyRef<'_, PyTicket>>) -> PyResult<()> {
    let ts: Vec<Ticket> = tickets.iter().map(|t| t.inner.clone()).collect();
    py.detach(move || {
        let mut first = Ok(());
        for t in &ts {
            let r = t.wait();
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
    .map_err(to_py)
}

/// Threads converting page layers between NHD token rows and HND host pages.
#[pyclass(frozen, module = "freekv_sglang._native", name = "ConversionWorkers")]
pub struct PyConversionWorkers {
    inner: Arc<ConversionWorkers>,
    pool: Py<PyHostPagePool>,
}

impl PyConversionWorkers {
    fn kv_pair(
        &self,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        names: (&str, &str),
    ) -> PyResult<(TensorArg, TensorArg)> {
        let g = *self.inner.pool().geometry();
        let k = cpu_tensor(k, names.0, g.dtype())?;
        let v = cpu_tensor(v, names.1, g.dtype())?;
        for t in [&k, &v] {
            let ok =
                t.shape.len() == 3 && t.shape[1] == g.num_kv_heads() && t.shape[2] == g.head_dim();
            if !ok {
                return Err(layout(format!(
                    "{} and {} must be [tokens, {}, {}], got {:?} and {:?}",
                    names.0,
                    names.1,
                    g.num_kv_heads(),
                    g.head_dim(),
                    k.shape,
                    v.shape
                )));
            }
        }
        if k.shape != v.shape {
            return Err(layout(format!(
                "{} and {} shapes differ: {:?} vs {:?}",
                names.0, names.1, k.shape, v.shape
            )));
        }
        Ok((k, v))
    }

    fn submit(
        &self,
        py: Python<'_>,
        job: ConversionJob,
        keep: (Py<PyAny>, Py<PyAny>),
    ) -> PyResult<PyTicket> {
        let w = Arc::clone(&self.inner);
        let ticket = py
            .detach(move || w.submit(job, Some(Box::new(keep))))
            .map_err(to_py)?;
        Ok(PyTicket { inner: ticket })
    }
}

fn layer_index(layer: i64) -> PyResult<usize> {
    usize::try_from(layer).map_err(|_| layout(format!("layer must be non-negative, got {layer}")))
}

fn raw(t: &TensorArg) -> RawBuffer {
    // SAFETY: [1] `t.ptr..t.ptr+t.nbytes` is the storage of a live, contiguous CPU tensor
    // (checked by `cpu_tensor`); [2] the tensor object goes into the job's keep-alive, so the
    // storage stays allocated until the job is finished; [3] not writing the tensor (inputs)
    // or not touching it (outputs) while the job runs is the documented contract of the
    // submit methods, as for any asynchronous copy.
    unsafe { RawBuffer::new(t.ptr as *mut u8, t.nbytes) }
}

#[pymethods]
impl PyConversionWorkers {
    #[new]
    #[pyo3(signature = (pool, num_threads = None, queue_depth = 1024))]
    fn new(
        pool: Bound<'_, PyHostPagePool>,
        num_threads: Option<i64>,
        queue_depth: i64,
    ) -> PyResult<Self> {
        let threads = num_threads
            .map(|n| {
                usize::try_from(n)
                    .map_err(|_| layout(format!("num_threads must be positive, got {n}")))
            })
            .transpose()?;
        let depth = usize::try_from(queue_depth)
            .map_err(|_| layout(format!("queue_depth must be positive, got {queue_depth}")))?;
        let inner =
            ConversionWorkers::new(Arc::clone(&pool.get().inner), threads, depth).map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(inner),
            pool: pool.unbind(),
        })
    }

    #[getter]
    fn pool(&self, py: Python<'_>) -> Py<PyHostPagePool> {
        self.pool.clone_ref(py)
    }
    #[getter]
    fn num_threads(&self) -> usize {
        self.inner.num_threads()
    }
    #[getter]
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    /// Jobs queued and not yet started.
    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }

    /// Queues the conversion of ``k`` and ``v`` (CPU, contiguous, ``[tokens, num_kv_heads,
    /// head_dim]``, the pool's dtype) into layer ``layer`` of ``page_ids``: token ``i`` goes
    /// to page ``page_ids[i // page_size]`` row ``i % page_size``. With ``cuda_event`` (a
    /// ``torch.cuda.Event.cuda_event`` handle, recorded after the copy that fills ``k`` and
    /// ``v``) the job waits for that event first. The job keeps the tensors alive; do not
    /// write them until the ticket is done.
    #[pyo3(signature = (layer, k, v, page_ids, cuda_event = None))]
    fn submit_nhd_to_hnd(
        &self,
        py: Python<'_>,
        layer: i64,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        page_ids: Vec<i64>,
        cuda_event: Option<u64>,
    ) -> PyResult<PyTicket> {
        let (k, v) = self.kv_pair(k, v, ("k", "v"))?;
        let event = match cuda_event {
            None => None,
            Some(0) => return Err(layout("cuda_event must be a non-null handle".to_owned())),
            Some(e) => {
                let e = usize::try_from(e).map_err(|_| layout(format!("bad cuda_event {e}")))?;
                // SAFETY: [1] the caller passes `torch.cuda.Event.cuda_event` of a live event
                // (documented contract of this method); the worker only synchronizes on it.
                Some(unsafe { CudaEventHandle::new(e) })
            }
        };
        let job = ConversionJob::NhdToHnd {
            layer: layer_index(layer)?,
            k: raw(&k),
            v: raw(&v),
            pages: parse_ids(&page_ids)?,
            wait_event: event,
        };
        self.submit(py, job, (k.obj, v.obj))
    }

    /// Queues the reverse conversion: layer ``layer`` of ``page_ids`` into ``k_out`` and
    /// ``v_out`` (CPU, contiguous, ``[tokens, num_kv_heads, head_dim]``). Do not touch the
    /// outputs until the ticket is done.
    fn submit_hnd_to_nhd(
        &self,
        py: Python<'_>,
        layer: i64,
        page_ids: Vec<i64>,
        k_out: &Bound<'_, PyAny>,
        v_out: &Bound<'_, PyAny>,
    ) -> PyResult<PyTicket> {
        let (k, v) = self.kv_pair(k_out, v_out, ("k_out", "v_out"))?;
        let job = ConversionJob::HndToNhd {
            layer: layer_index(layer)?,
            pages: parse_ids(&page_ids)?,
            k_out: raw(&k),
            v_out: raw(&v),
        };
        self.submit(py, job, (k.obj, v.obj))
    }

    /// Waits for every ticket, then raises the first error, if any.
    fn wait_all(&self, py: Python<'_>, tickets: Vec<PyRef<'_, PyTicket>>) -> PyResult<()> {
        wait_all(py, tickets)
    }

    /// Stops the workers: pending jobs run first, or with ``cancel_pending`` fail with
    /// ``WorkerShutdownError``; running jobs finish; every thread is joined. Idempotent.
    #[pyo3(signature = (cancel_pending = false))]
    fn shutdown(&self, py: Python<'_>, cancel_pending: bool) {
        let w = Arc::clone(&self.inner);
        py.detach(move || w.shutdown(cancel_pending));
    }

    /// Whether ``shutdown`` has been called.
    #[getter]
    fn is_shut_down(&self) -> bool {
        self.inner.is_shut_down()
    }

    /// Test hook: the next ``next_n_jobs`` jobs picked up fail with ``JobFailedError``.
    fn inject_failure(&self, next_n_jobs: usize) {
        self.inner.inject_failure(next_n_jobs);
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Drains and joins on exit (cancels pending jobs when leaving with an exception).
    #[pyo3(signature = (*args))]
    fn __exit__(&self, py: Python<'_>, args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let raised = args.get_item(0).is_ok_and(|t| !t.is_none());
        self.shutdown(py, raised);
        Ok(false)
    }
}
