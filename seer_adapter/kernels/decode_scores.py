"""Decode-gate scores of one decoding step, pure PyTorch (the reference, the test oracle and the CPU path).

One new token per sequence. For every KV head (GQA group) the decode gate (`seer_adapter.gate.DecodeGate`):

1. undoes RoPE on the group's post-RoPE queries (the attention function receives them rotated);
2. merges the ``g = Hq / Hkv`` pre-RoPE queries, concatenated head-major (``[g·D]``), with one bias-free linear
   ``q_weight [Hkv, m·G, g·D]`` into ``m`` gate queries (``m`` = ``DecodeGate.num_queries``, usually 1);
3. rotates each gate query at the token's own position (same tables);
4. scores the compressed keys of the strictly earlier blocks, ``logits = q_gate · k_c * scale``; with ``m > 1``,
   merges the ``m`` gate queries' logits per block (`merge_query_logits`): ``"mixture"``, the log of the mean over
   the queries of each one's softmax over the earlier blocks that hold a real token, or ``"logsumexp"`` of the raw
   logits.

The result is laid out for block selection: ``[B, Hkv, 1, n_earlier + 1]`` fp32 whose last column, the block
holding the new token (always attended, never scored), is the lowest finite float, so it stays out of a softmax's
mass and last in rank. The fused Triton kernel (`decode_scores_triton.py`) does all of it in one launch; this
module is the definition it is tested against.
"""

from __future__ import annotations

import math

import torch

from ..rope import ROPE_STYLES, apply_rope

QUERY_MERGES = ("mixture", "logsumexp")  # how m > 1 gate queries' logits become one score per block


def merge_query_logits(per_query: torch.Tensor, allowed: torch.Tensor | None, how: str) -> torch.Tensor:
    """Merge ``m`` gate queries' logits into one score per block: ``[..., m, n] -> [..., n]`` (fp32 for "mixture").

    ``"mixture"``: ``log(mean_j softmax(per_query[..., j, :]))`` with each softmax over the ``allowed`` blocks only
    (bool, broadcast to ``per_query``; None: all ``n``), so the scores are log-probabilities of the mean of the
    queries' distributions and every query weighs the same. ``"logsumexp"``: of the raw logits (a query with larger
    logits outweighs the others). Scores of blocks that are not allowed are meaningless: callers mask them.
    """
    if how == "logsumexp":
        return torch.logsumexp(per_query, dim=-2)
    if how != "mixture":
        raise ValueError(f"query merge must be one of {QUERY_MERGES}, got {how!r}")
    per_query = per_query.float()
    if allowed is not None:  # a finite stand-in: rows with no allowed block stay free of NaN (and so do gradients)
        per_query = torch.where(allowed, per_query, torch.full_like(per_query, -1e4))
    log_p = torch.log_softmax(per_query, dim=-1)
    return torch.logsumexp(log_p, dim=-2) - math.log(per_query.shape[-2])


