//! The whole fleet as a user meets it: real `nats-server`, `dispatcher` and `worker` processes
//! and the real model. A synchronous caller gets embeddings back by request-reply; an
//! asynchronous caller is told "accepted" at once and reads the result from FLEET_RESULTS; the
//! embeddings are those of the reference implementation.

use std::time::Duration;

use fleet_client::Tenant;
use fleet_schemas::{JobResult, Output, ResultStatus, SubmitStatus};
use fleet_tests::{NatsServer, Process, Streams, TestTenant, binary, eventually, model_dir};
use serde::Deserialize;

const MODEL: &str = "all-minilm-l6-v2";
const WAIT: Duration = Duration::from_secs(120);

#[derive(Deserialize)]
struct Reference {
    items: Vec<ReferenceItem>,
}

#[derive(Deserialize)]
struct ReferenceItem {
    text: String,
    embedding: Vec<f32>,
}

fn reference() -> Vec<ReferenceItem> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/minilm_reference.json"
    );
    let text = std::fs::read_to_string(path).expect("the reference fixture in fixtures/");
    serde_json::from_str::<Reference>(&text)
        .expect("fixture parses")
        .items
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

struct LocalFleet {
    nats: NatsServer,
    tenant: Tenant,
    _dir: tempfile::TempDir,
    _dispatcher: Process,
    _worker: Process,
}

impl LocalFleet {
    fn start() -> LocalFleet {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let demo = TestTenant::new("demo");
        let tenants = dir.path().join("tenants.toml");
        std::fs::write(
            &tenants,
            format!(
                "[[tenants]]\nname = \"demo\"\nmodels = [\"*\"]\nrate_per_second = 1000\nburst = 1000\n\
                 keys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n",
                demo.key.key_id,
                demo.public_key().to_hex()
            ),
        )
        .expect("tenants file");
        let tenants = tenants.to_string_lossy().into_owned();
        let dispatcher = Process::spawn_binary(
            "dispatcher",
            &[
                "--nats-url",
                nats.url(),
                "--tenants",
                &tenants,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[("RUST_LOG", "warn")],
        );
        let model = model_dir().to_string_lossy().into_owned();
        let worker = Process::spawn_binary(
            "worker",
            &[
                "--nats-url",
                nats.url(),
                "--tenants",
                &tenants,
                "--model-dir",
                &model,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[("RUST_LOG", "warn")],
        );
        LocalFleet {
            nats,
            tenant: Tenant {
                name: demo.name,
                key: demo.key,
            },
            _dir: dir,
            _dispatcher: dispatcher,
            _worker: worker,
        }
    }
}

fn embeddings(result: &JobResult) -> &[Vec<f32>] {
    assert_eq!(result.status, ResultStatus::Ok, "{result:?}");
    match &result.output {
        Some(Output::Embeddings { dims, vectors }) => {
            assert_eq!(*dims, 384);
            vectors
        }
        None => panic!("an ok result without output: {result:?}"),
    }
}

#[tokio::test]
async fn request_reply_and_async_submit_through_the_whole_fleet() {
    let fleet = LocalFleet::start();
    let client = fleet.nats.tenant_client(&fleet.tenant.name).await;
    let reference = reference();
    let texts: Vec<String> = reference.iter().take(4).map(|r| r.text.clone()).collect();

    // Synchronous: the first calls may meet no dispatcher yet (no responders) or time out while
    // the worker loads the model; a fresh job is sent each time.
    let result = eventually(WAIT, "a request-reply answer", || {
        let job = fleet.tenant.embed_job(MODEL, texts.clone());
        let client = client.clone();
        let tenant = &fleet.tenant;
        async move {
            fleet_client::infer(&client, tenant, &job, Duration::from_secs(20))
                .await
                .ok()
        }
    })
    .await;
    let vectors = embeddings(&result);
    assert_eq!(vectors.len(), texts.len());
    for (vector, item) in vectors.iter().zip(&reference) {
        assert!(cosine(vector, &item.embedding) >= 0.9999, "{:?}", item.text);
    }

    // Asynchronous: accepted at once, result stored under the tenant and job id.
    let job = fleet
        .tenant
        .embed_job(MODEL, vec![reference[5].text.clone()]);
    let reply = fleet_client::submit(&client, &fleet.tenant, &job, Duration::from_secs(10))
        .await
        .expect("submit answered");
    assert_eq!(reply.status, SubmitStatus::Accepted, "{reply:?}");
    assert_eq!(reply.job_id, job.job_id);
    let streams = Streams::connect(&fleet.nats).await;
    let stored = streams.wait_result(&job, WAIT).await;
    assert_eq!(stored.job_id, job.job_id);
    let vectors = embeddings(&stored);
    assert!(cosine(&vectors[0], &reference[5].embedding) >= 0.9999);

    // The user's command: `fleet infer` prints the JobResult as JSON.
    let key_file = fleet._dir.path().join("demo-key.toml");
    std::fs::write(
        &key_file,
        format!(
            "tenant = \"{}\"\nkey_id = \"{}\"\nsecret_key = \"{}\"\n",
            fleet.tenant.name,
            fleet.tenant.key.key_id,
            fleet.tenant.key.secret_hex()
        ),
    )
    .expect("key file");
    let output = std::process::Command::new(binary("fleet"))
        .arg("infer")
        .args(["--nats-url", fleet.nats.url(), "--model", MODEL])
        .arg("--key")
        .arg(&key_file)
        .args(["--text", &reference[6].text])
        .output()
        .expect("fleet runs");
    assert!(output.status.success(), "{output:?}");
    let printed: JobResult = serde_json::from_slice(&output.stdout).expect("JSON JobResult");
    assert!(cosine(&embeddings(&printed)[0], &reference[6].embedding) >= 0.9999);
}
