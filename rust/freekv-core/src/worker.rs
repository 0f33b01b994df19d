//! `ConversionWorkers`: N threads converting page layers between NHD rows and HND pages.
//!
//! Primitives and who calls them:
//!
//! - [`ConversionWorkers::submit`] (engine thread: the scheduler's offload path, the CPU
//!   recall path, tests) validates the job against the pool's geometry, takes one reference
//!   on every page it names (so no page can be freed and reissued while the job runs), and
//!   pushes it on a bounded queue, blocking while the queue is full. It returns a [`Ticket`].
//! - Worker threads pop jobs in FIFO order. An NHD -> HND job first waits on its CUDA event
//!   when it has one (the device-to-host copy into the pinned staging buffer it reads), with
//!   the pool's device ([`HostPagePool::device`]) current on the worker thread, then
//!   claims each (page, layer) it writes through the pool's claim guards and copies. Then it
//!   releases its page references, drops the job's keep-alive (the binding puts the source
//!   tensors there) and completes the ticket. A failing or panicking job completes its
//!   ticket with the error; the worker carries on.
//! - [`Ticket::wait`] blocks on the ticket's condition variable (the binding releases the GIL
//!   around it); it never hangs after shutdown, because shutdown completes every job.
//! - [`ConversionWorkers::shutdown`] closes the queue: new submissions fail with
//!   [`FreeKvError::WorkerShutdown`], blocked submitters wake and fail the same way; queued
//!   jobs are either run (drain) or completed with `WorkerShutdown` (cancel); then every
//!   thread is joined. `Drop` drains and joins.
//!
//! The queue lock protects only the queue and its `closed` flag; tickets have their own lock.
//! Worker threads never call back into the submitter. Threads do not survive `fork`: create
//! workers in the process that uses them.

use std::any::Any;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::convert;
use crate::cuda;
use crate::error::{FreeKvError, Result};
use crate::pool::{HostPagePool, PageId};

/// A caller-owned byte buffer a job reads (or writes) after `submit` returns.
#[derive(Debug)]
pub struct RawBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a RawBuffer is an address plus length whose validity the constructor's caller
// guarantees for the job's whole life, from whichever thread runs it (contract of `new`).
unsafe impl Send for RawBuffer {}

impl RawBuffer {
    /// Wraps `len` bytes at `ptr`.
    ///
    /// # Safety
    /// From the `submit` call that takes this buffer until that job's ticket completes:
    /// 1. `ptr..ptr+len` is valid for reads, and for writes when the buffer is a job output;
    /// 2. no other code writes those bytes, and for an output no other code reads them;
    /// 3. the memory stays allocated (for example, the owner goes in the job's keep-alive).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        Self {
            ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
            len,
        }
    }
    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A `cudaEvent_t` the job waits on before it reads its source.
#[derive(Debug)]
pub struct CudaEventHandle(*mut c_void);

// SAFETY: a cudaEvent_t is a process-wide handle, usable from any thread (CUDA runtime API);
// its lifetime is guaranteed by the contract of `CudaEventHandle::new`.
unsafe impl Send for CudaEventHandle {}

impl CudaEventHandle {
    /// Wraps a raw event handle.
    ///
    /// # Safety
    /// 1. `raw` is a `cudaEvent_t` of this process (e.g. `torch.cuda.Event.cuda_event` of a
    ///    recorded event), and stays alive until the job's ticket completes.
    #[must_use]
    pub unsafe fn new(raw: usize) -> Self {
        Self(raw as *mut c_void)
    }
}

/// One conversion of one layer over a list of pages. Token `i` of the NHD side is row
/// `i % page_size` of page `pages[i / page_size]`; `pages.len()` must be
/// `ceil(tokens / page_size)`, and the NHD buffers hold exactly `tokens` rows.
#[derive(Debug)]
pub enum ConversionJob {
    /// NHD token rows (`[tokens][kv_head][head_dim]` K and V) into HND host pages.
    NhdToHnd {
        /// Layer of the pages to write.
        layer: usize,
        /// Source keys.
        k: RawBuffer,
        /// Source values.
        v: RawBuffer,
        /// Destination pages.
        pages: Vec<PageId>,
        /// Event to wait on before reading `k` and `v`.
        wait_event: Option<CudaEventHandle>,
    },
    /// HND host pages into NHD token rows.
    HndToNhd {
        /// Layer of the pages to read.
        layer: usize,
        /// Source pages.
        pages: Vec<PageId>,
        /// Destination keys.
        k_out: RawBuffer,
        /// Destination values.
        v_out: RawBuffer,
    },
}

