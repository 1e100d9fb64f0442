//! Hugging Face parameter names, spelled once.
//!
//! The parameter list ([`super::spec`]), the model builder and (through them)
//! loading and hot updates all name tensors with these functions, so a
//! checkpoint name exists in exactly one place.

/// The token embedding matrix (also the output head when embeddings are tied).
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The final RMSNorm scale.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The output head, absent when embeddings are tied.
pub const LM_HEAD: &str = "lm_head.weight";

/// A module inside one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerModule {
    InputNorm,
    QProj,
    KProj,
    VProj,
    OProj,
    QNorm,
    KNorm,
    PostAttentionNorm,
    GateProj,
    UpProj,
    DownProj,
}

impl LayerModule {
    /// The seven linear projections of a layer, in checkpoint order.
    pub const PROJECTIONS: [LayerModule; 7] = [
        LayerModule::QProj,
        LayerModule::KProj,
        LayerModule::VProj,
        LayerModule::OProj,
        LayerModule::GateProj,
        LayerModule::UpProj,
        LayerModule::DownProj,
    ];

    /// The module's path below `model.layers.N`.
    pub fn path(self) -> &'static str {
        match self {
            LayerModule::InputNorm => "input_layernorm",
            LayerModule::QProj => "self_attn.q_proj",
            LayerModule::KProj => "self_attn.k_proj",
            LayerModule::VProj => "self_attn.v_proj",
            LayerModule::OProj => "self_attn.o_proj",
            LayerModule::QNorm => "self_attn.q_norm",
            LayerModule::KNorm => "self_attn.k_norm",
            LayerModule::PostAttentionNorm => "post_attention_layernorm",
            LayerModule::GateProj => "mlp.gate_proj",
            LayerModule::UpProj => "mlp.up_proj",
            LayerModule::DownProj => "mlp.down_proj",
        }
    }

    /// The last component of the path (`q_proj`), as PEFT's `target_modules` names it.
    pub fn short_name(self) -> &'static str {
        let path = self.path();
        path.rsplit('.').next().unwrap_or(path)
    }
}

/// Which tensor of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Weight,
    Bias,
}

impl Part {
    fn suffix(self) -> &'static str {
        match self {
            Part::Weight => "weight",
            Part::Bias => "bias",
        }
    }
}

/// The full name of one tensor of a layer module, e.g. `model.layers.3.self_attn.q_proj.weight`.
pub fn layer_param(layer: usize, module: LayerModule, part: Part) -> String {
    format!("model.layers.{layer}.{}.{}", module.path(), part.suffix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_hugging_face() {
        assert_eq!(
            layer_param(3, LayerModule::QProj, Part::Weight),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            layer_param(0, LayerModule::DownProj, Part::Bias),
            "model.layers.0.mlp.down_proj.bias"
        );
        assert_eq!(
            layer_param(1, LayerModule::PostAttentionNorm, Part::Weight),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert_eq!(LayerModule::GateProj.short_name(), "gate_proj");
    }
}
