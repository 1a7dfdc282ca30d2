//! The dynamic batcher's rules, free of I/O and clocks so tests can state them exactly.
//!
//! A job is the unit of acknowledgement, an input text the unit of batching: a job's inputs
//! wait in a common pool, a batch takes inputs of any jobs, and a job is finished once every one
//! of its inputs has a vector. A batch is anchored on the oldest waiting input (so nothing
//! starves) and grows with the inputs closest to it in length (so little is padding), up to
//! `max_batch_size` inputs and `max_batch_tokens` padded tokens (longest input x count).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::embedder::TokenizedInput;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most inputs in one batch.
    pub max_batch_size: usize,
    /// Most padded tokens in one batch: the longest input's length times the input count.
    pub max_batch_tokens: usize,
    /// Longest an input waits for company before a batch that is not full runs anyway.
    pub max_delay: Duration,
}

/// Inputs handed to the model together, and where each vector goes back.
#[derive(Debug)]
pub struct Batch {
    pub inputs: Vec<TokenizedInput>,
    slots: Vec<Slot>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// What the batch costs the model: every input is padded to the longest.
    pub fn padded_tokens(&self) -> usize {
        let longest = self.inputs.iter().map(|i| i.token_ids.len()).max();
        longest.unwrap_or(0) * self.inputs.len()
    }

    /// Number of distinct jobs with inputs in this batch.
    pub fn job_count(&self) -> usize {
        let mut jobs: Vec<u64> = self.slots.iter().map(|s| s.job).collect();
        jobs.sort_unstable();
        jobs.dedup();
        jobs.len()
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    job: u64,
    index: usize,
}

/// A job whose every input has a vector.
#[derive(Debug)]
pub struct Finished<H> {
    pub handle: H,
    /// One vector per input, in the job's input order.
    pub vectors: Vec<Vec<f32>>,
    /// From entering the batcher to the start of the job's first batch.
    pub waited: Duration,
    /// Model time of the batches that held the job's inputs.
    pub inference: Duration,
}

struct JobState<H> {
    handle: H,
    vectors: Vec<Option<Vec<f32>>>,
    missing: usize,
    dispatched: bool,
    deadline_ms: Option<u64>,
    arrived: Instant,
    started: Option<Instant>,
    inference: Duration,
}

struct PendingInput {
    slot: Slot,
    /// Push order, so "oldest" is exact even for inputs pushed at the same instant.
    seq: u64,
    arrived: Instant,
    input: TokenizedInput,
}

pub struct Batcher<H> {
    limits: BatchLimits,
    jobs: HashMap<u64, JobState<H>>,
    pending: Vec<PendingInput>,
    next_job: u64,
    next_seq: u64,
}

impl<H> Batcher<H> {
    pub fn new(limits: BatchLimits) -> Batcher<H> {
        Batcher {
            limits,
            jobs: HashMap::new(),
            pending: Vec::new(),
            next_job: 0,
            next_seq: 0,
        }
    }

    /// Adds a job's tokenized inputs. A job without inputs is finished at once.
    pub fn push(
        &mut self,
        handle: H,
        inputs: Vec<TokenizedInput>,
        deadline_ms: Option<u64>,
        now: Instant,
    ) -> Option<Finished<H>> {
        if inputs.is_empty() {
            return Some(Finished {
                handle,
                vectors: Vec::new(),
                waited: Duration::ZERO,
                inference: Duration::ZERO,
            });
        }
        let job = self.next_job;
        self.next_job += 1;
        let count = inputs.len();
        for (index, input) in inputs.into_iter().enumerate() {
            self.pending.push(PendingInput {
                slot: Slot { job, index },
                seq: self.next_seq,
                arrived: now,
                input,
            });
            self.next_seq += 1;
        }
        self.jobs.insert(
            job,
            JobState {
                handle,
                vectors: vec![None; count],
                missing: count,
                dispatched: false,
                deadline_ms,
                arrived: now,
                started: None,
                inference: Duration::ZERO,
            },
        );
        None
    }

    /// Inputs waiting for a batch.
    pub fn pending_inputs(&self) -> usize {
        self.pending.len()
    }

    /// True when no job is held, waiting or in a batch.
    pub fn is_idle(&self) -> bool {
        self.jobs.is_empty()
    }

