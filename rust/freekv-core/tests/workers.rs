//! Worker behaviour under load and at shutdown: concurrency stress, errors reaching the
//! waiter, cancellation and draining with jobs in flight.

use std::sync::Arc;
use std::time::Duration;

use freekv_core::{
    ConversionJob, ConversionWorkers, DType, FreeKvError, HostPagePool, PageGeometry, PageId,
    PinOptions, RawBuffer,
};

const NO_PIN: PinOptions = PinOptions {
    pin: false,
    huge_pages: false,
    device: 0,
    numa: freekv_core::NumaPlacement::None,
};

/// An owned NHD buffer a job can read or write. The Vec's heap buffer does not move when
/// the Vec moves, so the Vec can go into the job's keep-alive.
fn owned(mut bytes: Vec<u8>) -> (RawBuffer, Vec<u8>) {
    // SAFETY: [1] callers either put the Vec in the job's keep-alive (so the memory lives
    // until the job is finished) or keep it and touch it only after waiting on the ticket;
    // [2] nothing else accesses it meanwhile.
    let r = unsafe { RawBuffer::new(bytes.as_mut_ptr(), bytes.len()) };
    (r, bytes)
}

fn nhd_job(
    g: &PageGeometry,
    layer: usize,
    pages: &[PageId],
    fill: u8,
) -> (ConversionJob, Box<dyn std::any::Any + Send>) {
    let bytes = pages.len() * g.page_size() * g.nhd_token_bytes();
    let (k, kb) = owned(vec![fill; bytes]);
    let (v, vb) = owned(vec![fill.wrapping_add(1); bytes]);
    let job = ConversionJob::NhdToHnd {
        layer,
        k,
        v,
        pages: pages.to_vec(),
        wait_event: None,
    };
    (job, Box::new((kb, vb)))
}

