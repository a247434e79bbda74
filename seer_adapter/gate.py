"""AttnGate: predicts, per (query block, key block), how much attention mass falls in the block.

Prefill gate of SeerAttention (DESIGN.md §1):

1. pool pre-RoPE Q ``[B, Hq, S, D]`` and K ``[B, Hkv, S, D]`` over non-overlapping blocks of ``block_size``
   tokens (a trailing partial block is pooled over its real tokens; padding tokens never enter a pool);
2. project per head without bias: K's concatenated poolings ``len(k_pooling)·D -> gate_dim`` with one
   matrix per *query* head (the pooled K of a KV head is shared by its query group before projection);
   Q is used as pooled unless ``use_q_proj``;
3. rotate pooled Q and K with the model's RoPE at the position of each block's first token;
4. ``logits = q_blk · k_blkᵀ / sqrt(gate_dim)``, block-causal (diagonal included), ``-inf`` elsewhere.

`AttnGate.logits_from_pooled` is steps 2-4; `AttnGate.forward` pools pre-RoPE Q / K with `pool_blocks` first. In the
model, `seer_adapter.attention.compute_gate_logits` does step 1 straight from post-RoPE Q / K with the fused
`seer_adapter.kernels.gate_pooling.pool_pre_rope_blocks` (inverse RoPE and pooling in one pass).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .kernels.block_lists import key_block_has_tokens
from .kernels.decode_scores import QUERY_MERGES, merge_query_logits
from .rope import apply_rope


class HeadwiseLinear(nn.Module):
    """One bias-free linear map per head: ``[B, H, N, in] -> [B, H, N, out]``; weight ``[H, out, in]``."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_heads, self.in_features, self.out_features = num_heads, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_heads, out_features, in_features, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default uniform range
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhni,hoi->bhno", x, self.weight)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, in_features={self.in_features}, out_features={self.out_features}"


def pool_blocks(x: torch.Tensor, block_size: int, poolings: list[str], valid: torch.Tensor | None) -> torch.Tensor:
    """Pool ``x [B, H, S, D]`` over blocks of ``block_size`` tokens.

    Args:
        poolings: any of ``"avg"``, ``"max"``, ``"min"``; results are concatenated on the channel axis.
        valid: optional bool ``[B, S]``; False tokens (padding) are left out of every pool.

    Returns:
        ``[B, H, ceil(S / block_size), len(poolings) * D]``. A block without any real token pools to 0.
    """
    batch, heads, length, dim = x.shape
    n_blocks = math.ceil(length / block_size)
    pad = n_blocks * block_size - length
    token_valid = torch.ones(batch, length, dtype=torch.bool, device=x.device) if valid is None else valid
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad))
        token_valid = nn.functional.pad(token_valid, (0, pad), value=False)
    blocks = x.view(batch, heads, n_blocks, block_size, dim)
    mask = token_valid.view(batch, 1, n_blocks, block_size, 1)  # [B, 1, nB, bs, 1]
    count = mask.sum(dim=3)  # [B, 1, nB, 1]
    empty = count == 0
    pooled = []
    for kind in poolings:
        if kind == "avg":
            value = blocks.masked_fill(~mask, 0).sum(dim=3) / count.clamp(min=1)
        elif kind == "max":
            value = blocks.masked_fill(~mask, float("-inf")).amax(dim=3)
        elif kind == "min":
            value = blocks.masked_fill(~mask, float("inf")).amin(dim=3)
        else:
            raise ValueError(f"unknown pooling {kind!r}")
        pooled.append(value.masked_fill(empty, 0))
    return torch.cat(pooled, dim=-1)


def block_has_tokens(token_valid: torch.Tensor | None, block_size: int) -> torch.Tensor | None:
    """bool ``[B, ceil(S / block_size)]``: which blocks of ``token_valid [B, S]`` hold a real token (None -> None)."""
    return None if token_valid is None else key_block_has_tokens(token_valid, block_size)