    /// True when waiting longer cannot make the next batch bigger: the pool already fills a
    /// batch by count or by padded tokens.
    pub fn is_full(&self) -> bool {
        let longest = self.pending.iter().map(|p| p.input.token_ids.len()).max();
        self.pending.len() >= self.limits.max_batch_size
            || longest.unwrap_or(0) * self.pending.len() > self.limits.max_batch_tokens
    }

    /// When the oldest waiting input has waited `max_delay`.
    pub fn due_at(&self) -> Option<Instant> {
        self.pending
            .iter()
            .map(|p| p.arrived)
            .min()
            .map(|oldest| oldest + self.limits.max_delay)
    }

    /// True when a batch should run now: the pool is full or its oldest input is due.
    pub fn ready(&self, now: Instant) -> bool {
        !self.pending.is_empty() && (self.is_full() || self.due_at().is_some_and(|due| now >= due))
    }

    /// Removes and returns the jobs past their deadline (Unix ms) that have not reached the
    /// model; a job already partly run is finished instead, as its cost is mostly paid.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<H> {
        let expired: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, state)| {
                !state.dispatched && state.deadline_ms.is_some_and(|deadline| now_ms > deadline)
            })
            .map(|(key, _)| *key)
            .collect();
        self.remove_jobs(&expired)
    }

    /// Takes the next batch out of the pool, whether or not it is `ready`.
    pub fn next_batch(&mut self, now: Instant) -> Option<Batch> {
        let anchor_seq = self.pending.iter().map(|p| p.seq).min()?;
        self.pending
            .sort_by_key(|p| (p.input.token_ids.len(), p.seq));
        let anchor = self.pending.iter().position(|p| p.seq == anchor_seq)?;
        let len_at = |i: usize| self.pending[i].input.token_ids.len();
        let anchor_len = len_at(anchor);
        let fits = |lo: usize, hi: usize| {
            let count = hi - lo + 1;
            count <= self.limits.max_batch_size
                && len_at(hi) * count <= self.limits.max_batch_tokens
        };
        let (mut lo, mut hi) = (anchor, anchor);
        loop {
            let left = (lo > 0 && fits(lo - 1, hi)).then(|| anchor_len - len_at(lo - 1));
            let right = (hi + 1 < self.pending.len() && fits(lo, hi + 1))
                .then(|| len_at(hi + 1) - anchor_len);
            match (left, right) {
                (Some(l), Some(r)) if l <= r => lo -= 1,
                (Some(_), Some(_)) | (None, Some(_)) => hi += 1,
                (Some(_), None) => lo -= 1,
                (None, None) => break,
            }
        }
        let taken: Vec<PendingInput> = self.pending.drain(lo..=hi).collect();
        let mut inputs = Vec::with_capacity(taken.len());
        let mut slots = Vec::with_capacity(taken.len());
        for p in taken {
            if let Some(state) = self.jobs.get_mut(&p.slot.job) {
                state.dispatched = true;
                state.started.get_or_insert(now);
            }
            inputs.push(p.input);
            slots.push(p.slot);
        }
        Some(Batch { inputs, slots })
    }

    /// Stores a batch's vectors (one per input, in batch order) and returns the jobs this
    /// finished. A length mismatch is a model fault: the batch's jobs are failed instead.
    pub fn complete(
        &mut self,
        batch: Batch,
        vectors: Vec<Vec<f32>>,
        inference: Duration,
    ) -> Result<Vec<Finished<H>>, Vec<H>> {
        if vectors.len() != batch.slots.len() {
            return Err(self.fail(batch));
        }
        let mut finished_keys = Vec::new();
        for (slot, vector) in batch.slots.iter().zip(vectors) {
            // A job failed by an earlier batch is gone; its late vectors are dropped.
            let Some(state) = self.jobs.get_mut(&slot.job) else {
                continue;
            };
            if let Some(place) = state.vectors.get_mut(slot.index)
                && place.replace(vector).is_none()
            {
                state.missing -= 1;
            }
        }
        let mut jobs: Vec<u64> = batch.slots.iter().map(|s| s.job).collect();
        jobs.sort_unstable();
        jobs.dedup();
        for key in jobs {
            if let Some(state) = self.jobs.get_mut(&key) {
                state.inference += inference;
                if state.missing == 0 {
                    finished_keys.push(key);
                }
            }
        }
        Ok(finished_keys
            .into_iter()
            .filter_map(|key| self.jobs.remove(&key))
            .map(|state| Finished {
                waited: state.started.map_or(Duration::ZERO, |s| {
                    s.saturating_duration_since(state.arrived)
                }),
                inference: state.inference,
                vectors: state.vectors.into_iter().flatten().collect(),
                handle: state.handle,
            })
            .collect())
    }

    /// Gives up on every job with an input in `batch`, with all its other inputs, and returns
    /// them (each once) to be retried.
    pub fn fail(&mut self, batch: Batch) -> Vec<H> {
        let mut jobs: Vec<u64> = batch.slots.iter().map(|s| s.job).collect();
        jobs.sort_unstable();
        jobs.dedup();
        self.remove_jobs(&jobs)
    }

    /// Removes every job still held (waiting or in a batch) and returns them.
    pub fn take_all(&mut self) -> Vec<H> {
        self.pending.clear();
        self.jobs.drain().map(|(_, state)| state.handle).collect()
    }

    fn remove_jobs(&mut self, keys: &[u64]) -> Vec<H> {
        if keys.is_empty() {
            return Vec::new();
        }
        self.pending.retain(|p| !keys.contains(&p.slot.job));
        keys.iter()
            .filter_map(|key| self.jobs.remove(key))
            .map(|state| state.handle)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(size: usize, tokens: usize) -> BatchLimits {
        BatchLimits {
            max_batch_size: size,
            max_batch_tokens: tokens,
            max_delay: Duration::from_millis(5),
        }
    }

    /// An input whose tokens say which job and which input it is, and whose length is `len`.
    fn input(job: u32, index: u32, len: usize) -> TokenizedInput {
        let mut token_ids = vec![job * 1000 + index];
        token_ids.resize(len.max(1), 0);
        TokenizedInput {
            token_ids,
            normalize: true,
        }
    }

    fn job(
        batcher: &mut Batcher<&'static str>,
        name: &'static str,
        id: u32,
        lens: &[usize],
        now: Instant,
    ) {
        let inputs = lens
            .iter()
            .enumerate()
            .map(|(i, len)| input(id, i as u32, *len))
            .collect();
        assert!(batcher.push(name, inputs, None, now).is_none());
    }

    /// Answers a batch as a model would: each vector names its input.
    fn vectors_for(batch: &Batch) -> Vec<Vec<f32>> {
        batch
            .inputs
            .iter()
            .map(|i| vec![i.token_ids[0] as f32])
            .collect()
    }

    #[test]
    fn batches_respect_the_size_and_padded_token_bounds() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(4, 40));
        job(&mut batcher, "a", 1, &[5; 10], now);
        job(&mut batcher, "b", 2, &[12, 12, 12], now);
        let mut seen = 0;
        while let Some(batch) = batcher.next_batch(now) {
            assert!(batch.len() <= 4, "{} inputs", batch.len());
            assert!(
                batch.padded_tokens() <= 40,
                "{} padded tokens",
                batch.padded_tokens()
            );
            seen += batch.len();
        }
        assert_eq!(seen, 13);
    }

    #[test]
    fn one_batch_mixes_inputs_of_several_jobs_and_each_job_gets_its_vectors_in_order() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(8, 1000));
        job(&mut batcher, "a", 1, &[3, 3], now);
        job(&mut batcher, "b", 2, &[3, 3, 3], now);
        let batch = batcher.next_batch(now).expect("a batch");
        assert_eq!(batch.len(), 5);
        assert_eq!(batch.job_count(), 2);
        let vectors = vectors_for(&batch);
        let mut finished = batcher
            .complete(batch, vectors, Duration::from_millis(7))
            .expect("complete");
        finished.sort_by_key(|f| f.handle);
        assert_eq!(finished.len(), 2);
        assert_eq!(finished[0].handle, "a");
        assert_eq!(finished[0].vectors, [vec![1000.0], vec![1001.0]]);
        assert_eq!(
            finished[1].vectors,
            [vec![2000.0], vec![2001.0], vec![2002.0]]
        );
        assert_eq!(finished[1].inference, Duration::from_millis(7));
        assert!(batcher.is_idle());
    }

    #[test]
    fn a_job_split_over_batches_finishes_after_its_last_input() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(2, 1000));
        job(&mut batcher, "a", 1, &[4, 4, 4], now);
        let first = batcher.next_batch(now).expect("first");
        let vectors = vectors_for(&first);
        assert!(
            batcher
                .complete(first, vectors, Duration::from_millis(1))
                .expect("ok")
                .is_empty()
        );
        let second = batcher.next_batch(now).expect("second");
        let vectors = vectors_for(&second);
        let finished = batcher
            .complete(second, vectors, Duration::from_millis(2))
            .expect("ok");
        assert_eq!(finished.len(), 1);
        assert_eq!(
            finished[0].vectors,
            [vec![1000.0], vec![1001.0], vec![1002.0]]
        );
        assert_eq!(finished[0].inference, Duration::from_millis(3));
    }

    #[test]
    fn inputs_of_similar_length_are_grouped() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(2, 10_000));
        // Arrival order alternates short and long; length grouping pairs short with short.
        job(&mut batcher, "a", 1, &[2, 100, 3, 101], now);
        let first = batcher.next_batch(now).expect("first");
        let lens: Vec<usize> = first.inputs.iter().map(|i| i.token_ids.len()).collect();
        assert_eq!(lens, [2, 3]);
        assert_eq!(first.padded_tokens(), 6);
        let second = batcher.next_batch(now).expect("second");
        assert_eq!(second.padded_tokens(), 202);
    }

    #[test]
    fn the_oldest_input_is_always_in_the_next_batch() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(2, 10_000));
        job(&mut batcher, "old", 1, &[50], now);
        job(
            &mut batcher,
            "new",
            2,
            &[2, 2, 3, 3],
            now + Duration::from_millis(1),
        );
        let batch = batcher.next_batch(now).expect("batch");
        assert!(batch.inputs.iter().any(|i| i.token_ids[0] == 1000));
    }

    #[test]
    fn a_batch_that_is_not_full_waits_for_max_delay() {
        let start = Instant::now();
        let mut batcher = Batcher::new(limits(4, 1000));
        assert!(!batcher.ready(start), "nothing to run");
        job(&mut batcher, "a", 1, &[3, 3], start);
        assert!(!batcher.ready(start));
        assert!(!batcher.ready(start + Duration::from_millis(4)));
        assert_eq!(batcher.due_at(), Some(start + Duration::from_millis(5)));
        assert!(batcher.ready(start + Duration::from_millis(5)));
    }

    #[test]
    fn a_full_pool_is_ready_at_once() {
        let now = Instant::now();
        let mut by_count = Batcher::new(limits(4, 1000));
        job(&mut by_count, "a", 1, &[3, 3, 3, 3], now);
        assert!(by_count.ready(now));
        let mut by_tokens = Batcher::new(limits(100, 20));
        job(&mut by_tokens, "a", 1, &[8, 8, 8], now);
        assert!(by_tokens.ready(now));
    }

    #[test]
    fn jobs_past_their_deadline_are_taken_out_before_the_model_sees_them() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(8, 1000));
        batcher.push("late", vec![input(1, 0, 3)], Some(1_000), now);
        batcher.push("timely", vec![input(2, 0, 3)], Some(5_000), now);
        batcher.push("no-deadline", vec![input(3, 0, 3)], None, now);
        assert!(
            batcher.take_expired(1_000).is_empty(),
            "the deadline instant itself is in time"
        );
        assert_eq!(batcher.take_expired(2_000), ["late"]);
        let batch = batcher.next_batch(now).expect("batch");
        assert_eq!(batch.len(), 2);
        assert!(batch.inputs.iter().all(|i| i.token_ids[0] != 1000));
        assert!(
            batcher.take_expired(9_000).is_empty(),
            "jobs in a batch are finished, not expired"
        );
    }

    #[test]
    fn a_failed_batch_gives_back_its_jobs_once_with_their_waiting_inputs() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(2, 1000));
        job(&mut batcher, "a", 1, &[3, 3, 3], now);
        job(&mut batcher, "b", 2, &[9], now);
        let batch = batcher.next_batch(now).expect("batch");
        assert_eq!(batch.job_count(), 1);
        assert_eq!(batcher.fail(batch), ["a"]);
        assert_eq!(batcher.pending_inputs(), 1, "only b's input is left");
        let wrong = batcher.next_batch(now).expect("batch");
        let result = batcher.complete(wrong, Vec::new(), Duration::ZERO);
        assert!(matches!(result, Err(ref jobs) if jobs == &["b"]));
        assert!(batcher.is_idle());
    }

    #[test]
    fn a_job_without_inputs_finishes_at_once() {
        let mut batcher = Batcher::<&str>::new(limits(2, 1000));
        let finished = batcher.push("empty", Vec::new(), None, Instant::now());
        assert!(finished.is_some_and(|f| f.vectors.is_empty()));
        assert!(batcher.is_idle());
    }
}
