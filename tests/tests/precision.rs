//! A worker asked for `--precision bf16`, with real `nats-server`, `dispatcher` and `worker`
//! processes: on a CPU with AVX512-BF16 its answers are bf16's (within bf16's contract of the
//! sentence-transformers reference, and measurably off f32's, which agrees to 3e-7); on a CPU
//! without it the worker refuses to start and says why, instead of quietly running f32.

use std::path::Path;
use std::time::Duration;

use fleet_client::Tenant;
use fleet_schemas::{Output, ResultStatus};
use fleet_tests::{NatsServer, Process, TestTenant, eventually, model_dir, write_tenants_file};
use serde::Deserialize;

const MODEL: &str = "all-minilm-l6-v2";
/// bf16's contract (model/src/precision.rs): the least cosine and the largest difference of one
/// component, against the reference.
const BF16_MIN_COSINE: f64 = 0.9999;
const BF16_MAX_ABS_DIFF: f32 = 5e-3;
/// f32 agrees with the reference to 2.5e-7 on this fixture: a larger difference shows that the
/// products ran in bf16.
const ABOVE_F32: f32 = 1e-5;

#[derive(Deserialize)]
struct Fixture {
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    text: String,
    embedding: Vec<f32>,
}

fn reference() -> Vec<Item> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/minilm_reference.json");
    let text = std::fs::read_to_string(&path).expect("the reference fixture");
    let fixture: Fixture = serde_json::from_str(&text).expect("the reference fixture parses");
    fixture.items.into_iter().take(8).collect()
}

/// What the bf16 kernel needs (kernels/src/cpu: AVX-512 F, BW and VL, and AVX512-BF16).
fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_asked_for_bf16_answers_in_bf16_or_refuses_to_start() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tenants = write_tenants_file(dir.path(), &["acme"]);
    let tenants = tenants.to_string_lossy().into_owned();
    let model = model_dir().to_string_lossy().into_owned();
    let common = ["--nats-url", nats.url(), "--tenants", &tenants];
    let mut worker_args = common.to_vec();
    worker_args.extend(["--model-dir", &model, "--precision", "bf16"]);
    worker_args.extend(["--metrics-addr", "127.0.0.1:0"]);
    let worker_log = dir.path().join("worker.log");
    let mut worker =
        Process::spawn_binary_logged("worker", &worker_args, &[("RUST_LOG", "warn")], &worker_log);

    if !cpu_has_bf16() {
        let code = worker.wait_exit(Duration::from_secs(120));
        assert_ne!(code, Some(0), "the worker ran without AVX512-BF16");
        let log = std::fs::read_to_string(&worker_log).unwrap();
        assert!(
            log.contains("precision bf16 is not available here"),
            "the worker did not say why it stopped: {log}"
        );
        eprintln!("this CPU lacks AVX512-BF16: checked that the worker refuses bf16");
        return;
    }

    let mut dispatcher_args = common.to_vec();
    dispatcher_args.extend(["--metrics-addr", "127.0.0.1:0"]);
    let _dispatcher =
        Process::spawn_binary("dispatcher", &dispatcher_args, &[("RUST_LOG", "warn")]);
    let acme = TestTenant::new("acme");
    let tenant = Tenant {
        name: acme.name,
        key: acme.key,
    };
    let client = nats.tenant_client("acme").await;
    let items = reference();
    let texts: Vec<String> = items.iter().map(|item| item.text.clone()).collect();
    // The first calls may find no dispatcher yet, or a worker still loading the model.
    let answer = eventually(Duration::from_secs(120), "an answer", || {
        let job = tenant.embed_job(MODEL, texts.clone());
        let (client, tenant) = (client.clone(), &tenant);
        async move {
            fleet_client::infer(&client, tenant, &job, Duration::from_secs(10))
                .await
                .ok()
                .filter(|result| result.status == ResultStatus::Ok)
        }
    })
    .await;
    let Some(Output::Embeddings { vectors, .. }) = answer.output else {
        panic!("no vectors: {answer:?}");
    };
    assert!(worker.is_running());
    let mut largest = 0f32;
    for (item, vector) in items.iter().zip(&vectors) {
        let similarity = cosine(vector, &item.embedding);
        assert!(
            similarity >= BF16_MIN_COSINE,
            "{}: cosine {similarity}",
            item.text
        );
        for (x, y) in vector.iter().zip(&item.embedding) {
            largest = largest.max((x - y).abs());
        }
    }
    assert!(
        largest <= BF16_MAX_ABS_DIFF,
        "off the reference by {largest}"
    );
    assert!(
        largest > ABOVE_F32,
        "within {largest} of the reference: these vectors are f32's, not bf16's"
    );
}