class AttnGate(nn.Module):
    """The prefill gate of one attention layer.

    Args:
        num_q_heads, num_kv_heads, head_dim: the attention layer's shape.
        gate_dim: width of projected Q/K (``head_dim`` when no Q projection is used).
        block_size: tokens per block.
        q_pooling, k_pooling: pooling lists (see `pool_blocks`).
        use_q_proj: add a per-head Q linear.
        dtype: parameter dtype (the gate also computes in it).

    Parameters are initialised so that an untrained gate scores blocks by the dot product of mean-pooled Q
    and mean-pooled K (the K projection is the identity on the ``avg`` channels and zero on the others), a
    sensible prior that distillation refines; without an ``avg`` pooling, ``nn.Linear``'s uniform init is used.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        gate_dim: int,
        block_size: int,
        q_pooling: list[str],
        k_pooling: list[str],
        use_q_proj: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not use_q_proj and (list(q_pooling) != ["avg"] or gate_dim != head_dim):
            raise ValueError("without a Q projection the gate needs q_pooling=['avg'] and gate_dim == head_dim")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.gate_dim, self.block_size = gate_dim, block_size
        self.q_pooling, self.k_pooling = list(q_pooling), list(k_pooling)
        self.k_proj = HeadwiseLinear(num_q_heads, len(self.k_pooling) * head_dim, gate_dim, dtype)
        self.q_proj = (
            HeadwiseLinear(num_q_heads, len(self.q_pooling) * head_dim, gate_dim, dtype) if use_q_proj else None
        )
        # The decode gate of the same layer (SeerAttention-R), set by `seer_adapter.model` when
        # ``SeerAttentionConfig.decode_gate``; its weights live under ``seer_gate.decode.*`` in the adapter file.
        self.decode: DecodeGate | None = None
        self.init_mean_pooling_prior()

    @torch.no_grad()
    def init_mean_pooling_prior(self) -> None:
        """Identity on the ``avg`` channels, zero elsewhere (see class docstring)."""
        for proj, poolings in ((self.k_proj, self.k_pooling), (self.q_proj, self.q_pooling)):
            if proj is None or "avg" not in poolings or self.gate_dim != self.head_dim:
                continue
            proj.weight.zero_()
            start = poolings.index("avg") * self.head_dim
            eye = torch.eye(self.head_dim, dtype=proj.weight.dtype, device=proj.weight.device)
            proj.weight[:, :, start : start + self.head_dim] = eye

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        block_cos: torch.Tensor | None = None,
        block_sin: torch.Tensor | None = None,
        rope_style: str = "half",
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gate logits from pre-RoPE Q / K: pools them (`pool_blocks`) and calls `logits_from_pooled`.

        Args:
            q: pre-RoPE queries ``[B, Hq, S, D]``.
            k: pre-RoPE keys ``[B, Hkv, S, D]`` (same positions as ``q``: prefill without a past).
            block_cos, block_sin: RoPE tables at each block's first token ``[B, nB, r]`` (``None``: no RoPE).
            rope_style: ``"half"``, ``"interleaved"`` or ``"interleaved_half_table"``.
            token_valid: optional bool ``[B, S]``, False for padding tokens.

        Returns:
            fp ``[B, Hq, nB, nB]`` logits in the gate dtype, ``-inf`` above the block diagonal and on key
            blocks without a real token.
        """
        dtype = self.k_proj.weight.dtype
        q_pooled = pool_blocks(q.to(dtype), self.block_size, self.q_pooling, token_valid)  # [B, Hq, nB, Pq·D]
        k_pooled = pool_blocks(k.to(dtype), self.block_size, self.k_pooling, token_valid)  # [B, Hkv, nB, Pk·D]
        return self.logits_from_pooled(
            q_pooled,
            k_pooled,
            block_cos=block_cos,
            block_sin=block_sin,
            rope_style=rope_style,
            block_valid=block_has_tokens(token_valid, self.block_size),
        )

    def logits_from_pooled(
        self,
        q_pooled: torch.Tensor,
        k_pooled: torch.Tensor,
        *,
        block_cos: torch.Tensor | None = None,
        block_sin: torch.Tensor | None = None,
        rope_style: str = "half",
        block_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gate logits from already pooled pre-RoPE Q / K (steps 2-4 of the module docstring).

        Args:
            q_pooled: ``[B, Hq, nB, len(q_pooling)·D]``, the poolings in ``q_pooling`` order (any float dtype;
                computed in the gate dtype).
            k_pooled: ``[B, Hkv, nB, len(k_pooling)·D]``, the poolings in ``k_pooling`` order.
            block_cos, block_sin: RoPE tables at each block's first token ``[B, nB, r]`` or ``[nB, r]``
                (``None``: no RoPE).
            rope_style: ``"half"``, ``"interleaved"`` or ``"interleaved_half_table"``.
            block_valid: optional bool ``[B, nB]``, False for key blocks without a real token
                (`block_has_tokens`).

        Returns:
            fp ``[B, Hq, nB, nB]`` logits in the gate dtype, ``-inf`` above the block diagonal and on key
            blocks without a real token. Differentiable in the gate's weights (and in the pooled inputs).
        """
        dtype = self.k_proj.weight.dtype
        batch, _, n_blocks, _ = q_pooled.shape
        q_width, k_width = len(self.q_pooling) * self.head_dim, len(self.k_pooling) * self.head_dim
        if tuple(q_pooled.shape) != (batch, self.num_q_heads, n_blocks, q_width):
            raise ValueError(f"q_pooled must be [B, Hq={self.num_q_heads}, nB, {q_width}], got {tuple(q_pooled.shape)}")
        if tuple(k_pooled.shape) != (batch, self.num_kv_heads, n_blocks, k_width):
            raise ValueError(
                f"k_pooled must be [B={batch}, Hkv={self.num_kv_heads}, nB={n_blocks}, {k_width}], "
                f"got {tuple(k_pooled.shape)}"
            )
        if block_valid is not None and tuple(block_valid.shape) != (batch, n_blocks):
            raise ValueError(
                f"block_valid must be bool [B, nB] = [{batch}, {n_blocks}], got {tuple(block_valid.shape)}"
            )
        group = self.num_q_heads // self.num_kv_heads
        q_pooled, k_pooled = q_pooled.to(dtype), k_pooled.to(dtype)
        k_pooled = k_pooled.repeat_interleave(group, dim=1)  # pooled K is tiny: [B, Hq, nB, Pk·D]
        q_gate = self.q_proj(q_pooled) if self.q_proj is not None else q_pooled  # [B, Hq, nB, G]
        k_gate = self.k_proj(k_pooled)  # [B, Hq, nB, G]
        if block_cos is not None:
            q_gate = apply_rope(q_gate, block_cos, block_sin, rope_style)
            k_gate = apply_rope(k_gate, block_cos, block_sin, rope_style)
        logits = torch.einsum("bhqg,bhkg->bhqk", q_gate, k_gate) / math.sqrt(self.gate_dim)
        blocks = torch.arange(n_blocks, device=logits.device)
        allowed = blocks[None, :] <= blocks[:, None]  # [nB, nB] block-causal
        if block_valid is not None:
            allowed = allowed & block_valid[:, None, None, :]
        return logits.masked_fill(~allowed, float("-inf"))

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, gate_dim={self.gate_dim}, q_pooling={self.q_pooling}, "
            f"k_pooling={self.k_pooling}"
        )


class DecodeGate(nn.Module):
    """The decode gate of one attention layer (SeerAttention-R): one block selection per KV head per new token.

    * **Query**: the pre-RoPE queries of the ``g = Hq / Hkv`` heads of a GQA group are concatenated
      (``[g·D]``, head-major) and merged by one bias-free linear per KV head, ``g·D -> m·gate_dim``: ``m``
      gate queries (``num_queries``, a divisor of ``g``; 1 in SeerAttention-R), each rotated with the model's
      RoPE at the token's own position.
    * **Keys**: pre-RoPE K is pooled over blocks of ``block_size`` slots (``k_pooling``, as the prefill gate),
      projected per KV head ``len(k_pooling)·D -> gate_dim``, optionally RMS-normalised (``k_norm``: a learned
      scale per KV head and channel, initialised to 1) and rotated at the position of the block's first slot
      (the prefill gate's block-RoPE convention). These compressed keys are what `seer_adapter.decode` caches.
    * ``logits = q_gate · k_gateᵀ / sqrt(gate_dim)`` per KV head; with ``m > 1`` gate queries, merged per block
      (`merge_query_logits`, ``query_merge``): by default the log of the mean of the queries' softmaxes over the
      allowed blocks (every query weighs the same, as every head does in the distillation target, the maximum over
      the group's heads of each head's probability, which one bilinear score cannot follow when the heads attend to
      different blocks), or the logsumexp of the raw logits.

    The same three functions serve decoding (one token, keys from the K-compression cache) and training (every token
    of a prefill against its strictly earlier blocks), so the position convention is shared by construction.

    Initialisation: gate query ``j`` averages the ``g / m`` heads ``j·g/m .. (j+1)·g/m - 1`` of the group (``m = 1``:
    the group mean; ``m = g``: one head each) and the key projection is the identity on the ``avg`` channels (when
    ``gate_dim == head_dim``), so an untrained gate scores a block by the dot products of those head means with the
    block's mean key; otherwise ``nn.Linear``'s uniform init.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        gate_dim: int,
        block_size: int,
        k_pooling: list[str],
        k_norm: bool = False,
        dtype: torch.dtype = torch.float32,
        eps: float = 1e-6,
        num_queries: int = 1,
        query_merge: str = "mixture",
    ):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group, self.eps = num_q_heads // num_kv_heads, eps
        if num_queries < 1 or self.group % num_queries:
            raise ValueError(
                f"num_queries={num_queries} must divide the GQA group of {self.group} query heads per KV head "
                f"(1 merges the group into one gate query, {self.group} keeps one per head)"
            )
        self.num_queries = num_queries
        if query_merge not in QUERY_MERGES:
            raise ValueError(f"query_merge must be one of {QUERY_MERGES}, got {query_merge!r}")
        self.query_merge = query_merge
        self.gate_dim, self.block_size, self.k_pooling = gate_dim, block_size, list(k_pooling)
        self.q_proj = HeadwiseLinear(num_kv_heads, self.group * head_dim, num_queries * gate_dim, dtype)
        self.k_proj = HeadwiseLinear(num_kv_heads, len(self.k_pooling) * head_dim, gate_dim, dtype)
        # RMSNorm scale of the projected keys, [Hkv, gate_dim]; None without k_norm
        self.k_norm = nn.Parameter(torch.ones(num_kv_heads, gate_dim, dtype=dtype)) if k_norm else None
        self.init_mean_prior()

    @torch.no_grad()
    def init_mean_prior(self) -> None:
        """Group-mean query merge and identity on the ``avg`` key channels (see class docstring)."""
        if self.gate_dim != self.head_dim:
            return
        eye = torch.eye(self.head_dim, dtype=self.q_proj.weight.dtype, device=self.q_proj.weight.device)
        per_query = self.group // self.num_queries  # heads averaged by each gate query
        # [m·G, g·D]: gate query j reads heads j·per_query .. (j+1)·per_query - 1, each with weight 1 / per_query
        merge = torch.block_diag(*[(eye / per_query).repeat(1, per_query)] * self.num_queries)
        self.q_proj.weight.copy_(merge[None].expand_as(self.q_proj.weight))
        if "avg" in self.k_pooling:
            self.k_proj.weight.zero_()
            start = self.k_pooling.index("avg") * self.head_dim
            self.k_proj.weight[:, :, start : start + self.head_dim] = eye

    def query(
        self,
        q: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        rope_style: str = "half",
    ) -> torch.Tensor:
        """Merged, rotated gate queries.

        Args:
            q: pre-RoPE queries ``[B, Hq, N, D]``.
            cos, sin: RoPE tables at each token's position ``[B, N, r]`` or ``[N, r]`` (``None``: no RoPE).

        Returns:
            ``[B, Hkv, N, m·gate_dim]`` in the gate dtype: the ``m = num_queries`` gate queries side by side.
        """
        batch, heads, length, dim = q.shape
        if heads != self.num_q_heads or dim != self.head_dim:
            raise ValueError(f"q must be [B, Hq={self.num_q_heads}, N, D={self.head_dim}], got {tuple(q.shape)}")
        dtype = self.q_proj.weight.dtype
        grouped = q.to(dtype).view(batch, self.num_kv_heads, self.group, length, dim)
        grouped = grouped.permute(0, 1, 3, 2, 4).reshape(batch, self.num_kv_heads, length, self.group * dim)
        merged = self.q_proj(grouped)  # [B, Hkv, N, m·G]
        if cos is None:
            return merged
        if self.num_queries == 1:
            return apply_rope(merged, cos, sin, rope_style)
        # each gate query rotated on its own G channels: the m queries as extra heads of apply_rope
        queries = merged.unflatten(-1, (self.num_queries, self.gate_dim)).transpose(2, 3)  # [B, Hkv, m, N, G]
        rotated = apply_rope(queries.flatten(1, 2), cos, sin, rope_style).unflatten(1, (self.num_kv_heads, -1))
        return rotated.transpose(2, 3).flatten(-2)

    def keys(
        self,
        k_pooled: torch.Tensor,
        block_cos: torch.Tensor | None = None,
        block_sin: torch.Tensor | None = None,
        rope_style: str = "half",
    ) -> torch.Tensor:
        """Compressed keys: projected pooled pre-RoPE K rotated at each block's first slot.

        Args:
            k_pooled: ``[B, Hkv, nB, len(k_pooling)·D]`` (`pool_blocks` / `pool_pre_rope_blocks` output).
            block_cos, block_sin: RoPE tables at each block's first slot ``[B, nB, r]`` (``None``: no RoPE).

        Returns:
            ``[B, Hkv, nB, gate_dim]`` in the gate dtype.
        """
        width = len(self.k_pooling) * self.head_dim
        if k_pooled.dim() != 4 or k_pooled.shape[1] != self.num_kv_heads or k_pooled.shape[-1] != width:
            raise ValueError(f"k_pooled must be [B, Hkv={self.num_kv_heads}, nB, {width}], got {tuple(k_pooled.shape)}")
        projected = self.k_proj(k_pooled.to(self.k_proj.weight.dtype))  # [B, Hkv, nB, G]
        if self.k_norm is not None:
            rms = projected.pow(2).mean(dim=-1, keepdim=True).add(self.eps).rsqrt()
            projected = projected * rms * self.k_norm[None, :, None, :]
        return projected if block_cos is None else apply_rope(projected, block_cos, block_sin, rope_style)

    def logits(self, q_gate: torch.Tensor, k_gate: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, Hkv, N, m·G] x [B, Hkv, nB, G] -> [B, Hkv, N, nB]`` scaled dot products (no masking); with
        ``m > 1`` gate queries, merged by `merge_query_logits` over the ``allowed`` blocks."""
        if self.num_queries == 1:
            return torch.einsum("bhng,bhkg->bhnk", q_gate, k_gate) / math.sqrt(self.gate_dim)
        queries = q_gate.unflatten(-1, (self.num_queries, self.gate_dim))  # [B, Hkv, N, m, G]
        per_query = torch.einsum("bhnmg,bhkg->bhnmk", queries, k_gate) / math.sqrt(self.gate_dim)
        return merge_query_logits(per_query, None if allowed is None else allowed.unsqueeze(-2), self.query_merge)

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, gate_dim={self.gate_dim}, group={self.group}, "
            f"num_queries={self.num_queries}, k_pooling={self.k_pooling}, k_norm={self.k_norm is not None}"
        )
