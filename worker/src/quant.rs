//! ggml tensor formats: block layouts, dequantization, and the matrix kernels that
//! read quantized weights directly.
//!
//! The math is exact f32 on dequantized weights: a weight row is dequantized into a
//! small f32 tile (in cache) and multiplied with f32 activations. Batched rows reuse
//! each dequantized tile, which is what makes continuous batching pay off.

// The matrix kernels are compiled twice, once for AVX2+FMA, and dispatched at run
// time; calling a `#[target_feature]` function needs `unsafe`. This is the measured
// hot path (nearly all of the model's time), so it is the one module allowed to.
#![allow(unsafe_code)]

use half::{bf16, f16};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Option<GgmlType> {
        Some(match v {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
        }
    }
}

#[inline(always)]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `out.len()` elements (a whole number of blocks) from `src`.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    dequantize_inline(ty, src, out);
}

#[inline(always)]
fn dequantize_inline(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let bs = ty.block_size();
    let bb = ty.block_bytes();
    for (blk, y) in src.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::F16 => y[0] = h(blk, 0),
            GgmlType::BF16 => y[0] = bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q4_0 => {
                let d = h(blk, 0);
                let qs = &blk[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let d = h(blk, 0);
                let m = h(blk, 2);
                let qs = &blk[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 => {
                let d = h(blk, 0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let qs = &blk[6..22];
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((qs[j] & 0x0F) as u32 | xh0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) as u32 | xh1) as i32 - 16) as f32 * d;
                }
            }
            GgmlType::Q5_1 => {
                let d = h(blk, 0);
                let m = h(blk, 2);
                let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                let qs = &blk[8..24];
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    y[j] = ((qs[j] & 0x0F) as u32 | xh0) as f32 * d + m;
                    y[j + 16] = ((qs[j] >> 4) as u32 | xh1) as f32 * d + m;
                }
            }
            GgmlType::Q8_0 => {
                let d = h(blk, 0);
                for j in 0..32 {
                    y[j] = (blk[2 + j] as i8) as f32 * d;
                }
            }
            GgmlType::Q4K => dequantize_q4k(blk, y),
            GgmlType::Q6K => dequantize_q6k(blk, y),
        }
    }
}

#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