def check_decode_score_inputs(
    q: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_weight: torch.Tensor,
    keys: torch.Tensor,
    n_earlier: int | torch.Tensor,
    rope_style: str,
    num_queries: int = 1,
    query_merge: str = "mixture",
    block_valid: torch.Tensor | None = None,
) -> None:
    """Validate a decode-score call; raise ValueError naming the bad argument."""
    if q.dim() != 3 or q_weight.dim() != 3 or keys.dim() != 4:
        raise ValueError(
            f"expected q [B, Hq, D], q_weight [Hkv, m·G, g·D] and keys [B, Hkv, nC, G]; got {tuple(q.shape)}, "
            f"{tuple(q_weight.shape)}, {tuple(keys.shape)}"
        )
    batch, hq, head_dim = q.shape
    hkv, query_rows, merged_width = q_weight.shape
    if hq % hkv or merged_width != (hq // hkv) * head_dim:
        raise ValueError(f"q_weight {tuple(q_weight.shape)} does not merge {hq} query heads of {head_dim} into {hkv}")
    if not isinstance(num_queries, int) or num_queries < 1 or query_rows % num_queries:
        raise ValueError(f"num_queries={num_queries!r} must be a positive divisor of q_weight's {query_rows} rows")
    gate_dim = query_rows // num_queries
    if tuple(keys.shape[:2]) != (batch, hkv) or keys.shape[3] != gate_dim:
        raise ValueError(
            f"keys must be [B={batch}, Hkv={hkv}, nC, G={gate_dim}] (q_weight's {query_rows} rows are "
            f"{num_queries} gate quer{'y' if num_queries == 1 else 'ies'} of G), got {tuple(keys.shape)}"
        )
    if isinstance(n_earlier, torch.Tensor):  # a device tensor: its value cannot be checked without a sync
        if n_earlier.shape != (1,) or n_earlier.dtype not in (torch.int32, torch.int64) or n_earlier.device != q.device:
            raise ValueError(
                f"a tensor n_earlier must be an int32/int64 [1] tensor on {q.device}, got {n_earlier.dtype} "
                f"{tuple(n_earlier.shape)} on {n_earlier.device}"
            )
    elif not 0 <= n_earlier <= keys.shape[2]:
        raise ValueError(f"n_earlier={n_earlier} must be within the {keys.shape[2]} compressed blocks")
    if query_merge not in QUERY_MERGES:
        raise ValueError(f"query_merge must be one of {QUERY_MERGES}, got {query_merge!r}")
    if block_valid is not None:
        columns = keys.shape[2] if isinstance(n_earlier, torch.Tensor) else n_earlier
        if (
            block_valid.dim() != 2
            or block_valid.shape[0] != batch
            or block_valid.shape[1] < columns
            or block_valid.dtype != torch.bool
        ):
            raise ValueError(
                f"block_valid must be a bool [B={batch}, >= {columns}] mask of the blocks holding a real token, got "
                f"{block_valid.dtype} {tuple(block_valid.shape)}"
            )
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin come together (both None for models without RoPE)")
    if cos is not None:
        if rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
        width = cos.shape[-1]
        if cos.dim() != 2 or cos.shape[0] not in (1, batch) or sin.shape != cos.shape:
            raise ValueError(f"cos, sin must be [B or 1, r] tables of the new token, got {tuple(cos.shape)}")
        if width % 2 or width > min(head_dim, gate_dim):
            raise ValueError(f"rotary width {width} must be even and at most head_dim and gate_dim")


def decode_gate_scores_reference(
    q: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_weight: torch.Tensor,
    keys: torch.Tensor,
    n_earlier: int | torch.Tensor,
    *,
    rope_style: str = "half",
    scale: float = 1.0,
    num_queries: int = 1,
    query_merge: str = "mixture",
    block_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode-gate scores of one decoding step (see the module docstring).

    Args:
        q: post-RoPE queries of the new token ``[B, Hq, D]``.
        cos, sin: RoPE tables at the new token's position ``[B or 1, r]`` (``None``: no RoPE).
        q_weight: the query merge ``[Hkv, m·G, g·D]`` (gate dtype; the merge runs in that dtype): ``m`` gate
            queries, their scores merged by ``query_merge``.
        keys: compressed keys ``[B, Hkv, nC, G]``; the first ``n_earlier`` are scored.
        n_earlier: an int, or a long ``[1]`` device tensor (shape-static decoding steps: no host sync; it must be
            below ``nC``).
        rope_style: ``"half"``, ``"interleaved"`` or ``"interleaved_half_table"`` (`seer_adapter.rope`).
        scale: multiplies the dot products (the gate uses ``1 / sqrt(G)``).
        num_queries: ``m``, the gate queries per KV head (``DecodeGate.num_queries``; default 1).
        query_merge: ``"mixture"`` (default) or ``"logsumexp"`` (`merge_query_logits`; unused with one query).
        block_valid: optional bool ``[B, >= scored columns]``: the blocks holding a real token (left padding leaves
            the first ones empty); only the mixture's per-query normalisers read it, as in training.

    Returns:
        fp32 ``[B, Hkv, 1, n_earlier + 1]``: the scores, then the lowest finite float for the current block. With a
        tensor ``n_earlier``: ``[B, Hkv, 1, nC]``, the lowest finite float from column ``n_earlier`` on.
    """
    check_decode_score_inputs(q, cos, sin, q_weight, keys, n_earlier, rope_style, num_queries, query_merge, block_valid)
    batch, hq, head_dim = q.shape
    hkv, gate_dim, n_queries = q_weight.shape[0], keys.shape[3], num_queries
    query = q.float()[:, :, None]  # [B, Hq, 1, D]
    tables = (None, None) if cos is None else (cos[:, None], sin[:, None])  # [B or 1, 1, r]
    if cos is not None:
        query = apply_rope(query, *tables, rope_style, inverse=True)
    grouped = query.to(q_weight.dtype).view(batch, hkv, hq // hkv, 1, head_dim)
    grouped = grouped.permute(0, 1, 3, 2, 4).reshape(batch, hkv, 1, -1)  # [B, Hkv, 1, g·D]
    merged = torch.einsum("bhni,hoi->bhno", grouped, q_weight)  # [B, Hkv, 1, m·G]
    merged = merged.view(batch, hkv, n_queries, gate_dim)  # [B, Hkv, m, G]: the gate queries as rows
    if cos is not None:
        merged = apply_rope(merged, *tables, rope_style)
    lowest = torch.finfo(torch.float32).min
    scored_keys = keys if isinstance(n_earlier, torch.Tensor) else keys[:, :, :n_earlier]
    scored_keys = scored_keys.to(merged.dtype)  # half-precision compressed keys (decode_key_dtype) score as the gate
    scores = torch.einsum("bhmg,bhkg->bhmk", merged, scored_keys).float() * scale  # [B, Hkv, m, n]
    scored = torch.arange(scores.shape[-1], device=keys.device) < n_earlier  # [n]
    if n_queries > 1:
        allowed = scored if block_valid is None else scored & block_valid[:, None, None, : scores.shape[-1]]
        scores = merge_query_logits(scores, allowed, query_merge).unsqueeze(2)  # [B, Hkv, 1, n]
    if isinstance(n_earlier, torch.Tensor):
        return torch.where(scored, scores, lowest)
    current = scores.new_full((batch, hkv, 1, 1), lowest)
    return torch.cat((scores, current), dim=-1)
