//! In-process throughput on a JSONL corpus (`{"id", "text"}` per line), timed from text to
//! vectors (tokenizing included, as sentence-transformers' `encode` does): inputs sorted by
//! token count and cut into batches, as the worker's batcher does. With `--roofline` it also
//! measures the device's matrix-multiply rate and memory bandwidth and reports the fraction of
//! each the model reaches, from a count of its FLOPs and bytes moved.
//!
//! With several `--precision`s the modes run interleaved (each round runs every mode in turn,
//! so a slow minute of a shared machine hits all of them), and `--accuracy` first embeds the
//! whole corpus in each mode and compares it with f32 (cosine and largest difference).
//!
//! cargo run --release -p fleet-model --example throughput -- \
//!     --batch 32 --batch 128 --runs 3 [--device cuda:0] [--roofline] \
//!     [--precision f32 --precision bf16 --precision bf16x3 --accuracy]

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use fleet_model::{BertConfig, EmbeddingModel, Precision, Sequence};

/// In-process embedding throughput on a JSONL corpus.
#[derive(Parser)]
struct Args {
    /// Batch size to measure; repeat the flag for several (default: 32 and 128).
    #[arg(long = "batch")]
    batches: Vec<usize>,
    /// Passes over the corpus per batch size; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// JSONL corpus, one `{"id", "text"}` object per line.
    #[arg(long, env = "FLEET_BENCH_CORPUS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/corpus.jsonl"))]
    corpus: PathBuf,
    /// Model directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    #[arg(long, env = "FLEET_MODEL_DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/all-MiniLM-L6-v2"))]
    model: PathBuf,
    /// `cpu` or `cuda:<ordinal>` (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also measure the device's f32 matrix rate and memory bandwidth, and report the fraction
    /// of each the model reaches.
    #[arg(long)]
    roofline: bool,
    /// Precision of the linear layers; repeat the flag for several, run interleaved
    /// (default: auto).
    #[arg(long = "precision")]
    precisions: Vec<Precision>,
    /// Before timing, embed the whole corpus in each precision and compare with f32.
    #[arg(long)]
    accuracy: bool,
}

fn open_device(spec: &str) -> Result<Device, String> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = spec
        .strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .ok_or(format!(
            "device {spec:?} is neither `cpu` nor `cuda:<ordinal>`"
        ))?;
    Device::new_cuda(ordinal).map_err(|e| format!("{spec}: {e}"))
}

fn read_corpus(path: &PathBuf) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| e.to_string())?;
            v["text"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| "a line has no \"text\"".to_string())
        })
        .collect()
}

/// What one pass over the corpus costs the encoder, counted from its sizes.
#[derive(Default)]
struct Cost {
    flops: f64,
    bytes: f64,
}

impl Cost {
    /// Matrix products (the linear layers, and attention's `QKᵀ` and `PV` per sequence) count
    /// 2 FLOPs per multiply-add. Bytes: the layer weights read once per batch, and the f32
    /// activations each fused step reads and writes per token (an estimate: attention scores
    /// and gemm's repacking are not counted).
    fn of(cfg: &BertConfig, batches: &[&[Vec<u32>]]) -> Self {
        let (h, i, layers) = (
            cfg.hidden_size as f64,
            cfg.intermediate_size as f64,
            cfg.num_hidden_layers as f64,
        );
        let weights_per_layer = 4.0 * h * h + 2.0 * h * i;
        let activations_per_token_layer = 18.0 * h + 4.0 * i;
        let mut cost = Cost::default();
        for batch in batches {
            cost.bytes += 4.0 * layers * weights_per_layer;
            for seq in *batch {
                let len = seq.len() as f64;
                cost.flops += layers * (2.0 * weights_per_layer * len + 4.0 * len * len * h);
                cost.bytes += 4.0 * layers * activations_per_token_layer * len;
            }
        }
        cost
    }
}

