"""Self-distillation of the gates against the frozen model's own attention.

In distillation mode every gated layer computes, in one kernel call, the exact attention output (which the
frozen model continues with) and the ground-truth block map (DESIGN.md §1: per query row the largest
row-normalised probability of each key block, max-pooled over the block's query rows, renormalised per row).
The gate's logits for the same layer are computed with gradients; the loss is

    loss = loss_scale · Σ_layers mean_rows KL(ground truth ‖ softmax(gate logits))

over causal key blocks in fp32, leaving out the first ``skip_first_fraction`` of query-block rows (their rows
hold few blocks, so they teach little). Layers with a decode gate (``decode_gate=True``) add
``decode_loss_weight · mean_tokens KL(decode target ‖ softmax(decode-gate logits))`` (per token and KV head, over
strictly earlier key blocks; `seer_adapter.kernels.decode_ground_truth`), the same ``skip_first_fraction`` of tokens
left out. The base model runs under ``no_grad``: none of its activations are
kept, only the gates' small graphs (pooled tensors), so memory stays near inference memory.

Entry points: `distillation_loss` (one step's loss, for notebooks and custom loops) and `train_gates` (the
full loop: AdamW, cosine schedule with warm-up, gradient accumulation, tqdm, JSONL log, atomic checkpoints
and exact resume, data-parallel under ``torchrun`` / ``accelerate launch``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .attention import SeerAttentionMask, SeerLayerState, compute_decode_gate_logits, compute_gate_logits
from .kernels import backend_for, decode_block_ground_truth
from .kernels.decode_ground_truth import DECODE_TARGETS, decode_block_ground_truth_reference
from .kernels.ground_truth import attention_with_block_ground_truth
from .model import SeerModel

CHECKPOINT_PREFIX = "checkpoint-"
LATEST_FILE = "latest_checkpoint.txt"


# ------------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------------
def block_kl_loss(target: torch.Tensor, logits: torch.Tensor, skip_first_fraction: float = 0.25) -> torch.Tensor:
    """Mean over rows of ``KL(target ‖ softmax(logits))``.

    Args:
        target: fp ``[B, H, nQ, nK]`` ground-truth block map; rows sum to 1 (or are all zero: padding rows).
        logits: ``[B, H, nQ, nK]`` gate logits, ``-inf`` on blocks the gate may not choose.
        skip_first_fraction: leave out the first ``floor(nQ · fraction)`` query-block rows.

    Returns:
        fp32 scalar; 0 (with a graph) when no row qualifies.
    """
    # Finite stand-in for -inf keeps log_softmax and its gradient free of NaN on fully masked rows.
    logits = torch.where(torch.isfinite(logits), logits.float(), torch.full_like(logits, -1e4, dtype=torch.float32))
    log_q = torch.log_softmax(logits, dim=-1)
    target = target.float()
    positive = target > 0
    kl = torch.where(positive, target * (torch.log(target.clamp_min(1e-30)) - log_q), torch.zeros_like(log_q))
    row_kl = kl.sum(dim=-1)  # [B, H, nQ]
    rows = positive.any(dim=-1)
    skip = math.floor(target.shape[-2] * skip_first_fraction)
    if skip:
        rows[..., :skip] = False
    if not rows.any():
        return logits.sum() * 0.0
    return row_kl[rows].mean()


def decode_target_rows(length: int, skip_first_fraction: float, fraction: float, device: torch.device) -> torch.Tensor:
    """Token positions whose decode-gate target is computed: after the first ``floor(length · skip_first_fraction)``
    tokens, every ``round(1 / fraction)``-th token (all of them at ``fraction=1``), the last one always included.

    The decode loss is a mean over tokens, so an evenly strided subset estimates it without bias across positions
    while the PyTorch target (one fp32 ``Q·Kᵀ`` pass per layer) costs ``fraction`` of the full one.
    """
    start = math.floor(length * skip_first_fraction)
    stride = max(1, round(1.0 / fraction))
    return torch.arange(length - 1, start - 1, -stride, device=device).flip(0)


def temper_target(target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``target ** (1 / temperature)`` renormalised per row (rows that are all zero stay zero); 1.0 returns it as is.

    A temperature above 1 flattens the decode target, so the KL weighs the ranking of the blocks near a top-k cut
    more against the few largest ones (the KL to a peaked target barely sees the order of the blocks it gives a
    little probability, which is where a token budget cuts)."""
    if temperature == 1.0:
        return target
    tempered = target.float().clamp_min(0.0) ** (1.0 / temperature)
    total = tempered.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, tempered / total.clamp_min(1e-30), tempered)


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"decode_target_temperature must be a positive number, got {temperature!r}")


