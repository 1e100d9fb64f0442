//! The list of parameters a [`ModelConfig`] calls for, by Hugging Face name and shape.
//!
//! Loading, `make-model` and (later) hot updates all check tensors against this
//! one list, so a name or shape is spelled in exactly one place.

use super::names::{layer_param, LayerModule, Part, EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use crate::config::ModelConfig;

/// What a parameter is, which decides how `make-model` initialises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A projection or embedding matrix: small random values.
    Matrix,
    /// An RMSNorm scale: ones.
    NormScale,
    /// A bias vector: small random values (zero would hide bias bugs in tests).
    Bias,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

fn spec(name: String, shape: &[usize], kind: ParamKind) -> ParamSpec {
    ParamSpec {
        name,
        shape: shape.to_vec(),
        kind,
    }
}

/// Every parameter the model reads, in checkpoint order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    use LayerModule::*;
    use ParamKind::*;
    let h = cfg.hidden_size;
    let q_dim = cfg.num_attention_heads * cfg.head_dim;
    let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
    let m = cfg.intermediate_size;
    let mut out = vec![spec(EMBED_TOKENS.into(), &[cfg.vocab_size, h], Matrix)];
    for i in 0..cfg.num_hidden_layers {
        out.push(spec(
            layer_param(i, InputNorm, Part::Weight),
            &[h],
            NormScale,
        ));
        let projections = [
            (QProj, [q_dim, h], cfg.qkv_bias),
            (KProj, [kv_dim, h], cfg.qkv_bias),
            (VProj, [kv_dim, h], cfg.qkv_bias),
            (OProj, [h, q_dim], cfg.o_bias),
        ];
        push_projections(&mut out, i, &projections);
        if cfg.qk_norm {
            for module in [QNorm, KNorm] {
                out.push(spec(
                    layer_param(i, module, Part::Weight),
                    &[cfg.head_dim],
                    NormScale,
                ));
            }
        }
        out.push(spec(
            layer_param(i, PostAttentionNorm, Part::Weight),
            &[h],
            NormScale,
        ));
        let projections = [
            (GateProj, [m, h], cfg.mlp_bias),
            (UpProj, [m, h], cfg.mlp_bias),
            (DownProj, [h, m], cfg.mlp_bias),
        ];
        push_projections(&mut out, i, &projections);
    }
    out.push(spec(FINAL_NORM.into(), &[h], NormScale));
    if !cfg.tie_word_embeddings {
        out.push(spec(LM_HEAD.into(), &[cfg.vocab_size, h], Matrix));
    }
    out
}

/// A projection's weight `[out, in]` and, when the config has one, its bias `[out]`.
fn push_projections(
    out: &mut Vec<ParamSpec>,
    layer: usize,
    projections: &[(LayerModule, [usize; 2], bool)],
) {
    for &(module, shape, has_bias) in projections {
        out.push(spec(
            layer_param(layer, module, Part::Weight),
            &shape,
            ParamKind::Matrix,
        ));
        if has_bias {
            out.push(spec(
                layer_param(layer, module, Part::Bias),
                &shape[..1],
                ParamKind::Bias,
            ));
        }
    }
}
