//! ggml tensor formats: block layouts, dequantization, and the matrix kernels that
//! read quantized weights directly.
//!
//! The math is exact f32 on dequantized weights: a weight row is dequantized into a
//! small f32 tile (in cache) and multiplied with f32 activations. Batched rows reuse
//! each dequantized tile, which is what makes continuous batching pay off.

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

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `out.len()` elements (a whole number of blocks) from `src`.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
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

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

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
}

/// Weight rows dequantized at once: small enough to stay in L1/L2 while every
/// activation row is multiplied with them.
const TILE_ROWS: usize = 8;

impl QMatrix {
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.block_bytes()
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        dequantize(self.ty, &self.data[r * rb..(r + 1) * rb], &mut out[..self.cols]);
    }

    /// `out[i * rows + r] = dot(x[i * cols ..], W[r])` for `n` activation rows.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(out.len(), n * rows);
        // Results are produced weight-row-major (each task owns a block of weight
        // rows) and transposed afterwards.
        let mut out_t = vec![0f32; rows * n];
        // Enough tasks for both cores, few enough that scheduling stays cheap.
        let rows_per_task = (rows / 16).clamp(TILE_ROWS, 256).div_ceil(TILE_ROWS) * TILE_ROWS;
        out_t.par_chunks_mut(rows_per_task * n).enumerate().for_each(|(task, chunk)| {
            let r0 = task * rows_per_task;
            let nr = chunk.len() / n;
            let mut tile = vec![0f32; TILE_ROWS * cols];
            let mut t0 = 0;
            while t0 < nr {
                let tn = TILE_ROWS.min(nr - t0);
                for t in 0..tn {
                    self.dequantize_row(r0 + t0 + t, &mut tile[t * cols..(t + 1) * cols]);
                }
                for i in 0..n {
                    let xi = &x[i * cols..(i + 1) * cols];
                    for t in 0..tn {
                        chunk[(t0 + t) * n + i] = dot(&tile[t * cols..(t + 1) * cols], xi);
                    }
                }
                t0 += tn;
            }
        });
        for r in 0..rows {
            for i in 0..n {
                out[i * rows + r] = out_t[r * n + i];
            }
        }
    }
}

/// f32 dot product with eight independent accumulators so that it vectorizes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
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
    fn matmul_matches_naive() {
        let (rows, cols, n) = (37, 64, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let m = QMatrix {
            ty: GgmlType::F32,
            rows,
            cols,
            data: w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let mut out = vec![0f32; n * rows];
        m.matmul(&x, n, &mut out);
        for i in 0..n {
            for r in 0..rows {
                let e: f32 = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
                assert!((out[i * rows + r] - e).abs() < 1e-4);
            }
        }
    }
}
