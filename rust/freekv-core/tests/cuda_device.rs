//! Every CUDA call of the crate runs with the pool's device current on the calling thread,
//! checked against a stand-in `libcudart` (`fake_cudart/`) that records each call with the
//! thread's current device and fails calls on request.

mod fake_cudart;

use std::sync::Arc;

use fake_cudart::{assert_paired, named, stub, this_tid, Call};
use freekv_core::numa::DeviceNode;
use freekv_core::{
    ConversionJob, ConversionWorkers, CudaEventHandle, DType, FreeKvError, HostPagePool, MemPolicy,
    NumaPlacement, PageGeometry, PageId, PinOptions, PinnedRegion, RawBuffer,
};

fn pinned(device: i32) -> PinOptions {
    PinOptions {
        pin: true,
        huge_pages: false,
        device,
        numa: NumaPlacement::Device,
    }
}

fn geometry() -> PageGeometry {
    PageGeometry::new(2, 2, 4, 8, DType::Float16).unwrap()
}

fn owned(mut bytes: Vec<u8>) -> (RawBuffer, Vec<u8>) {
    // SAFETY: [1] callers put the Vec in the job's keep-alive or keep it until the ticket
    // has completed, and the Vec's heap buffer does not move with it; [2] nothing else
    // touches it meanwhile.
    let r = unsafe { RawBuffer::new(bytes.as_mut_ptr(), bytes.len()) };
    (r, bytes)
}

fn offload(w: &ConversionWorkers, pages: &[PageId], fill: u8, event: usize) -> freekv_core::Ticket {
    let g = *w.pool().geometry();
    let bytes = pages.len() * g.page_size() * g.nhd_token_bytes();
    let (k, kb) = owned(vec![fill; bytes]);
    let (v, vb) = owned(vec![fill + 1; bytes]);
    let job = ConversionJob::NhdToHnd {
        layer: 0,
        k,
        v,
        pages: pages.to_vec(),
        // SAFETY: [1] the stand-in runtime never dereferences event handles.
        wait_event: Some(unsafe { CudaEventHandle::new(event) }),
    };
    w.submit(job, Some(Box::new((kb, vb)))).unwrap()
}

fn read_back(w: &ConversionWorkers, pages: &[PageId]) -> (Vec<u8>, Vec<u8>) {
    let g = *w.pool().geometry();
    let bytes = pages.len() * g.page_size() * g.nhd_token_bytes();
    let (k, kb) = owned(vec![0; bytes]);
    let (v, vb) = owned(vec![0; bytes]);
    let job = ConversionJob::HndToNhd {
        layer: 0,
        pages: pages.to_vec(),
        k_out: k,
        v_out: v,
    };
    w.submit(job, None).unwrap().wait().unwrap();
    (kb, vb)
}

/// The last `cudaSetDevice` made by `call`'s thread before `call` succeeded and asked for
/// `device`.
fn set_before(calls: &[Call], call: &Call, device: i32) -> bool {
    let at = calls.iter().position(|c| c == call).unwrap();
    calls[..at]
        .iter()
        .rev()
        .find(|c| c.tid == call.tid && c.name == "cudaSetDevice")
        .is_some_and(|c| c.rc == 0 && c.arg == device as usize)
}

