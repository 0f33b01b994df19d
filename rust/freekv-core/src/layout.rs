//! Page geometry and the byte offsets of the host (HND) and engine (NHD) layouts.
//!
//! A host page holds one logical page (`page_size` tokens) of one request for all layers:
//!
//! ```text
//! page  = [layer][kv_head][K|V][page_size][head_dim]      (HND inside each layer)
//! chunk = one (layer, kv_head): K block then V block, 2 * page_size * head_dim elements
//! ```
//!
//! so the K and V of one (layer, page, head) are one contiguous chunk, the unit a recall
//! reads. The engine side (SGLang's per-layer K and V buffers) is NHD: `[tokens][kv_head]
//! [head_dim]`. Every offset in the crate comes from [`PageGeometry::hnd_offset`] and
//! [`PageGeometry::nhd_offset`]; nothing else multiplies strides.
//!
//! This module is pure: no allocation, no I/O, no unsafe.

use crate::error::{FreeKvError, Result};

/// Element type of the KV cache. Conversion copies bytes, so only the size matters to it;
/// the name is what the binding checks tensors against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    Float32,
    /// IEEE binary16.
    Float16,
    /// bfloat16.
    BFloat16,
    /// OCP FP8 E4M3 (finite-only variant, as torch's `float8_e4m3fn`).
    Float8E4M3Fn,
}

impl DType {
    /// Every dtype, in a fixed order (for tests and error messages).
    pub const ALL: [DType; 4] = [
        DType::Float32,
        DType::Float16,
        DType::BFloat16,
        DType::Float8E4M3Fn,
    ];

    /// Bytes per element.
    #[must_use]
    pub const fn size(self) -> usize {
        match self {
            DType::Float32 => 4,
            DType::Float16 | DType::BFloat16 => 2,
            DType::Float8E4M3Fn => 1,
        }
    }

    /// The torch name without the `torch.` prefix (`"bfloat16"`, ...).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::BFloat16 => "bfloat16",
            DType::Float8E4M3Fn => "float8_e4m3fn",
        }
    }

    /// Parses a torch dtype name, with or without the `torch.` prefix.
    ///
    /// # Errors
    /// [`FreeKvError::InvalidGeometry`] for any other name.
    pub fn from_name(name: &str) -> Result<Self> {
        let bare = name.strip_prefix("torch.").unwrap_or(name);
        DType::ALL
            .into_iter()
            .find(|d| d.name() == bare)
            .ok_or_else(|| {
                FreeKvError::InvalidGeometry(format!(
                    "unknown dtype {name:?}; expected one of float32, float16, bfloat16, \
                     float8_e4m3fn"
                ))
            })
    }
}

/// Which half of a chunk: keys first, then values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kv {
    /// Keys (index 0).
    K = 0,
    /// Values (index 1).
    V = 1,
}

impl Kv {
    /// `0` for K, `1` for V (the Python API's `kv` argument).
    ///
    /// # Errors
    /// [`FreeKvError::LayoutMismatch`] for any other value.
    pub fn from_index(kv: usize) -> Result<Self> {
        match kv {
            0 => Ok(Kv::K),
            1 => Ok(Kv::V),
            _ => Err(FreeKvError::LayoutMismatch(format!(
                "kv must be 0 (K) or 1 (V), got {kv}"
            ))),
        }
    }
}

/// Shape of one host page. Construct with [`PageGeometry::new`], which checks that every
/// dimension is positive and that the page size in bytes fits in `usize` (so no offset
/// computed from an in-range index can overflow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageGeometry {
    num_layers: usize,
    num_kv_heads: usize,
    page_size: usize,
    head_dim: usize,
    dtype: DType,
}

