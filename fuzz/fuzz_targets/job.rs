//! What a worker does with a queued message: the strict envelope decode, then the strict job
//! decode of its body, then the name checks. The input is also read as a job body directly, so
//! the job decoder is reached without the fuzzer having to build an envelope around it. A job
//! that decodes must survive encode → decode unchanged.
#![no_main]

use fleet_schemas::{Job, SignedJob, decode, encode, validate_name};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 20;

fn job(bytes: &[u8]) {
    let Ok(job) = decode::<Job>(bytes, MAX) else {
        return;
    };
    let again: Job = decode(&encode(&job).expect("encodes"), MAX).expect("re-decodes");
    assert_eq!(again, job);
    let _ = validate_name("job_id", &job.job_id);
    let _ = validate_name("tenant", &job.tenant);
}

fuzz_target!(|data: &[u8]| {
    job(data);
    if let Ok(envelope) = decode::<SignedJob>(data, MAX) {
        job(&envelope.body);
    }
});