#[test]
fn pinning_runs_on_the_region_device_and_restores_the_caller_device() {
    let (_serial, cudart) = stub();
    let rt = freekv_core::cuda::runtime().unwrap();
    cudart.set_device(3);
    let region = PinnedRegion::new(10_000, pinned(1)).unwrap();
    assert!(region.is_pinned());
    assert_eq!(region.device(), 1);
    assert_eq!(rt.current_device().unwrap(), 3);
    let base = region.ptr().as_ptr() as usize;
    drop(region);
    assert_eq!(rt.current_device().unwrap(), 3);

    let calls = cudart.calls();
    let reg = named(&calls, "cudaHostRegister");
    let unreg = named(&calls, "cudaHostUnregister");
    assert_eq!(reg.len(), 1);
    assert_eq!(unreg.len(), 1);
    assert_eq!((reg[0].arg, reg[0].dev, reg[0].rc), (base, 1, 0));
    assert!(reg[0].len >= 10_000);
    assert_eq!((unreg[0].arg, unreg[0].dev, unreg[0].rc), (base, 1, 0));
    assert!(set_before(&calls, reg[0], 1));
    assert!(set_before(&calls, unreg[0], 1));
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn unpinned_regions_make_no_cuda_call() {
    let (_serial, cudart) = stub();
    let opts = PinOptions {
        pin: false,
        ..pinned(2)
    };
    drop(PinnedRegion::new(4096, opts).unwrap());
    assert!(cudart.calls().iter().all(|c| c.name != "cudaSetDevice"
        && c.name != "cudaHostRegister"
        && c.name != "cudaHostUnregister"));
}

#[test]
fn workers_wait_on_events_with_the_pool_device_current() {
    let (_serial, cudart) = stub();
    let g = geometry();
    let pool = Arc::new(HostPagePool::new(g, 8 * g.page_bytes(), pinned(2)).unwrap());
    assert_eq!(pool.device(), 2);
    let w = ConversionWorkers::new(Arc::clone(&pool), Some(2), 4).unwrap();
    let pages: Vec<Vec<PageId>> = (0..6).map(|_| pool.alloc(1).unwrap()).collect();
    let tickets: Vec<_> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| offload(&w, p, 10 * i as u8, 0x1000 + i))
        .collect();
    for t in &tickets {
        t.wait().unwrap();
    }
    for (i, p) in pages.iter().enumerate() {
        let (k, v) = read_back(&w, p);
        assert!(k.iter().all(|&b| b == 10 * i as u8));
        assert!(v.iter().all(|&b| b == 10 * i as u8 + 1));
        pool.release(p).unwrap();
    }
    w.shutdown(false);
    drop(w);
    assert_eq!(
        freekv_core::cuda::runtime()
            .unwrap()
            .current_device()
            .unwrap(),
        0
    );
    drop(pool);

    let calls = cudart.calls();
    let syncs = named(&calls, "cudaEventSynchronize");
    let mut events: Vec<usize> = syncs.iter().map(|c| c.arg).collect();
    events.sort_unstable();
    assert_eq!(events, (0x1000..0x1006).collect::<Vec<_>>());
    let me = this_tid();
    for s in &syncs {
        assert_eq!((s.dev, s.rc), (2, 0), "{s:?}");
        assert_ne!(s.tid, me, "waited on the submitting thread: {s:?}");
        assert!(set_before(&calls, s, 2), "no cudaSetDevice(2) first: {s:?}");
    }
    for r in named(&calls, "cudaHostRegister")
        .into_iter()
        .chain(named(&calls, "cudaHostUnregister"))
    {
        assert_eq!(r.dev, 2, "{r:?}");
    }
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn failed_registration_is_a_cuda_error_and_leaves_nothing_registered() {
    let (_serial, cudart) = stub();
    let g = geometry();
    cudart.fail("cudaHostRegister", 0, 2);
    match PinnedRegion::new(10_000, pinned(1)) {
        Err(FreeKvError::Cuda { op, code: 2, .. }) => assert_eq!(op, "cudaHostRegister"),
        other => panic!("{other:?}"),
    }
    cudart.fail("cudaHostRegister", 0, 2);
    match HostPagePool::new(g, 4 * g.page_bytes(), pinned(1)) {
        Err(FreeKvError::Cuda { op, code: 2, .. }) => assert_eq!(op, "cudaHostRegister"),
        other => panic!("{other:?}"),
    }
    let rt = freekv_core::cuda::runtime().unwrap();
    assert_eq!(rt.current_device().unwrap(), 0);
    let calls = cudart.calls();
    assert_eq!(named(&calls, "cudaHostRegister").len(), 2);
    assert!(named(&calls, "cudaHostUnregister").is_empty());
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn an_invalid_device_fails_before_registering() {
    let (_serial, cudart) = stub();
    match PinnedRegion::new(4096, pinned(9)) {
        Err(FreeKvError::Cuda { op, code: 101, .. }) => assert_eq!(op, "cudaSetDevice"),
        other => panic!("{other:?}"),
    }
    let calls = cudart.calls();
    assert!(named(&calls, "cudaHostRegister").is_empty());
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn registration_is_undone_when_the_caller_device_cannot_be_restored() {
    let (_serial, cudart) = stub();
    // The first cudaSetDevice (to the region's device) succeeds, the restore fails.
    cudart.fail("cudaSetDevice", 1, 999);
    match PinnedRegion::new(4096, pinned(1)) {
        Err(FreeKvError::Cuda { op, code: 999, .. }) => assert_eq!(op, "cudaSetDevice"),
        other => panic!("{other:?}"),
    }
    let calls = cudart.calls();
    let reg = named(&calls, "cudaHostRegister");
    let unreg = named(&calls, "cudaHostUnregister");
    assert_eq!((reg.len(), unreg.len()), (1, 1));
    assert_eq!((reg[0].rc, unreg[0].rc, unreg[0].arg), (0, 0, reg[0].arg));
    assert_eq!(unreg[0].dev, 1);
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn a_later_failure_still_unregisters_the_pool() {
    let (_serial, cudart) = stub();
    let g = geometry();
    let pool = Arc::new(HostPagePool::new(g, 4 * g.page_bytes(), pinned(3)).unwrap());
    assert!(pool.is_pinned());
    assert!(matches!(
        ConversionWorkers::new(Arc::clone(&pool), Some(0), 4),
        Err(FreeKvError::LayoutMismatch(_))
    ));
    drop(pool);
    let calls = cudart.calls();
    assert_eq!(named(&calls, "cudaHostUnregister").len(), 1);
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn failed_event_wait_fails_the_job_and_releases_its_pages() {
    let (_serial, cudart) = stub();
    let g = geometry();
    let pool = Arc::new(HostPagePool::new(g, 4 * g.page_bytes(), pinned(1)).unwrap());
    let w = ConversionWorkers::new(Arc::clone(&pool), Some(1), 4).unwrap();
    let pages = pool.alloc(1).unwrap();
    cudart.fail("cudaEventSynchronize", 0, 999);
    match offload(&w, &pages, 7, 0xbad).wait() {
        Err(FreeKvError::Cuda { op, code: 999, .. }) => assert_eq!(op, "cudaEventSynchronize"),
        other => panic!("{other:?}"),
    }
    assert_eq!(pool.refcount(pages[0]).unwrap(), 1);
    // The worker carries on with the next job.
    offload(&w, &pages, 7, 0x900d).wait().unwrap();
    assert!(read_back(&w, &pages).0.iter().all(|&b| b == 7));
    pool.release(&pages).unwrap();
    pool.check_invariants().unwrap();
    assert_eq!(pool.used_pages(), 0);
    drop(w);
    drop(pool);

    let calls = cudart.calls();
    let syncs = named(&calls, "cudaEventSynchronize");
    assert_eq!(syncs.len(), 2);
    assert_eq!((syncs[0].arg, syncs[0].rc), (0xbad, 999));
    assert_eq!((syncs[1].arg, syncs[1].rc), (0x900d, 0));
    assert!(syncs.iter().all(|s| s.dev == 1 && set_before(&calls, s, 1)));
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn a_device_bus_id_without_a_sysfs_entry_has_no_numa_affinity() {
    let (_serial, cudart) = stub();
    let rt = freekv_core::cuda::runtime().unwrap();
    assert_eq!(rt.pci_bus_id(1).unwrap(), "0000:E1:1F.7");
    match freekv_core::numa::device_node(rt, 1) {
        DeviceNode::Unknown(why) => {
            assert!(
                why.starts_with("GPU 1 (PCI 0000:e1:1f.7) has no NUMA affinity"),
                "{why}"
            );
            assert!(why.contains("no sysfs numa_node"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    match freekv_core::numa::device_node(rt, 9) {
        DeviceNode::Unknown(why) => assert!(why.contains("cudaDeviceGetPCIBusId"), "{why}"),
        other => panic!("{other:?}"),
    }
    cudart.fail("cudaDeviceGetPCIBusId", 0, 999);
    assert!(matches!(
        freekv_core::numa::device_node(rt, 0),
        DeviceNode::Unknown(why) if why.contains("error 999")
    ));
    let calls = cudart.calls();
    let lookups = named(&calls, "cudaDeviceGetPCIBusId");
    let asked: Vec<_> = lookups.iter().map(|c| (c.arg, c.rc)).collect();
    assert_eq!(asked, [(1, 0), (1, 0), (9, 101), (0, 999)]);
    // The lookup names its device: the caller's current device is not touched.
    assert!(named(&calls, "cudaSetDevice").is_empty());
}

#[test]
fn the_default_placement_of_a_pinned_region_is_reported() {
    let (_serial, cudart) = stub();
    let region = PinnedRegion::new(10_000, pinned(2)).unwrap();
    assert!(region.is_pinned());
    let report = region.numa().clone();
    drop(region);
    let calls = cudart.calls();
    let lookups = named(&calls, "cudaDeviceGetPCIBusId");
    assert_eq!((report.node, report.policy), (None, None));
    if freekv_core::numa::online_nodes().len() > 1 {
        // The stand-in's bus ids exist on no host: no affinity, pinned all the same.
        assert!(
            report.detail.contains("GPU 2 (PCI 0000:e2:1f.7)"),
            "{report:?}"
        );
        assert_eq!(lookups.len(), 1);
    } else {
        assert_eq!(report.detail, "single NUMA node");
        assert!(lookups.is_empty());
    }
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}

#[test]
fn an_explicit_node_is_bound_before_the_region_is_pinned() {
    let (_serial, cudart) = stub();
    let opts = PinOptions {
        numa: NumaPlacement::Node(0),
        ..pinned(1)
    };
    let region = PinnedRegion::new(10_000, opts).unwrap();
    assert!(region.is_pinned());
    assert_eq!(region.numa().node, Some(0));
    assert_eq!(region.numa().policy, Some(MemPolicy::Bind));
    drop(region);
    let missing = freekv_core::numa::online_nodes().last().unwrap() + 1;
    let opts = PinOptions {
        numa: NumaPlacement::Node(missing),
        ..pinned(1)
    };
    assert!(matches!(
        PinnedRegion::new(10_000, opts),
        Err(FreeKvError::NumaNodeUnavailable { node, .. }) if node == missing
    ));
    let calls = cudart.calls();
    // Refused before anything was mapped or registered.
    assert_eq!(named(&calls, "cudaHostRegister").len(), 1);
    assert_paired(&calls);
    assert_eq!(cudart.registered(), 0);
}