impl PageGeometry {
    /// Checks and builds a geometry.
    ///
    /// # Errors
    /// [`FreeKvError::InvalidGeometry`] when a dimension is zero or the page overflows.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        page_size: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<Self> {
        for (name, v) in [
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("page_size", page_size),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(FreeKvError::InvalidGeometry(format!(
                    "{name} must be positive"
                )));
            }
        }
        let page_bytes = [
            num_layers,
            num_kv_heads,
            2,
            page_size,
            head_dim,
            dtype.size(),
        ]
        .into_iter()
        .try_fold(1usize, usize::checked_mul);
        match page_bytes {
            // Offsets are also handed to Python as i64 and to torch as element counts.
            Some(b) if isize::try_from(b).is_ok() => Ok(Self {
                num_layers,
                num_kv_heads,
                page_size,
                head_dim,
                dtype,
            }),
            _ => Err(FreeKvError::InvalidGeometry(
                "page size in bytes overflows".to_owned(),
            )),
        }
    }

    /// Layers per page.
    #[must_use]
    pub const fn num_layers(&self) -> usize {
        self.num_layers
    }
    /// KV heads per layer.
    #[must_use]
    pub const fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// Tokens per page.
    #[must_use]
    pub const fn page_size(&self) -> usize {
        self.page_size
    }
    /// Elements per head vector.
    #[must_use]
    pub const fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Element type.
    #[must_use]
    pub const fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes per element.
    #[must_use]
    pub const fn elem_size(&self) -> usize {
        self.dtype.size()
    }
    /// Bytes of one head vector of one token (a row in both layouts).
    #[must_use]
    pub const fn row_bytes(&self) -> usize {
        self.head_dim * self.dtype.size()
    }
    /// Bytes of the K (or V) block of one (layer, head): `page_size` rows.
    #[must_use]
    pub const fn block_bytes(&self) -> usize {
        self.page_size * self.row_bytes()
    }
    /// Bytes of one (layer, head) chunk: K block then V block.
    #[must_use]
    pub const fn chunk_bytes(&self) -> usize {
        2 * self.block_bytes()
    }
    /// Bytes of one layer of a page.
    #[must_use]
    pub const fn layer_bytes(&self) -> usize {
        self.num_kv_heads * self.chunk_bytes()
    }
    /// Bytes of one page (all layers).
    #[must_use]
    pub const fn page_bytes(&self) -> usize {
        self.num_layers * self.layer_bytes()
    }
    /// Bytes of one token in an NHD K (or V) buffer: all heads.
    #[must_use]
    pub const fn nhd_token_bytes(&self) -> usize {
        self.num_kv_heads * self.row_bytes()
    }

    /// Byte offset, inside a page, of row `token` of the `kv` block of (`layer`, `kv_head`).
    /// This is the single source of the host layout. Indices must be in range (checked in
    /// debug builds; use [`PageGeometry::offset`] for a checked version).
    #[must_use]
    pub fn hnd_offset(&self, layer: usize, kv_head: usize, kv: Kv, token: usize) -> usize {
        debug_assert!(layer < self.num_layers && kv_head < self.num_kv_heads);
        debug_assert!(token < self.page_size);
        ((layer * self.num_kv_heads + kv_head) * 2 + kv as usize) * self.block_bytes()
            + token * self.row_bytes()
    }

    /// Byte offset of (`token`, `kv_head`) in an NHD buffer `[tokens][kv_head][head_dim]`.
    #[must_use]
    pub fn nhd_offset(&self, token: usize, kv_head: usize) -> usize {
        debug_assert!(kv_head < self.num_kv_heads);
        (token * self.num_kv_heads + kv_head) * self.row_bytes()
    }

    /// Checked byte offset of the `kv` block of (`layer`, `kv_head`) inside a page.
    ///
    /// # Errors
    /// [`FreeKvError::LayoutMismatch`] when an index is out of range.
    pub fn offset(&self, layer: usize, kv_head: usize, kv: Kv) -> Result<usize> {
        if layer >= self.num_layers || kv_head >= self.num_kv_heads {
            return Err(FreeKvError::LayoutMismatch(format!(
                "(layer {layer}, kv_head {kv_head}) out of range for {} layers x {} heads",
                self.num_layers, self.num_kv_heads
            )));
        }
        Ok(self.hnd_offset(layer, kv_head, kv, 0))
    }

    /// Checks a layer index.
    ///
    /// # Errors
    /// [`FreeKvError::LayoutMismatch`] when `layer >= num_layers`.
    pub fn check_layer(&self, layer: usize) -> Result<()> {
        if layer < self.num_layers {
            Ok(())
        } else {
            Err(FreeKvError::LayoutMismatch(format!(
                "layer {layer} out of range for {} layers",
                self.num_layers
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_8b_sizes() {
        let g = PageGeometry::new(32, 8, 32, 128, DType::BFloat16).unwrap();
        assert_eq!(g.row_bytes(), 256);
        assert_eq!(g.chunk_bytes(), 16 * 1024);
        assert_eq!(g.layer_bytes(), 128 * 1024);
        assert_eq!(g.page_bytes(), 4 * 1024 * 1024);
        // 128 KiB of KV per token, as in DESIGN.md.
        assert_eq!(g.page_bytes() / g.page_size(), 128 * 1024);
    }

    #[test]
    fn offsets_tile_the_page_exactly_once() {
        for dtype in DType::ALL {
            let g = PageGeometry::new(3, 5, 4, 6, dtype).unwrap();
            let mut seen = vec![0u8; g.page_bytes()];
            for layer in 0..3 {
                for head in 0..5 {
                    for kv in [Kv::K, Kv::V] {
                        for t in 0..4 {
                            let o = g.hnd_offset(layer, head, kv, t);
                            for b in &mut seen[o..o + g.row_bytes()] {
                                *b += 1;
                            }
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn chunk_is_contiguous_k_then_v() {
        let g = PageGeometry::new(2, 3, 16, 8, DType::Float16).unwrap();
        let k = g.offset(1, 2, Kv::K).unwrap();
        let v = g.offset(1, 2, Kv::V).unwrap();
        assert_eq!(v - k, g.block_bytes());
        assert_eq!(k % g.chunk_bytes(), 0);
        assert_eq!(
            g.hnd_offset(1, 2, Kv::V, 15) + g.row_bytes(),
            k + g.chunk_bytes()
        );
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(matches!(
            PageGeometry::new(0, 8, 32, 128, DType::BFloat16),
            Err(FreeKvError::InvalidGeometry(_))
        ));
        assert!(matches!(
            PageGeometry::new(usize::MAX / 2, 8, 32, 128, DType::BFloat16),
            Err(FreeKvError::InvalidGeometry(_))
        ));
        assert!(matches!(
            DType::from_name("int8"),
            Err(FreeKvError::InvalidGeometry(_))
        ));
        assert_eq!(DType::from_name("torch.bfloat16").unwrap(), DType::BFloat16);
        let g = PageGeometry::new(2, 2, 2, 2, DType::Float32).unwrap();
        assert!(matches!(
            g.offset(2, 0, Kv::K),
            Err(FreeKvError::LayoutMismatch(_))
        ));
        assert!(matches!(
            Kv::from_index(2),
            Err(FreeKvError::LayoutMismatch(_))
        ));
    }
}