impl ConversionJob {
    fn pages(&self) -> &[PageId] {
        match self {
            ConversionJob::NhdToHnd { pages, .. } | ConversionJob::HndToNhd { pages, .. } => pages,
        }
    }
}

#[derive(Debug, Default)]
struct TicketState {
    result: Mutex<Option<Result<()>>>,
    done: Condvar,
}

/// Completion handle of a submitted job. Cloning shares the same completion.
#[derive(Debug, Clone)]
pub struct Ticket(Arc<TicketState>);

impl Ticket {
    fn new() -> Self {
        Self(Arc::default())
    }
    fn lock(&self) -> MutexGuard<'_, Option<Result<()>>> {
        self.0.result.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn complete(&self, r: Result<()>) {
        *self.lock() = Some(r);
        self.0.done.notify_all();
    }
    /// Whether the job has finished (successfully or not).
    #[must_use]
    pub fn done(&self) -> bool {
        self.lock().is_some()
    }
    /// Blocks until the job finishes; returns its outcome (every call returns the same).
    ///
    /// # Errors
    /// The job's error.
    pub fn wait(&self) -> Result<()> {
        let g = self
            .0
            .done
            .wait_while(self.lock(), |r| r.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        g.clone().unwrap_or(Ok(()))
    }
    /// As [`Ticket::wait`] with a time limit; `None` when it ran out first.
    #[must_use]
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        let (g, _) = self
            .0
            .done
            .wait_timeout_while(self.lock(), timeout, |r| r.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        g.clone()
    }
}

struct Queued {
    job: ConversionJob,
    slots: Vec<usize>,
    keepalive: Option<Box<dyn Any + Send>>,
    ticket: Ticket,
}

struct QueueState {
    jobs: VecDeque<Queued>,
    closed: bool,
}

struct Shared {
    pool: Arc<HostPagePool>,
    queue: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    depth: usize,
    inject_failures: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases the job's pages, drops its keep-alive, completes its ticket.
    fn finish(&self, q: Queued, r: Result<()>) {
        let released = self.pool.release(q.job.pages());
        drop(q.job);
        drop(q.keepalive);
        q.ticket.complete(r.and(released.map(|_| ())));
    }
}

/// A pool of conversion threads bound to one [`HostPagePool`].
pub struct ConversionWorkers {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    num_threads: usize,
}

impl std::fmt::Debug for ConversionWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversionWorkers")
            .field("num_threads", &self.num_threads)
            .field("queue_depth", &self.shared.depth)
            .finish_non_exhaustive()
    }
}

/// Default thread count: the available cores.
#[must_use]
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

