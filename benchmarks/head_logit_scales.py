"""How unevenly the query heads of a GQA group weigh in a logsumexp of their attention logits.

Several decode-gate queries merged by ``logsumexp`` of their raw logits give a block the probability
``Σ_h Z_h p_h(b) / Σ_h Z_h``: each head's distribution weighted by its partition function ``Z_h`` (the sum of its
exponentiated logits over the earlier keys). The ``"mixture"`` merge weighs every head alike. A gate with one query
per head starts as the heads themselves, so the heads' own ``Z_h`` show how far logsumexp is from the mixture for a
model. For each model, layer and KV head this script takes the real attention logits of the last ``--rows`` tokens
of a held-out window (dense prefill) and reports, per group, the mean weight ``max_h Z_h / Σ_h Z_h`` of the heaviest
head (``1/g`` when even, 1 when one head decides alone), the effective number of heads ``exp(entropy)`` of those
weights (``g`` when even) and the mean spread ``max_h log Z_h - min_h log Z_h``.

    python benchmarks/head_logit_scales.py --models smollm2 qwen2.5-coder-0.5b --length 2048

Writes ``head_logit_scales_<device>_<stamp>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill_eval import MODELS, heldout_token_ids, model_setup  # noqa: E402

from seer_adapter import SeerAttentionConfig, get_seer_model  # noqa: E402
from seer_adapter.evaluation import environment_meta, write_results  # noqa: E402


def group_weights(query: torch.Tensor, key: torch.Tensor, scaling: float, rows: int) -> dict[str, float]:
    """Heaviest-head weight and log-partition spread of each GQA group over the last ``rows`` query positions.

    query ``[1, Hq, S, D]`` and key ``[1, Hkv, S, D]`` post-RoPE; causal attention logits ``q·kᵀ·scaling``."""
    _, hq, length, _ = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    last = query[0, :, length - rows :].float()  # [Hq, R, D]
    keys = key[0].float().repeat_interleave(group, dim=0)  # [Hq, S, D]
    logits = torch.einsum("hrd,hsd->hrs", last, keys) * scaling  # [Hq, R, S]
    positions = torch.arange(length - rows, length)[:, None]
    logits = logits.masked_fill(torch.arange(length)[None, :] > positions, float("-inf"))
    log_z = torch.logsumexp(logits, dim=-1).view(hkv, group, rows)  # [Hkv, g, R]
    weights = torch.softmax(log_z, dim=1)  # each head's share of a logsumexp merge
    spread = log_z.amax(dim=1) - log_z.amin(dim=1)
    effective = torch.exp(-(weights * weights.clamp_min(1e-30).log()).sum(dim=1))  # exp(entropy): g when even
    return {
        "heaviest_weight": weights.amax(dim=1).mean().item(),
        "effective_heads": effective.mean().item(),
        "log_z_spread": spread.mean().item(),
    }


def measure(name: str, length: int, rows: int) -> dict:
    path, tokenizer, device, dtype = model_setup(name)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model = get_seer_model(base, SeerAttentionConfig())
    ids = heldout_token_ids(tokenizer)[:length][None].to(device)
    per_layer: dict[int, dict[str, float]] = {}

    def hook(module, layer, query, key, value, mask, scaling, **kwargs):
        per_layer[layer.layer_idx] = group_weights(query, key, scaling, rows)
        group = query.shape[1] // key.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), is_causal=True, scale=scaling
        )

    model.runtime.distillation = hook
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.runtime.distillation = None
    config = base.config
    group = config.num_attention_heads // config.num_key_value_heads
    layers = sorted(per_layer)
    return {
        "model": name,
        "group": group,
        "even_weight": 1.0 / group,
        **{
            stat: sum(per_layer[i][stat] for i in layers) / len(layers)
            for stat in ("heaviest_weight", "effective_heads", "log_z_spread")
        },
        "per_layer": {str(i): per_layer[i] for i in layers},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-coder-0.5b"], choices=sorted(MODELS))
    parser.add_argument("--length", type=int, default=2048, help="tokens of the held-out window")
    parser.add_argument("--rows", type=int, default=256, help="last query positions measured")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = [measure(name, args.length, args.rows) for name in args.models]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = environment_meta(device, command="python " + " ".join(sys.argv), length=args.length, rows=args.rows)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    print(f"wrote {write_results(Path(args.out) / f'head_logit_scales_{device.type}_{stamp}.json', meta, rows)}")
    print(f"{'model':<20} {'group':>5} {'1/g':>6} {'heaviest head':>13} {'effective heads':>15} {'log Z spread':>12}")
    for row in rows:
        print(
            f"{row['model']:<20} {row['group']:>5} {row['even_weight']:>6.3f} {row['heaviest_weight']:>13.3f} "
            f"{row['effective_heads']:>15.2f} {row['log_z_spread']:>12.2f}"
        )


if __name__ == "__main__":
    main()
