//! Conversion of one layer of one page between the engine's NHD rows and the host's HND page.
//!
//! Safe functions on byte slices: the worker threads (`worker.rs`) turn validated raw
//! buffers into slices and call these; tests and Miri call them directly. Offsets come only
//! from [`PageGeometry::hnd_offset`] / [`PageGeometry::nhd_offset`].
//!
//! Loop order: both directions walk the NHD side sequentially, token by token and head by
//! head, and scatter to (or gather from) the page's `2 * num_kv_heads` blocks, each of which
//! is itself walked sequentially. Walking the page block by block instead reads NHD rows with
//! a stride of `num_kv_heads * head_dim` elements, which the hardware prefetchers follow badly
//! (measured ~1.6x slower at Llama-3.1-8B geometry). Row copies have a compile-time length for
//! the common sizes, so each row is a few vector moves.
//!
//! NHD -> HND writes host pages that the CPU will not read again soon (the GPU reads them by
//! DMA), so on x86-64 it uses non-temporal (streaming) stores when rows are whole 16-byte
//! vectors at 16-byte aligned addresses, sparing the caches. A store fence ends every such
//! call, so the bytes are globally visible before the caller signals completion (the ticket's
//! mutex then publishes them). Under Miri, and on other targets, ordinary copies are used.

use crate::layout::{Kv, PageGeometry};

/// Non-temporal row copies (x86-64 only, not under Miri).
#[cfg(all(target_arch = "x86_64", not(miri)))]
mod stream {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};

    /// Whether rows of `row` bytes at offsets that are multiples of `row` from the start of
    /// `dst` are 16-byte aligned whole vectors.
    pub fn usable(dst: &[u8], row: usize) -> bool {
        row % 16 == 0 && (dst.as_ptr() as usize) % 16 == 0
    }

    /// `dst <- src` with streaming stores.
    #[inline(always)]
    pub fn copy_row(dst: &mut [u8], src: &[u8]) {
        assert!(dst.len() == src.len() && dst.len() % 16 == 0);
        assert!((dst.as_ptr() as usize) % 16 == 0);
        let d = dst.as_mut_ptr().cast::<__m128i>();
        let s = src.as_ptr().cast::<__m128i>();
        for i in 0..dst.len() / 16 {
            // SAFETY: [1] bytes `16*i .. 16*i+16` are in bounds of both slices (equal
            // lengths, a multiple of 16, asserted above); [2] the store address is 16-byte
            // aligned (asserted) and the load is unaligned; [3] SSE2 is part of the x86-64
            // baseline, so the intrinsics are available.
            unsafe { _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i))) };
        }
    }

    /// Orders the streaming stores before any later store (the job's completion).
    pub fn fence() {
        // SAFETY: [1] sfence has no operands or preconditions; SSE is in the x86-64 baseline.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_sfence();
        }
    }
}

#[inline(always)]
fn copy_fixed<const ROW: usize>(dst: &mut [u8], src: &[u8]) {
    let d: &mut [u8; ROW] = dst.try_into().expect("destination row of ROW bytes");
    let s: &[u8; ROW] = src.try_into().expect("source row of ROW bytes");
    *d = *s;
}

