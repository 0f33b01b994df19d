//! Conversion of one layer of one page between the engine's NHD rows and the host's HND page.
//!
//! Pure, safe functions on byte slices: the worker threads (`worker.rs`) turn validated raw
//! buffers into slices and call these; tests and Miri call them directly. Offsets come only
//! from [`PageGeometry::hnd_offset`] / [`PageGeometry::nhd_offset`]; the hot loops walk the
//! destination (or source) page sequentially, one `head_dim` row at a time, with the row
//! length a compile-time constant for the common sizes so each row is a few vector moves.

use crate::layout::{Kv, PageGeometry};

/// Copies rows `dst[r*ROW..] <- src[start + r*stride..]` for `r < n` (or the reverse
/// direction through [`scatter_rows`]).
#[inline(always)]
fn gather_rows<const ROW: usize>(
    dst: &mut [u8],
    src: &[u8],
    start: usize,
    stride: usize,
    n: usize,
) {
    for (r, d) in dst.chunks_exact_mut(ROW).take(n).enumerate() {
        let s = start + r * stride;
        let d: &mut [u8; ROW] = d.try_into().expect("chunks_exact yields ROW bytes");
        let s: &[u8; ROW] = src[s..s + ROW].try_into().expect("slice of ROW bytes");
        *d = *s;
    }
}

#[inline(always)]
fn scatter_rows<const ROW: usize>(
    dst: &mut [u8],
    src: &[u8],
    start: usize,
    stride: usize,
    n: usize,
) {
    for (r, s) in src.chunks_exact(ROW).take(n).enumerate() {
        let o = start + r * stride;
        let d: &mut [u8; ROW] = (&mut dst[o..o + ROW])
            .try_into()
            .expect("slice of ROW bytes");
        let s: &[u8; ROW] = s.try_into().expect("chunks_exact yields ROW bytes");
        *d = *s;
    }
}

fn gather_dyn(dst: &mut [u8], src: &[u8], start: usize, stride: usize, n: usize, row: usize) {
    for (r, d) in dst.chunks_exact_mut(row).take(n).enumerate() {
        let s = start + r * stride;
        d.copy_from_slice(&src[s..s + row]);
    }
}

fn scatter_dyn(dst: &mut [u8], src: &[u8], start: usize, stride: usize, n: usize, row: usize) {
    for (r, s) in src.chunks_exact(row).take(n).enumerate() {
        let o = start + r * stride;
        dst[o..o + row].copy_from_slice(s);
    }
}

macro_rules! dispatch_row {
    ($row:expr, $fixed:ident, $dynamic:ident, $($arg:expr),*) => {
        match $row {
            64 => $fixed::<64>($($arg),*),
            128 => $fixed::<128>($($arg),*),
            256 => $fixed::<256>($($arg),*),
            512 => $fixed::<512>($($arg),*),
            row => $dynamic($($arg,)* row),
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
    let row = g.row_bytes();
    let stride = g.nhd_token_bytes();
    for head in 0..g.num_kv_heads() {
        for (kv, src) in [(Kv::K, k), (Kv::V, v)] {
            let o = g.hnd_offset(0, head, kv, 0);
            let block = &mut dst[o..o + g.block_bytes()];
            let start = g.nhd_offset(first_token, head);
            dispatch_row!(
                row,
                gather_rows,
                gather_dyn,
                block,
                src,
                start,
                stride,
                n_tokens
            );
        }
    }
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
    let row = g.row_bytes();
    let stride = g.nhd_token_bytes();
    for head in 0..g.num_kv_heads() {
        for (kv, dst) in [(Kv::K, &mut *k), (Kv::V, &mut *v)] {
            let o = g.hnd_offset(0, head, kv, 0);
            let block = &src[o..o + g.block_bytes()];
            let start = g.nhd_offset(first_token, head);
            dispatch_row!(
                row,
                scatter_rows,
                scatter_dyn,
                dst,
                block,
                start,
                stride,
                n_tokens
            );
        }
    }
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
}
