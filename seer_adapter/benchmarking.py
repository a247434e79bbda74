"""Timing the block-sparse attention kernel against dense SDPA: shared by ``seer-adapter bench`` and the scripts
under ``benchmarks/``.

A benchmark run produces a results file ``{"meta": {...}, "rows": [...]}``; `seer_adapter.plots.plot_kernel_speed`
reads it. One row per timed variant::

    {"kernel", "S", "head_dim", "hq", "hkv", "batch", "block_size", "density", "mask_heads", "density_actual",
     "ms", "tflops_eff", "speedup_vs_<baseline>", "status": "ok"}

(``status: "skipped"`` with a ``reason`` and ``ms: None`` for a variant that could not run.) ``density`` is the
requested fraction of the causal block triangle, ``density_actual`` the fraction the random mask kept, and
``tflops_eff`` counts only the kept blocks: ``4 * B * Hq * S^2 * D * 0.5 * density_actual / time``.

`run_kernel_benchmark` is what the CLI runs: the package's one dispatch point
`seer_adapter.kernels.block_sparse_attention` (Triton on CUDA, the PyTorch reference elsewhere) at a few
densities against ``torch.nn.functional.scaled_dot_product_attention`` (causal, dense) on the same inputs.
"""

from __future__ import annotations

import datetime
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    """An attention call's shape: ``q [batch, hq, seq_len, head_dim]``, ``k, v [batch, hkv, seq_len, head_dim]``."""

    seq_len: int
    hq: int = 32
    hkv: int = 8
    head_dim: int = 128
    batch: int = 1

    def flops(self, density: float) -> float:
        """Causal attention FLOPs of the kept blocks: ``4 * B * Hq * S^2 * D * 0.5 * density``."""
        return 4.0 * self.batch * self.hq * self.seq_len**2 * self.head_dim * 0.5 * density


def parse_seq_len(text: str) -> int:
    """``"8k"`` → 8192, ``"1.5k"`` → 1536, ``"1000"`` → 1000."""
    cleaned = text.strip().lower()
    try:
        value = float(cleaned[:-1]) * 1024 if cleaned.endswith("k") else float(cleaned)
    except ValueError:
        raise ValueError(f"not a sequence length: {text!r} (examples: 512, 8k, 32k)") from None
    if value < 1 or value != int(value):
        raise ValueError(f"not a sequence length: {text!r} (a positive whole number of tokens, e.g. 512 or 8k)")
    return int(value)


def format_seq_len(seq_len: int) -> str:
    """8192 → ``"8k"``; lengths that are not whole multiples of 1024 stay as they are (1000 → ``"1000"``)."""
    return f"{seq_len // 1024}k" if seq_len >= 1024 and seq_len % 1024 == 0 else str(seq_len)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


