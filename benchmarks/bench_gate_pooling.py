"""Gate input pooling on one GPU: the unfused path (fp32 cast, inverse RoPE, `pool_blocks`) against the fused
Triton op `pool_pre_rope_blocks`, for Q and K alone and for the whole gate-logit computation (a script, not a test).

Default shape (a Llama-3.1-8B layer): B=1, Hq=32, Hkv=8, head_dim=128, bf16, S=32768, block 64, the default gate
(q_pooling ['avg'], k_pooling ['max', 'min', 'avg'], fp32 gate), "half" RoPE with bf16 [B, S, D] tables as
transformers passes them; Q and K are transposes of [B, S, H, D] like in the attention layer.

Rows:

* ``pool_q`` / ``pool_k``: ``pool_blocks(apply_rope(x.float(), cos, sin, inverse=True))`` (``unfused``) vs the fused
  op (``fused``);
* ``gate_logits``: the body of ``compute_gate_logits`` before this op existed (``unfused``: inverse RoPE of Q and K
  in fp32, then ``AttnGate.forward``) vs ``seer_adapter.attention.compute_gate_logits`` itself (``fused``).

Times are medians of `triton.testing.do_bench`; ``GB/s`` counts the bytes the fused op must read (x and the tables)
and write; ``peak_MiB`` is the peak memory allocated above the inputs. Before timing, the fused results are checked
against the unfused ones. ``--sweep-configs`` also times the kernel's launch configurations (TOKENS x warps).

    python benchmarks/bench_gate_pooling.py
    python benchmarks/bench_gate_pooling.py --seq-lens 8192 32768 131072 --left-pad 1000 --sweep-configs

Writes ``benchmarks/results/<name>_<date>.json`` (``meta`` + ``rows``) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_adapter.attention import compute_gate_logits  # noqa: E402
from seer_adapter.gate import AttnGate, pool_blocks  # noqa: E402
from seer_adapter.kernels import gate_pooling  # noqa: E402
from seer_adapter.rope import apply_rope  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16


def make_inputs(args: argparse.Namespace, seq_len: int) -> dict[str, torch.Tensor | None]:
    """Post-RoPE q ``[B, Hq, S, D]`` / k ``[B, Hkv, S, D]`` (transposes of ``[B, S, H, D]``), bf16 cos / sin
    ``[B, S, D]`` ("half" layout) and the optional left-padding mask ``[B, S]``."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (args.batch, seq_len)
    q = torch.randn(*shape, args.hq, args.head_dim, generator=gen, device=DEVICE, dtype=DTYPE).transpose(1, 2)
    k = torch.randn(*shape, args.hkv, args.head_dim, generator=gen, device=DEVICE, dtype=DTYPE).transpose(1, 2)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, args.head_dim, 2, device=DEVICE, dtype=torch.float32) / args.head_dim))
    angles = torch.arange(seq_len, device=DEVICE, dtype=torch.float32)[:, None] * freqs[None, :]
    angles = torch.cat((angles, angles), dim=-1)[None].expand(args.batch, -1, -1)
    cos, sin = angles.cos().to(DTYPE).contiguous(), angles.sin().to(DTYPE).contiguous()
    valid = None
    if args.left_pad:
        valid = torch.ones(*shape, dtype=torch.bool, device=DEVICE)
        valid[:, : args.left_pad] = False
    return {"q": q, "k": k, "cos": cos, "sin": sin, "valid": valid}


def unfused_gate_logits(gate: AttnGate, inputs: dict, block_size: int) -> torch.Tensor:
    """The body of `compute_gate_logits` before the fused op: fp32 inverse RoPE of Q and K, then the gate."""
    cos, sin, dtype = inputs["cos"], inputs["sin"], gate.k_proj.weight.dtype
    query = apply_rope(inputs["q"].to(dtype), cos, sin, "half", inverse=True)
    key = apply_rope(inputs["k"].to(dtype), cos, sin, "half", inverse=True)
    return gate(
        query,
        key,
        block_cos=cos[..., ::block_size, :],
        block_sin=sin[..., ::block_size, :],
        rope_style="half",
        token_valid=inputs["valid"],
    )


def fused_gate_logits(gate: AttnGate, inputs: dict) -> torch.Tensor:
    """`compute_gate_logits` itself, on a stand-in layer state."""
    state = SimpleNamespace(
        runtime=SimpleNamespace(active_adapter="default"),
        layer_idx=0,
        rope_style="half",
        position_embeddings=(inputs["cos"], inputs["sin"]),
    )
    module = SimpleNamespace(seer_gate={"default": gate})
    return compute_gate_logits(state, module, inputs["q"], inputs["k"], inputs["valid"])


def measure(fn: Callable[[], torch.Tensor], rep_ms: int) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what was allocated before the call)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"), peak


def compare(check: str, got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> dict:
    """Max abs difference over the finite entries (``inf`` if the -inf pattern differs); passes if it is within
    ``rtol`` of the largest expected magnitude."""
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(got)):
        diff, scale = float("inf"), 1.0
    elif finite.any():
        diff = (got[finite].float() - expected[finite].float()).abs().max().item()
        scale = expected[finite].float().abs().max().item()
    else:
        diff, scale = 0.0, 1.0
    return {"check": check, "max_abs_diff": diff, "max_abs_expected": scale, "passed": diff <= rtol * max(scale, 1e-6)}


