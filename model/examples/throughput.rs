//! In-process throughput on a JSONL corpus (`{"id", "text"}` per line), timed from text to
//! vectors (tokenizing included, as sentence-transformers' `encode` does): inputs sorted by
//! token count and cut into batches, as the worker's batcher does.
//!
//! cargo run --release -p fleet-model --example throughput -- \
//!     --batch 32 --batch 128 --runs 3 --corpus ../shared/bench/corpus.jsonl [--model DIR]

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use fleet_model::{EmbeddingModel, Sequence};

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
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/bench/corpus.jsonl"))]
    corpus: PathBuf,
    /// Model directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    #[arg(long, env = "FLEET_MODEL_DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/all-MiniLM-L6-v2"))]
    model: PathBuf,
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

/// One pass over the corpus; returns (wall seconds, CPU seconds, tokens).
fn run(
    model: &EmbeddingModel,
    texts: &[String],
    batch: usize,
) -> Result<(f64, Option<f64>, usize), String> {
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
        let seqs: Vec<Sequence<'_>> = chunk
            .iter()
            .map(|t| Sequence {
                token_ids: t,
                normalize: true,
            })
            .collect();
        let out = model.embed(&seqs).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu_start).map(|(end, start)| end - start);
    Ok((wall, cpu, tokens))
}

fn main() -> Result<(), String> {
    let mut args = Args::parse();
    if args.batches.is_empty() {
        args.batches = vec![32, 128];
    }
    let texts = read_corpus(&args.corpus)?;
    let model = EmbeddingModel::load(&args.model, &Device::Cpu).map_err(|e| e.to_string())?;
    // Warm-up: page in the weights, grow rayon's and gemm's buffers.
    run(&model, &texts[..texts.len().min(256)], 32)?;
    println!("{} texts", texts.len());
    for &batch in &args.batches {
        let mut secs = Vec::new();
        let mut tokens = 0;
        for _ in 0..args.runs {
            let (s, cpu, t) = run(&model, &texts, batch)?;
            match cpu {
                Some(cpu) => println!(
                    "  batch {batch}: {s:.2} s wall, {cpu:.2} s CPU ({:.2} cores busy)",
                    cpu / s
                ),
                None => println!("  batch {batch}: {s:.2} s wall"),
            }
            secs.push(s);
            tokens = t;
        }
        secs.sort_by(f64::total_cmp);
        let median = secs[secs.len() / 2];
        let n = texts.len() as f64;
        println!(
            "batch {batch}: median {median:.2} s ({:.2}-{:.2}) = {:.1} texts/s ({:.1}-{:.1}), {:.0} tokens/s, {tokens} tokens",
            secs[0],
            secs[secs.len() - 1],
            n / median,
            n / secs[secs.len() - 1],
            n / secs[0],
            tokens as f64 / median,
        );
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
