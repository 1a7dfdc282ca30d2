//! BERT encoder weights and the unpadded forward pass.

use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use fleet_kernels as k;
use fleet_kernels::cpu::{self, PackedLinear};

use crate::config::BertConfig;
use crate::{ModelError, Precision, Sequence};

/// The weight of a linear layer (`[out, in]`, PyTorch's layout) as the model's precision
/// wants it: f32 as loaded, or rounded to bf16 and packed once (the f32 copy is dropped).
enum Dense {
    F32(Tensor),
    Packed(PackedLinear),
}

impl Dense {
    fn new(weight: Tensor, precision: Precision) -> Result<Self, ModelError> {
        Ok(match precision.bf16_mode() {
            None => Self::F32(weight),
            Some(mode) => {
                let in_dim = weight.dim(1)?;
                let values = weight.flatten_all()?.to_vec1::<f32>()?;
                Self::Packed(PackedLinear::new(&values, in_dim, mode)?)
            }
        })
    }

    /// `x · weightᵀ (+ bias)` through the candle ops.
    fn apply(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, ModelError> {
        Ok(match self {
            Self::F32(w) => k::linear(x, w, bias)?,
            Self::Packed(p) => k::packed_linear(x, p, bias)?,
        })
    }

    /// `x · weightᵀ (+ bias)` on slices, into `out`.
    fn run(
        &self,
        x: &[f32],
        in_dim: usize,
        bias: Option<&[f32]>,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        match self {
            Self::F32(w) => {
                let (storage, layout) = w.storage_and_layout();
                cpu::linear(x, in_dim, cpu_f32(&storage, layout)?, bias, out)?;
            }
            Self::Packed(p) => p.forward(x, bias, out)?,
        }
        Ok(())
    }
}

/// One encoder layer, with weights rearranged once at load time for the fused ops.
struct Layer {
    /// Query, key and value weights stacked: `[3 * hidden, hidden]`, and their biases.
    qkv_weight: Dense,
    qkv_bias: Tensor,
    attn_out_weight: Dense,
    attn_out_bias: Tensor,
    /// LayerNorm weight and bias stacked `[2, hidden]`, as `AddLayerNorm` takes them.
    attn_norm: Tensor,
    inter_weight: Dense,
    inter_bias: Tensor,
    out_weight: Dense,
    out_bias: Tensor,
    out_norm: Tensor,
}

pub(crate) struct Bert {
    word_embeddings: Tensor,
    /// Position embeddings with the token-type-0 embedding added: every input is a single
    /// segment, so the type embedding is the same for all tokens and is folded in once.
    position_embeddings: Tensor,
    embeddings_norm: Tensor,
    layers: Vec<Layer>,
    heads: usize,
    eps: f32,
    hidden: usize,
    vocab_size: usize,
    device: Device,
    workspace: Mutex<Workspace>,
}

/// Reads tensors by name, checking their shapes against the configuration.
struct Weights<'a> {
    st: &'a MmapedSafetensors,
    prefix: &'static str,
    device: &'a Device,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .st
            .get(&full)
            .map_err(|_| ModelError::MissingTensor { name: full.clone() })?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                name: full,
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        Ok(self.st.load(&full, self.device)?.to_dtype(DType::F32)?)
    }

    /// LayerNorm `weight` and `bias` under `name`, stacked `[2, n]`.
    fn layer_norm(&self, name: &str, n: usize) -> Result<Tensor, ModelError> {
        let w = self.get(&format!("{name}.weight"), &[n])?;
        let b = self.get(&format!("{name}.bias"), &[n])?;
        Ok(Tensor::stack(&[w, b], 0)?)
    }
}

