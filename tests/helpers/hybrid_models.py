"""Tiny models of the families Mac users run now, built from mlx-lm's own classes with random
weights: hybrids with recurrent state (gated delta, short convolutions, Mamba-2), mixtures of
experts, and mxfp4 experts (gpt-oss).

Random weights make a model that repeats one token: ``helpers.liven`` makes the next token
depend on the current one and on the context, as ``helpers.build_tiny_model`` does.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import switch_layers
from mlx_lm.models import (
    falcon_h1, gpt_oss, granitemoehybrid, kimi_linear, lfm2, lfm2_moe, mamba2, nemotron_h, olmo_hybrid,
    plamo2, qwen3_5, qwen3_moe, qwen3_next,
)
from mlx_lm.utils import save_config, save_model

from . import liven, write_byte_tokenizer

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=128, tie_word_embeddings=False)
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)
GATED_DELTA = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
                   linear_value_head_dim=32)
MAMBA = dict(mamba_d_conv=4, mamba_d_state=16, mamba_n_groups=1, mamba_n_heads=8, mamba_d_head=16,
             mamba_conv_bias=True, mamba_proj_bias=False)

CONFIGS = {
    "qwen3_5": (qwen3_5, dict(
        COMMON, **ATTENTION, **GATED_DELTA, model_type="qwen3_5", intermediate_size=256,
        num_hidden_layers=4, full_attention_interval=2)),
    "qwen3_next": (qwen3_next, dict(
        COMMON, **ATTENTION, **GATED_DELTA, model_type="qwen3_next", intermediate_size=256,
        num_hidden_layers=2, linear_conv_kernel_dim=4, full_attention_interval=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, shared_expert_intermediate_size=64,
        moe_intermediate_size=64, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=10000.0,
        partial_rotary_factor=0.5, max_position_embeddings=1024, norm_topk_prob=True)),
    "lfm2": (lfm2, dict(
        COMMON, model_type="lfm2", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, norm_eps=1e-5, conv_bias=True, conv_L_cache=3, block_dim=128,
        block_ff_dim=256, block_multiple_of=32, block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False, full_attn_idxs=[1, 3], rope_theta=10000.0)),
    "mamba2": (mamba2, dict(
        COMMON, model_type="mamba2", num_heads=8, head_dim=32, intermediate_size=256, state_size=16,
        num_hidden_layers=2, layer_norm_epsilon=1e-5, conv_kernel=4, n_groups=1, use_bias=False,
        use_conv_bias=True, time_step_limit=(0.0, float("inf")), time_step_rank="auto")),
    "nemotron_h": (nemotron_h, dict(
        COMMON, model_type="nemotron_h", intermediate_size=256, max_position_embeddings=1024,
        **ATTENTION, attention_bias=False, mamba_num_heads=8, mamba_head_dim=16, mamba_proj_bias=False,
        ssm_state_size=16, conv_kernel=4, n_groups=2, mlp_bias=False, layer_norm_epsilon=1e-5,
        use_bias=False, use_conv_bias=True, hybrid_override_pattern=["M", "*", "M", "-"])),
    "qwen3_moe": (qwen3_moe, dict(
        COMMON, **ATTENTION, model_type="qwen3_moe", num_hidden_layers=2, intermediate_size=256,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=1024, norm_topk_prob=True)),
    "gpt_oss": (gpt_oss, dict(
        COMMON, **ATTENTION, model_type="gpt_oss", num_hidden_layers=2, num_local_experts=8,
        num_experts_per_tok=2, intermediate_size=64, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"])),
}

# Further hybrids whose mixers recurrent.MIXERS lists, for the rewind tests only.
MORE = {
    "granitemoehybrid": (granitemoehybrid, dict(
        COMMON, **ATTENTION, **MAMBA, model_type="granitemoehybrid", intermediate_size=256,
        max_position_embeddings=1024, attention_bias=False, embedding_multiplier=1.0,
        attention_multiplier=0.1, logits_scaling=1.0, residual_multiplier=1.0, num_local_experts=0,
        num_experts_per_tok=0, shared_intermediate_size=256, layer_types=["mamba", "attention"],
        rms_norm_eps=1e-5, rope_theta=10000.0, num_hidden_layers=2, position_embedding_type="rope")),
    "falcon_h1": (falcon_h1, dict(
        COMMON, **ATTENTION, **MAMBA, model_type="falcon_h1", intermediate_size=256,
        num_hidden_layers=2, mamba_d_ssm=128, mamba_chunk_size=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=1024)),
    "plamo2": (plamo2, dict(
        COMMON, model_type="plamo2", num_hidden_layers=2, rms_norm_eps=1e-5,
        num_attention_heads=4, num_key_value_heads=2, hidden_size_per_head=32,
        max_position_embeddings=1024, attention_window_size=1024, full_attention_idx=[1],
        mamba_d_state=16, mamba_d_conv=4, mamba_num_heads=8, mamba_step=2, mamba_chunk_size=256,
        mamba_enabled=True, intermediate_size=256, rope_theta=10000.0)),
    "olmo_hybrid": (olmo_hybrid, dict(
        COMMON, **ATTENTION, **GATED_DELTA, model_type="olmo_hybrid", intermediate_size=256,
        num_hidden_layers=2, linear_conv_kernel_dim=4, linear_allow_neg_eigval=True,
        attention_bias=False, layer_types=["linear_attention", "full_attention"],
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024)),
    "lfm2_moe": (lfm2_moe, dict(
        COMMON, model_type="lfm2_moe", intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        use_expert_bias=True, num_dense_layers=1, norm_eps=1e-5, conv_bias=True, conv_L_cache=3,
        full_attn_idxs=[1])),
    "kimi_linear": (kimi_linear, dict(
        COMMON, model_type="kimi_linear", num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, rope_theta=10000.0,
        model_max_length=1024, rms_norm_eps=1e-5,
        linear_attn_config={"kda_layers": [1], "num_heads": 4, "head_dim": 32,
                            "short_conv_kernel_size": 4, "full_attn_layers": [2]},
        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, num_experts=0, moe_intermediate_size=64, first_k_dense_replace=2)),
}

def build(name: str, seed: int = 0, bits: int = 4, experts_mode: str = "affine") -> nn.Module:
    """The tiny ``name`` model, affine ``bits``-bit (group 32) but its convolutions and
    norms; its experts in ``experts_mode`` (``mxfp4``: as gpt-oss ships them)."""
    module, config = {**CONFIGS, **MORE}[name]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(dict(config)))
    liven(model)
    if experts_mode != "affine":
        nn.quantize(model, group_size=32, bits=4, mode=experts_mode,
                    class_predicate=lambda _, m: isinstance(m, switch_layers.SwitchLinear))
    nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def save(name: str, root, experts_mode: str = "affine"):
    """The tiny ``name`` model as an mlx-community style directory: weights, config (mlx-lm
    infers each layer's quantization from its arrays), a byte-level BPE tokenizer with a
    chat template that joins the messages' texts."""
    save_model(root, build(name, experts_mode=experts_mode), donate_model=True)
    save_config({**CONFIGS[name][1], "quantization": {"group_size": 32, "bits": 4}},
                root / "config.json")
    write_byte_tokenizer(root, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    return root
