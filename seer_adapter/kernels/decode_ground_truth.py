"""Ground truth of the decode gate (SeerAttention-R) for distillation, pure PyTorch (the reference and CPU path).

For every query token ``t`` of a prefill and every KV head (GQA group):

1. the frozen model's attention probabilities of each query head of the group over all causally visible keys
   (row-normalised softmax, padding keys excluded);
2. per key block, the largest probability inside the block;
3. the maximum over the group's query heads (the decode gate makes one selection per KV head);
4. only the blocks **strictly earlier** than the block holding ``t`` (those the decode gate chooses among; the
   current block is always attended), renormalised to sum to 1.

Rows without any earlier block with a real token (tokens of the first block, padding tokens) are all zero and are
left out of the loss by `seer_adapter.distill.block_kl_loss`.

``target="mass"`` replaces steps 2-3 by the attention mass: the sum of the probabilities inside each block, summed
over the group's query heads — the quantity a top-k selection under a budget should keep most of. (SmolLM2 on the
CPU, a quarter of a 2k context: selecting by the max target from the true attention costs +10.4 % perplexity, by
the mass +5.5 %; gates trained on either at 1k, +23.1 vs +19.0 %; benchmarks/README.md.)
"""

from __future__ import annotations

import math

import torch

# Upper bound on fp32 score elements materialised at once (as in reference.py): 2**27 * 4 B = 512 MiB per chunk.
_MAX_SCORE_ELEMENTS = 1 << 27
DECODE_TARGETS = ("max", "mass")


def decode_block_ground_truth_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    query_rows: torch.Tensor | None = None,
    target: str = "max",
) -> torch.Tensor:
    """Per-token decode-gate target, computed in fp32 one chunk of query rows at a time.

    Args:
        q: post-RoPE queries ``[B, Hq, S, D]``; k: post-RoPE keys ``[B, Hkv, S, D]`` (a prefill without past).
        block_size: tokens per key block. scale: softmax scale (default ``1/sqrt(D)``).
        key_padding_mask: optional bool ``[B, S]``, True for real tokens. softcap: optional logit soft-capping.
        query_rows: optional long ``[R]`` token positions to compute the target for (default: all ``S``); the keys
            are always the whole sequence.
        target: ``"max"`` (largest probability per block, max over the group's heads: SeerAttention-R's target) or
            ``"mass"`` (probability mass per block, summed over the group's heads).

    Returns:
        fp32 ``[B, Hkv, R, nK]`` (``R = S`` by default) with ``nK = ceil(S / block_size)``: the row of token ``t``
        sums to 1 over blocks ``< t // block_size`` (or is all zero).
    """
    query_rows = check_decode_target_inputs(q, k, key_padding_mask, query_rows, target)
    batch, hq, length, head_dim = q.shape
    hkv = k.shape[1]
    n_rows = query_rows.numel()
    group = hq // hkv
    n_blocks = math.ceil(length / block_size)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    kf = k.float()
    # The last key block is never strictly earlier than any token, so only the n_blocks - 1 full blocks before it
    # are scored, and max_k p_k = exp(max_k s_k - lse) per block: one block-max pass over the scores instead of
    # materialising the probabilities (softmax, NaN cleanup and padding each cost a pass of their own).
    n_earlier = n_blocks - 1
    per_block = torch.zeros(batch, hkv, n_rows, n_earlier, dtype=torch.float32, device=q.device)
    key_positions = torch.arange(length, device=q.device)
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * hq * length))
    for start in range(0, n_rows if n_earlier else 0, chunk):
        stop = min(n_rows, start + chunk)
        positions = query_rows[start:stop]  # [s] token positions of this chunk
        qc = q[:, :, positions].float().view(batch, hkv, group, stop - start, head_dim)
        scores = torch.einsum("bhgsd,bhkd->bhgsk", qc, kf).mul_(scale)  # [B, Hkv, g, s, S]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = (key_positions[None, :] <= positions[:, None])[None]  # [1, s, S] causal rows of this chunk only
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, :]
        scores.masked_fill_(~visible[:, None, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, Hkv, g, s, 1]
        earlier_scores = scores[..., : n_earlier * block_size].unflatten(-1, (n_earlier, block_size))
        if target == "max":
            block_max = earlier_scores.amax(dim=-1)  # [B, Hkv, g, s, nK - 1]
            block_prob = torch.exp(block_max - lse).nan_to_num(0.0)  # rows without a visible key: 0
            chunk_blocks = block_prob.amax(dim=2)  # [B, Hkv, s, nK - 1]
        else:
            probs = torch.exp(earlier_scores - lse[..., None]).nan_to_num(0.0)  # [B, Hkv, g, s, nK - 1, bs]
            chunk_blocks = probs.sum(dim=(-1, 2))  # the group's mass per block [B, Hkv, s, nK - 1]
        earlier = torch.arange(n_earlier, device=q.device)[None, :] < (positions // block_size)[:, None]
        per_block[:, :, start:stop] = chunk_blocks * earlier  # [B, Hkv, s, nK - 1]
    return normalise_decode_target(per_block, query_rows, key_padding_mask)


def check_decode_target_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    query_rows: torch.Tensor | None,
    target: str,
) -> torch.Tensor:
    """Shape checks shared by the decode-target backends; returns the query rows (long ``[R]`` on q's device)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q [B, Hq, S, D] and k [B, Hkv, S, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, hq, length, _ = q.shape
    hkv = k.shape[1]
    if hq % hkv or k.shape[2] != length:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need Hq % Hkv == 0 and equal lengths")
    if target not in DECODE_TARGETS:
        raise ValueError(f"decode target must be one of {DECODE_TARGETS}, got {target!r}")
    if key_padding_mask is not None and (
        tuple(key_padding_mask.shape) != (batch, length) or key_padding_mask.dtype != torch.bool
    ):
        raise ValueError(f"key_padding_mask must be bool [B, S] = [{batch}, {length}]")
    if query_rows is None:
        return torch.arange(length, device=q.device)
    # the range check reads the rows on the host, which a CUDA-graph capture (a static decoding step) cannot
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if query_rows.dim() != 1 or (
        query_rows.numel() and not capturing and not 0 <= int(query_rows.min()) <= int(query_rows.max()) < length
    ):
        raise ValueError(f"query_rows must be 1-D token positions in [0, {length})")
    return query_rows.to(q.device, torch.long)


def normalise_decode_target(
    per_block: torch.Tensor, query_rows: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """The target from the un-normalised values of the strictly earlier blocks.

    Args:
        per_block: fp32 ``[B, Hkv, R, nK - 1]``, zero on blocks not strictly earlier than the row's token.
        query_rows: long ``[R]`` token positions of the rows; key_padding_mask: optional bool ``[B, S]``.

    Returns:
        fp32 ``[B, Hkv, R, nK]``: each row divided by its sum (all-zero rows and padding tokens' rows stay zero), the
        last block's column zero (no token has it strictly earlier).
    """
    total = per_block.sum(dim=-1, keepdim=True)
    result = torch.where(total > 0, per_block / total.clamp_min(1e-30), 0.0)
    if key_padding_mask is not None:
        result = torch.where(key_padding_mask[:, query_rows][:, None, :, None], result, 0.0)
    return torch.nn.functional.pad(result, (0, 1))
