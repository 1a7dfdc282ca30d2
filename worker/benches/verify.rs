//! What verifying a job costs a worker, per job: reading a queued job as before (envelope and
//! body) against reading it verified (key lookup, strict Ed25519 over the body, key validity,
//! tenant and model rights), on one core, in one run.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleet_keys::{KeyStore, Tenants};
use fleet_schemas::{Job, SigningKey, encode, now_ms};
use fleet_worker::job::{decode_job, read_verified_job};

fn read_job(c: &mut Criterion) {
    let key = SigningKey::generate("acme-1");
    let tenants = Tenants::from_toml(&format!(
        "[[tenants]]\nname = \"acme\"\nmodels = [\"*\"]\nrate_per_second = 1\nburst = 1\n\
         keys = [{{ key_id = \"acme-1\", public_key = \"{}\" }}]\n",
        key.verifying_key().to_hex()
    ))
    .expect("tenants");
    let keys = KeyStore::fixed(tenants);
    let job = Job::embed(
        "job-0001",
        "acme",
        "all-minilm-l6-v2",
        vec!["A sentence of ordinary length to embed, about a dozen words.".into()],
        now_ms(),
    );
    let payload = encode(&key.sign_job(&job).expect("sign")).expect("encode");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("worker_read_job");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_only", |b| {
        b.iter(|| decode_job(black_box(&payload), 1 << 20).expect("decodes"))
    });
    group.bench_function("decode_and_verify", |b| {
        b.iter(|| {
            runtime
                .block_on(read_verified_job(
                    black_box(&payload),
                    1 << 20,
                    &keys,
                    now_ms(),
                ))
                .expect("verifies")
        })
    });
    group.finish();
}

criterion_group!(benches, read_job);
criterion_main!(benches);