impl ConversionWorkers {
    /// Starts `num_threads` workers (default: the available cores) on a queue of
    /// `queue_depth` jobs.
    ///
    /// # Errors
    /// [`FreeKvError::LayoutMismatch`] for zero threads or depth; [`FreeKvError::JobFailed`]
    /// when a thread cannot be spawned (the ones already started are joined).
    pub fn new(
        pool: Arc<HostPagePool>,
        num_threads: Option<usize>,
        queue_depth: usize,
    ) -> Result<Self> {
        let n = num_threads.unwrap_or_else(default_threads);
        if n == 0 || queue_depth == 0 {
            return Err(FreeKvError::LayoutMismatch(
                "num_threads and queue_depth must be positive".to_owned(),
            ));
        }
        let shared = Arc::new(Shared {
            pool,
            queue: Mutex::new(QueueState {
                jobs: VecDeque::with_capacity(queue_depth),
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            depth: queue_depth,
            inject_failures: AtomicUsize::new(0),
        });
        let me = Self {
            shared,
            threads: Mutex::new(Vec::with_capacity(n)),
            num_threads: n,
        };
        for i in 0..n {
            let s = Arc::clone(&me.shared);
            let h = std::thread::Builder::new()
                .name(format!("freekv-convert-{i}"))
                .spawn(move || worker_loop(&s))
                .map_err(|e| FreeKvError::JobFailed(format!("spawning worker {i}: {e}")))?;
            me.threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(h);
        }
        Ok(me)
    }

    /// Worker threads started.
    #[must_use]
    pub fn num_threads(&self) -> usize {
        self.num_threads
    }
    /// Queue capacity.
    #[must_use]
    pub fn queue_depth(&self) -> usize {
        self.shared.depth
    }
    /// The pool the workers convert into and out of.
    #[must_use]
    pub fn pool(&self) -> &Arc<HostPagePool> {
        &self.shared.pool
    }
    /// Jobs queued and not yet picked up.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Test hook: the next `n` jobs a worker picks up fail with [`FreeKvError::JobFailed`]
    /// instead of running (their pages are released and their tickets report the error).
    pub fn inject_failure(&self, n: usize) {
        self.shared.inject_failures.store(n, Ordering::SeqCst);
    }

    fn validate(&self, job: &ConversionJob) -> Result<()> {
        let g = self.shared.pool.geometry();
        let (layer, k, v, pages) = match job {
            ConversionJob::NhdToHnd {
                layer, k, v, pages, ..
            } => (*layer, k.len(), v.len(), pages.len()),
            ConversionJob::HndToNhd {
                layer,
                k_out,
                v_out,
                pages,
            } => (*layer, k_out.len(), v_out.len(), pages.len()),
        };
        g.check_layer(layer)?;
        if let ConversionJob::HndToNhd { k_out, v_out, .. } = job {
            let (a, b) = (k_out.ptr.as_ptr() as usize, v_out.ptr.as_ptr() as usize);
            if a < b + v_out.len && b < a + k_out.len {
                return Err(FreeKvError::LayoutMismatch(
                    "k_out and v_out overlap".to_owned(),
                ));
            }
        }
        let row = g.nhd_token_bytes();
        if k != v || k == 0 || k % row != 0 {
            return Err(FreeKvError::LayoutMismatch(format!(
                "K and V must be the same whole number (> 0) of token rows of {row} bytes; \
                 got {k} and {v} bytes"
            )));
        }
        let tokens = k / row;
        if pages != tokens.div_ceil(g.page_size()) {
            return Err(FreeKvError::LayoutMismatch(format!(
                "{tokens} tokens at page size {} need {} pages, got {pages}",
                g.page_size(),
                tokens.div_ceil(g.page_size())
            )));
        }
        Ok(())
    }

    /// Validates and queues a job; blocks while the queue is full. `keepalive` is dropped
    /// (on a worker thread, or in `shutdown`) once the job no longer touches its buffers.
    ///
    /// # Errors
    /// [`FreeKvError::LayoutMismatch`] for a job that does not fit the geometry;
    /// [`FreeKvError::StaleHandle`] for an invalid page id; [`FreeKvError::WorkerShutdown`]
    /// after shutdown. Nothing is queued and no reference is kept on error.
    pub fn submit(
        &self,
        job: ConversionJob,
        keepalive: Option<Box<dyn Any + Send>>,
    ) -> Result<Ticket> {
        self.validate(&job)?;
        let pool = &self.shared.pool;
        if self.shared.lock().closed {
            return Err(FreeKvError::WorkerShutdown);
        }
        pool.retain(job.pages())?;
        let slots = match pool.indices_of(job.pages()) {
            Ok(s) => s,
            Err(e) => {
                pool.release(job.pages())?;
                return Err(e);
            }
        };
        let ticket = Ticket::new();
        let item = Queued {
            job,
            slots,
            keepalive,
            ticket: ticket.clone(),
        };
        let mut q = self
            .shared
            .not_full
            .wait_while(self.shared.lock(), |q| {
                !q.closed && q.jobs.len() >= self.shared.depth
            })
            .unwrap_or_else(PoisonError::into_inner);
        if q.closed {
            drop(q);
            pool.release(item.job.pages())?;
            return Err(FreeKvError::WorkerShutdown);
        }
        q.jobs.push_back(item);
        drop(q);
        self.shared.not_empty.notify_one();
        Ok(ticket)
    }

    /// Closes the queue and joins every thread. With `cancel_pending`, queued jobs that no
    /// worker has started complete with [`FreeKvError::WorkerShutdown`]; otherwise they run
    /// first. Jobs already running always finish. Idempotent.
    pub fn shutdown(&self, cancel_pending: bool) {
        let cancelled: Vec<Queued> = {
            let mut q = self.shared.lock();
            q.closed = true;
            if cancel_pending {
                q.jobs.drain(..).collect()
            } else {
                Vec::new()
            }
        };
        self.shared.not_empty.notify_all();
        self.shared.not_full.notify_all();
        for item in cancelled {
            self.shared.finish(item, Err(FreeKvError::WorkerShutdown));
        }
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for h in threads {
            // A worker never panics outside catch_unwind; if one did, its jobs were already
            // completed, so there is nothing left to report.
            let _ = h.join();
        }
    }

    /// Whether `shutdown` has been called.
    #[must_use]
    pub fn is_shut_down(&self) -> bool {
        self.shared.lock().closed
    }
}

impl Drop for ConversionWorkers {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

fn worker_loop(shared: &Shared) {
    loop {
        let item = {
            let mut q = shared
                .not_empty
                .wait_while(shared.lock(), |q| q.jobs.is_empty() && !q.closed)
                .unwrap_or_else(PoisonError::into_inner);
            q.jobs.pop_front()
        };
        let Some(item) = item else {
            return; // closed and drained
        };
        shared.not_full.notify_one();
        let injected = shared
            .inject_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let r = if injected {
            Err(FreeKvError::JobFailed(
                "injected failure (test hook)".to_owned(),
            ))
        } else {
            catch_unwind(AssertUnwindSafe(|| {
                execute(&shared.pool, &item.job, &item.slots)
            }))
            .unwrap_or_else(|p| Err(FreeKvError::JobFailed(panic_text(p.as_ref()))))
        };
        shared.finish(item, r);
    }
}

fn panic_text(p: &(dyn Any + Send)) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("panic in conversion: {msg}")
}

fn execute(pool: &HostPagePool, job: &ConversionJob, slots: &[usize]) -> Result<()> {
    let g = pool.geometry();
    let ps = g.page_size();
    match job {
        ConversionJob::NhdToHnd {
            layer,
            k,
            v,
            wait_event,
            ..
        } => {
            if let Some(ev) = wait_event {
                let rt = cuda::runtime().ok_or_else(|| cuda::missing("cudaEventSynchronize"))?;
                // SAFETY: [1] contract of CudaEventHandle::new: a live event of this process,
                // recorded on a stream of the pool's device.
                unsafe { rt.event_synchronize(pool.device(), ev.0) }?;
            }
            // SAFETY: [1] contract of RawBuffer::new: `k` and `v` are readable for their
            // length and not written by anyone until this job's ticket completes, which
            // happens after these slices are dropped (end of this function).
            let (k, v) = unsafe {
                (
                    std::slice::from_raw_parts(k.ptr.as_ptr(), k.len),
                    std::slice::from_raw_parts(v.ptr.as_ptr(), v.len),
                )
            };
            let tokens = k.len() / g.nhd_token_bytes();
            for (i, &slot) in slots.iter().enumerate() {
                let first = i * ps;
                let mut dst = pool.write_layer(slot, *layer)?;
                convert::nhd_to_hnd_layer(g, k, v, first, ps.min(tokens - first), &mut dst);
            }
        }
        ConversionJob::HndToNhd {
            layer,
            k_out,
            v_out,
            ..
        } => {
            // SAFETY: [1] contract of RawBuffer::new for outputs: writable for their length
            // and untouched by anyone else until the ticket completes, after these slices
            // are dropped; [2] `k_out` and `v_out` are distinct allocations or the caller
            // broke contract 2 (each output is exclusively this job's).
            let (k, v) = unsafe {
                (
                    std::slice::from_raw_parts_mut(k_out.ptr.as_ptr(), k_out.len),
                    std::slice::from_raw_parts_mut(v_out.ptr.as_ptr(), v_out.len),
                )
            };
            let tokens = k.len() / g.nhd_token_bytes();
            for (i, &slot) in slots.iter().enumerate() {
                let first = i * ps;
                let src = pool.read_layer(slot, *layer)?;
                convert::hnd_to_nhd_layer(g, &src, first, ps.min(tokens - first), k, v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Small enough for Miri (which checks the unsafe buffer handling and the claim
    //! protocol for data races); the large cases live in `tests/workers.rs`.
    use super::*;
    use crate::layout::{DType, PageGeometry};
    use crate::pinned::PinOptions;

    fn owned(mut bytes: Vec<u8>) -> (RawBuffer, Vec<u8>) {
        // SAFETY: [1] the Vec's heap buffer does not move with the Vec, which the tests
        // keep (or put in the keep-alive) until the job's ticket has completed; [2] nothing
        // else touches it meanwhile.
        let r = unsafe { RawBuffer::new(bytes.as_mut_ptr(), bytes.len()) };
        (r, bytes)
    }

    #[test]
    fn concurrent_submitters_round_trip_and_shutdown_cancels() {
        let g = PageGeometry::new(2, 2, 2, 4, DType::Float16).unwrap();
        let opts = PinOptions {
            pin: false,
            huge_pages: false,
            device: 0,
            numa: crate::NumaPlacement::None,
        };
        let pool = Arc::new(HostPagePool::new(g, 8 * g.page_bytes(), opts).unwrap());
        let w = Arc::new(ConversionWorkers::new(Arc::clone(&pool), Some(2), 2).unwrap());
        let submitters: Vec<_> = (0..2u8)
            .map(|t| {
                let (w, pool) = (Arc::clone(&w), Arc::clone(&pool));
                std::thread::spawn(move || {
                    for i in 0..3u8 {
                        let pages = pool.alloc(2).unwrap();
                        let bytes = 3 * g.nhd_token_bytes(); // 3 tokens: last page half full
                        let fill = t * 16 + i;
                        let (k, kb) = owned(vec![fill; bytes]);
                        let (v, vb) = owned(vec![fill + 100; bytes]);
                        let layer = usize::from(i % 2);
                        let job = ConversionJob::NhdToHnd {
                            layer,
                            k,
                            v,
                            pages: pages.clone(),
                            wait_event: None,
                        };
                        w.submit(job, Some(Box::new((kb, vb))))
                            .unwrap()
                            .wait()
                            .unwrap();
                        let (k, kb) = owned(vec![0; bytes]);
                        let (v, vb) = owned(vec![0; bytes]);
                        let job = ConversionJob::HndToNhd {
                            layer,
                            pages: pages.clone(),
                            k_out: k,
                            v_out: v,
                        };
                        w.submit(job, None).unwrap().wait().unwrap();
                        assert!(kb.iter().all(|&b| b == fill));
                        assert!(vb.iter().all(|&b| b == fill + 100));
                        pool.release(&pages).unwrap();
                    }
                })
            })
            .collect();
        for s in submitters {
            s.join().unwrap();
        }
        let pages = pool.alloc(1).unwrap();
        let tickets: Vec<_> = (0..4)
            .map(|_| {
                let (k, kb) = owned(vec![1; g.nhd_token_bytes()]);
                let (v, vb) = owned(vec![2; g.nhd_token_bytes()]);
                let job = ConversionJob::NhdToHnd {
                    layer: 0,
                    k,
                    v,
                    pages: pages.clone(),
                    wait_event: None,
                };
                w.submit(job, Some(Box::new((kb, vb)))).unwrap()
            })
            .collect();
        w.shutdown(true);
        for t in tickets {
            assert!(t.done());
            match t.wait() {
                Ok(()) | Err(FreeKvError::WorkerShutdown) => {}
                // Two workers may pick two jobs on the same page layer at once.
                Err(FreeKvError::JobFailed(m)) => assert!(m.contains("same time"), "{m}"),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pool.refcount(pages[0]).unwrap(), 1);
        pool.release(&pages).unwrap();
        pool.check_invariants().unwrap();
        assert_eq!(pool.used_pages(), 0);
    }
}