# Per layer, the decode target keeps an fp32 record [B, H, rows, nK] (H: the KV heads for the default grouped Triton
# kernel, the query heads otherwise): the default fraction keeps it near 1 GiB (an 8B model, 16-token blocks, grouped
# record: every token at 16k, 2/3 of them at 32k, one in 6 at 64k).
_DEFAULT_DECODE_RECORD_ELEMENTS = 1 << 28


def default_decode_token_fraction(
    device: torch.device, batch: int = 1, q_heads: int = 1, length: int = 0, block_size: int = 64,
    skip_first_fraction: float = 0.25, kv_heads: int | None = None,
) -> float:  # fmt: skip
    """The decode-token fraction used when none is given, for a layer's ``[batch, q_heads, length, ·]`` queries.

    1.0 where the decode target runs as the Triton kernel (a Qwen2.5-0.5B-shaped step at 16k costs the same with
    every token as with a quarter: 0.23 s on an H200), 0.25 on the PyTorch reference, whose fp32 scores made the
    target most of a step (benchmarks/README.md); lower where the target's record would pass about 1 GiB per layer.
    The record has one row block per KV head (``kv_heads``, default ``q_heads``) when the device's target backend
    reduces the group in the kernel (``record_heads == "kv"``), one per query head otherwise.
    """
    target_fn = backend_for("decode_ground_truth", device)
    fraction = 0.25 if target_fn is decode_block_ground_truth_reference else 1.0
    rows = length - math.floor(length * skip_first_fraction)
    heads = kv_heads if kv_heads is not None and getattr(target_fn, "record_heads", "q") == "kv" else q_heads
    elements = batch * heads * rows * math.ceil(length / block_size)
    if elements > _DEFAULT_DECODE_RECORD_ELEMENTS:
        fraction = min(fraction, _DEFAULT_DECODE_RECORD_ELEMENTS / elements)
    return fraction