#[inline(always)]
fn copy_dyn(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

/// Calls `$body` with `$copy` bound to the fastest ordinary row copy for `$row` bytes.
macro_rules! with_row_copy {
    ($row:expr, $copy:ident => $body:expr) => {
        match $row {
            64 => {
                let $copy = copy_fixed::<64>;
                $body
            }
            128 => {
                let $copy = copy_fixed::<128>;
                $body
            }
            256 => {
                let $copy = copy_fixed::<256>;
                $body
            }
            512 => {
                let $copy = copy_fixed::<512>;
                $body
            }
            _ => {
                let $copy = copy_dyn;
                $body
            }
        }
    };
}

fn check_sizes(g: &PageGeometry, k: usize, v: usize, first: usize, n: usize, layer: usize) {
    assert!(
        n <= g.page_size(),
        "{n} tokens do not fit a page of {}",
        g.page_size()
    );
    let need = (first + n) * g.nhd_token_bytes();
    assert!(
        k >= need && v >= need,
        "NHD buffers of {k}/{v} bytes, need {need}"
    );
    assert_eq!(
        layer,
        g.layer_bytes(),
        "page layer slice has the wrong length"
    );
}

#[inline(always)]
fn scatter_tokens(
    g: &PageGeometry,
    k: &[u8],
    v: &[u8],
    first: usize,
    n: usize,
    dst: &mut [u8],
    copy: impl Fn(&mut [u8], &[u8]),
) {
    let row = g.row_bytes();
    for (kv, src) in [(Kv::K, k), (Kv::V, v)] {
        for t in 0..n {
            let s = g.nhd_offset(first + t, 0);
            for (h, src_row) in src[s..s + g.nhd_token_bytes()]
                .chunks_exact(row)
                .enumerate()
            {
                let o = g.hnd_offset(0, h, kv, t);
                copy(&mut dst[o..o + row], src_row);
            }
        }
    }
}

#[inline(always)]
fn gather_tokens(
    g: &PageGeometry,
    src: &[u8],
    first: usize,
    n: usize,
    k: &mut [u8],
    v: &mut [u8],
    copy: impl Fn(&mut [u8], &[u8]),
) {
    let row = g.row_bytes();
    for (kv, dst) in [(Kv::K, k), (Kv::V, v)] {
        for t in 0..n {
            let d = g.nhd_offset(first + t, 0);
            let dst_rows = &mut dst[d..d + g.nhd_token_bytes()];
            for (h, dst_row) in dst_rows.chunks_exact_mut(row).enumerate() {
                let o = g.hnd_offset(0, h, kv, t);
                copy(dst_row, &src[o..o + row]);
            }
        }
    }
}

/// Writes NHD rows `first_token .. first_token + n_tokens` of `k` and `v`
/// (`[tokens][kv_head][head_dim]`) into rows `0 .. n_tokens` of one page's layer slice
/// `dst` (`[kv_head][K|V][page_size][head_dim]`, `layer_bytes` long). Rows of the page at
/// and past `n_tokens` are left as they are.
///
/// # Panics
/// When the buffers are shorter than the token range needs, `n_tokens > page_size`, or
/// `dst.len() != layer_bytes` (callers validate first; a panic here is a bug).
pub fn nhd_to_hnd_layer(
    g: &PageGeometry,
    k: &[u8],
    v: &[u8],
    first_token: usize,
    n_tokens: usize,
    dst: &mut [u8],
) {
    check_sizes(g, k.len(), v.len(), first_token, n_tokens, dst.len());
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if stream::usable(dst, g.row_bytes()) {
        scatter_tokens(g, k, v, first_token, n_tokens, dst, stream::copy_row);
        stream::fence();
        return;
    }
    with_row_copy!(g.row_bytes(), copy => scatter_tokens(g, k, v, first_token, n_tokens, dst, copy));
}

/// The reverse of [`nhd_to_hnd_layer`]: rows `0 .. n_tokens` of the page's layer slice
/// `src` go to NHD rows `first_token .. first_token + n_tokens` of `k` and `v`.
///
/// # Panics
/// As [`nhd_to_hnd_layer`].
pub fn hnd_to_nhd_layer(
    g: &PageGeometry,
    src: &[u8],
    first_token: usize,
    n_tokens: usize,
    k: &mut [u8],
    v: &mut [u8],
) {
    check_sizes(g, k.len(), v.len(), first_token, n_tokens, src.len());
    with_row_copy!(g.row_bytes(), copy => gather_tokens(g, src, first_token, n_tokens, k, v, copy));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DType;

    fn pattern(n: usize, salt: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
            .collect()
    }

    #[test]
    fn matches_the_layout_definition_and_round_trips() {
        // head_dim 3 * f16 = 6-byte rows exercise the generic path; 64 * f32 = 256 the fixed one.
        for (heads, dim, dtype) in [(3, 3, DType::Float16), (2, 64, DType::Float32)] {
            let g = PageGeometry::new(2, heads, 4, dim, dtype).unwrap();
            let tokens = 7;
            let (k, v) = (
                pattern(tokens * g.nhd_token_bytes(), 1),
                pattern(tokens * g.nhd_token_bytes(), 2),
            );
            let mut page = vec![0u8; g.layer_bytes()];
            nhd_to_hnd_layer(&g, &k, &v, 4, 3, &mut page);
            let row = g.row_bytes();
            for h in 0..heads {
                for t in 0..3 {
                    let src = g.nhd_offset(4 + t, h);
                    assert_eq!(
                        page[g.hnd_offset(0, h, Kv::K, t)..][..row],
                        k[src..src + row]
                    );
                    assert_eq!(
                        page[g.hnd_offset(0, h, Kv::V, t)..][..row],
                        v[src..src + row]
                    );
                }
                // The unused last row stays untouched.
                assert!(page[g.hnd_offset(0, h, Kv::K, 3)..][..row]
                    .iter()
                    .all(|&b| b == 0));
            }
            let (mut k2, mut v2) = (vec![0u8; k.len()], vec![0u8; v.len()]);
            hnd_to_nhd_layer(&g, &page, 4, 3, &mut k2, &mut v2);
            let r = 4 * g.nhd_token_bytes()..7 * g.nhd_token_bytes();
            assert_eq!(k2[r.clone()], k[r.clone()]);
            assert_eq!(v2[r.clone()], v[r]);
        }
    }

    #[test]
    fn aligned_and_unaligned_destinations_agree() {
        // Offsetting the destination by one byte disables the streaming path on x86-64.
        let g = PageGeometry::new(1, 3, 8, 64, DType::BFloat16).unwrap();
        let (k, v) = (
            pattern(8 * g.nhd_token_bytes(), 5),
            pattern(8 * g.nhd_token_bytes(), 6),
        );
        let mut a = vec![0u8; g.layer_bytes() + 16];
        let mut b = vec![0u8; g.layer_bytes() + 16];
        let aligned = (16 - a.as_ptr() as usize % 16) % 16;
        let unaligned = (16 - b.as_ptr() as usize % 16) % 16 + 1;
        let a = &mut a[aligned..aligned + g.layer_bytes()];
        let b = &mut b[unaligned..unaligned + g.layer_bytes()];
        nhd_to_hnd_layer(&g, &k, &v, 1, 7, a);
        nhd_to_hnd_layer(&g, &k, &v, 1, 7, b);
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }
}
