//! ggml tensor formats: block layouts, dequantization, and the matrix kernels that
//! read quantized weights directly.
//!
//! The math is f32 on exactly dequantized weights: a few weight rows are dequantized
//! into a small f32 tile (in cache) and multiplied with f32 activations. Batched rows
//! reuse each dequantized tile, which is what makes continuous batching pay off.

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

    /// Like `matmul`; `Precision::Fast` lets Q4_0/Q4_1/Q8_0 use the register-blocked
    /// kernel, which sees the same dequantized weights as `Exact` and differs only in
    /// the order its dot products are summed.
    pub fn matmul_with(&self, x: &[f32], n: usize, out: &mut [f32], precision: Precision) {
        matmul_group(&[self], x, n, &mut [out], precision);
    }

    fn fused(&self, precision: Precision) -> bool {
        precision == Precision::Fast && matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }

    /// Weight rows per parallel task: enough tasks for both cores, few enough that
    /// scheduling stays cheap.
    fn rows_per_task(&self) -> usize {
        (self.rows / 16).clamp(TILE_ROWS, 256).div_ceil(TILE_ROWS) * TILE_ROWS
    }
}

/// `outs[j] = mats[j] · x` (each as `QMatrix::matmul_with`) for matrices that read
/// the same activations (q/k/v, gate/up), as one parallel region: a step then waits
/// for one fork-join per group instead of one per matrix. Every output element is
/// computed by the same kernel call as alone, so results do not change.
pub fn matmul_group(mats: &[&QMatrix], x: &[f32], n: usize, outs: &mut [&mut [f32]], precision: Precision) {
    debug_assert_eq!(mats.len(), outs.len());
    // Results are produced weight-row-major (each task owns a block of weight rows)
    // and transposed afterwards; one activation row's layout is the output's own.
    let mut staged: Vec<Vec<f32>> =
        if n == 1 { Vec::new() } else { mats.iter().map(|m| vec![0f32; m.rows * n]).collect() };
    {
        let targets: Vec<&mut [f32]> = if n == 1 {
            outs.iter_mut().map(|o| &mut **o).collect()
        } else {
            staged.iter_mut().map(Vec::as_mut_slice).collect()
        };
        let mut tasks = Vec::new();
        for (&m, out_t) in mats.iter().zip(targets) {
            debug_assert_eq!(x.len(), n * m.cols);
            debug_assert_eq!(out_t.len(), n * m.rows);
            let rpt = m.rows_per_task();
            let fused = m.fused(precision);
            tasks.extend(out_t.chunks_mut(rpt * n).enumerate().map(|(task, chunk)| (m, fused, task * rpt, chunk)));
        }
        tasks.into_par_iter().for_each(|(m, fused, r0, chunk)| {
            if fused {
                fused_kernel(m, r0, x, n, chunk);
            } else {
                rows_kernel(m, r0, x, n, chunk);
            }
        });
    }
    for ((m, out_t), out) in mats.iter().zip(&staged).zip(outs.iter_mut()) {
        let rows = m.rows;
        // In blocks of weight rows, so that both sides stay in cache (the output
        // head's results are 3 MiB at 16 rows).
        for r0 in (0..rows).step_by(64) {
            let r1 = (r0 + 64).min(rows);
            for (i, out_i) in out.chunks_exact_mut(rows).enumerate() {
                for r in r0..r1 {
                    out_i[r] = out_t[r * n + i];
                }
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

/// Weight rows the blocked kernel dequantizes together into an f32 tile; every
/// dequantized element is then used by all activation rows, so the decode work is
/// shared by the whole batch instead of repeated per row.
const BLOCK_ROWS: usize = 4;
/// Activation rows of one micro-tile: its `BLOCK_ROWS × ACT_ROWS` accumulators (8
/// f32 lanes each) stay in registers while the columns stream past. 4 × 2 measured
/// fastest on Zen 4 among 4×3, 3×4, 2×4, 4×4, 5×2, 6×2 and 2×6 (more accumulators
/// spill the 16 ymm registers).
const ACT_ROWS: usize = 2;

/// Block formats of the fast kernel as const generic tags, so each kernel is compiled
/// once per format with no per-block branch.
const FMT_Q4_0: u8 = 0;
const FMT_Q4_1: u8 = 1;
const FMT_Q8_0: u8 = 2;

const fn fmt_block_bytes(fmt: u8) -> usize {
    match fmt {
        FMT_Q4_0 => 18,
        FMT_Q4_1 => 20,
        _ => 34,
    }
}

/// The `Precision::Fast` kernel for the 32-element formats. It sees the same
/// dequantized weights as `Exact`, and each (weight row, activation row) pair is
/// reduced the same way wherever it sits in the batch or micro-tile: 8 lanes in
/// column order, one fixed horizontal sum. So a row's result does not depend on
/// which other rows share the batch.
fn fused_kernel(m: &QMatrix, r0: usize, x: &[f32], n: usize, chunk: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: these require only AVX2 and FMA, confirmed present by `has_avx2_fma`.
        unsafe {
            match m.ty {
                GgmlType::Q4_0 => avx2::fused_kernel::<FMT_Q4_0>(m, r0, x, n, chunk),
                GgmlType::Q4_1 => avx2::fused_kernel::<FMT_Q4_1>(m, r0, x, n, chunk),
                _ => avx2::fused_kernel::<FMT_Q8_0>(m, r0, x, n, chunk),
            }
        }
        return;
    }
    fused_kernel_portable(m, r0, x, n, chunk);
}

/// The fast kernel with AVX2 and FMA intrinsics.
///
/// Loads and stores go through `read`/`write` (a packed-struct access) rather than
/// `_mm256_loadu_ps`/`_mm256_storeu_ps`: those copy through `ptr::copy_nonoverlapping`,
/// whose debug-build precondition check takes the destination's address and so
/// forces every loaded vector through the stack. The dev profile (tests, `worker
/// bench`) keeps debug assertions, where that made the kernel about 4× slower.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{fmt_block_bytes, QMatrix, ACT_ROWS, BLOCK_ROWS, FMT_Q4_0, FMT_Q4_1};

    #[repr(C, packed)]
    struct Unaligned<T>(T);

    /// # Safety
    /// `p` must be valid for reading `size_of::<T>()` bytes (any alignment).
    #[inline(always)]
    unsafe fn read<T: Copy>(p: *const T) -> T {
        // SAFETY: the caller guarantees `p` is readable for a `T`; `Unaligned<T>` has
        // alignment 1, so the read is valid at any address.
        unsafe { (*p.cast::<Unaligned<T>>()).0 }
    }

    /// # Safety
    /// `p` must be valid for writing 8 f32s (any alignment).
    #[inline(always)]
    unsafe fn write(p: *mut f32, v: __m256) {
        // SAFETY: as for `read`.
        unsafe { (*p.cast::<Unaligned<__m256>>()).0 = v };
    }

    /// Elements `8k..8k + 8` of the block at `blk`, exactly as `dequantize` computes
    /// them (a product and a sum, not a fused multiply-add).
    ///
    /// # Safety
    /// `blk` must point at a whole block of format `F`; `k < 4`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn decode8<const F: u8>(blk: *const u8, k: usize, d: __m256, min: __m256) -> __m256 {
        // Q4_0/Q4_1: element j < 16 is the low nibble of quant byte j, element j + 16
        // its high nibble. Q8_0: element j is quant byte j.
        let q8 = |offset: usize| {
            // SAFETY: the offsets below keep these 8 bytes inside the block: at most
            // 2 + 8 + 8 = 18 (Q4_0), 4 + 8 + 8 = 20 (Q4_1), 2 + 24 + 8 = 34 (Q8_0).
            _mm_cvtsi64_si128(unsafe { read(blk.add(offset).cast::<i64>()) })
        };
        match F {
            FMT_Q4_0 | FMT_Q4_1 => {
                let base = if F == FMT_Q4_1 { 4 } else { 2 };
                let q = _mm256_cvtepu8_epi32(q8(base + 8 * (k % 2)));
                let q = if k < 2 { _mm256_and_si256(q, _mm256_set1_epi32(0x0F)) } else { _mm256_srli_epi32::<4>(q) };
                if F == FMT_Q4_1 {
                    _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), min)
                } else {
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8))), d)
                }
            }
            _ => _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8(2 + 8 * k))), d),
        }
    }

    /// Writes weight-row-major results (`chunk[t * n + i]`) for the weight rows from
    /// `r0` on. One activation row decodes in registers; a batch dequantizes
    /// `BLOCK_ROWS` weight rows into a tile and runs register micro-tiles over it.
    /// Both paths do the same operations per (weight row, activation row) pair.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fused_kernel<const F: u8>(m: &QMatrix, r0: usize, x: &[f32], n: usize, chunk: &mut [f32]) {
        if n == 1 {
            single_row::<F>(m, r0, x, chunk);
            return;
        }
        let cols = m.cols;
        let nr = chunk.len() / n;
        // Rows past the matrix's last tile keep zeros; their results are not stored.
        let mut tile = vec![0f32; BLOCK_ROWS * cols];
        for t0 in (0..nr).step_by(BLOCK_ROWS) {
            let tr = BLOCK_ROWS.min(nr - t0);
            for (t, out) in tile.chunks_exact_mut(cols).take(tr).enumerate() {
                dequantize_row::<F>(m, r0 + t0 + t, out);
            }
            let mut i = 0;
            while i < n {
                let a = ACT_ROWS.min(n - i);
                let mut dots = [[0f32; ACT_ROWS]; BLOCK_ROWS];
                if a == ACT_ROWS {
                    micro_tile::<ACT_ROWS>(&tile, &x[i * cols..(i + a) * cols], cols, &mut dots);
                } else {
                    micro_tile::<1>(&tile, &x[i * cols..(i + 1) * cols], cols, &mut dots);
                }
                for (t, d) in dots.iter().take(tr).enumerate() {
                    chunk[(t0 + t) * n + i..(t0 + t) * n + i + a].copy_from_slice(&d[..a]);
                }
                i += a;
            }
        }
    }

    /// One activation row, decoded straight into registers (no tile to store and
    /// reload). `BLOCK_ROWS` accumulators run interleaved for the FMA latency, on rows
    /// a quarter of the chunk apart: each lane then walks consecutive rows, one long
    /// sequential stream the hardware prefetcher follows. (Adjacent rows made short
    /// streams it missed: the 49152-row output head took twice as long.)
    #[target_feature(enable = "avx2,fma")]
    fn single_row<const F: u8>(m: &QMatrix, r0: usize, x: &[f32], chunk: &mut [f32]) {
        let nb = m.cols / 32;
        let bb = fmt_block_bytes(F);
        let x = &x[..nb * 32];
        let nr = chunk.len();
        let span = nr.div_ceil(BLOCK_ROWS);
        for j in 0..span {
            // Lanes past the chunk's end repeat its last row; their results are not stored.
            let rows: [usize; BLOCK_ROWS] = std::array::from_fn(|t| (t * span + j).min(nr - 1));
            let data: [&[u8]; BLOCK_ROWS] = rows.map(|t| &m.data[(r0 + t) * nb * bb..(r0 + t + 1) * nb * bb]);
            let scales: [&[[f32; 2]]; BLOCK_ROWS] = rows.map(|t| &m.scales[(r0 + t) * nb..(r0 + t + 1) * nb]);
            let mut acc = [_mm256_setzero_ps(); BLOCK_ROWS];
            for (b, xb) in x.chunks_exact(32).enumerate() {
                for k in 0..4 {
                    // SAFETY: `xb` holds 32 f32s and `k < 4`.
                    let xv = unsafe { read(xb.as_ptr().add(8 * k).cast::<__m256>()) };
                    for t in 0..BLOCK_ROWS {
                        let [d, min] = scales[t][b];
                        // SAFETY: `b < nb`, so the block lies inside the row's `nb * bb` bytes.
                        let w = unsafe {
                            decode8::<F>(data[t].as_ptr().add(b * bb), k, _mm256_set1_ps(d), _mm256_set1_ps(min))
                        };
                        acc[t] = _mm256_fmadd_ps(w, xv, acc[t]);
                    }
                }
            }
            for (t, &acc) in acc.iter().enumerate() {
                if t * span + j < nr {
                    chunk[t * span + j] = hsum(acc);
                }
            }
        }
    }

    /// Dequantizes row `r` into `out`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn dequantize_row<const F: u8>(m: &QMatrix, r: usize, out: &mut [f32]) {
        let nb = m.cols / 32;
        let bb = fmt_block_bytes(F);
        let row = &m.data[r * nb * bb..(r + 1) * nb * bb];
        let scales = &m.scales[r * nb..(r + 1) * nb];
        for ((blk, y), &[d, min]) in row.chunks_exact(bb).zip(out[..nb * 32].chunks_exact_mut(32)).zip(scales) {
            let (d, min) = (_mm256_set1_ps(d), _mm256_set1_ps(min));
            for k in 0..4 {
                // SAFETY: `blk` is one whole block and `y` holds 32 f32s.
                unsafe { write(y.as_mut_ptr().add(8 * k), decode8::<F>(blk.as_ptr(), k, d, min)) };
            }
        }
    }

    /// `dots[t][k] = tile row t · x row k` for `BLOCK_ROWS` tile rows and `A`
    /// activation rows (`x` holds `A` rows of `cols`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn micro_tile<const A: usize>(tile: &[f32], x: &[f32], cols: usize, dots: &mut [[f32; ACT_ROWS]; BLOCK_ROWS]) {
        assert!(cols % 8 == 0 && tile.len() >= BLOCK_ROWS * cols && x.len() >= A * cols);
        let (w, xp) = (tile.as_ptr(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); A]; BLOCK_ROWS];
        for c in (0..cols).step_by(8) {
            for k in 0..A {
                // SAFETY: `c + 8 <= cols`, and the assert above bounds `x` to `A` rows
                // and `tile` to `BLOCK_ROWS` rows of `cols`.
                let xv = unsafe { read(xp.add(k * cols + c).cast::<__m256>()) };
                for (t, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let wv = unsafe { read(w.add(t * cols + c).cast::<__m256>()) };
                    acc[k] = _mm256_fmadd_ps(wv, xv, acc[k]);
                }
            }
        }
        for (d, acc) in dots.iter_mut().zip(&acc) {
            for k in 0..A {
                d[k] = hsum(acc[k]);
            }
        }
    }

    /// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