/// One pass over the corpus; returns (wall seconds, CPU seconds, tokens, cost).
fn run(
    model: &EmbeddingModel,
    texts: &[String],
    batch: usize,
) -> Result<(f64, Option<f64>, usize, Cost), String> {
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let mut ids = texts
        .iter()
        .map(|t| model.tokenize(t, true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    ids.sort_by_key(Vec::len);
    let tokens = ids.iter().map(Vec::len).sum();
    for chunk in ids.chunks(batch) {
        let seqs: Vec<Sequence<'_>> = chunk.iter().map(|t| Sequence::normalized(t)).collect();
        let out = model.embed(&seqs).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu_start).map(|(end, start)| end - start);
    let batches: Vec<&[Vec<u32>]> = ids.chunks(batch).collect();
    Ok((wall, cpu, tokens, Cost::of(model.config(), &batches)))
}

/// The device's f32 rates: (matrix FLOP/s from square products, bytes/s from a reduction that
/// reads a large tensor once).
fn device_rates(device: &Device) -> Result<(f64, f64), candle_core::Error> {
    let (n, reps) = if device.is_cpu() {
        (2048, 5)
    } else {
        (8192, 20)
    };
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    a.matmul(&b)?;
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(a.matmul(&b)?);
    }
    device.synchronize()?;
    let matmul = 2.0 * (n as f64).powi(3) * reps as f64 / start.elapsed().as_secs_f64();

    let len = 1usize << 28; // 1 GiB of f32
    let x = Tensor::ones(len, DType::F32, device)?;
    x.sum_all()?.to_scalar::<f32>()?;
    let start = Instant::now();
    for _ in 0..5 {
        std::hint::black_box(x.sum_all()?.to_scalar::<f32>()?);
    }
    let bandwidth = 4.0 * len as f64 * 5.0 / start.elapsed().as_secs_f64();
    Ok((matmul, bandwidth))
}

/// Every text of the corpus embedded (normalised) at batch 32, in corpus order.
fn embed_all(model: &EmbeddingModel, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        let ids = chunk
            .iter()
            .map(|t| model.tokenize(t, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let seqs: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
        out.extend(model.embed(&seqs).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// (least cosine, largest absolute difference) between corresponding vectors.
fn agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f32) {
    let (mut cos, mut diff) = (1.0f64, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        let dot: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
        cos = cos.min(dot / (norm(x) * norm(y)));
        diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(diff, f32::max);
    }
    (cos, diff)
}

fn main() -> Result<(), String> {
    let mut args = Args::parse();
    if args.batches.is_empty() {
        args.batches = vec![32, 128];
    }
    if args.precisions.is_empty() {
        args.precisions = vec![Precision::Auto];
    }
    let device = open_device(&args.device)?;
    let texts = read_corpus(&args.corpus)?;
    let models = args
        .precisions
        .iter()
        .map(|&p| {
            let m = EmbeddingModel::load_with_precision(&args.model, &device, p)
                .map_err(|e| format!("{p}: {e}"))?;
            println!("precision {p}: runs {}", m.precision());
            Ok(m)
        })
        .collect::<Result<Vec<_>, String>>()?;
    if args.accuracy {
        let f32_model = EmbeddingModel::load_with_precision(&args.model, &device, Precision::F32)
            .map_err(|e| e.to_string())?;
        let want = embed_all(&f32_model, &texts)?;
        for m in &models {
            let (cos, diff) = agreement(&embed_all(m, &texts)?, &want);
            println!(
                "accuracy {} against f32 over {} texts: min cosine {cos:.9}, max abs diff {diff:.2e}",
                m.precision(),
                texts.len()
            );
        }
    }
    let rates = if args.roofline {
        let (matmul, bandwidth) = device_rates(&device).map_err(|e| e.to_string())?;
        println!(
            "{}: measured f32 matmul {:.1} GFLOP/s, read bandwidth {:.1} GB/s",
            args.device,
            matmul / 1e9,
            bandwidth / 1e9
        );
        Some((matmul, bandwidth))
    } else {
        None
    };
    // Warm-up: page in the weights, grow rayon's and gemm's buffers (or load CUDA modules).
    for model in &models {
        run(model, &texts[..texts.len().min(256)], 32)?;
    }
    println!("{} texts on {}", texts.len(), args.device);
    for &batch in &args.batches {
        let mut secs = vec![Vec::new(); models.len()];
        let mut last = None;
        for _ in 0..args.runs {
            for (model, secs) in models.iter().zip(&mut secs) {
                let p = model.precision();
                let (s, cpu, tokens, cost) = run(model, &texts, batch)?;
                match cpu {
                    Some(cpu) => println!(
                        "  {p} batch {batch}: {s:.2} s wall, {cpu:.2} s CPU ({:.2} cores busy)",
                        cpu / s
                    ),
                    None => println!("  {p} batch {batch}: {s:.2} s wall"),
                }
                secs.push(s);
                last = Some((tokens, cost));
            }
        }
        let Some((tokens, cost)) = last else {
            continue;
        };
        for (model, secs) in models.iter().zip(&mut secs) {
            let p = model.precision();
            secs.sort_by(f64::total_cmp);
            let median = secs[secs.len() / 2];
            let n = texts.len() as f64;
            println!(
                "{p} batch {batch}: median {median:.2} s ({:.2}-{:.2}) = {:.1} texts/s ({:.1}-{:.1}), {:.0} tokens/s, {tokens} tokens",
                secs[0],
                secs[secs.len() - 1],
                n / median,
                n / secs[secs.len() - 1],
                n / secs[0],
                tokens as f64 / median,
            );
            let (flops, bytes) = (cost.flops / median, cost.bytes / median);
            print!(
                "{p} batch {batch}: {:.2} GFLOP and {:.2} MB per text; achieved {:.1} GFLOP/s, {:.1} GB/s",
                cost.flops / n / 1e9,
                cost.bytes / n / 1e6,
                flops / 1e9,
                bytes / 1e9
            );
            match rates {
                Some((matmul, bandwidth)) => println!(
                    " = {:.0}% of the matmul rate, {:.0}% of the bandwidth",
                    100.0 * flops / matmul,
                    100.0 * bytes / bandwidth
                ),
                None => println!(),
            }
        }
    }
    Ok(())
}

/// CPU seconds this process has used (all threads), from `/proc/self/stat`: with other work on
/// the machine, CPU time divided by wall time shows how many cores the run really had.
/// `None` where `/proc` is not there.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15,
    // in clock ticks of 1/100 s (USER_HZ on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
