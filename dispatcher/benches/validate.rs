//! Signed jobs validated per second on one core: decode, key lookup, strict Ed25519
//! verification and every admission check, without NATS.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleet_dispatcher::validate::{AdmissionLimits, Validator};
use fleet_keys::{KeyStore, Tenants};
use fleet_schemas::{Job, SigningKey, encode, now_ms};

fn validate(c: &mut Criterion) {
    let key = SigningKey::generate("acme-1");
    let tenants = Tenants::from_toml(&format!(
        "[[tenants]]\nname = \"acme\"\nmodels = [\"*\"]\nrate_per_second = 1\nburst = 1\n\
         keys = [{{ key_id = \"acme-1\", public_key = \"{}\" }}]\n",
        key.verifying_key().to_hex()
    ))
    .expect("tenants");
    let validator = Validator::new(
        KeyStore::fixed(tenants),
        ["all-minilm-l6-v2".to_string()],
        AdmissionLimits::default(),
    );
    let job = Job::embed(
        "job-0001",
        "acme",
        "all-minilm-l6-v2",
        vec!["A sentence of ordinary length to embed, about a dozen words.".into()],
        now_ms(),
    );
    let payload = encode(&key.sign_job(&job).expect("sign")).expect("encode");
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(1));
    group.bench_function("signed_job_one_input", |b| {
        b.iter(|| {
            validator
                .admit("all-minilm-l6-v2", black_box(&payload), now_ms())
                .expect("admitted")
        })
    });
    group.finish();
}

criterion_group!(benches, validate);
criterion_main!(benches);