/// The same blocking and lane layout without SIMD intrinsics (for CPUs without AVX2).
fn fused_kernel_portable(m: &QMatrix, r0: usize, x: &[f32], n: usize, chunk: &mut [f32]) {
    let cols = m.cols;
    let nr = chunk.len() / n;
    let mut tile = vec![0f32; BLOCK_ROWS * cols];
    for t0 in (0..nr).step_by(BLOCK_ROWS) {
        let tr = BLOCK_ROWS.min(nr - t0);
        for (t, out) in tile.chunks_exact_mut(cols).take(tr).enumerate() {
            dequantize_scaled(m, r0 + t0 + t, out);
        }
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            for (t, w) in tile.chunks_exact(cols).take(tr).enumerate() {
                let mut acc = [0f32; 8];
                for (wc, xc) in w.chunks_exact(8).zip(xi.chunks_exact(8)) {
                    for k in 0..8 {
                        acc[k] += wc[k] * xc[k];
                    }
                }
                chunk[(t0 + t) * n + i] = hsum8(&acc);
            }
        }
    }
}

/// The horizontal sum in the order the AVX2 kernel uses.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
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

/// Adds the bias `b` (when there is one) to each `b.len()`-wide row of `x`.
pub fn add_bias(x: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in x.chunks_exact_mut(b.len()) {
            for (a, bb) in row.iter_mut().zip(b) {
                *a += bb;
            }
        }
    }
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

    /// A matrix of `rows` × `cols` in `ty` with varied quants, scales and mins.
    fn test_matrix(ty: GgmlType, rows: usize, cols: usize) -> QMatrix {
        let bb = ty.block_bytes();
        let mut data: Vec<u8> = (0..rows * cols / 32 * bb).map(|i| (i * 37 % 251) as u8).collect();
        for (b, blk) in data.chunks_exact_mut(bb).enumerate() {
            blk[0..2].copy_from_slice(&f16::from_f32(0.002 * (1 + b % 7) as f32).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                blk[2..4].copy_from_slice(&f16::from_f32(-0.01 * (b % 5) as f32).to_le_bytes());
            }
        }
        QMatrix::new(ty, rows, cols, data)
    }

    fn test_activations(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0 + (i % 7) as f32 * 0.01).collect()
    }

    /// The blocked fast kernel against the exact path, with row and batch counts that
    /// are not multiples of its tile sizes, and each batch row bit-identical to the
    /// same row computed alone (what makes batched sampling reproducible).
    #[test]
    fn blocked_kernel_matches_exact_and_is_batch_invariant() {
        let cols = 96;
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            for rows in [1, 3, 4, 5, 13, 37] {
                let m = test_matrix(ty, rows, cols);
                for n in 1..=9 {
                    let x = test_activations(n, cols);
                    let (mut exact, mut fast) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                    m.matmul(&x, n, &mut exact);
                    m.matmul_with(&x, n, &mut fast, Precision::Fast);
                    for (a, b) in exact.iter().zip(&fast) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{ty:?} {rows}x{cols} n={n}: {a} vs {b}");
                    }
                    for i in 0..n {
                        let mut alone = vec![0f32; rows];
                        m.matmul_with(&x[i * cols..(i + 1) * cols], 1, &mut alone, Precision::Fast);
                        assert_eq!(alone, fast[i * rows..(i + 1) * rows], "{ty:?} {rows}x{cols}: row {i} of {n}");
                    }
                }
            }
        }
    }

    /// The portable kernel (CPUs without AVX2) keeps the same contract.
    #[test]
    fn portable_blocked_kernel_matches_exact_and_is_batch_invariant() {
        let (rows, cols) = (13, 64);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let m = test_matrix(ty, rows, cols);
            let n = 5;
            let x = test_activations(n, cols);
            let mut exact = vec![0f32; n * rows];
            m.matmul(&x, n, &mut exact);
            // The kernel writes weight-row-major: out_t[r * n + i].
            let mut fast_t = vec![0f32; rows * n];
            fused_kernel_portable(&m, 0, &x, n, &mut fast_t);
            for r in 0..rows {
                for i in 0..n {
                    let (a, b) = (exact[i * rows + r], fast_t[r * n + i]);
                    assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{ty:?} r={r} i={i}: {a} vs {b}");
                    let mut alone = vec![0f32; rows];
                    fused_kernel_portable(&m, 0, &x[i * cols..(i + 1) * cols], 1, &mut alone);
                    assert_eq!(alone[r], b, "{ty:?} r={r} i={i}");
                }
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
