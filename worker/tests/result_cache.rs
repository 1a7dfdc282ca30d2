//! The result cache against a real nats-server with the fake embedder in-process: a text
//! embedded once is answered again from the cache without the model, bit for bit the same
//! vector; a job with some cached texts sends only the others to the model; a tenant's cache
//! never answers another tenant unless the cache is explicitly shared; the metrics count the
//! hits.

// Shared with the pipeline tests, which use the rest of it.
#[allow(dead_code)]
mod support;

use std::time::Duration;

use fleet_schemas::{Job, JobResult, Output};
use fleet_tests::{NatsServer, Streams, eventually, openmetrics::Scrape, write_tenants_file};
use support::{FakeEmbedder, MODEL, RunningWorker, config, job};

const WAIT: Duration = Duration::from_secs(15);
const CACHE_STREAM: &str = "KV_FLEET_CACHE";

struct Fleet {
    server: NatsServer,
    streams: Streams,
    tenants: tempfile::TempDir,
}

impl Fleet {
    async fn start() -> Fleet {
        let server = NatsServer::start();
        let streams = Streams::create(&server).await;
        let tenants = tempfile::tempdir().expect("temporary directory");
        write_tenants_file(tenants.path(), &["acme", "globex"]);
        Fleet {
            server,
            streams,
            tenants,
        }
    }

    async fn worker(&self, mode: &str, embedder: FakeEmbedder) -> RunningWorker {
        RunningWorker::start(
            self.server.client().await,
            support::key_store(self.tenants.path()).await,
            config(self.server.url(), &["--result-cache", mode]),
            embedder,
        )
        .await
    }

    /// Queues `job` and returns its vectors once it is answered, after its computed vectors
    /// are in the cache (`cached` entries in all by then).
    async fn run(&self, job: &Job, cached: u64) -> Vec<Vec<f32>> {
        self.streams.enqueue(job, None).await;
        let result = self.streams.wait_result(job, WAIT).await;
        eventually(WAIT, &format!("{cached} cached vectors"), || async {
            (self.streams.messages_in(CACHE_STREAM).await == cached).then_some(())
        })
        .await;
        vectors(result)
    }
}

fn vectors(result: JobResult) -> Vec<Vec<f32>> {
    match result.output {
        Some(Output::Embeddings { vectors, .. }) => vectors,
        None => panic!("no vectors: {result:?}"),
    }
}

fn bits(vector: &[f32]) -> Vec<u32> {
    vector.iter().map(|x| x.to_bits()).collect()
}

/// Each text the model embedded, in order (a word-hash vector per text: compared by tokens).
fn embedded(embedder: &FakeEmbedder) -> Vec<Vec<u32>> {
    embedder
        .batches()
        .into_iter()
        .flatten()
        .map(|input| input.token_ids)
        .collect()
}

fn tokens(embedder: &FakeEmbedder, text: &str) -> Vec<u32> {
    use fleet_worker::Embedder;
    embedder.tokenize(text, true).expect("tokenizes")
}

fn lookups(worker: &RunningWorker, outcome: &str) -> f64 {
    Scrape::of(&worker.registry).value(&format!(
        "fleet_worker_result_cache_lookups_total{{model=\"{MODEL}\",outcome=\"{outcome}\"}}"
    ))
}

#[tokio::test]
async fn repeated_texts_come_from_the_cache_bit_for_bit_and_only_the_rest_reach_the_model() {
    let fleet = Fleet::start().await;
    let embedder = FakeEmbedder::new(16, 64);
    let worker = fleet.worker("tenant", embedder.clone()).await;

    let first = fleet
        .run(&job("first", &["red apple", "green pear"]), 2)
        .await;
    assert_eq!(embedded(&embedder).len(), 2);
    assert_eq!(
        (lookups(&worker, "hit"), lookups(&worker, "miss")),
        (0.0, 2.0)
    );

    // The same texts again, in another order: no model run, the very same bits.
    let again = fleet
        .run(&job("again", &["green pear", "red apple"]), 2)
        .await;
    assert_eq!(embedded(&embedder).len(), 2, "the model ran cached texts");
    assert_eq!(bits(&again[0]), bits(&first[1]));
    assert_eq!(bits(&again[1]), bits(&first[0]));
    assert_eq!(
        (lookups(&worker, "hit"), lookups(&worker, "miss")),
        (2.0, 2.0)
    );

    // Some cached, some not: only the new text is batched, the answer keeps the input order.
    let mixed = fleet
        .run(&job("mixed", &["red apple", "blue plum", "green pear"]), 3)
        .await;
    assert_eq!(
        embedded(&embedder)[2..],
        [tokens(&embedder, "blue plum")],
        "only the missing text reaches the model"
    );
    assert_eq!(bits(&mixed[0]), bits(&first[0]));
    assert_eq!(
        bits(&mixed[1]),
        bits(&embedder.expected_vector("blue plum", true))
    );
    assert_eq!(bits(&mixed[2]), bits(&first[1]));
    assert_eq!(
        (lookups(&worker, "hit"), lookups(&worker, "miss")),
        (4.0, 3.0)
    );

    // The task's options are part of the address: unnormalised is another vector.
    let raw = Job {
        task: fleet_schemas::Task::Embed {
            inputs: vec!["red apple".into()],
            normalize: false,
            truncate: true,
        },
        ..job("raw", &[])
    };
    let raw = fleet.run(&raw, 4).await;
    assert_eq!(
        bits(&raw[0]),
        bits(&embedder.expected_vector("red apple", false))
    );
    assert_eq!(embedded(&embedder).len(), 4);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_tenants_cache_answers_no_other_tenant_unless_shared() {
    let fleet = Fleet::start().await;
    let embedder = FakeEmbedder::new(16, 64);
    let worker = fleet.worker("tenant", embedder.clone()).await;
    let acme = |id: &str| job(id, &["quarterly numbers"]);
    let globex = |id: &str| Job::embed(id, "globex", MODEL, vec!["quarterly numbers".into()], 0);

    fleet.run(&acme("acme-1"), 1).await;
    // The same text from another tenant: a miss, run by the model, cached apart.
    fleet.run(&globex("globex-1"), 2).await;
    assert_eq!(
        embedded(&embedder).len(),
        2,
        "a tenant was answered from another's cache"
    );
    assert_eq!(lookups(&worker, "hit"), 0.0);
    worker.stop().await.expect("clean stop");

    // Shared, by explicit choice: one tenant's vector answers another.
    let shared = FakeEmbedder::new(16, 64);
    let worker = fleet.worker("shared", shared.clone()).await;
    fleet.run(&acme("acme-2"), 3).await;
    fleet.run(&globex("globex-2"), 3).await;
    assert_eq!(embedded(&shared).len(), 1);
    assert_eq!(lookups(&worker, "hit"), 1.0);
    worker.stop().await.expect("clean stop");
}
