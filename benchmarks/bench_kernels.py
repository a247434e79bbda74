"""Kernel benchmark on one GPU: block-sparse Triton attention and the ground-truth kernel against dense SDPA
(cuDNN, FlashAttention-2) and FlexAttention on the same block mask (a script, not a test).

Default grid (ANCHORS.md shapes): B=1, Hq=32, Hkv=8, head_dim=128, bf16, causal, block 64, S in {8k, 32k, 128k},
densities {0.1, 0.3, 0.5, 1.0} of the causal block triangle (random masks, sink and diagonal blocks forced), one mask
per query head ("q") and one per KV head ("kv"); plus head_dim 64 and Hq=Hkv=32 rows at 32k. Before timing, outputs
are checked: density 1.0 against SDPA causal, sparse masks and the ground truth against the PyTorch references.

    python benchmarks/bench_kernels.py                      # full run (~5-8 min on an H200)
    python benchmarks/bench_kernels.py --quick              # smoke run: 8k only, two densities
    python benchmarks/bench_kernels.py --seq-lens 32k --densities 0.1 0.5 --sweep-configs

Times are medians of `triton.testing.do_bench` (fewer repetitions at >= 64k). Effective TFLOP/s counts only the kept
causal blocks: 4 * B * Hq * S^2 * D * 0.5 * density / time; speedup_vs_cudnn = cuDNN dense time / time.
``seer_triton`` is the public entry point (bool mask in, index lists built on the GPU each call);
``seer_triton_kernel`` reuses precomputed index lists (kernel time only). Writes
``benchmarks/results/<name>_<date>.json`` (``meta`` + ``rows``) and prints a table last. A variant that runs out of
memory or fails is recorded as skipped with the reason; the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_adapter import benchmarking  # noqa: E402
from seer_adapter.benchmarking import (  # noqa: E402
    Shape,
    benchmark_meta,
    compare_outputs,
    format_kernel_table,
    parse_seq_len,
    sdpa_dense,
    time_ms,
)
from seer_adapter.kernels import block_sparse_triton  # noqa: E402
from seer_adapter.kernels import ground_truth as ground_truth_kernels  # noqa: E402
from seer_adapter.kernels.block_sparse_triton import (  # noqa: E402
    KernelConfig,
    block_mask_to_indices,
    block_sparse_attention_triton,
    choose_kernel_config,
)
from seer_adapter.kernels.ground_truth import (  # noqa: E402
    attention_with_block_ground_truth_reference,
    attention_with_block_ground_truth_triton,
)
from seer_adapter.kernels.reference import block_sparse_attention_reference  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


def make_inputs(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return benchmarking.make_inputs(shape, DEVICE, DTYPE, seed)


def random_causal_block_mask(
    batch: int, heads: int, n_blocks: int, density: float, seed: int
) -> tuple[torch.Tensor, float]:
    return benchmarking.random_causal_block_mask(batch, heads, n_blocks, density, seed, DEVICE)


# ----------------------------------------------------------------------------------------------------------------------
# Competitors
# ----------------------------------------------------------------------------------------------------------------------


_compiled_flex: Callable | None = None
# One block-mask buffer and mask_mod per (shape, block size): later masks are copied into the buffer, so the compiled
# FlexAttention sees the same closure every time and does not recompile per mask.
_flex_mask_buffers: dict[tuple, tuple[torch.Tensor, Callable]] = {}


def flex_attention_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int
) -> tuple[Callable, int, float]:
    """FlexAttention on the same block mask: kept blocks below the diagonal as full blocks, the diagonal blocks as
    partial ones whose mask_mod is causal & the block mask (FlexAttention's contract: mask_mod alone defines the
    result; the BlockMask only lets it skip work).

    Tries ``block_size`` tiles first; if Flex refuses them, the mask is coarsened (OR) to 128-blocks.
    Returns the callable, the block size used and the density Flex actually computes.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if _compiled_flex is None:
        for limit in ("recompile_limit", "cache_size_limit"):  # one compile per shape and tile size
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)

    hq = q.shape[1]
    if block_mask.shape[1] != hq:
        block_mask = block_mask.repeat_interleave(hq // block_mask.shape[1], dim=1)  # [B, Hq, n, n]

    def build(mask: torch.Tensor, flex_block: int) -> BlockMask:
        key = (tuple(mask.shape), flex_block, mask.device)
        if key not in _flex_mask_buffers:
            buffer = torch.empty_like(mask)

            def causal_and_kept(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & buffer[b, h, q_idx // flex_block, kv_idx // flex_block]

            _flex_mask_buffers[key] = (buffer, causal_and_kept)
        buffer, mask_mod = _flex_mask_buffers[key]
        buffer.copy_(mask)
        ids = torch.arange(mask.shape[-1], device=mask.device)
        full = mask & (ids[None, :] < ids[:, None])
        partial = mask & (ids[None, :] == ids[:, None])
        partial_indices, partial_counts = block_mask_to_indices(partial, compact=False)
        full_indices, full_counts = block_mask_to_indices(full, compact=False)
        args = (partial_counts, partial_indices.contiguous(), full_counts, full_indices.contiguous())
        try:
            return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=flex_block, mask_mod=mask_mod, compute_q_blocks=False)
        except TypeError:  # older signature
            return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=flex_block, mask_mod=mask_mod)

    def density_of(mask: torch.Tensor) -> float:
        n = mask.shape[-1]
        return mask.sum().item() / (mask.shape[0] * mask.shape[1] * n * (n + 1) / 2)

    try:
        flex_mask = build(block_mask, block_size)
        options = {"BLOCK_M": block_size, "BLOCK_N": block_size}

        def call() -> torch.Tensor:
            return _compiled_flex(q, k, v, block_mask=flex_mask, enable_gqa=True, kernel_options=options)

        call()
        return call, block_size, density_of(block_mask)
    except Exception as error:  # noqa: BLE001 - any refusal: fall back to 128-blocks
        print(f"    flex: block {block_size} refused ({type(error).__name__}); using 128-blocks", flush=True)
    factor = 128 // block_size
    b, h, n, _ = block_mask.shape
    coarse = block_mask.view(b, h, n // factor, factor, n // factor, factor).any(dim=5).any(dim=3)
    flex_mask = build(coarse, 128)

    def call_128() -> torch.Tensor:
        return _compiled_flex(q, k, v, block_mask=flex_mask, enable_gqa=True)

    call_128()
    return call_128, 128, density_of(coarse)


# ----------------------------------------------------------------------------------------------------------------------
# Timing and bookkeeping
# ----------------------------------------------------------------------------------------------------------------------


class Runner:
    """Times variants, records rows (or skips with a reason), keeps the run inside a wall-time budget."""

    def __init__(self, time_budget_s: float, quick: bool) -> None:
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.start = time.monotonic()
        self.time_budget_s = time_budget_s
        self.quick = quick
        self.cudnn_ms: dict[tuple, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def time_ms(self, fn: Callable[[], object], seq_len: int) -> float:
        """Median ms of `triton.testing.do_bench`; few repetitions at long sequences and in quick runs."""
        return time_ms(fn, DEVICE, few=seq_len >= 65536 or self.quick)

    def measure(
        self,
        kernel: str,
        shape: Shape,
        build: Callable[[], tuple[Callable[[], object], dict]],
        *,
        density: float,
        mask_heads: str,
        block_size: int,
    ) -> None:
        """``build`` makes the callable (untimed) and returns it with extra row fields (e.g. ``density_actual``)."""
        row = {
            "kernel": kernel,
            "S": shape.seq_len,
            "head_dim": shape.head_dim,
            "hq": shape.hq,
            "hkv": shape.hkv,
            "batch": shape.batch,
            "block_size": block_size,
            "density": density,
            "mask_heads": mask_heads,
        }
        if self.elapsed() > self.time_budget_s:
            self.skip(row, f"time budget of {self.time_budget_s:.0f} s exhausted")
            return
        try:
            fn, extra = build()
            row.update(extra)
            ms = self.time_ms(fn, shape.seq_len)
        except torch.OutOfMemoryError as error:
            self.skip(row, f"out of memory: {str(error).splitlines()[0]}")
            return
        except Exception as error:  # noqa: BLE001 - one broken variant must not end the run
            self.skip(row, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            traceback.print_exc(limit=2)
            return
        finally:
            torch.cuda.empty_cache()
        density_actual = row.setdefault("density_actual", density)
        row["ms"] = ms
        row["tflops_eff"] = shape.flops(density_actual) / (ms * 1e-3) / 1e12
        key = (shape, block_size)
        if kernel == "sdpa_cudnn_dense":
            self.cudnn_ms[key] = ms
        cudnn = self.cudnn_ms.get(key)
        row["speedup_vs_cudnn"] = cudnn / ms if cudnn else None
        row["status"] = "ok"
        self.rows.append(row)
        speedup = f"{row['speedup_vs_cudnn']:.2f}x cuDNN" if cudnn else ""
        print(
            f"  {kernel:<22} {mask_heads:<5} d={density_actual:.2f}  {ms:9.3f} ms  "
            f"{row['tflops_eff']:6.1f} TFLOP/s  {speedup}",
            flush=True,
        )

    def skip(self, row: dict, reason: str) -> None:
        row.update(status="skipped", reason=reason, ms=None, tflops_eff=None, speedup_vs_cudnn=None)
        self.rows.append(row)
        print(f"  {row['kernel']:<22} {row['mask_heads']:<5} skipped: {reason}", flush=True)

    def check(self, name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
        record = compare_outputs(name, actual, expected, atol=atol, rtol=rtol)
        self.checks.append(record)
        status = "ok" if record["passed"] else "FAILED"
        print(f"  check {name:<48} max|diff|={record['max_abs_diff']:.2e}  {status}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Checks and benchmark grid
# ----------------------------------------------------------------------------------------------------------------------


def run_checks(runner: Runner, dense_len: int, sparse_len: int, block_size: int) -> None:
    print(f"correctness (dense at S={dense_len}, sparse and ground truth at S={sparse_len})", flush=True)
    for head_dim in (128, 64):
        shape = Shape(dense_len, head_dim=head_dim)
        q, k, v = make_inputs(shape, seed=1)
        n_blocks = math.ceil(dense_len / block_size)
        dense_mask = torch.ones(1, shape.hkv, n_blocks, n_blocks, dtype=torch.bool, device=DEVICE)
        ours = block_sparse_attention_triton(q, k, v, dense_mask, block_size=block_size)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        runner.check(f"density 1.0 vs SDPA causal, D={head_dim}", ours, expected, atol=1e-2, rtol=2e-2)
        del q, k, v, ours, expected

    shape = Shape(sparse_len)
    q, k, v = make_inputs(shape, seed=2)
    n_blocks = math.ceil(sparse_len / block_size)
    padding = torch.ones(1, sparse_len, dtype=torch.bool, device=DEVICE)
    padding[:, : sparse_len // 5] = False  # left padding
    for mask_heads, heads in (("q", shape.hq), ("kv", shape.hkv)):
        mask, _ = random_causal_block_mask(1, heads, n_blocks, 0.3, seed=3)
        for key_padding_mask in (None, padding):
            kwargs = {"block_size": block_size, "key_padding_mask": key_padding_mask, "return_lse": True}
            out, lse = block_sparse_attention_triton(q, k, v, mask, **kwargs)
            ref_out, ref_lse = block_sparse_attention_reference(q, k, v, mask, **kwargs)
            label = f"sparse {mask_heads}-mask d=0.3{' left-pad' if key_padding_mask is not None else ''} vs reference"
            runner.check(label, out, ref_out, atol=1e-2, rtol=2e-2)
            finite = torch.isfinite(ref_lse)
            runner.check(label.replace("sparse", "lse"), lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-3)
    for group_max in (False, True):
        out, block_map = attention_with_block_ground_truth_triton(q, k, v, block_size=block_size, group_max=group_max)
        ref_out, ref_map = attention_with_block_ground_truth_reference(
            q, k, v, block_size=block_size, group_max=group_max
        )
        runner.check(f"ground truth out (group_max={group_max}) vs reference", out, ref_out, atol=1e-2, rtol=2e-2)
        runner.check(f"ground truth map (group_max={group_max}) vs reference", block_map, ref_map, atol=1e-3, rtol=1e-2)
    torch.cuda.empty_cache()


def build_sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Callable, dict]:
    fn, note = sdpa_dense(q, k, v, backend)
    return fn, ({"note": note} if note else {})


def build_ground_truth(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> tuple[Callable, dict]:
    return functools.partial(attention_with_block_ground_truth_triton, q, k, v, block_size=block_size), {}


def build_ground_truth_two_pass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int
) -> tuple[Callable, dict]:
    """The two-pass variant (no scratch records; two Q K^T passes), for comparison with the single-pass default."""
    fn = functools.partial(
        ground_truth_kernels._launch_ground_truth, q, k, v, block_size, None, None, None, False, single_pass=False
    )
    return fn, {}


def build_seer(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block_size: int, density_actual: float
) -> tuple[Callable, dict]:
    fn = functools.partial(block_sparse_attention_triton, q, k, v, mask, block_size=block_size)
    return fn, {"density_actual": density_actual}


def build_seer_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_size: int,
    density_actual: float,
    block_indices: tuple[torch.Tensor, torch.Tensor],
    config: KernelConfig,
) -> tuple[Callable, dict]:
    """The kernel alone: index lists precomputed, launch config explicit."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    fn = functools.partial(
        block_sparse_triton._launch_block_sparse_forward,
        q, k, v, mask, block_size, scale, None, None, config=config, block_indices=block_indices,
    )  # fmt: skip
    return fn, {"density_actual": density_actual, "config": str(config)}


def build_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block_size: int
) -> tuple[Callable, dict]:
    fn, flex_block, flex_density = flex_attention_call(q, k, v, mask, block_size)
    return fn, {"density_actual": flex_density, "flex_block": flex_block}


def bench_shape(
    runner: Runner,
    shape: Shape,
    densities: list[float],
    block_size: int,
    *,
    mask_kinds: tuple[str, ...],
    flex: bool,
    ground_truth: bool,
    sweep: bool,
) -> None:
    print(f"S={shape.seq_len} Hq={shape.hq} Hkv={shape.hkv} D={shape.head_dim}", flush=True)
    try:
        q, k, v = make_inputs(shape, seed=shape.seq_len)
    except torch.OutOfMemoryError as error:
        row = {"kernel": "inputs", "S": shape.seq_len, "head_dim": shape.head_dim, "hq": shape.hq, "hkv": shape.hkv}
        runner.skip({**row, "density": None, "mask_heads": "-"}, f"out of memory: {str(error).splitlines()[0]}")
        return
    n_blocks = math.ceil(shape.seq_len / block_size)
    dense = {"density": 1.0, "mask_heads": "dense", "block_size": block_size}
    runner.measure(
        "sdpa_cudnn_dense", shape, functools.partial(build_sdpa, SDPBackend.CUDNN_ATTENTION, q, k, v), **dense
    )
    runner.measure(
        "sdpa_flash_dense", shape, functools.partial(build_sdpa, SDPBackend.FLASH_ATTENTION, q, k, v), **dense
    )
    if ground_truth:
        runner.measure(
            "ground_truth_triton", shape, functools.partial(build_ground_truth, q, k, v, block_size), **dense
        )
        runner.measure(
            "ground_truth_triton_two_pass",
            shape,
            functools.partial(build_ground_truth_two_pass, q, k, v, block_size),
            **dense,
        )

    for density in densities:
        for mask_heads in mask_kinds:
            heads = shape.hq if mask_heads == "q" else shape.hkv
            try:
                mask, actual = random_causal_block_mask(shape.batch, heads, n_blocks, density, seed=int(density * 100))
                block_indices = block_mask_to_indices(
                    mask, block_size=block_size, q_len=shape.seq_len, kv_len=shape.seq_len, compact=False
                )
            except torch.OutOfMemoryError as error:
                print(f"  mask d={density} {mask_heads}: out of memory ({str(error).splitlines()[0]})", flush=True)
                continue
            common = {"density": density, "mask_heads": mask_heads, "block_size": block_size}
            runner.measure(
                "seer_triton", shape, functools.partial(build_seer, q, k, v, mask, block_size, actual), **common
            )
            config = choose_kernel_config(shape.head_dim, block_size, shape.hq // shape.hkv, heads != shape.hq, DTYPE)
            configs = [("seer_triton_kernel", config)]
            if sweep and density == densities[len(densities) // 2]:
                configs += [
                    ("seer_triton_kernel_sweep", c) for c in sweep_configs(shape, block_size, heads != shape.hq)
                ]
            for kernel, launch_config in configs:
                build = functools.partial(
                    build_seer_kernel, q, k, v, mask, block_size, actual, block_indices, launch_config
                )
                runner.measure(kernel, shape, build, **common)
            if flex:
                runner.measure(
                    "flex_attention", shape, functools.partial(build_flex, q, k, v, mask, block_size), **common
                )
            del mask, block_indices
            torch.cuda.empty_cache()


def sweep_configs(shape: Shape, block_size: int, per_kv_head: bool) -> list[KernelConfig]:
    """A few launch configurations around the heuristic, to tune it on new hardware."""
    group = shape.hq // shape.hkv
    candidates = []
    for block_m in (32, 64, 128):
        for heads in (1, 2, 4) if per_kv_head else (1,):
            for block_n in (32, 64, 128):
                for num_warps, num_stages in ((4, 2), (4, 3), (8, 3)):
                    rows = block_m * heads
                    if max(block_m, block_n) > block_size or group % heads or not 64 <= rows <= 256:
                        continue
                    if rows * shape.head_dim > 128 * 128 and num_warps == 4:
                        continue
                    candidates.append(KernelConfig(block_m, block_n, heads, num_warps, num_stages))
    return candidates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", nargs="+", default=["8k", "32k", "128k"], help="e.g. 8k 32k 128k or 8192")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--extras-at", default="32k", help="S for the head_dim-64 and Hq=Hkv rows ('none' to skip)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves its compile time)")
    parser.add_argument("--no-ground-truth", action="store_true")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--sweep-configs", action="store_true", help="also time launch configs around the heuristic")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8k, densities 0.1 and 1.0, few repetitions")
    parser.add_argument("--time-budget", type=float, default=450.0, help="seconds; later variants are skipped")
    parser.add_argument("--name", default="bench_kernels")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2

    if args.quick:
        args.seq_lens, args.densities, args.extras_at = ["8k"], [0.1, 1.0], "8k"
    seq_lens = sorted(parse_seq_len(text) for text in args.seq_lens)
    extras_at = None if args.extras_at == "none" else parse_seq_len(args.extras_at)
    runner = Runner(args.time_budget, args.quick)
    torch.manual_seed(0)

    if not args.no_checks:
        try:
            run_checks(
                runner,
                dense_len=min(8192, seq_lens[0]),
                sparse_len=1024 if args.quick else 2048,
                block_size=args.block_size,
            )
        except Exception as error:  # noqa: BLE001 - record it, still time what can be timed
            traceback.print_exc()
            runner.checks.append({"check": "checks crashed", "passed": False, "error": repr(error)})
            torch.cuda.empty_cache()
    for seq_len in seq_lens:
        bench_shape(runner, Shape(seq_len), args.densities, args.block_size, mask_kinds=("q", "kv"),
                    flex=not args.no_flex, ground_truth=not args.no_ground_truth, sweep=args.sweep_configs)  # fmt: skip
        if seq_len == extras_at:
            extra_densities = [d for d in args.densities if d in (0.1, 0.5, 1.0)] or args.densities
            bench_shape(runner, Shape(seq_len, head_dim=64), extra_densities, args.block_size, mask_kinds=("q", "kv"),
                        flex=not args.no_flex, ground_truth=False, sweep=False)  # fmt: skip
            bench_shape(runner, Shape(seq_len, hq=32, hkv=32), extra_densities, args.block_size, mask_kinds=("q",),
                        flex=not args.no_flex, ground_truth=False, sweep=False)  # fmt: skip

    now = datetime.datetime.now()
    meta = benchmark_meta(
        DEVICE,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        dtype=str(DTYPE),
        wall_s=round(runner.elapsed(), 1),
        checks=runner.checks,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}_{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "rows": runner.rows}, indent=2))
    failed = [check["check"] for check in runner.checks if not check["passed"]]
    print(f"\nwrote {path} ({runner.elapsed():.0f} s)" + (f"; FAILED checks: {failed}" if failed else ""))
    print("\n" + format_kernel_table(runner.rows, speedup_key="speedup_vs_cudnn", speedup_label="x cuDNN"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
