"""Tiny random models of many transformers families, for breadth tests on CPU."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Per family: config overrides. Shapes are chosen to exercise GQA, partial rotary and sliding layers.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 32, "num_hidden_layers": 2},
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 32,
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "phi3": {},
    "phi": {"partial_rotary_factor": 0.5},
    "gpt_neox": {"partial_rotary_factor": 0.25, "num_key_value_heads": 4},
    "olmo": {},
    "olmo2": {},
    "starcoder2": {"sliding_window": None},
    "stablelm": {"partial_rotary_factor": 0.25},
    "granite": {},
    "cohere": {},
    "glm": {"head_dim": 16, "partial_rotary_factor": 0.5},
    "helium": {"head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "smollm3": {},
    "seed_oss": {"head_dim": 16},
    "arcee": {},
    "apertus": {},
    "ernie4_5": {"head_dim": 16},
    "opt": {"ffn_dim": 96, "word_embed_proj_dim": 64, "num_key_value_heads": None},
    "gpt_bigcode": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "num_key_value_heads": None},
    "biogpt": {"num_key_value_heads": None},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "num_key_value_heads": None},
}

# Families without an SDPA path in transformers: their original implementation is "eager".
EAGER_ONLY = {"gemma2": "eager"}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``family`` in eval mode."""
    kwargs = {
        k: v for k, v in {**COMMON, **FAMILIES[family], **overrides}.items() if v is not None or k == "sliding_window"
    }
    implementation = EAGER_ONLY.get(family, "sdpa")
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=implementation)
    # Random init leaves some norms at exactly 1 / 0; perturb every parameter so bugs cannot hide behind symmetry.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()