#[inline(always)]
fn dequantize_q4k(blk: &[u8], y: &mut [f32]) {
    let d = h(blk, 0);
    let dmin = h(blk, 2);
    let scales = &blk[4..16];
    let qs = &blk[16..144];
    for (jb, chunk) in (0..4).zip(y.chunks_exact_mut(64)) {
        let (sc1, m1) = scale_min_k4(2 * jb, scales);
        let (sc2, m2) = scale_min_k4(2 * jb + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[jb * 32..jb * 32 + 32];
        for l in 0..32 {
            chunk[l] = d1 * (q[l] & 0xF) as f32 - m1;
            chunk[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

#[inline(always)]
fn dequantize_q6k(blk: &[u8], y: &mut [f32]) {
    let d = h(blk, 208);
    for (n, chunk) in (0..2).zip(y.chunks_exact_mut(128)) {
        let ql = &blk[n * 64..n * 64 + 64];
        let qh = &blk[128 + n * 32..128 + n * 32 + 32];
        let sc = &blk[192 + n * 8..192 + n * 8 + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[k] as i8) as f32;
            chunk[l] = s(is) * q1 as f32;
            chunk[l + 32] = s(is + 2) * q2 as f32;
            chunk[l + 64] = s(is + 4) * q3 as f32;
            chunk[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

/// A weight matrix of `rows` × `cols` (each row contiguous, `cols` long) in its file
/// format.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    /// Per-block (scale, min) as f32 for the 32-element formats, so the fused
    /// kernels do not convert f16 in their inner loop.
    scales: Vec<[f32; 2]>,
}

/// Weight rows dequantized at once: small enough to stay in L1/L2 while every
/// activation row is multiplied with them.
const TILE_ROWS: usize = 8;

impl QMatrix {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> QMatrix {
        let scales = match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => data.chunks_exact(ty.block_bytes()).map(|b| [h(b, 0), 0.0]).collect(),
            GgmlType::Q4_1 => data.chunks_exact(ty.block_bytes()).map(|b| [h(b, 0), h(b, 2)]).collect(),
            _ => Vec::new(),
        };
        QMatrix { ty, rows, cols, data, scales }
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.block_bytes()
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        dequantize(self.ty, &self.data[r * rb..(r + 1) * rb], &mut out[..self.cols]);
    }

    /// `out[i * rows + r] = dot(x[i * cols ..], W[r])` for `n` activation rows,
    /// exact f32 on dequantized weights.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(x, n, out, Precision::Exact);
    }

    /// Like `matmul`; `Precision::Fast` lets Q4_0/Q4_1/Q8_0 use the fused kernels,
    /// which differ from `Exact` only in f32 rounding.
    pub fn matmul_with(&self, x: &[f32], n: usize, out: &mut [f32], precision: Precision) {
        let (rows, cols) = (self.rows, self.cols);
        // Measured on AVX2, the fused kernels beat dequantize-to-tile at every batch
        // size (about 27 vs 11 GMAC/s at 16 rows); a register-blocked tile kernel for
        // large batches is future work.
        let fused = precision == Precision::Fast && matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0);
        // Per-block sums of each activation row, for the fused kernels' offset terms.
        let sums: Vec<f32> = if fused { x.chunks_exact(32).map(|b| b.iter().sum()).collect() } else { Vec::new() };
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(out.len(), n * rows);
        // Results are produced weight-row-major (each task owns a block of weight
        // rows) and transposed afterwards.
        let mut out_t = vec![0f32; rows * n];
        // Enough tasks for both cores, few enough that scheduling stays cheap.
        let rows_per_task = (rows / 16).clamp(TILE_ROWS, 256).div_ceil(TILE_ROWS) * TILE_ROWS;
        out_t.par_chunks_mut(rows_per_task * n).enumerate().for_each(|(task, chunk)| {
            if fused {
                fused_kernel(self, task * rows_per_task, x, &sums, n, chunk);
            } else {
                rows_kernel(self, task * rows_per_task, x, n, chunk);
            }
        });
        if n == 1 {
            out.copy_from_slice(&out_t);
            return;
        }
        for r in 0..rows {
            for i in 0..n {
                out[i * rows + r] = out_t[r * n + i];
            }
        }
    }
}

/// Numerical contract of a matrix product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 math on exactly dequantized weights (the golden tests' path).
    #[default]
    Exact,
    /// Fused quantized kernels: same math, other f32 rounding.
    Fast,
}

impl Precision {
    /// The name requests and the gateway use: `full` (exact) or `reduced` (fast).
    pub fn api_name(self) -> &'static str {
        match self {
            Precision::Exact => "full",
            Precision::Fast => "reduced",
        }
    }

    /// The precision an API name stands for.
    pub fn from_api_name(name: &str) -> Option<Precision> {
        match name {
            "full" => Some(Precision::Exact),
            "reduced" => Some(Precision::Fast),
            _ => None,
        }
    }
}

fn fused_kernel(m: &QMatrix, r0: usize, x: &[f32], sums: &[f32], n: usize, chunk: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: requires only AVX2 and FMA, confirmed present by `has_avx2_fma`.
        unsafe { fused_kernel_avx2(m, r0, x, sums, n, chunk) };
        return;
    }
    fused_kernel_body::<false>(m, r0, x, sums, n, chunk);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fused_kernel_avx2(m: &QMatrix, r0: usize, x: &[f32], sums: &[f32], n: usize, chunk: &mut [f32]) {
    fused_kernel_body::<true>(m, r0, x, sums, n, chunk);
}

/// One weight row at a time, dotted with every activation row; each 32-element
/// block contributes `d * sum(q * x)` (+ the min or -8 offset via `sums`).
#[inline(always)]
fn fused_kernel_body<const FMA: bool>(m: &QMatrix, r0: usize, x: &[f32], sums: &[f32], n: usize, chunk: &mut [f32]) {
    let cols = m.cols;
    let nb = cols / 32;
    let rb = m.row_bytes();
    let bb = m.ty.block_bytes();
    for t in 0..chunk.len() / n {
        let r = r0 + t;
        let row = &m.data[r * rb..(r + 1) * rb];
        let row_scales = &m.scales[r * nb..(r + 1) * nb];
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            let si = &sums[i * nb..(i + 1) * nb];
            let mut acc = [0f32; 8];
            let mut offset = 0f32;
            for (((blk, xb), sx), &[d, min]) in row.chunks_exact(bb).zip(xi.chunks_exact(32)).zip(si).zip(row_scales) {
                let mut s = [0f32; 8];
                match m.ty {
                    GgmlType::Q8_0 => {
                        let q = &blk[2..34];
                        for k in 0..8 {
                            s[k] = (q[k] as i8 as f32) * xb[k]
                                + (q[k + 8] as i8 as f32) * xb[k + 8]
                                + (q[k + 16] as i8 as f32) * xb[k + 16]
                                + (q[k + 24] as i8 as f32) * xb[k + 24];
                        }
                    }
                    GgmlType::Q4_1 | GgmlType::Q4_0 => {
                        let q = if m.ty == GgmlType::Q4_1 { &blk[4..20] } else { &blk[2..18] };
                        for k in 0..8 {
                            s[k] = ((q[k] & 15) as f32) * xb[k]
                                + ((q[k + 8] & 15) as f32) * xb[k + 8]
                                + ((q[k] >> 4) as f32) * xb[k + 16]
                                + ((q[k + 8] >> 4) as f32) * xb[k + 24];
                        }
                        offset += if m.ty == GgmlType::Q4_1 { min * sx } else { -8.0 * d * sx };
                    }
                    _ => {}
                }
                for k in 0..8 {
                    acc[k] = if FMA { d.mul_add(s[k], acc[k]) } else { acc[k] + d * s[k] };
                }
            }
            chunk[t * n + i] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + offset;
        }
    }
}

/// Whether this CPU has AVX2 and FMA (checked once).
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dispatches the hot loop to a copy compiled for AVX2+FMA when the CPU has them:
/// the build targets baseline x86-64 (SSE2), and 256-bit FMA is about 4x faster.
fn rows_kernel(m: &QMatrix, r0: usize, x: &[f32], n: usize, chunk: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: `rows_kernel_avx2` only requires the AVX2 and FMA instruction set
        // extensions, which `has_avx2_fma` has just confirmed this CPU supports.
        unsafe { rows_kernel_avx2(m, r0, x, n, chunk) };
        return;
    }
    rows_kernel_body::<false>(m, r0, x, n, chunk);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_kernel_avx2(m: &QMatrix, r0: usize, x: &[f32], n: usize, chunk: &mut [f32]) {
    rows_kernel_body::<true>(m, r0, x, n, chunk);
}

/// Dequantizes `TILE_ROWS` weight rows at a time into an f32 tile and multiplies
/// every activation row with them.
#[inline(always)]
fn rows_kernel_body<const FMA: bool>(m: &QMatrix, r0: usize, x: &[f32], n: usize, chunk: &mut [f32]) {
    let cols = m.cols;
    let nr = chunk.len() / n;
    let mut tile = vec![0f32; TILE_ROWS * cols];
    let rb = m.row_bytes();
    let mut t0 = 0;
    while t0 < nr {
        let tn = TILE_ROWS.min(nr - t0);
        for t in 0..tn {
            let r = r0 + t0 + t;
            let out = &mut tile[t * cols..(t + 1) * cols];
            if m.scales.is_empty() {
                dequantize_inline(m.ty, &m.data[r * rb..(r + 1) * rb], out);
            } else {
                dequantize_scaled(m, r, out);
            }
        }
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            for t in 0..tn {
                chunk[(t0 + t) * n + i] = dot_inline::<FMA>(&tile[t * cols..(t + 1) * cols], xi);
            }
        }
        t0 += tn;
    }
}