class GateDistillationHook:
    """The `DistillationHook` installed during a distillation forward: ground truth + gate loss per layer."""

    def __init__(
        self,
        skip_first_fraction: float = 0.25,
        decode_loss_weight: float = 1.0,
        decode_token_fraction: float | None = None,
        decode_target: str = "max",
        decode_target_temperature: float = 1.0,
    ):
        if decode_token_fraction is not None and not 0.0 < decode_token_fraction <= 1.0:
            raise ValueError(f"decode_token_fraction must be in (0, 1], got {decode_token_fraction}")
        if decode_target not in DECODE_TARGETS:
            raise ValueError(f"decode_target must be one of {DECODE_TARGETS}, got {decode_target!r}")
        _check_temperature(decode_target_temperature)
        self.skip_first_fraction = skip_first_fraction
        self.decode_loss_weight = decode_loss_weight
        self.decode_token_fraction = decode_token_fraction
        self.decode_target = decode_target
        self.decode_target_temperature = decode_target_temperature
        # layer -> prefill-gate loss (+ decode_loss_weight x decode-gate loss when the layer has a decode gate)
        self.losses: dict[int, torch.Tensor] = {}
        # layer -> decode-gate loss alone (detached), for logging
        self.decode_losses: dict[int, torch.Tensor] = {}

    def __call__(
        self,
        module: torch.nn.Module,
        layer: SeerLayerState,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: SeerAttentionMask,
        scaling: float | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        config = layer.runtime.config
        padding = mask.key_padding_mask
        with torch.no_grad():
            out, target = attention_with_block_ground_truth(
                query,
                key,
                value,
                block_size=config.block_size,
                scale=scaling,
                key_padding_mask=padding,
                softcap=kwargs.get("softcap"),
            )  # out [B, Hq, S, D], target [B, Hq, nQ, nK]
        with torch.enable_grad():
            logits = compute_gate_logits(layer, module, query.detach(), key.detach(), padding)
            loss = block_kl_loss(target, logits, self.skip_first_fraction)
        decode_gate = module.seer_gate[layer.runtime.active_adapter].decode
        if decode_gate is not None and self.decode_loss_weight > 0:
            batch, q_heads, length, _ = query.shape
            fraction = self.decode_token_fraction or default_decode_token_fraction(
                query.device, batch, q_heads, length, decode_gate.block_size, self.skip_first_fraction, key.shape[1]
            )
            rows = decode_target_rows(query.shape[2], self.skip_first_fraction, fraction, query.device)
            with torch.no_grad():
                decode_target = decode_block_ground_truth(
                    query,
                    key,
                    block_size=decode_gate.block_size,
                    scale=scaling,
                    key_padding_mask=padding,
                    softcap=kwargs.get("softcap"),
                    query_rows=rows,
                    target=self.decode_target,
                )  # [B, Hkv, R, nK]
                decode_target = temper_target(decode_target, self.decode_target_temperature)
            with torch.enable_grad():
                decode_logits = compute_decode_gate_logits(
                    layer, module, query.detach(), key.detach(), padding, query_rows=rows
                )
                decode_loss = block_kl_loss(decode_target, decode_logits, skip_first_fraction=0.0)
                loss = loss + self.decode_loss_weight * decode_loss
            self.decode_losses[layer.layer_idx] = decode_loss.detach()
        self.losses[layer.layer_idx] = loss
        return out


def distillation_loss(
    model: SeerModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    skip_first_fraction: float = 0.25,
    loss_scale: float = 10.0,
    decode_loss_weight: float = 1.0,
    decode_token_fraction: float | None = None,
    decode_target: str = "max",
    decode_target_temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[int, float]]:
    """One distillation forward of the frozen model.

    Args:
        model: a `SeerModel`; its active adapter's gates are trained.
        input_ids: ``[B, S]``; attention_mask: optional ``[B, S]`` padding mask.
        skip_first_fraction: see `block_kl_loss`.
        loss_scale: multiplies the summed layer losses (the released recipe uses 10).
        decode_loss_weight: weight of the decode-gate loss in each layer's loss (layers with a decode gate only;
            0 trains the prefill gates alone).
        decode_token_fraction: fraction of the (not skipped) tokens whose decode-gate target and loss are computed,
            evenly strided (`decode_target_rows`; 1.0: every token); default `default_decode_token_fraction`.
        decode_target: what the decode gate imitates: ``"max"`` (the largest probability per key block, max over the
            GQA group: SeerAttention-R's target, the default) or ``"mass"`` (the group's probability mass per block).
        decode_target_temperature: the target raised to ``1 / temperature`` and renormalised (`temper_target`; 1.0:
            as is).

    Returns:
        ``(loss, per_layer)``: the scalar loss with gradients into the gates only, and ``{layer: loss}`` floats.
    """
    hook = GateDistillationHook(
        skip_first_fraction, decode_loss_weight, decode_token_fraction, decode_target, decode_target_temperature
    )
    total, per_layer, _ = _run_distillation_forward(model, input_ids, attention_mask, hook, loss_scale)
    return total, per_layer


def _run_distillation_forward(
    model: SeerModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    hook: GateDistillationHook,
    loss_scale: float,
) -> tuple[torch.Tensor, dict[int, float], dict[int, float]]:
    """The forward of `distillation_loss` with ``hook``; also returns the decode-gate KL per layer (floats)."""
    runtime = model.runtime
    if runtime.distillation is not None:
        raise RuntimeError("a distillation forward is already running on this model")
    runtime.distillation = hook
    try:
        with torch.no_grad():
            # The backbone alone: the LM head's logits are not needed to distil attention.
            model.base_model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        runtime.distillation = None
    if not hook.losses:
        raise RuntimeError("no gated layer ran during the distillation forward; does the model carry gates?")
    losses = list(hook.losses.values())
    # Layers spread over GPUs (device_map) leave their losses on their own devices.
    total = torch.stack([loss.to(losses[0].device) for loss in losses]).sum() * loss_scale
    per_layer = {idx: loss.item() for idx, loss in sorted(hook.losses.items())}
    return total, per_layer, {idx: loss.item() for idx, loss in sorted(hook.decode_losses.items())}


# ------------------------------------------------------------------------------------------------------
# training loop
# ------------------------------------------------------------------------------------------------------
@dataclass
class DistillationArguments:
    """Settings of `train_gates` (defaults follow the released recipe where it has one)."""

    output_dir: str = field(metadata={"help": "Where checkpoints, the JSONL log and the final adapter go."})
    max_steps: int = field(default=500, metadata={"help": "Optimizer steps."})
    seq_len: int = field(default=4096, metadata={"help": "Tokens per training sequence."})
    batch_size: int = field(default=1, metadata={"help": "Sequences per forward (per process)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Forwards per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps before the cosine decay."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (None: off)."})
    loss_scale: float = field(default=10.0, metadata={"help": "Multiplier of the summed layer losses."})
    skip_first_fraction: float = field(default=0.25, metadata={"help": "Leading query-block rows left out."})
    decode_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the decode-gate loss in layers that have a decode gate (0: prefill gates only)."},
    )
    decode_token_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the tokens whose decode-gate target is computed (evenly strided, the skipped first "
            "tokens excluded). Default: every token where the target runs as the Triton kernel (CUDA), 0.25 on the "
            "PyTorch reference (CPU), which materialises fp32 scores; less where the target would pass 1 GiB per "
            "layer (default_decode_token_fraction)."
        },
    )
    decode_target: str = field(
        default="max",
        metadata={
            "help": "What the decode gate imitates: 'max' (largest probability per key block, max over the GQA group; "
            "SeerAttention-R's target) or 'mass' (the group's probability mass per block)."
        },
    )
    decode_target_temperature: float = field(
        default=1.0,
        metadata={
            "help": "The decode target raised to 1/temperature and renormalised per token: above 1 flattens it, so "
            "the gate learns the order of the blocks near a top-k cut, not only the largest ones. CPU, SmolLM2, 80 "
            "steps at 1k, two seeds: 2.0 took budget 256 after 960 tokens from +8.44 / +7.12 % to +7.12 / +5.55 % "
            "perplexity (not yet measured on a GPU run; 1.0 is SeerAttention-R's target)."
        },
    )
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every this many steps (and at the end)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    seed: int = field(default=0, metadata={"help": "Seed of the data shuffle and of torch."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "seq_len", "batch_size", "gradient_accumulation_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.skip_first_fraction < 1:
            raise ValueError(f"skip_first_fraction must be in [0, 1), got {self.skip_first_fraction}")
        if self.decode_token_fraction is not None and not 0 < self.decode_token_fraction <= 1:
            raise ValueError(f"decode_token_fraction must be in (0, 1], got {self.decode_token_fraction}")
        if self.decode_target not in DECODE_TARGETS:
            raise ValueError(f"decode_target must be one of {DECODE_TARGETS}, got {self.decode_target!r}")
        _check_temperature(self.decode_target_temperature)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gate_parameters(model: SeerModel) -> dict[str, torch.nn.Parameter]:
    marker = f".seer_gate.{model.active_adapter}."
    return {name: p for name, p in model.base_model.named_parameters() if marker in name}


def save_checkpoint(
    model: SeerModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    sequences_seen: int,
    args: DistillationArguments,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (a temporary folder renamed into place) and prune old ones.

    A checkpoint holds the training state (gates, optimizer, scheduler, RNG, data position) and is also a loadable
    adapter (``SeerModel.from_pretrained(base, "out/checkpoint-100")``), as PEFT checkpoints of transformers'
    Trainer are.
    """
    output = Path(args.output_dir)
    final = output / f"{CHECKPOINT_PREFIX}{step}"
    partial = output / f".{CHECKPOINT_PREFIX}{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gates = {name: p.detach().cpu().contiguous() for name, p in _gate_parameters(model).items()}
    save_file(gates, partial / "gates.safetensors")
    model.save_pretrained(partial)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        partial / "trainer_state.pt",
    )
    (partial / "progress.json").write_text(
        json.dumps({"step": step, "sequences_seen": sequences_seen, "args": asdict(args)}, indent=2)
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    latest_tmp = output / (LATEST_FILE + ".partial")
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, output / LATEST_FILE)
    checkpoints = sorted(
        (p for p in output.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1])
    )
    for old in checkpoints[: -args.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` or ``None``."""
    pointer = Path(output_dir) / LATEST_FILE
    if not pointer.exists():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _load_checkpoint(path: Path, model: SeerModel, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, int]:
    gates = load_file(path / "gates.safetensors")
    params = _gate_parameters(model)
    if set(gates) != set(params):
        raise ValueError(f"checkpoint {path} holds gates for other layers/adapters than this model's.")
    with torch.no_grad():
        for name, tensor in gates.items():
            params[name].copy_(tensor)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    progress = json.loads((path / "progress.json").read_text())
    return progress["step"], progress["sequences_seen"]


def _truncate_log(log: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (run after the checkpoint a resumed run starts from), so that the
    resumed run's records follow without repeating steps."""
    if not log.exists():
        return
    kept = [line for line in log.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    temporary = log.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    temporary.replace(log)


def _skip(iterator: Iterator[torch.Tensor], count: int) -> None:
    for _ in range(count):
        next(iterator)


def train_gates(
    model: SeerModel,
    sequences: Iterable[torch.Tensor],
    args: DistillationArguments,
    *,
    resume_from_checkpoint: bool | str | os.PathLike = False,
) -> list[dict[str, Any]]:
    """Distil the active adapter's gates on ``sequences`` (``LongTensor [seq_len]`` each, e.g. `packed_sequences`).

    Under ``torchrun`` / ``accelerate launch`` (an initialised process group) every process takes every
    ``world_size``-th sequence and gradients are averaged across processes; rank 0 writes files.

    Args:
        model: the wrapped model (base frozen); its active adapter's gates are trained in place.
        sequences: a deterministic stream of training sequences (the same order on every run, so that a
            resumed run skips exactly the sequences already seen).
        args: `DistillationArguments`.
        resume_from_checkpoint: ``True`` for the newest checkpoint in ``output_dir``, or a checkpoint path.

    Returns:
        The log records of the steps run (also appended to ``output_dir/log.jsonl``). The final adapter is saved
        to ``output_dir`` in the PEFT file layout.
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    rank, world = _world()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    params = _gate_parameters(model)
    if not params:
        raise RuntimeError(f"adapter {model.active_adapter!r} has no gates to train")
    for p in params.values():
        p.requires_grad_(True)
    model.peft_config[model.active_adapter].inference_mode = False
    optimizer = torch.optim.AdamW(params.values(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    step, seen = 0, 0
    if resume_from_checkpoint:
        path = latest_checkpoint(output) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {output}")
        step, seen = _load_checkpoint(path, model, optimizer, scheduler)
        if rank == 0:
            _truncate_log(output / "log.jsonl", step)
    iterator = iter(sequences)
    _skip(iterator, seen)
    device = next(iter(params.values())).device
    per_step = args.batch_size * args.gradient_accumulation_steps * world

    records: list[dict[str, Any]] = []
    bar = tqdm(total=args.max_steps, initial=step, disable=not args.progress or rank != 0, desc="distill", unit="step")
    log_file = open(output / "log.jsonl", "a", encoding="utf-8") if rank == 0 else None
    try:
        while step < args.max_steps:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss, layer_losses, decode_loss = 0.0, {}, None
            for _ in range(args.gradient_accumulation_steps):
                batch = []
                for _ in range(args.batch_size * world):
                    try:
                        batch.append(next(iterator))
                    except StopIteration:
                        raise RuntimeError(
                            f"the data ran out after {seen + len(batch)} sequences at step {step}; "
                            "give more data or fewer max_steps."
                        ) from None
                seen += len(batch)
                local = torch.stack(batch[rank::world]).to(device)  # [batch_size, seq_len]
                hook = GateDistillationHook(
                    args.skip_first_fraction,
                    args.decode_loss_weight,
                    args.decode_token_fraction,
                    args.decode_target,
                    args.decode_target_temperature,
                )
                loss, per_layer, decode_per_layer = _run_distillation_forward(model, local, None, hook, args.loss_scale)
                (loss / args.gradient_accumulation_steps).backward()
                step_loss += loss.item() / args.gradient_accumulation_steps
                for idx, value in per_layer.items():
                    layer_losses[idx] = layer_losses.get(idx, 0.0) + value / args.gradient_accumulation_steps
                if decode_per_layer:
                    mean_decode = sum(decode_per_layer.values()) / len(decode_per_layer)
                    decode_loss = (decode_loss or 0.0) + mean_decode / args.gradient_accumulation_steps
            if world > 1:
                for p in params.values():
                    if p.grad is not None:  # decode gates get none with decode_loss_weight=0 (same on every rank)
                        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
                reduced = torch.tensor(step_loss, device=device)
                dist.all_reduce(reduced, op=dist.ReduceOp.AVG)
                step_loss = reduced.item()
            grad_norm = None
            if args.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), args.max_grad_norm).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - started
            record = {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": per_step * args.seq_len / elapsed,
                "seconds": elapsed,
                "layer_loss": layer_losses,
                # mean decode-gate KL over the layers with a decode gate (this process's batch; None without one)
                "decode_loss": decode_loss,
            }
            records.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if rank == 0 and (step % args.save_steps == 0 or step == args.max_steps):
                save_checkpoint(model, optimizer, scheduler, step, seen, args)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if rank == 0:
        model.save_pretrained(output)
    return records