#[test]
fn stress_alloc_free_convert_from_many_threads() {
    let g = PageGeometry::new(4, 3, 16, 32, DType::BFloat16).unwrap();
    let pool = Arc::new(HostPagePool::new(g, 64 * g.page_bytes(), NO_PIN).unwrap());
    let workers = Arc::new(ConversionWorkers::new(Arc::clone(&pool), Some(3), 8).unwrap());
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let (pool, workers) = (Arc::clone(&pool), Arc::clone(&workers));
            std::thread::spawn(move || {
                let g = *pool.geometry();
                let mut exhausted = 0;
                for i in 0..150u32 {
                    let n = 1 + (i as usize + t as usize) % 5;
                    let pages = match pool.alloc(n) {
                        Ok(p) => p,
                        Err(FreeKvError::PoolExhausted { .. }) => {
                            exhausted += 1;
                            continue;
                        }
                        Err(e) => panic!("{e}"),
                    };
                    let fill = t.wrapping_mul(50).wrapping_add(i as u8);
                    let tickets: Vec<_> = (0..g.num_layers())
                        .map(|layer| {
                            let (job, keep) = nhd_job(&g, layer, &pages, fill);
                            workers.submit(job, Some(keep)).unwrap()
                        })
                        .collect();
                    for tk in &tickets {
                        tk.wait().unwrap();
                    }
                    // Read back one layer and check this thread's bytes are there.
                    let bytes = pages.len() * g.page_size() * g.nhd_token_bytes();
                    let (k, kb) = owned(vec![0; bytes]);
                    let (v, vb) = owned(vec![0; bytes]);
                    // Kept here (no keep-alive): read back only after the wait below.
                    let job = ConversionJob::HndToNhd {
                        layer: i as usize % g.num_layers(),
                        pages: pages.clone(),
                        k_out: k,
                        v_out: v,
                    };
                    workers.submit(job, None).unwrap().wait().unwrap();
                    assert!(kb.iter().all(|&b| b == fill));
                    assert!(vb.iter().all(|&b| b == fill.wrapping_add(1)));
                    pool.release(&pages).unwrap();
                }
                exhausted
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(pool.used_pages(), 0);
    pool.check_invariants().unwrap();
}

#[test]
fn errors_reach_the_waiter() {
    let g = PageGeometry::new(2, 2, 4, 16, DType::Float16).unwrap();
    let pool = Arc::new(HostPagePool::new(g, 4 * g.page_bytes(), NO_PIN).unwrap());
    let w = ConversionWorkers::new(Arc::clone(&pool), Some(2), 4).unwrap();
    let pages = pool.alloc(2).unwrap();

    w.inject_failure(1);
    let (job, keep) = nhd_job(&g, 0, &pages, 1);
    let t = w.submit(job, Some(keep)).unwrap();
    assert!(matches!(t.wait(), Err(FreeKvError::JobFailed(_))));
    assert!(t.done());
    let (job, keep) = nhd_job(&g, 0, &pages, 1);
    w.submit(job, Some(keep)).unwrap().wait().unwrap();

    // Validation errors at submit, with no references left behind.
    let (job, keep) = nhd_job(&g, 2, &pages, 1);
    assert!(matches!(
        w.submit(job, Some(keep)),
        Err(FreeKvError::LayoutMismatch(_))
    ));
    let (job, keep) = nhd_job(&g, 0, &pages[..1], 1);
    let ConversionJob::NhdToHnd { k, v, .. } = job else {
        unreachable!()
    };
    let wrong = ConversionJob::NhdToHnd {
        layer: 0,
        k,
        v,
        pages: pages.clone(),
        wait_event: None,
    };
    assert!(matches!(
        w.submit(wrong, Some(keep)),
        Err(FreeKvError::LayoutMismatch(_))
    ));
    pool.release(&pages[1..]).unwrap();
    let (job, keep) = nhd_job(&g, 0, &pages, 1);
    assert!(matches!(
        w.submit(job, Some(keep)),
        Err(FreeKvError::StaleHandle { .. })
    ));
    assert_eq!(pool.refcount(pages[0]).unwrap(), 1);

    // A CUDA event without a CUDA device: the job fails with a CUDA error, never hangs.
    if freekv_core::cuda::device_runtime().is_none() {
        let (job, keep) = nhd_job(&g, 0, &pages[..1], 1);
        let ConversionJob::NhdToHnd { k, v, .. } = job else {
            unreachable!()
        };
        // SAFETY: [1] the job never dereferences the event when no runtime has a device:
        // cudaEventSynchronize fails first (no driver) or the runtime is missing.
        let ev = unsafe { freekv_core::CudaEventHandle::new(0x10) };
        let job = ConversionJob::NhdToHnd {
            layer: 0,
            k,
            v,
            pages: pages[..1].to_vec(),
            wait_event: Some(ev),
        };
        if freekv_core::cuda::runtime().is_none() {
            let r = w.submit(job, Some(keep)).unwrap().wait();
            assert!(
                matches!(r, Err(FreeKvError::Cuda { code: -1, .. })),
                "{r:?}"
            );
        } else {
            drop((job, keep));
        }
    }
    pool.check_invariants().unwrap();
}

#[test]
fn shutdown_cancels_or_drains_jobs_in_flight() {
    let g = PageGeometry::new(8, 8, 64, 128, DType::BFloat16).unwrap();
    let pool = Arc::new(HostPagePool::new(g, 4 * g.page_bytes(), NO_PIN).unwrap());
    let pages = pool.alloc(4).unwrap();
    for cancel in [true, false] {
        let w = ConversionWorkers::new(Arc::clone(&pool), Some(1), 256).unwrap();
        let tickets: Vec<_> = (0..200)
            .map(|i| {
                let (job, keep) = nhd_job(&g, i % 8, &pages[i % 4..=i % 4], 3);
                w.submit(job, Some(keep)).unwrap()
            })
            .collect();
        w.shutdown(cancel);
        assert!(w.is_shut_down());
        let mut cancelled = 0;
        for t in &tickets {
            match t
                .wait_timeout(Duration::from_secs(30))
                .expect("no ticket hangs")
            {
                Ok(()) => {}
                Err(FreeKvError::WorkerShutdown) => cancelled += 1,
                Err(e) => panic!("{e}"),
            }
        }
        if cancel {
            assert!(
                cancelled > 0,
                "one worker cannot have finished 200 jobs while they were queued"
            );
        } else {
            assert_eq!(cancelled, 0);
        }
        let (job, keep) = nhd_job(&g, 0, &pages[..1], 3);
        assert!(matches!(
            w.submit(job, Some(keep)),
            Err(FreeKvError::WorkerShutdown)
        ));
        w.shutdown(false); // idempotent
    }
    // Every job dropped its page references.
    for &p in &pages {
        assert_eq!(pool.refcount(p).unwrap(), 1);
    }
    pool.check_invariants().unwrap();
}

#[test]
fn a_full_queue_blocks_then_shutdown_releases_the_submitter() {
    let g = PageGeometry::new(8, 8, 64, 128, DType::BFloat16).unwrap();
    let pool = Arc::new(HostPagePool::new(g, 2 * g.page_bytes(), NO_PIN).unwrap());
    let pages = pool.alloc(1).unwrap();
    let w = Arc::new(ConversionWorkers::new(Arc::clone(&pool), Some(1), 1).unwrap());
    let submitter = {
        let (w, pages) = (Arc::clone(&w), pages.clone());
        std::thread::spawn(move || {
            let g = *w.pool().geometry();
            let mut results = Vec::new();
            for i in 0..200 {
                let (job, keep) = nhd_job(&g, i % 8, &pages, 1);
                match w.submit(job, Some(keep)) {
                    Ok(t) => results.push(t),
                    Err(FreeKvError::WorkerShutdown) => return (results, true),
                    Err(e) => panic!("{e}"),
                }
            }
            (results, false)
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    w.shutdown(true);
    let (tickets, _saw_shutdown) = submitter.join().unwrap();
    for t in tickets {
        let r = t
            .wait_timeout(Duration::from_secs(30))
            .expect("no ticket hangs");
        assert!(matches!(r, Ok(()) | Err(FreeKvError::WorkerShutdown)));
    }
    assert_eq!(pool.refcount(pages[0]).unwrap(), 1);
}

#[test]
fn concurrent_writers_of_one_page_layer_fail_instead_of_racing() {
    let g = PageGeometry::new(1, 8, 64, 128, DType::Float32).unwrap();
    let pool = Arc::new(HostPagePool::new(g, g.page_bytes(), NO_PIN).unwrap());
    let pages = pool.alloc(1).unwrap();
    let w = ConversionWorkers::new(Arc::clone(&pool), Some(2), 64).unwrap();
    let tickets: Vec<_> = (0..64)
        .map(|i| {
            let (job, keep) = nhd_job(&g, 0, &pages, i);
            w.submit(job, Some(keep)).unwrap()
        })
        .collect();
    for t in tickets {
        match t.wait() {
            Ok(()) => {}
            Err(FreeKvError::JobFailed(m)) => assert!(m.contains("same time"), "{m}"),
            Err(e) => panic!("{e}"),
        }
    }
    // Whatever won, the layer holds one job's bytes, not a mix of two.
    let l = pool.read_layer(0, 0).unwrap();
    let k0 = l[0];
    assert!(l[..g.block_bytes()].iter().all(|&b| b == k0));
}
