"""Sparse decoding (SeerAttention-R): K-compression cache, per-step block selection, the decode step.

At every decoding step each gated layer with a decode gate (`seer_adapter.gate.DecodeGate`):

1. appends the new token to its **K-compression cache** (`CompressedKeys`, kept by `SeerDynamicCache` beside the
   KV cache): when a block of ``block_size`` cache slots completes, its pre-RoPE keys are pooled, projected and
   rotated at the block's first slot, once; the result is ``[B, Hkv, n_blocks, gate_dim]`` — about
   ``1 / block_size`` of the K cache;
2. scores the strictly earlier blocks with the merged query of each GQA group (one score row per KV head);
3. selects blocks (`select_decode_blocks`): top ``decode_token_budget / block_size`` blocks or those whose
   probability exceeds ``decode_threshold``; the block holding the new token (the trailing, possibly partial
   block) and the first block holding a real token (the sink) are always attended;
4. attends through `seer_adapter.kernels.sparse_decode_attention` (Triton split-KV kernel on CUDA).

Blocks are cut along **cache slots**, as in the prefill gate: with left padding every row of a batch shares block
boundaries, padding slots enter no pool and a block holding only padding is never selected. Block RoPE uses the
RoPE table of the block's first slot, the prefill gate's convention, so the compressed keys of a prompt are the same
whether it was prefilled at once or decoded token by token (tested).

To compress a block that completes, and to rebuild the block a `crop` cuts into, the cache keeps each layer's RoPE
tables per slot (``[B, S, r]``, ``r`` = rotary width): ``r / (Hkv · D)`` of the K cache.

`SeerStaticCache` is the fixed-capacity variant whose single-token steps are shape-static (the new token's slot in
a device tensor, whole buffers read with a padding mask, the current block recompressed in place every step by
`update_compressed_keys_static`), so that `seer_adapter.cuda_graphs` can replay them as one CUDA graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .gate import DecodeGate
from .kernels.block_lists import key_block_has_tokens
from .kernels.gate_pooling import pool_pre_rope_blocks


class DecodeCacheError(RuntimeError):
    """The K-compression cache cannot follow the KV cache (wrong cache type, or a cache changed behind its back)."""


# Spare room a buffer gets when it must grow: an eighth of what it holds (at least _KV_GROWTH_MIN slots for KV
# layers), so appending is amortised O(new tokens) while at most ~12 % of the cache memory sits unused.
_KV_GROWTH_FRACTION = 8
_KV_GROWTH_MIN = 256


def _grown(buffer: torch.Tensor, dim: int, needed: int, exact: bool = False) -> torch.Tensor:
    """``buffer`` with at least ``needed`` entries along ``dim``: an eighth more (geometric, so appends stay amortised
    O(1), without doubling a 64k-slot layer's RoPE tables), or, ``exact``, exactly ``needed`` (a cache whose final size
    is known)."""
    capacity = buffer.shape[dim]
    if needed <= capacity:
        return buffer
    shape = list(buffer.shape)
    shape[dim] = needed if exact else needed + max(16, needed // _KV_GROWTH_FRACTION)
    grown = buffer.new_zeros(shape)
    grown.narrow(dim, 0, capacity).copy_(buffer)
    return grown


class SlotRopeTables:
    """RoPE tables ``cos, sin [B, slots, r]`` of every cache slot: what undoes RoPE before a block's keys are pooled.

    One object serves every layer that receives the same table tensors: a model computes them once per forward and
    hands the same ``position_embeddings`` to each layer, so the layers joined at the prefill by that identity share
    one copy (a copy per layer held 9 GiB of an 8B model's decoding at 64k x batch 8; for a small GQA model such as
    Qwen2.5-0.5B the per-layer tables were half the size of the KV cache). Layers with tables of their own (another
    rotary, tables made per layer) get their own object. Batch reordering goes through the cache, once per object.
    """

    def __init__(self, batch: int, width: int, dtype: torch.dtype, device: torch.device):
        self._cos = torch.zeros(batch, 0, width, dtype=dtype, device=device)
        self._sin = torch.zeros_like(self._cos)
        self.n_slots = 0  # slots whose tables are recorded (pending or in the buffers)
        # Tables of recent slots not yet copied into the buffers: (start slot, cos, sin). Decoding steps only keep a
        # reference (the model makes fresh tables every forward); the copy waits until the tables are read (a block
        # completes, crop, batch reorder): one concatenation instead of two copies per step.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.last_source: tuple[int, torch.Tensor] | None = None  # (start slot, cos) of the last record
        # (cos, sin, rows, block tables) of the current shape-static step: its later sharing layers reuse them
        self._static_step: tuple | None = None

    @property
    def batch_size(self) -> int:
        return self._cos.shape[0]

    def record(self, start: int, count: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Tables ``[B or 1, count, r]`` of slots ``start ..``; a sharing layer repeating the same record is a no-op."""
        source = self.last_source
        if source is not None and source[0] == start and source[1] is cos and start + count == self.n_slots:
            return  # an earlier layer of this forward recorded these very tables
        if start != self.n_slots:
            raise DecodeCacheError(
                f"RoPE tables for slots from {start} arrived where {self.n_slots} slots are recorded: layers that "
                "shared their RoPE tables at the prefill received different tables since. Please report the model."
            )
        self._pending.append((start, cos, sin))
        self.n_slots += count
        self.last_source = (start, cos)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers ``cos, sin [B, capacity, r]`` with every recorded slot written."""
        if self._pending:
            start, end = self._pending[0][0], self.n_slots
            self._cos, self._sin = _grown(self._cos, 1, end), _grown(self._sin, 1, end)
            for buffer, index in ((self._cos, 1), (self._sin, 2)):
                tables = [entry[index].expand(self.batch_size, -1, -1) for entry in self._pending]  # [B, n, r] each
                buffer[:, start:end] = tables[0] if len(tables) == 1 else torch.cat(tables, dim=1)
            self._pending.clear()
        return self._cos, self._sin

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows (in place when the batch size stays: captured graphs keep the addresses)."""
        self.buffers()
        indices = indices.to(self._cos.device)
        if indices.numel() == self.batch_size:
            self._cos.copy_(self._cos.index_select(0, indices))
            self._sin.copy_(self._sin.index_select(0, indices))
        else:
            self._cos, self._sin = self._cos.index_select(0, indices), self._sin.index_select(0, indices)
        self.last_source = None

    def reserve(self, n_slots: int) -> None:
        """Buffers for exactly ``n_slots`` slots (shape-static steps write in place); idempotent."""
        self.buffers()
        self._cos, self._sin = _grown(self._cos, 1, n_slots, exact=True), _grown(self._sin, 1, n_slots, exact=True)

    def crop(self, n_slots: int) -> None:
        """Forget slots from ``n_slots`` on; idempotent (every sharing layer crops)."""
        self.buffers()
        self.n_slots = max(0, min(n_slots, self.n_slots))
        self.last_source = None

    def advance_static(self, n_slots: int) -> None:
        """After shape-static steps (which write the buffers in place) brought the cache to ``n_slots`` slots."""
        self.n_slots = n_slots
        self.last_source = None
        self._static_step = None

    def static_block_tables(
        self, slot: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One shape-static step's tables: writes the new token's ``cos, sin [B or 1, 1, r]`` at ``slot`` (long
        ``[1]`` on the device) and returns those of the current block's slots ``rows`` (``[B, bs, r]`` each).

        The layers sharing these tables receive the same tensors in a step: the first does the work, the others reuse
        its result (a CUDA-graph capture records it once), instead of four copies and gathers per layer."""
        step = self._static_step
        if step is not None and step[0] is cos and step[1] is sin and step[2] is rows:
            return step[3]
        if cos.shape[-2] != 1:
            raise ValueError(f"a static step's RoPE tables hold one position, got {tuple(cos.shape)}")
        cos_buffer, sin_buffer = self.buffers()
        batch = cos_buffer.shape[0]
        cos_buffer.index_copy_(1, slot, cos.expand(batch, 1, -1).to(cos_buffer.dtype))
        sin_buffer.index_copy_(1, slot, sin.expand(batch, 1, -1).to(sin_buffer.dtype))
        # Advanced indexing, not index_select: for a 16-slot block CUDA's index_select takes its few-indices kernel,
        # 8 us against 3 us on the H200 (bench_block_gather.py; 64 slots: both 4 us).
        block_tables = (cos_buffer[:, rows], sin_buffer[:, rows])
        self._static_step = (cos, sin, rows, block_tables)
        return block_tables


class CompressedKeys:
    """K-compression cache of one layer, in growable buffers (appending a slot never copies the history).

    Attributes (views of the buffers):
        keys: ``[B, Hkv, nC, gate_dim]`` compressed keys of the ``nC = n_slots // block_size`` completed blocks
            (gate dtype).
        block_valid: bool ``[B, nC]``: the block holds at least one real token.
        cos, sin: RoPE tables of every slot ``[B, n_slots, r]`` (``None`` for models without RoPE), from `tables`,
            a `SlotRopeTables` the layer may share with others.
        n_slots: cache slots seen so far (== the KV cache length); n_blocks: ``nC``.
        adapter_name: the adapter whose decode gate made the compressed keys.
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        gate_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tables: SlotRopeTables | None,
        adapter_name: str = "default",
    ):
        self.adapter_name = adapter_name  # the adapter whose decode gate compressed these keys
        self._keys = torch.zeros(batch, num_kv_heads, 0, gate_dim, dtype=dtype, device=device)
        self._valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.tables = tables  # None: a model without RoPE
        self.n_slots = 0
        self.n_blocks = 0
        self._marked_partial: int | None = None  # the partial block whose validity entry is set (see mark_...)

    @property
    def batch_size(self) -> int:
        return self._keys.shape[0]

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self.n_blocks]

    @property
    def block_valid(self) -> torch.Tensor:
        return self._valid[:, : self.n_blocks]

    @property
    def cos(self) -> torch.Tensor | None:
        return None if self.tables is None else self.tables.buffers()[0][:, : self.n_slots]

    @property
    def sin(self) -> torch.Tensor | None:
        return None if self.tables is None else self.tables.buffers()[1][:, : self.n_slots]

    def append_slots(self, count: int, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
        """Record ``count`` new slots with their RoPE tables ``[B or 1, count, r]``."""
        if (cos is None) != (self.tables is None):
            raise DecodeCacheError("RoPE tables appeared or vanished between calls of one layer")
        if cos is not None:
            self.tables.record(self.n_slots, count, cos, sin)
        self.n_slots += count

    def append_blocks(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """Record compressed blocks ``keys [B, Hkv, n, G]`` and their validity ``[B, n]``."""
        end = self.n_blocks + keys.shape[2]
        self._keys, self._valid = _grown(self._keys, 2, end), _grown(self._valid, 1, end)
        self._keys[:, :, self.n_blocks : end] = keys
        self._valid[:, self.n_blocks : end] = valid
        self.n_blocks = end

    def mark_partial_block(self, block_size: int) -> None:
        """Set the validity entry of the trailing partial block (the one the next decoding step's token is in) to
        True, so that `block_valid_through` needs no concatenation: a decoding step's current block always holds
        its new, real token. Completing the block overwrites the entry with its real validity."""
        partial = self.n_slots // block_size
        if self.n_slots % block_size == 0 or partial == self._marked_partial:
            return
        self._valid = _grown(self._valid, 1, partial + 1)
        self._valid[:, partial] = True
        self._marked_partial = partial

    def block_valid_through(self, n_blocks: int) -> torch.Tensor:
        """bool ``[B, n_blocks]``: `block_valid` of the earlier blocks, then True for the current one (a view)."""
        if n_blocks > self._valid.shape[1] or (n_blocks > self.n_blocks and self._marked_partial != n_blocks - 1):
            raise DecodeCacheError(f"no validity recorded for block {n_blocks - 1} (cache holds {self.n_slots} slots)")
        return self._valid[:, :n_blocks]

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows (``indices`` long ``[B']``): beam search and batch selection.

        A reordering that keeps the batch size writes into the same buffers (their addresses stay valid for a captured
        CUDA graph); a new batch size makes new buffers. The RoPE tables are not touched: the cache reorders each
        `SlotRopeTables` once, however many layers share it."""
        indices = indices.to(self._keys.device)
        same_size = indices.numel() == self.batch_size
        for name in ("_keys", "_valid"):
            selected = getattr(self, name).index_select(0, indices)
            if same_size:
                getattr(self, name).copy_(selected)
            else:
                setattr(self, name, selected)

    def reserve(self, n_slots: int, block_size: int) -> None:
        """Allocate every buffer for ``n_slots`` cache slots now, so that shape-static decoding steps
        (`update_compressed_keys_static`) write in place at device-side positions."""
        # exactly: the capacity is final (growing past it by the usual spare room would only hold unused memory)
        n_blocks = -(-n_slots // block_size)
        self._keys, self._valid = (
            _grown(self._keys, 2, n_blocks, exact=True),
            _grown(self._valid, 1, n_blocks, exact=True),
        )
        if self.tables is not None:
            self.tables.reserve(n_slots)

    def static_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The whole buffers ``(keys [B, Hkv, nCap, G], valid [B, nCap], cos, sin [B, Cap, r])`` (after `reserve`)."""
        cos, sin = (None, None) if self.tables is None else self.tables.buffers()
        return self._keys, self._valid, cos, sin

    def advance_static(self, n_slots: int, block_size: int) -> None:
        """Host bookkeeping after shape-static steps brought the cache to ``n_slots`` slots (the device buffers were
        written by `update_compressed_keys_static`, the current block's validity included)."""
        self.n_slots = n_slots
        self.n_blocks = n_slots // block_size
        self._marked_partial = self.n_blocks if n_slots % block_size else None
        if self.tables is not None:
            self.tables.advance_static(n_slots)

    def crop(self, n_slots: int, block_size: int) -> None:
        """Forget slots from ``n_slots`` on (blocks no longer complete are recompressed when they complete again)."""
        self.n_slots = max(0, min(n_slots, self.n_slots))
        if self.tables is not None:
            self.tables.crop(self.n_slots)
        self.n_blocks = min(self.n_blocks, self.n_slots // block_size)
        self._marked_partial = None
        self.mark_partial_block(block_size)


class GrowableDynamicLayer(DynamicLayer):
    """transformers' `DynamicLayer` whose keys and values live in buffers with spare slots.

    `DynamicLayer.update` appends with ``torch.cat``, which copies the whole layer cache at every decoding step:
    at batch 8 and 64k tokens of an 8B-shaped model that is 4 GiB of traffic per layer and step, more than dense
    attention itself reads (an H200 profile of 8 such steps: 56 of 81 ms of GPU time). Here a step writes only its new
    slots; ``keys`` / ``values`` are views ``[B, H, S, D]`` of the buffers (last dimension contiguous). Anything
    that replaces them (crop slices keep the view; beam reordering and batch selection make new tensors) is adopted
    into a fresh buffer at the next append.
    """

    # Fixed capacity in slots (`SeerStaticCache`): buffers are allocated once at exactly this size and never grow.
    capacity_limit: int | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._append(self.keys, key_states, "_key_buffer")
        self.values = self._append(self.values, value_states, "_value_buffer")
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._drop_buffers_of_another_batch_size()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._drop_buffers_of_another_batch_size()

    def _drop_buffers_of_another_batch_size(self) -> None:
        # The keys/values are new tensors of a new batch size: a buffer of the old one can never be adopted again and
        # would hold its memory (a whole 64k-slot layer) until the next append.
        for name, current in (("_key_buffer", self.keys), ("_value_buffer", self.values)):
            buffer = getattr(self, name, None)
            if (
                buffer is not None
                and current is not None
                and current.dim() == 4
                and buffer.shape[0] != current.shape[0]
            ):
                setattr(self, name, None)

    def _append(self, current: torch.Tensor, new: torch.Tensor, name: str) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self, name, None)
        length = current.shape[-2] if current.dim() == 4 else 0
        needed = length + new.shape[-2]
        in_buffer = (
            buffer is not None
            and current.dim() == 4
            and current.data_ptr() == buffer.data_ptr()
            and current.stride() == buffer.stride()
            and current.shape[:2] == buffer.shape[:2]
            and current.shape[-1] == buffer.shape[-1]
            and buffer.dtype == new.dtype
        )
        reusable = (  # a fixed-capacity buffer keeps its address (captured CUDA graphs point at it)
            not in_buffer
            and self.capacity_limit is not None
            and buffer is not None
            and needed <= buffer.shape[-2]
            and current.dim() == 4
            and buffer.shape[:2] == current.shape[:2]
            and buffer.shape[-1] == new.shape[-1]
            and buffer.dtype == new.dtype
            and buffer.device == new.device
        )
        if reusable:
            buffer[..., :length, :].copy_(current)
        elif not in_buffer or needed > buffer.shape[-2]:
            capacity = needed + max(_KV_GROWTH_MIN, needed // _KV_GROWTH_FRACTION)
            if self.capacity_limit is not None:
                if needed > self.capacity_limit:
                    raise DecodeCacheError(
                        f"SeerStaticCache(max_cache_len={self.capacity_limit}) cannot hold {needed} tokens; create it "
                        "with a max_cache_len of at least the prompt length plus max_new_tokens."
                    )
                capacity = self.capacity_limit
            # A fixed-capacity buffer is read whole by static steps (masked, but 0 * NaN garbage is NaN): zeroed.
            allocate = new.new_empty if self.capacity_limit is None else new.new_zeros
            grown = allocate(*new.shape[:2], capacity, new.shape[-1])
            if length:
                grown[..., :length, :].copy_(current)
            buffer = grown
            setattr(self, name, buffer)
        buffer[..., length:needed, :].copy_(new)
        return buffer[..., :needed, :]

    def reset(self) -> None:
        # Dropped rather than zeroed (older transformers zero the tensors in place and keep their length).
        self._key_buffer = self._value_buffer = None
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()


def _use_growable_layers(cache: DynamicCache) -> None:
    """Turn the plain `DynamicLayer` layers of ``cache`` (and those it creates later) into `GrowableDynamicLayer`."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowableDynamicLayer
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowableDynamicLayer


class SeerDynamicCache(DynamicCache):
    """transformers' `DynamicCache` plus the K-compression cache of every layer with a decode gate.

    Beam-search reordering, batch repetition/selection, crop and reset apply to both. Full-attention layers append
    in place into buffers with spare slots (`GrowableDynamicLayer`) instead of concatenating. A plain `DynamicCache` met
    empty by a layer with a decode gate (e.g. the one ``generate()`` creates) is turned into this class in place
    (`as_seer_cache`), so ``generate()`` works unchanged; any other cache type is refused with a clear error at the
    first sparse decoding step.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seer_keys: dict[int, CompressedKeys] = {}
        self.seer_block_size: int | None = None
        _use_growable_layers(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_compressed_rows(lambda batch: beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._select_compressed_rows(lambda batch: torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_compressed_rows(lambda batch: torch.as_tensor(indices).long())

    def _select_compressed_rows(self, rows_for: Callable[[int], torch.Tensor]) -> None:
        """Apply a batch-row selection (``rows_for(batch)``: long ``[B']``) to every layer's compressed keys and to
        each shared `SlotRopeTables` once."""
        for layer in self.seer_keys.values():
            layer.select_batch(rows_for(layer.batch_size))
        for tables in self.shared_rope_tables():
            tables.select_batch(rows_for(tables.batch_size))

    def shared_rope_tables(self) -> list[SlotRopeTables]:
        """The distinct `SlotRopeTables` of the layers (one when every layer receives the model's one rotary)."""
        distinct = {id(layer.tables): layer.tables for layer in self.seer_keys.values() if layer.tables is not None}
        return list(distinct.values())

    def crop(self, max_length: int) -> None:
        """Crop the KV cache as transformers does, and the K-compression cache to the same length.

        The argument follows the installed transformers: a negative count removes that many tokens; a positive one
        is the length to keep in transformers releases that accept it (recent ones refuse it). The compression
        cache follows whatever length the KV cache has afterwards.
        """
        super().crop(max_length)
        kept = self.get_seq_length()
        for layer in self.seer_keys.values():
            layer.crop(min(kept, layer.n_slots), self.seer_block_size or 1)

    def reset(self) -> None:
        super().reset()
        self.seer_keys.clear()


def _capacity_limited_layer(capacity: int) -> GrowableDynamicLayer:
    layer = GrowableDynamicLayer()
    layer.capacity_limit = capacity
    return layer


class SeerStaticCache(SeerDynamicCache):
    """A `SeerDynamicCache` of fixed capacity whose decoding steps are shape-static, so they can run as a CUDA graph.

    Every full-attention layer's keys and values live in one buffer of ``max_cache_len`` slots, allocated at the
    first write (the K-compression buffers are sized at the first decoding step). Forwards of more than one token
    (the prompt) append like the dynamic cache. A single-token forward of a model wrapped by seer_adapter runs as a
    **static step** (`seer_adapter.cuda_graphs`): the new token is written at a slot held in a device tensor, the
    attention reads the whole buffers with a padding mask of ``max_cache_len`` slots, the decode gate recompresses
    the current block in place, and nothing depends on the cache length on the host, so one captured CUDA graph
    serves every step (``cuda_graph=True``, on CUDA). Its results equal the dynamic cache's (tested).

    Args:
        config: the model config (as for ``DynamicCache``), so that a layer per decoder layer exists up front.
        max_cache_len: slots of every layer: at least the prompt length plus ``max_new_tokens``.
        cuda_graph: capture and replay decoding steps as a CUDA graph on CUDA (ignored on other devices, where
            static steps run eagerly).
        full_sliding_layers: keep the model's sliding-window layers at full capacity as well (they then hold every
            token, not just the window: more memory; their masks still apply the window), so that models with
            sliding-window layers (Gemma 2 / 3, Mistral with a window) decode statically. Off by default: such a
            model is refused at the first static step.

    Beam search works (reordering copies rows within the same buffers, so a captured graph stays valid).
    """

    def __init__(
        self, *args, max_cache_len: int, cuda_graph: bool = True, full_sliding_layers: bool = False, **kwargs
    ) -> None:
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        super().__init__(*args, **kwargs)
        if full_sliding_layers:
            for index, layer in enumerate(self.layers):
                if getattr(layer, "is_sliding", False):
                    if layer.is_initialized:
                        raise ValueError(f"layer {index} holds tokens: full_sliding_layers needs an empty cache")
                    self.layers[index] = GrowableDynamicLayer()
        self._capacity = max_cache_len
        self.cuda_graph = cuda_graph
        # during a static step: long [1] on the device, the new token's slot (see begin_static_step)
        self.static_slot: torch.Tensor | None = None
        self._slot_buffer: torch.Tensor | None = None
        self._static_written: set[int] = set()  # layers whose compressed keys the current static step updated
        # the keys/values views the last static step left in the layers: while every layer still holds them, nothing
        # (append, crop, reorder, reset) changed the layers and begin_static_step skips its checks (~1 ms of host
        # time per step at 32 layers, more than the rest of the step's host work)
        self._static_views: list[torch.Tensor] = []
        self.graph_runner: object | None = None  # seer_adapter.cuda_graphs keeps its captured step here
        for layer in self.layers:
            if type(layer) is GrowableDynamicLayer:
                layer.capacity_limit = max_cache_len
        if self.layer_class_to_replicate is GrowableDynamicLayer:
            self.layer_class_to_replicate = functools.partial(_capacity_limited_layer, max_cache_len)

    @property
    def max_cache_len(self) -> int:
        """Slots of every layer (transformers' ``Cache.max_cache_len``)."""
        return self._capacity

    # -- shape-static decoding steps ------------------------------------------------------------------------
    def begin_static_step(self) -> int:
        """Prepare a shape-static single-token step; returns the new token's slot (== the cached length).

        Checks that every layer holds its keys in a full-capacity buffer, sizes the K-compression buffers, and writes
        the slot into the device tensor `static_slot` that the step reads. Runs on the host, before a graph replay.

        Raises:
            DecodeCacheError: empty cache (prefill first), cache full, or a layer this cache cannot run statically.
        """
        length = self.get_seq_length()
        if length == 0:
            raise DecodeCacheError("a static decoding step needs a prefilled cache; run the prompt through it first")
        if length + 1 > self.max_cache_len:
            raise DecodeCacheError(
                f"SeerStaticCache(max_cache_len={self.max_cache_len}) is full ({length} tokens); create it with a "
                "max_cache_len of at least the prompt length plus max_new_tokens."
            )
        unchanged = len(self._static_views) == 2 * len(self.layers) and all(
            a is b for a, b in zip(self._static_views, self._layer_tensors(), strict=True)
        )  # no list of the current tensors is held: the loop below frees each old tensor as it re-adopts it
        if unchanged:
            self._slot_buffer.fill_(length)
            self.static_slot = self._slot_buffer
            self._static_written.clear()
            return length
        self._static_views = []  # stale views would keep replaced tensors alive through the loop
        device = None
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, GrowableDynamicLayer) or layer.capacity_limit != self.max_cache_len:
                raise DecodeCacheError(
                    f"layer {index} of this SeerStaticCache is a {type(layer).__name__} (sliding window or another "
                    "layer type); static decoding needs full-capacity layers: create the cache with "
                    "full_sliding_layers=True (every token kept in sliding layers too), or use SeerDynamicCache."
                )
            if not layer.is_initialized or layer.keys.shape[-2] != length:
                raise DecodeCacheError(f"layer {index} holds a different number of tokens than layer 0 ({length})")
            # re-adopt keys/values replaced since the last append (beam reordering) into the same buffers
            layer.keys = layer._append(layer.keys, layer.keys[..., :0, :], "_key_buffer")
            layer.values = layer._append(layer.values, layer.values[..., :0, :], "_value_buffer")
            if device is not None and layer.keys.device != device:
                raise DecodeCacheError(
                    f"layer {index} of this SeerStaticCache is on {layer.keys.device}, layer 0 on {device}: static "
                    "decoding needs the model on one device; use SeerDynamicCache with a model split over devices."
                )
            device = layer.keys.device
        for compressed in self.seer_keys.values():
            compressed.reserve(self.max_cache_len, self.seer_block_size or 1)
        if self._slot_buffer is None or self._slot_buffer.device != device:
            self._slot_buffer = torch.zeros(1, dtype=torch.long, device=device)
        self._slot_buffer.fill_(length)
        self.static_slot = self._slot_buffer
        self._static_written.clear()
        self._static_views = list(self._layer_tensors())
        return length

    def _layer_tensors(self) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            yield layer.keys
            yield layer.values

    def mark_static_updates(self, layer_indices: Iterable[int]) -> None:
        """Record that the current static step updated these layers' compressed keys."""
        self._static_written.update(layer_indices)

    @property
    def static_updates(self) -> set[int]:
        """Layers whose compressed keys the current static step updated so far."""
        return self._static_written

    def end_static_step(self, completed: bool) -> None:
        """Leave the static step; when it ``completed``, advance the host-side lengths by the one new token.

        Compressed keys of layers the step did not update (adapter switched off, dense fallback) are dropped: a later
        sparse step of such a layer raises instead of reading stale blocks."""
        slot = self.static_slot
        self.static_slot = None
        if slot is None or not completed:
            return
        length = self.get_seq_length() + 1
        for layer in self.layers:
            layer.keys = layer._key_buffer[..., :length, :]
            layer.values = layer._value_buffer[..., :length, :]
        self._static_views = list(self._layer_tensors())
        for layer_idx in list(self.seer_keys):
            if layer_idx in self._static_written:
                self.seer_keys[layer_idx].advance_static(length, self.seer_block_size or 1)
            else:
                del self.seer_keys[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.static_slot is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        layer._key_buffer.index_copy_(2, self.static_slot, key_states)
        layer._value_buffer.index_copy_(2, self.static_slot, value_states)
        return layer._key_buffer, layer._value_buffer

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self.static_slot is None:
            return super().get_mask_sizes(query_length, layer_idx)
        return self.max_cache_len, 0

    def get_query_offset(self, layer_idx: int = 0):
        # A device tensor during a static step, so masks built inside a captured graph follow the step's slot.
        if self.static_slot is None:
            return super().get_query_offset(layer_idx)
        return self.static_slot[0]

    def reset(self) -> None:
        super().reset()
        self.graph_runner = None


def as_seer_cache(cache: object) -> SeerDynamicCache | None:
    """``cache`` as a `SeerDynamicCache`: itself, a plain `DynamicCache` converted in place, or ``None`` for others."""
    if isinstance(cache, SeerDynamicCache):
        return cache
    if type(cache) is DynamicCache:
        cache.__class__ = SeerDynamicCache
        cache.seer_keys, cache.seer_block_size = {}, None
        _use_growable_layers(cache)
        return cache
    return None


def compress_key_blocks(
    gate: DecodeGate,
    key: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    token_valid: torch.Tensor | None,
    rope_style: str,
) -> torch.Tensor:
    """Compressed keys ``[B, Hkv, n, G]`` of the ``n`` whole blocks of post-RoPE ``key [B, Hkv, n · block_size, D]``:
    pooled pre-RoPE (RoPE undone with the slots' tables ``cos, sin [B, n · block_size, r]``; ``token_valid``
    ``[B, n · block_size]`` keeps padding out), projected, and rotated at each block's first slot."""
    block_size = gate.block_size
    pooled = pool_pre_rope_blocks(
        key, cos, sin, rope_style=rope_style, block_size=block_size, poolings=gate.k_pooling, token_valid=token_valid
    )  # [B, Hkv, n, Pk·D] fp32
    block_tables = (None, None) if cos is None else (cos[:, ::block_size], sin[:, ::block_size])
    with torch.no_grad():
        return gate.keys(pooled, *block_tables, rope_style=rope_style)


def update_compressed_keys(
    cache: SeerDynamicCache,
    layer_idx: int,
    gate: DecodeGate,
    key: torch.Tensor,
    new_tokens: int,
    token_valid: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_style: str,
    adapter_name: str = "default",
    key_dtype: torch.dtype | None = None,
) -> CompressedKeys:
    """Append ``new_tokens`` slots to the layer's K-compression cache and compress the blocks they complete.

    Args:
        key: the layer's full post-RoPE key cache ``[B, Hkv, Sk, D]`` (new slots at the end).
        new_tokens: slots added by this forward (the query length).
        token_valid: bool ``[B, Sk]`` (True = real token) or ``None`` when nothing is padded.
        cos, sin: RoPE tables of the new slots ``[B or 1, new_tokens, r]`` (``None``: no RoPE).
        adapter_name: the active adapter (a cache filled by another adapter's decode gate is refused).
        key_dtype: dtype of the compressed keys when this call creates the layer's cache (``None``: the gate's);
            an existing cache keeps its own.

    Raises:
        DecodeCacheError: the compression cache is out of step with the KV cache.
    """
    batch, _, kv_len, _ = key.shape
    block_size = gate.block_size
    if cache.seer_block_size not in (None, block_size):
        raise DecodeCacheError(f"this cache was filled with block_size={cache.seer_block_size}, not {block_size}")
    cache.seer_block_size = block_size
    layer = cache.seer_keys.get(layer_idx)
    if layer is None:
        if kv_len != new_tokens:
            raise DecodeCacheError(
                f"layer {layer_idx}: the KV cache already held {kv_len - new_tokens} tokens when the decode gate first "
                "saw it; start generation from an empty cache (or a SeerDynamicCache filled with the adapter on)."
            )
        tables = None
        if cos is not None:
            # the tables of an earlier layer that recorded these very tensors for the same slots (this prefill)
            same = [
                t
                for t in cache.shared_rope_tables()
                if t.last_source is not None and t.last_source[0] == 0 and t.last_source[1] is cos
                and t.batch_size == batch
            ]  # fmt: skip
            tables = same[0] if same else SlotRopeTables(batch, cos.shape[-1], cos.dtype, key.device)
        dtype = key_dtype or gate.k_proj.weight.dtype
        layer = CompressedKeys(batch, gate.num_kv_heads, gate.gate_dim, dtype, key.device, tables, adapter_name)
        cache.seer_keys[layer_idx] = layer
    if layer.adapter_name != adapter_name:
        raise DecodeCacheError(
            f"layer {layer_idx}: this cache's compressed keys were made by adapter {layer.adapter_name!r}, but "
            f"{adapter_name!r} is active; switch adapters between generations, not within one."
        )
    if layer.n_slots + new_tokens != kv_len or layer.batch_size != batch:
        raise DecodeCacheError(
            f"layer {layer_idx}: the K-compression cache holds {layer.n_slots} slots x {layer.batch_size} rows but "
            f"the KV cache now has {kv_len} slots (after {new_tokens} new) x {batch} rows; the KV cache was changed "
            "without going through SeerDynamicCache (crop / reorder_cache / batch_select_indices)."
        )
    layer.append_slots(new_tokens, cos, sin)
    done, complete = layer.n_blocks, kv_len // block_size
    if complete > done:
        start, stop = done * block_size, complete * block_size
        valid = None if token_valid is None else token_valid[:, start:stop]
        tables = (None, None) if cos is None else (layer.cos[:, start:stop], layer.sin[:, start:stop])
        new_keys = compress_key_blocks(gate, key[:, :, start:stop], *tables, valid, rope_style)  # [B, Hkv, n_new, G]
        new_valid = (
            torch.ones(batch, complete - done, dtype=torch.bool, device=key.device)
            if valid is None
            else key_block_has_tokens(valid, block_size)
        )
        layer.append_blocks(new_keys, new_valid)
    layer.mark_partial_block(block_size)
    return layer


class StaticStepBlocks(NamedTuple):
    """Where a static decoding step's token sits, as device tensors shared by every layer of the step.

    Attributes:
        block: long ``[1]``: the key block holding the new token (the current block).
        rows: long ``[block_size]``: the cache slots of that block (clamped to the capacity).
        valid: bool ``[B, block_size]``: those slots hold a real token written so far.
        block_valid: bool ``[B, 1]``: the block holds one (always True: the new token is real).
    """

    block: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor
    block_valid: torch.Tensor


def static_step_blocks(slot: torch.Tensor, token_valid: torch.Tensor, block_size: int) -> StaticStepBlocks:
    """`StaticStepBlocks` of the token at ``slot`` (long ``[1]``) given the padding mask ``token_valid [B, C]``."""
    capacity = token_valid.shape[1]
    device = token_valid.device
    block = torch.div(slot, block_size, rounding_mode="floor")  # [1]
    wanted = block * block_size + torch.arange(block_size, device=device)  # [bs]
    rows = wanted.clamp(max=capacity - 1)  # a capacity that is not a multiple of block_size: a shorter last block
    valid = token_valid.index_select(1, rows) & (wanted < capacity)  # [B, bs]
    return StaticStepBlocks(block, rows, valid, valid.any(dim=-1, keepdim=True))


def update_compressed_keys_static(
    layer: CompressedKeys,
    gate: DecodeGate,
    key: torch.Tensor,
    slot: torch.Tensor,
    blocks: StaticStepBlocks,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_style: str,
) -> None:
    """The K-compression update of one shape-static decoding step (no host synchronisation, CUDA-graph capturable).

    Writes the new token's RoPE tables at ``slot`` and recompresses the block holding it from its slots written so
    far: every step, so the block's compressed key is final at its last slot, when it becomes an earlier block (the
    dynamic path compresses it once, then; both pool the same slots with the same kernel). The buffers must have been
    sized by `CompressedKeys.reserve`.

    Args:
        key: the layer's whole key buffer ``[B, Hkv, C, D]`` (post-RoPE, the new token written at ``slot``).
        slot: long ``[1]`` on the device: the new token's cache slot.
        blocks: the step's `StaticStepBlocks` (from the padding mask: True for real tokens written so far).
        cos, sin: RoPE tables of the new token ``[B or 1, 1, r]`` (``None``: no RoPE).
    """
    keys, valid_blocks, _, _ = layer.static_buffers()
    block, rows, valid = blocks.block, blocks.rows, blocks.valid
    tables = (None, None) if cos is None else layer.tables.static_block_tables(slot, rows, cos, sin)
    # the block's key slots by advanced indexing, not index_select (8 against 3 us for a 16-slot block, see above)
    new_key = compress_key_blocks(gate, key[:, :, rows], *tables, valid, rope_style)  # [B, Hkv, 1, G]
    keys.index_copy_(2, block, new_key.to(keys.dtype))
    valid_blocks.index_copy_(1, block, blocks.block_valid)


def select_decode_blocks(
    logits: torch.Tensor,
    candidate_valid: torch.Tensor,
    sink_block: torch.Tensor,
    n_blocks: int,
    *,
    method: str,
    block_size: int,
    token_budget: int,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept key blocks of one decoding step, one list per KV head.

    A decoding step is one query row per KV head whose diagonal block is the current one, so this goes through the
    prefill's block selection (`seer_adapter.kernels.select_block_lists`: one fused Triton launch on CUDA instead of
    some twenty small PyTorch ops per layer and step): the current block gets no gate score and is kept as the local
    block, the sink is kept, padding-only blocks are never chosen.

    Args:
        logits: decode-gate logits ``[B, Hkv, n_blocks - 1]`` of the strictly earlier blocks.
        candidate_valid: bool ``[B, n_blocks - 1]``: the block holds a real token.
        sink_block: long ``[B]``: first block with a real token (always kept).
        n_blocks: key blocks of the cache, ``ceil(Sk / block_size)``; block ``n_blocks - 1`` holds the new token
            and is always kept.
        method: ``"token_budget"`` (``token_budget // block_size`` blocks in all, forced ones included) or
            ``"threshold"`` (gate probability over the valid earlier blocks ``> threshold``).

    Returns:
        ``indices`` int32 ``[B, Hkv, W]`` (ascending; entries past ``counts`` are unspecified), ``counts`` int32
        ``[B, Hkv]`` and ``allowed`` int32 ``[B, Hkv]`` (blocks holding a real token, the current one included: the
        density denominator).
    """
    batch, hkv, n_candidates = logits.shape
    if n_candidates != n_blocks - 1 or tuple(candidate_valid.shape) != (batch, n_candidates):
        raise ValueError(
            f"logits [B, Hkv, n_blocks - 1] and candidate_valid [B, n_blocks - 1] expected for n_blocks={n_blocks}, "
            f"got {tuple(logits.shape)} and {tuple(candidate_valid.shape)}"
        )
    scores = with_current_block(logits)
    valid = torch.cat((candidate_valid, candidate_valid.new_ones(batch, 1)), dim=-1)  # [B, nB]
    return select_scored_blocks(
        scores, valid, sink_block, method=method, block_size=block_size, token_budget=token_budget, threshold=threshold
    )


def with_current_block(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, Hkv, n]`` of the earlier blocks -> fp32 selection scores ``[B, Hkv, 1, n + 1]``.

    The appended current block gets the lowest finite float: it is never scored and always kept, so it must take no
    softmax mass (threshold) and rank last, and a row with nothing earlier must stay free of NaN."""
    batch, hkv, _ = logits.shape
    current = logits.new_full((batch, hkv, 1), torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.cat((logits.float(), current), dim=-1)[:, :, None]


def select_scored_blocks(
    scores: torch.Tensor,
    valid: torch.Tensor,
    sink_block: torch.Tensor,
    *,
    method: str,
    block_size: int,
    token_budget: int,
    threshold: float,
    current_block: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`select_decode_blocks` on scores already laid out for selection (what `decode_gate_scores` returns).

    Args:
        scores: fp32 ``[B, Hkv, 1, n_blocks]``: the earlier blocks' logits, then the current block's, which must
            be the lowest finite float (`with_current_block`).
        valid: bool ``[B, n_blocks]``: the block holds a real token (the current one does).
        sink_block, method, block_size, token_budget, threshold: as `select_decode_blocks`.
        current_block: long ``[1]`` on the device (shape-static steps): the current block, when it is not the last
            column; the blocks after it are not allowed (their scores must be the lowest float as well).
    """
    from .kernels import select_block_lists

    if method not in ("token_budget", "threshold"):
        raise ValueError(f"unknown decode selection method {method!r}; expected 'token_budget' or 'threshold'")
    if method == "token_budget" and token_budget < block_size:
        raise ValueError(f"token_budget={token_budget} is below one block ({block_size} tokens)")
    n_blocks = scores.shape[-1]
    lists, allowed = select_block_lists(
        scores,
        method=method,
        block_size=block_size,
        q_len=1,
        kv_len=n_blocks * block_size,  # the query is the cache's last slot: its block is the diagonal
        block_valid=valid,
        threshold=threshold,
        token_budget=token_budget,
        sink_block=sink_block,
        force_local_block=True,
        local_block=current_block,
    )
    return lists.indices[:, :, 0], lists.counts[:, :, 0], allowed[:, :, 0]