/// Dequantizes row `r` of a 32-element-block format with the precomputed f32
/// scales; the values are identical to `dequantize`'s.
#[inline(always)]
fn dequantize_scaled(m: &QMatrix, r: usize, y: &mut [f32]) {
    let nb = m.cols / 32;
    let bb = m.ty.block_bytes();
    let rb = nb * bb;
    let row = &m.data[r * rb..(r + 1) * rb];
    for ((blk, y), &[d, min]) in row.chunks_exact(bb).zip(y.chunks_exact_mut(32)).zip(&m.scales[r * nb..(r + 1) * nb]) {
        match m.ty {
            GgmlType::Q4_0 => {
                for j in 0..16 {
                    y[j] = ((blk[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((blk[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                for j in 0..16 {
                    y[j] = (blk[4 + j] & 0x0F) as f32 * d + min;
                    y[j + 16] = (blk[4 + j] >> 4) as f32 * d + min;
                }
            }
            _ => {
                for j in 0..32 {
                    y[j] = (blk[2 + j] as i8) as f32 * d;
                }
            }
        }
    }
}

/// f32 dot product with 32 independent accumulators so that it vectorizes and
/// hides FMA latency.
#[inline(always)]
fn dot_inline<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let ca = a.chunks_exact(32);
    let cb = b.chunks_exact(32);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..32 {
            acc[k] = if FMA { x[k].mul_add(y[k], acc[k]) } else { acc[k] + x[k] * y[k] };
        }
    }
    for k in 0..16 {
        acc[k] += acc[k + 16];
    }
    for k in 0..8 {
        acc[k] += acc[k + 8];
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// f32 dot product (used outside the matrix kernels, e.g. attention).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: requires only AVX2 and FMA, confirmed present by `has_avx2_fma`.
        return unsafe { dot_avx2(a, b) };
    }
    dot_inline::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_inline::<true>(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_dequantizes_as_ggml_does() {
        let mut blk = vec![0u8; 20];
        blk[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        blk[4] = 0x3A; // low nibble 10 → element 0, high nibble 3 → element 16
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_1, &blk, &mut y);
        assert_eq!(y[0], 4.0);
        assert_eq!(y[16], 0.5);
        assert_eq!(y[1], -1.0);
    }

    #[test]
    fn fused_kernels_match_exact_within_rounding() {
        let (rows, cols) = (5, 64);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let rb = cols / 32 * ty.block_bytes();
            let mut data: Vec<u8> = (0..rows * rb).map(|i| (i * 37 % 251) as u8).collect();
            // Keep the f16 scales small and finite.
            for blk in data.chunks_exact_mut(ty.block_bytes()) {
                blk[0..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    blk[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
                }
            }
            let m = QMatrix::new(ty, rows, cols, data);
            let x: Vec<f32> = (0..2 * cols).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
            let (mut exact, mut fast) = (vec![0f32; 2 * rows], vec![0f32; 2 * rows]);
            m.matmul(&x, 2, &mut exact);
            m.matmul_with(&x, 2, &mut fast, Precision::Fast);
            for (a, b) in exact.iter().zip(&fast) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{ty:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn matmul_matches_naive() {
        let (rows, cols, n) = (37, 64, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let m = QMatrix::new(GgmlType::F32, rows, cols, w.iter().flat_map(|v| v.to_le_bytes()).collect());
        let mut out = vec![0f32; n * rows];
        m.matmul(&x, n, &mut out);
        let mut fast = vec![0f32; n * rows];
        m.matmul_with(&x, n, &mut fast, Precision::Fast);
        assert_eq!(out, fast, "F32 has no fused kernel, so Fast must equal Exact");
        for i in 0..n {
            for r in 0..rows {
                let e: f32 = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
                assert!((out[i * rows + r] - e).abs() < 1e-4);
            }
        }
    }
}