def bench_seq_len(args: argparse.Namespace, seq_len: int, rows: list[dict], checks: list[dict]) -> None:
    inputs = make_inputs(args, seq_len)
    block = args.block_size
    gate = AttnGate(args.hq, args.hkv, args.head_dim, args.head_dim, block, ["avg"], ["max", "min", "avg"]).to(DEVICE)
    n_blocks = triton.cdiv(seq_len, block)
    pool = {"rope_style": "half", "block_size": block, "token_valid": inputs["valid"]}
    table_bytes = 2 * inputs["cos"].numel() * inputs["cos"].element_size()

    with torch.no_grad():
        for name, x, poolings in (("pool_q", inputs["q"], ["avg"]), ("pool_k", inputs["k"], ["max", "min", "avg"])):
            kwargs = {**pool, "poolings": poolings}
            variants = {
                "unfused": lambda x=x, kwargs=kwargs: pool_blocks(
                    apply_rope(x.float(), inputs["cos"], inputs["sin"], "half", inverse=True),
                    block,
                    kwargs["poolings"],
                    kwargs["token_valid"],
                ),
                "fused": lambda x=x, kwargs=kwargs: gate_pooling.pool_pre_rope_blocks(
                    x, inputs["cos"], inputs["sin"], backend="triton", **kwargs
                ),
            }
            checks.append(compare(f"{name} fused vs unfused, S={seq_len}", variants["fused"](), variants["unfused"]()))
            out_bytes = x.shape[0] * x.shape[1] * n_blocks * len(poolings) * x.shape[-1] * 4
            moved = x.numel() * x.element_size() + table_bytes + out_bytes
            for variant, fn in variants.items():
                ms, peak = measure(fn, args.rep)
                rows.append(row(name, variant, seq_len, ms, peak, moved))
            if args.sweep_configs:
                sweep(args, name, seq_len, variants["fused"], moved, rows)

        variants = {
            "unfused": lambda: unfused_gate_logits(gate, inputs, block),
            "fused": lambda: fused_gate_logits(gate, inputs),
        }
        checks.append(compare(f"gate logits fused vs unfused, S={seq_len}", variants["fused"](), variants["unfused"]()))
        for variant, fn in variants.items():
            ms, peak = measure(fn, args.rep)
            rows.append(row("gate_logits", variant, seq_len, ms, peak, None))


def sweep(args: argparse.Namespace, name: str, seq_len: int, fn: Callable, moved: int, rows: list[dict]) -> None:
    """Time the fused op under other launch configurations (patches the private heuristic, restored after)."""
    heuristic = gate_pooling._launch_config
    try:
        for tokens in (16, 32, 64):
            for warps in (2, 4, 8):

                def config(head_dim: int, block_size: int, tokens: int = tokens, warps: int = warps) -> dict[str, int]:
                    base = heuristic(head_dim, block_size)
                    return {**base, "TOKENS": min(tokens, triton.next_power_of_2(block_size)), "num_warps": warps}

                gate_pooling._launch_config = config
                ms, peak = measure(fn, args.rep)
                rows.append(row(name, f"fused T{tokens} w{warps}", seq_len, ms, peak, moved))
    finally:
        gate_pooling._launch_config = heuristic


def row(name: str, variant: str, seq_len: int, ms: float, peak: float, moved: int | None) -> dict:
    return {
        "op": name,
        "variant": variant,
        "S": seq_len,
        "ms": round(ms, 4),
        "peak_MiB": round(peak, 1),
        "GB_s": None if moved is None else round(moved / ms / 1e6, 1),
    }


def print_table(rows: list[dict]) -> None:
    print(f"\n{'op':<12} {'variant':<16} {'S':>7} {'ms':>9} {'speedup':>8} {'GB/s':>8} {'peak MiB':>9}")
    baseline = {(r["op"], r["S"]): r["ms"] for r in rows if r["variant"] == "unfused"}
    for r in rows:
        speedup = baseline.get((r["op"], r["S"]), float("nan")) / r["ms"]
        gbs = "" if r["GB_s"] is None else f"{r['GB_s']:.0f}"
        print(
            f"{r['op']:<12} {r['variant']:<16} {r['S']:>7} {r['ms']:>9.3f} {speedup:>7.2f}x {gbs:>8} "
            f"{r['peak_MiB']:>9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--left-pad", type=int, default=0, help="left-padding tokens per sequence (0: no mask)")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    parser.add_argument("--sweep-configs", action="store_true", help="also time other launch configurations")
    parser.add_argument("--name", default="bench_gate_pooling")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gate_pooling.py needs a CUDA GPU", file=sys.stderr)
        return 2

    start = datetime.datetime.now()
    rows: list[dict] = []
    checks: list[dict] = []
    for seq_len in args.seq_lens:
        bench_seq_len(args, seq_len, rows, checks)
        torch.cuda.empty_cache()  # the inputs of this length are gone
    now = datetime.datetime.now()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dtype": str(DTYPE),
        "shape": {"batch": args.batch, "hq": args.hq, "hkv": args.hkv, "head_dim": args.head_dim},
        "block_size": args.block_size,
        "left_pad": args.left_pad,
        "launch_config": gate_pooling._launch_config(args.head_dim, args.block_size),
        "wall_s": round((now - start).total_seconds(), 1),
        "checks": checks,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}_{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    failed = [check["check"] for check in checks if not check["passed"]]
    print(f"\nwrote {path}" + (f"; FAILED checks: {failed}" if failed else ""))
    for check in checks:
        print(f"check {check['check']}: max |diff| {check['max_abs_diff']:.3g} ({'ok' if check['passed'] else 'FAIL'})")
    print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
