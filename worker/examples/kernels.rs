//! Kernel and forward-pass micro-benchmark: `cargo run -p worker --example kernels`
//! (set FAST=1 for the forward pass with the fused kernels).
#![allow(clippy::unwrap_used, clippy::print_stdout)]
use std::time::Instant;
use worker::forward::BatchItem;
use worker::model::LoadedModel;
use worker::native;
use worker::quant::{GgmlType, QMatrix};
fn main() {
    let m = LoadedModel::load(&worker::fetch::default_model_path(), false).unwrap();
    let precision = if std::env::var("FAST").is_ok() { worker::quant::Precision::Fast } else { worker::quant::Precision::Exact };
    let model = &m.model;
    for n in [1usize, 16] {
        let mut caches: Vec<_> = (0..n).map(|_| native::new_cache(model)).collect();
        let toks: Vec<[u32; 1]> = (0..n).map(|i| [100 + i as u32]).collect();
        for _ in 0..3 {
            let mut items: Vec<_> = caches.iter_mut().zip(&toks).map(|(c, t)| BatchItem { cache: c, tokens: t, want_logits: true, all_logits: false }).collect();
            native::forward(model, &mut items, precision).unwrap();
        }
        let t = Instant::now();
        let iters = 10;
        for _ in 0..iters {
            let mut items: Vec<_> = caches.iter_mut().zip(&toks).map(|(c, t)| BatchItem { cache: c, tokens: t, want_logits: true, all_logits: false }).collect();
            native::forward(model, &mut items, precision).unwrap();
        }
        println!("forward n={n}: {:.2} ms/step", t.elapsed().as_secs_f64() * 1e3 / iters as f64);
    }
    for (ty, rows, cols) in [(GgmlType::Q4_1, 1536, 576), (GgmlType::Q8_0, 49152, 576)] {
        let rb = cols / 32 * ty.block_bytes();
        let mq = QMatrix::new(ty, rows, cols, vec![1u8; rows * rb]);
        for n in [1usize, 2, 4, 16] {
            let x = vec![0.5f32; n * cols];
            let mut out = vec![0f32; n * rows];
            for p in [worker::quant::Precision::Exact, worker::quant::Precision::Fast] {
            let t = Instant::now();
            for _ in 0..20 { mq.matmul_with(&x, n, &mut out, p); }
            let el = t.elapsed().as_secs_f64() / 20.0;
            println!("{ty:?} {p:?} {rows}x{cols} n={n}: {:.3} ms  ({:.2} GMAC/s)", el * 1e3, (rows * cols * n) as f64 / el / 1e9);
            }
        }
    }
}
