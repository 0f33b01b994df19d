//! NHD -> HND -> NHD through the worker threads is the identity, over a grid of shapes.

use std::sync::Arc;

use freekv_core::{
    ConversionJob, ConversionWorkers, DType, HostPagePool, Kv, PageGeometry, PinOptions, RawBuffer,
};

const NO_PIN: PinOptions = PinOptions {
    pin: false,
    huge_pages: false,
    device: 0,
    numa: freekv_core::NumaPlacement::None,
};

/// Deterministic pseudo-random bytes (xorshift64*), fixed seed per call site.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn raw(buf: &mut [u8]) -> RawBuffer {
    // SAFETY: [1] `buf` outlives the job: every test waits on the ticket before the buffer
    // is dropped or touched again; [2] nothing else accesses it meanwhile.
    unsafe { RawBuffer::new(buf.as_mut_ptr(), buf.len()) }
}

#[test]
fn nhd_hnd_nhd_is_identity_over_a_grid() {
    let mut seed = 1;
    for &page_size in &[1usize, 16, 32, 64] {
        for &heads in &[1usize, 3, 5] {
            for &(head_dim, dtype) in &[
                (128, DType::BFloat16),
                (64, DType::Float32),
                (128, DType::Float8E4M3Fn),
                (24, DType::Float16),
            ] {
                let g = PageGeometry::new(3, heads, page_size, head_dim, dtype).unwrap();
                // A partially filled last page whenever page_size > 1.
                let tokens = 2 * page_size + page_size.div_ceil(2);
                let n_pages = tokens.div_ceil(page_size);
                let pool =
                    Arc::new(HostPagePool::new(g, (n_pages + 1) * g.page_bytes(), NO_PIN).unwrap());
                let workers = ConversionWorkers::new(Arc::clone(&pool), Some(2), 4).unwrap();
                let pages = pool.alloc(n_pages).unwrap();
                let bytes = tokens * g.nhd_token_bytes();
                let mut k = random_bytes(bytes, seed);
                let mut v = random_bytes(bytes, seed + 1);
                seed += 2;
                let layer = 1;
                let job = ConversionJob::NhdToHnd {
                    layer,
                    k: raw(&mut k),
                    v: raw(&mut v),
                    pages: pages.clone(),
                    wait_event: None,
                };
                workers.submit(job, None).unwrap().wait().unwrap();

                // Spot-check the HND placement against the layout definition.
                let row = g.row_bytes();
                let last = tokens - 1;
                let page = pool.read_layer(pool.index_of(pages[last / page_size]).unwrap(), layer);
                let page = page.unwrap();
                let h = heads - 1;
                let at = g.hnd_offset(0, h, Kv::V, last % page_size);
                let src = g.nhd_offset(last, h);
                assert_eq!(page[at..at + row], v[src..src + row]);
                drop(page);

                let (mut k2, mut v2) = (vec![0u8; bytes], vec![0u8; bytes]);
                let job = ConversionJob::HndToNhd {
                    layer,
                    pages: pages.clone(),
                    k_out: raw(&mut k2),
                    v_out: raw(&mut v2),
                };
                workers.submit(job, None).unwrap().wait().unwrap();
                assert!(
                    k2 == k && v2 == v,
                    "round trip differs: p={page_size} h={heads} {g:?}"
                );
                workers.shutdown(false);
                assert_eq!(
                    pool.refcount(pages[0]).unwrap(),
                    1,
                    "jobs release their references"
                );
                pool.release(&pages).unwrap();
                pool.check_invariants().unwrap();
            }
        }
    }
}

#[test]
fn other_layers_and_pages_are_untouched() {
    let g = PageGeometry::new(2, 2, 4, 8, DType::Float16).unwrap();
    let pool = Arc::new(HostPagePool::new(g, 3 * g.page_bytes(), NO_PIN).unwrap());
    let workers = ConversionWorkers::new(Arc::clone(&pool), Some(1), 2).unwrap();
    let pages = pool.alloc(3).unwrap();
    let bytes = 4 * g.nhd_token_bytes();
    let (mut k, mut v) = (vec![0xAB; bytes], vec![0xCD; bytes]);
    let job = ConversionJob::NhdToHnd {
        layer: 0,
        k: raw(&mut k),
        v: raw(&mut v),
        pages: vec![pages[1]],
        wait_event: None,
    };
    workers.submit(job, None).unwrap().wait().unwrap();
    for slot in 0..3 {
        for layer in 0..2 {
            let l = pool.read_layer(slot, layer).unwrap();
            let written = slot == pool.index_of(pages[1]).unwrap() && layer == 0;
            for (i, chunk) in l.chunks(g.block_bytes()).enumerate() {
                // Blocks alternate K, V per head; unwritten layers stay zero.
                let want = match (written, i % 2) {
                    (false, _) => 0,
                    (true, 0) => 0xAB,
                    (true, _) => 0xCD,
                };
                assert!(
                    chunk.iter().all(|&b| b == want),
                    "slot {slot} layer {layer}"
                );
            }
        }
    }
}
