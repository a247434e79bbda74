"""seer_adapter: learned block-sparse attention (SeerAttention) as a PEFT-style adapter for any causal LM.

>>> from seer_adapter import SeerAttentionConfig, get_seer_model
>>> model = get_seer_model(base_model, SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.3))
"""

from .attention import ATTN_IMPLEMENTATION, register_attention
from .auto import AutoSeerModelForCausalLM
from .config import SeerAttentionConfig, SeerConfigError
from .decode import DecodeCacheError, SeerDynamicCache, SeerStaticCache
from .gate import AttnGate, DecodeGate
from .model import AdapterMismatchError, SeerModel, UnsupportedModelError, get_seer_model
from .peft_integration import register_with_peft

__version__ = "0.1.0"

register_attention()
register_with_peft(strict=False)  # PeftModel / AutoPeftModelForCausalLM load seer adapters (peft >= 0.21)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AdapterMismatchError",
    "AttnGate",
    "DecodeCacheError",
    "DecodeGate",
    "AutoSeerModelForCausalLM",
    "SeerAttentionConfig",
    "SeerConfigError",
    "SeerDynamicCache",
    "SeerStaticCache",
    "SeerModel",
    "UnsupportedModelError",
    "get_seer_model",
]
