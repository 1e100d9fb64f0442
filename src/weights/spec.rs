//! The list of parameters a [`ModelConfig`] calls for, by Hugging Face name and shape.
//!
//! Loading, `make-model` and (later) hot updates all check tensors against this
//! one list, so a name or shape is spelled in exactly one place.

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
    use ParamKind::*;
    let h = cfg.hidden_size;
    let q_dim = cfg.num_attention_heads * cfg.head_dim;
    let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        Matrix,
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push(spec(format!("{p}.input_layernorm.weight"), &[h], NormScale));
        for (proj, rows) in [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)] {
            out.push(spec(
                format!("{p}.self_attn.{proj}.weight"),
                &[rows, h],
                Matrix,
            ));
            if cfg.qkv_bias {
                out.push(spec(format!("{p}.self_attn.{proj}.bias"), &[rows], Bias));
            }
        }
        out.push(spec(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q_dim],
            Matrix,
        ));
        if cfg.o_bias {
            out.push(spec(format!("{p}.self_attn.o_proj.bias"), &[h], Bias));
        }
        if cfg.qk_norm {
            out.push(spec(
                format!("{p}.self_attn.q_norm.weight"),
                &[cfg.head_dim],
                NormScale,
            ));
            out.push(spec(
                format!("{p}.self_attn.k_norm.weight"),
                &[cfg.head_dim],
                NormScale,
            ));
        }
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            NormScale,
        ));
        let m = cfg.intermediate_size;
        for (proj, shape) in [
            ("gate_proj", [m, h]),
            ("up_proj", [m, h]),
            ("down_proj", [h, m]),
        ] {
            out.push(spec(format!("{p}.mlp.{proj}.weight"), &shape, Matrix));
            if cfg.mlp_bias {
                out.push(spec(format!("{p}.mlp.{proj}.bias"), &shape[..1], Bias));
            }
        }
    }
    out.push(spec("model.norm.weight".into(), &[h], NormScale));
    if !cfg.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), &[cfg.vocab_size, h], Matrix));
    }
    out
}