impl Bert {
    /// Loads the weights; `precision` is a resolved one (not `Auto`), checked against the
    /// device by the caller.
    pub(crate) fn load(
        st: &MmapedSafetensors,
        cfg: &BertConfig,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        // Checkpoints saved from `BertForPreTraining` and the like prefix every name with `bert.`.
        let prefix = if st.get("embeddings.word_embeddings.weight").is_err()
            && st.get("bert.embeddings.word_embeddings.weight").is_ok()
        {
            "bert."
        } else {
            ""
        };
        let w = Weights { st, prefix, device };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let word_embeddings = w.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let positions = w.get(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let types = w.get(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?;
        let position_embeddings = positions.broadcast_add(&types.narrow(0, 0, 1)?)?;
        let embeddings_norm = w.layer_norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let lin =
                |name: &str, out: usize, inp: usize| -> Result<(Tensor, Tensor), ModelError> {
                    Ok((
                        w.get(&format!("{p}.{name}.weight"), &[out, inp])?,
                        w.get(&format!("{p}.{name}.bias"), &[out])?,
                    ))
                };
            let (qw, qb) = lin("attention.self.query", h, h)?;
            let (kw, kb) = lin("attention.self.key", h, h)?;
            let (vw, vb) = lin("attention.self.value", h, h)?;
            let (attn_out_weight, attn_out_bias) = lin("attention.output.dense", h, h)?;
            let (inter_weight, inter_bias) = lin("intermediate.dense", i, h)?;
            let (out_weight, out_bias) = lin("output.dense", h, i)?;
            let dense = |w: Tensor| Dense::new(w, precision);
            layers.push(Layer {
                qkv_weight: dense(Tensor::cat(&[qw, kw, vw], 0)?)?,
                qkv_bias: Tensor::cat(&[qb, kb, vb], 0)?,
                attn_out_weight: dense(attn_out_weight)?,
                attn_out_bias,
                attn_norm: w.layer_norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                inter_weight: dense(inter_weight)?,
                inter_bias,
                out_weight: dense(out_weight)?,
                out_bias,
                out_norm: w.layer_norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(Self {
            word_embeddings,
            position_embeddings,
            embeddings_norm,
            layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            hidden: h,
            vocab_size: cfg.vocab_size,
            device: device.clone(),
            workspace: Mutex::new(Workspace::default()),
        })
    }

    pub(crate) fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Mean-pooled (and where asked normalised) embeddings of a batch: on the CPU through the
    /// kernels on slices with buffers reused across calls, elsewhere (or when `tensor_ops`)
    /// through the same kernels as candle custom ops.
    ///
    /// All tokens of the batch go through the linear layers as one `[T, hidden]` matrix, with
    /// no padding; attention runs per sequence from `cu_seqlens`.
    pub(crate) fn forward(
        &self,
        batch: &[Sequence<'_>],
        tensor_ops: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let total: usize = batch.iter().map(|s| s.token_ids.len()).sum();
        if total == 0 {
            return Ok(vec![vec![0.0; self.hidden]; batch.len()]);
        }
        let mut input = Input {
            ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            cu: Vec::with_capacity(batch.len() + 1),
            flags: batch.iter().map(|s| u32::from(s.normalize)).collect(),
        };
        input.cu.push(0u32);
        for s in batch {
            if let Some(&id) = s
                .token_ids
                .iter()
                .find(|&&id| id as usize >= self.vocab_size)
            {
                return Err(ModelError::InvalidTokenId {
                    id,
                    vocab_size: self.vocab_size,
                });
            }
            input.ids.extend_from_slice(s.token_ids);
            input.positions.extend(0..s.token_ids.len() as u32);
            input.cu.push(input.ids.len() as u32);
        }
        if self.device.is_cpu() && !tensor_ops {
            self.forward_cpu(&input)
        } else {
            self.forward_tensors(input)
        }
    }

    fn forward_tensors(&self, input: Input) -> Result<Vec<Vec<f32>>, ModelError> {
        let dev = &self.device;
        let (total, batch) = (input.ids.len(), input.flags.len());
        let ids = Tensor::from_vec(input.ids, total, dev)?;
        let positions = Tensor::from_vec(input.positions, total, dev)?;
        let cu = Tensor::from_vec(input.cu, batch + 1, dev)?;
        let flags = Tensor::from_vec(input.flags, batch, dev)?;

        let words = self.word_embeddings.index_select(&ids, 0)?;
        let pos = self.position_embeddings.index_select(&positions, 0)?;
        let mut h = k::add_layer_norm(&words, &pos, &self.embeddings_norm, self.eps)?;
        let scale = self.attention_scale();
        for l in &self.layers {
            let qkv = l.qkv_weight.apply(&h, Some(&l.qkv_bias))?;
            let ctx = k::varlen_attention(&qkv, &cu, self.heads, scale)?;
            let attn = l.attn_out_weight.apply(&ctx, Some(&l.attn_out_bias))?;
            let h1 = k::add_layer_norm(&attn, &h, &l.attn_norm, self.eps)?;
            let inter = l.inter_weight.apply(&h1, None)?;
            let act = k::bias_gelu(&inter, &l.inter_bias)?;
            let out = l.out_weight.apply(&act, Some(&l.out_bias))?;
            h = k::add_layer_norm(&out, &h1, &l.out_norm, self.eps)?;
        }
        let pooled = k::mean_pool_normalize(&h, &cu, &flags)?;
        Ok(pooled.to_vec2::<f32>()?)
    }

    /// The same computation as [`Self::forward_tensors`], on the weights' CPU storage in place
    /// and into buffers kept between calls: after the first batches nothing is allocated, so
    /// no fresh pages are faulted in (that was ~8% of the time, and 20% at batch 128).
    fn forward_cpu(&self, input: &Input) -> Result<Vec<Vec<f32>>, ModelError> {
        let guards: Vec<_> = self
            .cpu_weights()
            .iter()
            .map(|t| t.storage_and_layout())
            .collect();
        let w = guards
            .iter()
            .map(|(storage, layout)| cpu_f32(storage, layout))
            .collect::<Result<Vec<&[f32]>, ModelError>>()?;
        // `w` follows the order of `cpu_weights`: 3 tensors, then 6 per layer.
        let (words, positions, emb_norm) = (w[0], w[1], w[2]);
        let mut guard = self.workspace.lock().unwrap_or_else(|poisoned| {
            // A batch panicked mid-pass (the runtime turned that into its error). The buffers
            // are scratch that every pass rewrites, so fresh ones make the lock good again;
            // refusing would fail every later batch of the worker.
            self.workspace.clear_poison();
            let mut guard = poisoned.into_inner();
            *guard = Workspace::default();
            guard
        });
        let ws = &mut *guard;
        let (h, d) = (self.hidden, self.hidden / self.heads);
        gather(words, h, &input.ids, &mut ws.a);
        gather(positions, h, &input.positions, &mut ws.b);
        let (norm_w, norm_b) = emb_norm.split_at(h);
        cpu::add_layer_norm(&ws.a, &ws.b, norm_w, norm_b, self.eps, &mut ws.h)?;
        let scale = self.attention_scale();
        for (layer, l) in self.layers.iter().zip(w[3..].chunks_exact(6)) {
            #[cfg(test)]
            tests::panic_if_armed();
            let &[qkv_b, ao_b, n1, i_b, o_b, n2] = l else {
                return Err(ModelError::Unsupported("layer weights out of order".into()));
            };
            layer.qkv_weight.run(&ws.h, h, Some(qkv_b), &mut ws.qkv)?;
            cpu::varlen_attention(&ws.qkv, &input.cu, self.heads, d, scale, &mut ws.b)?;
            layer.attn_out_weight.run(&ws.b, h, Some(ao_b), &mut ws.a)?;
            let (n1w, n1b) = n1.split_at(h);
            cpu::add_layer_norm(&ws.a, &ws.h, n1w, n1b, self.eps, &mut ws.h1)?;
            layer.inter_weight.run(&ws.h1, h, None, &mut ws.inter)?;
            cpu::bias_gelu(&ws.inter, i_b, &mut ws.act)?;
            layer
                .out_weight
                .run(&ws.act, i_b.len(), Some(o_b), &mut ws.a)?;
            let (n2w, n2b) = n2.split_at(h);
            cpu::add_layer_norm(&ws.a, &ws.h1, n2w, n2b, self.eps, &mut ws.h)?;
        }
        cpu::mean_pool_normalize(&ws.h, h, &input.cu, &input.flags, &mut ws.a)?;
        Ok(ws.a.chunks_exact(h).map(<[f32]>::to_vec).collect())
    }

    /// The f32 tensors other than the linear weights, in the order `forward_cpu` reads them.
    fn cpu_weights(&self) -> Vec<&Tensor> {
        let mut v = vec![
            &self.word_embeddings,
            &self.position_embeddings,
            &self.embeddings_norm,
        ];
        for l in &self.layers {
            v.extend([
                &l.qkv_bias,
                &l.attn_out_bias,
                &l.attn_norm,
                &l.inter_bias,
                &l.out_bias,
                &l.out_norm,
            ]);
        }
        v
    }

    fn attention_scale(&self) -> f32 {
        1.0 / ((self.hidden / self.heads) as f32).sqrt()
    }
}

/// A batch flattened into the varlen layout.
struct Input {
    ids: Vec<u32>,
    positions: Vec<u32>,
    cu: Vec<u32>,
    flags: Vec<u32>,
}

/// Activation buffers of the CPU path, kept between batches.
#[derive(Default)]
pub(crate) struct Workspace {
    a: Vec<f32>,
    b: Vec<f32>,
    h: Vec<f32>,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    inter: Vec<f32>,
    act: Vec<f32>,
}

/// `out = table[rows]`, rows of `width`; the ids were checked against the table before.
fn gather(table: &[f32], width: usize, rows: &[u32], out: &mut Vec<f32>) {
    out.clear();
    for &r in rows {
        let r = r as usize;
        out.extend_from_slice(&table[r * width..(r + 1) * width]);
    }
}

/// The `f32` values of a contiguous CPU tensor.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32], ModelError> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Ok(&v[start..end]),
        _ => Err(ModelError::Unsupported(
            "CPU path on a tensor that is not contiguous f32 in CPU memory".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use super::*;

    // No input reaches a panic in the real pass: the ids and lengths are checked before it and
    // the kernels return `ShapeError` rather than panic. So the test arms this point, compiled
    // into this crate's unit tests only, to panic between layers with the workspace locked, as
    // a bug in a kernel would.
    thread_local! {
        static ARMED: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn panic_if_armed() {
        if ARMED.take() {
            panic!("injected panic inside the forward pass");
        }
    }

    const VOCAB: usize = 12;
    const HIDDEN: usize = 8;
    const INTER: usize = 16;

    fn random(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 0.5, shape, &Device::Cpu).expect("random tensor")
    }

    fn tiny_bert() -> Bert {
        let layer = || Layer {
            qkv_weight: Dense::F32(random(&[3 * HIDDEN, HIDDEN])),
            qkv_bias: random(&[3 * HIDDEN]),
            attn_out_weight: Dense::F32(random(&[HIDDEN, HIDDEN])),
            attn_out_bias: random(&[HIDDEN]),
            attn_norm: random(&[2, HIDDEN]),
            inter_weight: Dense::F32(random(&[INTER, HIDDEN])),
            inter_bias: random(&[INTER]),
            out_weight: Dense::F32(random(&[HIDDEN, INTER])),
            out_bias: random(&[HIDDEN]),
            out_norm: random(&[2, HIDDEN]),
        };
        Bert {
            word_embeddings: random(&[VOCAB, HIDDEN]),
            position_embeddings: random(&[16, HIDDEN]),
            embeddings_norm: random(&[2, HIDDEN]),
            layers: vec![layer(), layer()],
            heads: 2,
            eps: 1e-12,
            hidden: HIDDEN,
            vocab_size: VOCAB,
            device: Device::Cpu,
            workspace: Mutex::new(Workspace::default()),
        }
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn a_panic_inside_the_forward_pass_leaves_the_next_batch_correct() {
        let bert = tiny_bert();
        let ids: [&[u32]; 3] = [&[2, 4, 5, 3], &[2, 3], &[2, 6, 8, 10, 9, 11, 7, 3]];
        let batch: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
        // The tensor-op path keeps no workspace: the right vectors, whatever the lock holds.
        let want = bert.forward(&batch, true).expect("tensor ops");
        assert_close(
            &bert.forward(&batch, false).expect("before the panic"),
            &want,
        );

        ARMED.set(true);
        let panicked = catch_unwind(AssertUnwindSafe(|| bert.forward(&batch, false)));
        assert!(panicked.is_err(), "the armed pass panics");
        assert!(
            bert.workspace.is_poisoned(),
            "the panic happened with the workspace locked"
        );

        let after = bert.forward(&batch, false).expect("the next batch runs");
        assert_close(&after, &want);
        assert!(!bert.workspace.is_poisoned());
        // A smaller batch next: nothing of the panicked pass's buffers leaks into it.
        let one = bert.forward(&batch[1..2], false).expect("a smaller batch");
        assert_close(&one, &want[1..2]);
    }
}