def make_inputs(
    shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q ``[B, Hq, S, D]`` as transformers passes it (a transpose of ``[B, S, Hq, D]``), k, v
    ``[B, Hkv, S, D]`` (never zeros: timing zeros flatters some kernels)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(shape.batch, shape.seq_len, shape.hq, shape.head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(shape.batch, shape.hkv, shape.seq_len, shape.head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(shape.batch, shape.hkv, shape.seq_len, shape.head_dim, generator=gen, device=device, dtype=dtype)
    return q.transpose(1, 2), k, v


def random_causal_block_mask(
    batch: int, heads: int, n_blocks: int, density: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """bool ``[B, H, n, n]`` block-causal mask keeping about ``density`` of the causal triangle (sink block and
    diagonal always kept, as the gates do), and the density actually kept."""
    rows = torch.arange(n_blocks, device=device)
    causal = rows[None, :] <= rows[:, None]  # [n, n]
    forced = (rows[None, :] == 0) | (rows[None, :] == rows[:, None])
    forced_fraction = forced.sum().item() / causal.sum().item()
    if density >= 1.0:
        keep_probability = 1.0
    elif forced_fraction >= 1.0:
        keep_probability = 0.0
    else:
        keep_probability = max(0.0, (density - forced_fraction) / (1.0 - forced_fraction))
    gen = torch.Generator(device=device).manual_seed(seed)
    mask = torch.empty(batch, heads, n_blocks, n_blocks, dtype=torch.bool, device=device)
    for head in range(heads):  # one head at a time: no [B, H, n, n] fp32 temporary
        draw = torch.rand(batch, n_blocks, n_blocks, generator=gen, device=device) < keep_probability
        mask[:, head] = (draw & causal) | forced
    actual = mask.sum().item() / (causal.sum().item() * batch * heads)
    return mask, actual


def sdpa_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any = None
) -> tuple[Callable[[], torch.Tensor], str]:
    """A callable running dense causal SDPA (on one ``torch.nn.attention.SDPBackend`` when given, else PyTorch's
    choice), GQA natively when the backend accepts it, else on K/V expanded beforehand (the copy is not timed).
    Returns the callable and a note ("" or why K/V were expanded)."""
    from contextlib import nullcontext

    def context() -> Any:
        if backend is None:
            return nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(backend)

    def native() -> torch.Tensor:
        with context():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        native()
        return native, ""
    except (RuntimeError, TypeError):  # TypeError: a torch without enable_gqa
        group = q.shape[1] // k.shape[1]
        k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

        def expanded() -> torch.Tensor:
            with context():
                return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

        expanded()
        return expanded, "enable_gqa refused: K/V expanded before timing (copy not timed)"


# ----------------------------------------------------------------------------------------------------------------------
# Timing, checks, metadata
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    few: bool = False,
    min_warmup_ms: float = 25.0,
    min_rep_ms: float = 100.0,
) -> float:
    """Median milliseconds per call of ``fn`` on ``device``.

    One untimed call, then one timed call sizes the run: warm-up for ``max(min_warmup_ms, 2 x estimate)`` and
    timing for ``max(min_rep_ms, 10 x estimate)`` (``few=True``: one and three estimates, for long calls). On CUDA
    the timing is ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) when triton is importable,
    else CUDA events; elsewhere wall-clock time per call (``time.perf_counter``), at least three calls.
    """
    fn()
    synchronize(device)
    estimate = max(_one_call_ms(fn, device), 1e-3)
    if few:
        warmup, rep = estimate, 3 * estimate
    else:
        warmup, rep = max(min_warmup_ms, 2 * estimate), max(min_rep_ms, 10 * estimate)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(int(warmup // estimate)):
        fn()
    synchronize(device)
    times = [_one_call_ms(fn, device) for _ in range(max(3, int(rep // estimate)))]
    return float(statistics.median(times))


def compare_outputs(
    name: str, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float
) -> dict[str, Any]:
    """A check record ``{"check", "max_abs_diff", "passed"}``: ``|actual - expected| <= atol + rtol * |expected|``
    everywhere and no NaN."""
    diff = (actual.float() - expected.float()).abs()
    bound = atol + rtol * expected.float().abs()
    passed = bool(torch.all(diff <= bound)) and not bool(actual.isnan().any())
    return {"check": name, "max_abs_diff": diff.max().item(), "passed": passed}


def benchmark_meta(device: torch.device, **fields: Any) -> dict[str, Any]:
    """The ``meta`` object of a kernel results file: ``fields``, the device (``gpu`` too on CUDA), torch /
    transformers / triton / CUDA versions, and the date and time of the run."""
    from .evaluation import environment_meta

    meta = environment_meta(device, **fields)
    meta["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    if device.type == "cuda":
        meta["gpu"] = meta["device"]
        meta["cuda"] = torch.version.cuda
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return meta


def format_kernel_table(
    rows: Sequence[dict[str, Any]], speedup_key: str = "speedup_vs_dense", speedup_label: str = "x dense"
) -> str:
    """A text table of benchmark rows (skipped rows with their reason)."""
    header = (
        f"{'kernel':<25} {'S':>7} {'D':>4} {'Hq/Hkv':>7} {'mask':>5} {'density':>7} {'ms':>10} {'TFLOP/s':>8} "
        f"{speedup_label:>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        density = row.get("density_actual", row.get("density"))
        density_text = f"{density:.2f}" if isinstance(density, float) else "-"
        heads = f"{row['hq']}/{row['hkv']}"
        lead = f"{row['kernel']:<25} {row['S']:>7} {row['head_dim']:>4} {heads:>7} {row['mask_heads']:>5}"
        lead += f" {density_text:>7}"
        if row.get("status") != "ok":
            lines.append(f"{lead}  skipped: {row.get('reason', '')[:60]}")
            continue
        speedup = f"{row[speedup_key]:.2f}" if row.get(speedup_key) else "-"
        tflops = f"{row['tflops_eff']:.1f}" if row["tflops_eff"] >= 1 else f"{row['tflops_eff']:.3f}"
        lines.append(f"{lead} {row['ms']:>10.3f} {tflops:>8} {speedup:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The CLI's benchmark
# ----------------------------------------------------------------------------------------------------------------------


def default_settings(device: torch.device) -> dict[str, Any]:
    """Defaults of ``seer-adapter bench`` per device: the H200 benchmark's shape on CUDA (bf16), a small one
    elsewhere (fp32; the reference path is for testing, and materialises a masked dense attention)."""
    if device.type == "cuda":
        return {"seq_lens": [8192, 32768], "hq": 32, "hkv": 8, "head_dim": 128, "dtype": torch.bfloat16}
    return {"seq_lens": [1024, 2048], "hq": 8, "hkv": 2, "head_dim": 64, "dtype": torch.float32}


def run_kernel_benchmark(
    seq_lens: Sequence[int],
    densities: Sequence[float],
    *,
    hq: int,
    hkv: int,
    head_dim: int,
    batch: int = 1,
    block_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    mask_heads: str = "q",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Time `seer_adapter.kernels.block_sparse_attention` against dense causal SDPA.

    For every sequence length: dense SDPA once (``kernel="sdpa_dense"``), then the block-sparse kernel through the
    package's dispatch point (``kernel="seer_<backend>"``, the backend `select_backend` picks for ``device`` unless
    ``backend`` forces one) on a random block-causal mask per density (one mask per query head, ``mask_heads="q"``,
    or per KV head, ``"kv"``). Before timing, the kernel with every block kept is checked against SDPA.

    Returns:
        ``{"meta": ..., "rows": ...}`` (see the module docstring); ``meta["checks"]`` holds the correctness checks
        and ``meta["backend"]`` the kernel backend.
    """
    from tqdm.auto import tqdm

    from .kernels import block_sparse_attention, select_backend

    device = torch.device(device)
    if mask_heads not in ("q", "kv"):
        raise ValueError(f"mask_heads must be 'q' or 'kv', got {mask_heads!r}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    for density in densities:
        if not 0 < density <= 1:
            raise ValueError(f"densities must be in (0, 1], got {density}")
    backend_name = select_backend(device, backend)
    kernel = f"seer_{backend_name}"
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    bar = tqdm(total=len(seq_lens) * (1 + len(densities)), desc="bench", unit="variant", disable=not progress)
    for seq_len in seq_lens:
        shape = Shape(seq_len, hq=hq, hkv=hkv, head_dim=head_dim, batch=batch)
        q, k, v = make_inputs(shape, device, dtype, seed=seed + seq_len)
        n_blocks = math.ceil(seq_len / block_size)
        common = {"S": seq_len, "head_dim": head_dim, "hq": hq, "hkv": hkv, "batch": batch, "block_size": block_size}

        bar.set_postfix_str(f"S={format_seq_len(seq_len)} sdpa_dense")
        dense_fn, note = sdpa_dense(q, k, v)
        dense_ms = time_ms(dense_fn, device)
        dense_row = {"kernel": "sdpa_dense", **common, "density": 1.0, "mask_heads": "dense", "density_actual": 1.0}
        dense_row.update(ms=dense_ms, tflops_eff=shape.flops(1.0) / (dense_ms * 1e-3) / 1e12, speedup_vs_dense=1.0)
        rows.append({**dense_row, **({"note": note} if note else {}), "status": "ok"})
        bar.update()

        heads = hq if mask_heads == "q" else hkv
        every_block = torch.ones(batch, heads, n_blocks, n_blocks, dtype=torch.bool, device=device)
        ours = block_sparse_attention(q, k, v, every_block, block_size=block_size, backend=backend)
        checks.append(compare_outputs(f"S={seq_len}: every block kept vs SDPA causal", ours, dense_fn(), **tolerance))
        del every_block, ours

        for density in densities:
            bar.set_postfix_str(f"S={format_seq_len(seq_len)} {kernel} d={density}")
            mask, actual = random_causal_block_mask(batch, heads, n_blocks, density, int(density * 100), device)

            sparse = functools.partial(block_sparse_attention, q, k, v, mask, block_size=block_size, backend=backend)
            ms = time_ms(sparse, device, few=seq_len >= 65536)
            rows.append(
                {
                    "kernel": kernel,
                    **common,
                    "density": density,
                    "mask_heads": mask_heads,
                    "density_actual": actual,
                    "ms": ms,
                    "tflops_eff": shape.flops(actual) / (ms * 1e-3) / 1e12,
                    "speedup_vs_dense": dense_ms / ms,
                    "status": "ok",
                }
            )
            bar.update()
        del q, k, v
    bar.close()
    meta = benchmark_meta(
        device,
        backend=backend_name,
        dtype=str(dtype),
        wall_s=round(time.monotonic() - start, 1),
        checks=checks,
    )
    return {"meta": meta, "rows": rows}
