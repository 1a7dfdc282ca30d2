//! BERT encoder weights and the unpadded forward pass.

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use fleet_kernels as k;

use crate::config::BertConfig;
use crate::{ModelError, Sequence};

/// One encoder layer, with weights rearranged once at load time for the fused ops.
struct Layer {
    /// Query, key and value weights stacked: `[3 * hidden, hidden]`, and their biases.
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    attn_out_weight: Tensor,
    attn_out_bias: Tensor,
    /// LayerNorm weight and bias stacked `[2, hidden]`, as `AddLayerNorm` takes them.
    attn_norm: Tensor,
    inter_weight: Tensor,
    inter_bias: Tensor,
    out_weight: Tensor,
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
    pub(crate) fn load(
        st: &MmapedSafetensors,
        cfg: &BertConfig,
        device: &Device,
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
            layers.push(Layer {
                qkv_weight: Tensor::cat(&[qw, kw, vw], 0)?,
                qkv_bias: Tensor::cat(&[qb, kb, vb], 0)?,
                attn_out_weight,
                attn_out_bias,
                attn_norm: w.layer_norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                inter_weight,
                inter_bias,
                out_weight,
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
        })
    }

    pub(crate) fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Mean-pooled (and where asked normalised) embeddings of already validated sequences.
    ///
    /// All tokens of the batch go through the linear layers as one `[T, hidden]` matrix, with
    /// no padding; attention runs per sequence from `cu_seqlens`.
    pub(crate) fn forward(&self, batch: &[Sequence<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let total: usize = batch.iter().map(|s| s.token_ids.len()).sum();
        if total == 0 {
            return Ok(vec![vec![0.0; self.hidden]; batch.len()]);
        }
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut cu = Vec::with_capacity(batch.len() + 1);
        cu.push(0u32);
        for s in batch {
            for &id in s.token_ids {
                if id as usize >= self.vocab_size {
                    return Err(ModelError::InvalidTokenId {
                        id,
                        vocab_size: self.vocab_size,
                    });
                }
            }
            ids.extend_from_slice(s.token_ids);
            positions.extend(0..s.token_ids.len() as u32);
            cu.push(ids.len() as u32);
        }
        let flags: Vec<u32> = batch.iter().map(|s| u32::from(s.normalize)).collect();
        let dev = &self.device;
        let ids = Tensor::from_vec(ids, total, dev)?;
        let positions = Tensor::from_vec(positions, total, dev)?;
        let cu = Tensor::from_vec(cu, batch.len() + 1, dev)?;
        let flags = Tensor::from_vec(flags, batch.len(), dev)?;

        let words = self.word_embeddings.index_select(&ids, 0)?;
        let pos = self.position_embeddings.index_select(&positions, 0)?;
        let mut h = k::add_layer_norm(&words, &pos, &self.embeddings_norm, self.eps)?;
        let scale = 1.0 / ((self.hidden / self.heads) as f32).sqrt();
        for l in &self.layers {
            let qkv = k::linear(&h, &l.qkv_weight, Some(&l.qkv_bias))?;
            let ctx = k::varlen_attention(&qkv, &cu, self.heads, scale)?;
            let attn = k::linear(&ctx, &l.attn_out_weight, Some(&l.attn_out_bias))?;
            let h1 = k::add_layer_norm(&attn, &h, &l.attn_norm, self.eps)?;
            let inter = k::linear(&h1, &l.inter_weight, None)?;
            let act = k::bias_gelu(&inter, &l.inter_bias)?;
            let out = k::linear(&act, &l.out_weight, Some(&l.out_bias))?;
            h = k::add_layer_norm(&out, &h1, &l.out_norm, self.eps)?;
        }
        let pooled = k::mean_pool_normalize(&h, &cu, &flags)?;
        Ok(pooled.to_vec2::<f32>()?)
    }
}
