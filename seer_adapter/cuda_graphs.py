"""Static decoding steps on a `SeerStaticCache`, captured once and replayed as a CUDA graph.

Why: eager ``generate()`` of a Llama-3-8B-shaped model at batch 8 spends ~25 ms per step on the host (Python, the
attention interface, kernel launches) even at a 2k context, where the GPU needs a few ms; at 64k the dense step is
~30 ms, so no attention kernel can make eager decoding 2x faster (``benchmarks/README.md``). A CUDA graph replays
every kernel of a step from one host call.

How: a graph fixes every shape and address, while the cache grows each step. `SeerStaticCache` keeps every buffer
at its full capacity and, during a *static step*, the new token's slot in a device tensor; the attention function
(`seer_adapter.attention`) reads whole buffers with a ``[B, max_cache_len]`` padding mask instead of host lengths.
This module turns a single-token forward into such a step:

1. `SeerStaticCache.begin_static_step` checks the cache and writes the slot;
2. the step's tensor inputs are copied into persistent buffers (the 2-D attention mask padded to the capacity;
   ``position_ids`` / ``cache_position`` made from the slot when the caller gave none, so nothing is baked in);
3. on CUDA with ``cuda_graph=True`` the forward is captured the first time (after two warm-up runs that compile
   the Triton kernels) and replayed afterwards; elsewhere it runs eagerly (the same code path: what the CPU tests
   compare against the dynamic cache);
4. `SeerStaticCache.end_static_step` advances the host-side lengths.

A capture is reused while its *signature* holds: batch and input shapes, the non-tensor arguments, the adapter's
settings (active adapter, on/off, every config field), grad mode, the kernel backend choice and the addresses of
the cache buffers. Anything else re-captures (e.g. ``set_sparsity`` between generations), never replays a stale
graph.

`install_static_decoding` wraps the transformers model's ``forward`` (an instance attribute, removed by `unload`),
so ``model.generate(..., past_key_values=SeerStaticCache(...))`` uses static steps with no other change.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .decode import SeerStaticCache
from .kernels import ENV_BACKEND

_CACHE_KWARGS = ("past_key_values", "cache")
_ORIGINAL_FORWARD_ATTR = "_seer_original_forward"


def _step_cache(args: tuple, kwargs: dict[str, Any]) -> SeerStaticCache | None:
    """The `SeerStaticCache` of a single-token forward with a non-empty cache (keyword arguments only), else None."""
    if args:
        return None
    cache = next((kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None), None)
    if not isinstance(cache, SeerStaticCache) or cache.get_seq_length() == 0:
        return None
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[1] != 1:
        return None
    return cache


def install_static_decoding(model: nn.Module) -> None:
    """Route single-token forwards of ``model`` on a `SeerStaticCache` through `StaticStepRunner` (idempotent).

    The wrapper is a method bound to ``model`` with the class's ``forward`` signature (transformers inspects it), so
    a deep copy of the model rebinds it to the copy. The adapter's `SeerRuntime` (``model._seer_runtime``) is part
    of a capture's signature."""
    if _ORIGINAL_FORWARD_ATTR in model.__dict__:
        return
    class_forward = type(model).forward

    @functools.wraps(class_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = functools.partial(class_forward, self)
        cache = _step_cache(args, kwargs)
        if cache is None:
            return original(*args, **kwargs)
        runner = cache.graph_runner
        if not isinstance(runner, StaticStepRunner) or runner.model is not self:
            runner = cache.graph_runner = StaticStepRunner(cache, self)
        return runner(kwargs)

    model.__dict__[_ORIGINAL_FORWARD_ATTR] = class_forward
    model.forward = types.MethodType(forward, model)


def uninstall_static_decoding(model: nn.Module) -> None:
    """Undo `install_static_decoding`."""
    if model.__dict__.pop(_ORIGINAL_FORWARD_ATTR, None) is not None:
        model.__dict__.pop("forward", None)


def _runtime_signature(runtime: Any) -> tuple:
    """What of the adapter's state a captured step depends on (Python decisions baked into the graph)."""
    return (
        runtime.active_adapter,
        runtime.adapter_enabled,
        repr(runtime.config),
        runtime.distillation is None,
        runtime.decode_block_scorer,  # None (the decode gate) or the evaluation scorer object itself
        runtime.record_gate_outputs,
        os.environ.get(ENV_BACKEND, ""),
    )


def _buffer_addresses(cache: SeerStaticCache) -> tuple[int, ...]:
    addresses = [t.data_ptr() for layer in cache.layers for t in (layer._key_buffer, layer._value_buffer)]
    for compressed in cache.seer_keys.values():
        addresses += [t.data_ptr() for t in compressed.static_buffers() if t is not None]
    return tuple(addresses)


def _clone_outputs(output: Any) -> Any:
    """A copy of a captured step's output whose tensors are not overwritten by the next replay."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return type(output)(_clone_outputs(item) for item in output)
    if isinstance(output, dict):  # transformers' ModelOutput
        return type(output)(**{key: _clone_outputs(value) for key, value in output.items()})
    return output


class StaticStepRunner:
    """Runs the single-token forwards of one `SeerStaticCache` as static steps (see the module docstring).

    Args:
        cache: the cache the steps decode into.
        model: the transformers model (wrapped by `install_static_decoding`; its class's ``forward`` runs the step,
            its ``_seer_runtime`` holds the adapter's state).

    Attributes:
        captures: how many times a graph was captured (tests and benchmarks read it).
    """

    def __init__(self, cache: SeerStaticCache, model: nn.Module):
        self.cache = cache
        self.model = model
        self.forward: Callable[..., Any] = functools.partial(type(model).forward, model)
        self.runtime = model._seer_runtime
        parameters = inspect.signature(type(model).forward).parameters
        self._derived = [name for name in ("position_ids", "cache_position") if name in parameters]
        self._buffers: dict[str, torch.Tensor] = {}
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_output: Any = None
        self._signature: tuple | None = None
        self._updated_layers: set[int] = set()  # layers whose compressed keys the captured step updates
        self._stats: dict[int, dict[str, Any]] = {}  # runtime.stats entries the captured step writes
        self.captures = 0

    def __call__(self, kwargs: dict[str, Any]) -> Any:
        cache = self.cache
        slot = cache.begin_static_step()
        completed = False
        try:
            inputs = self._static_inputs(kwargs, slot)
            device = cache.static_slot.device
            if not (cache.cuda_graph and device.type == "cuda"):
                output = self.forward(**inputs)
            else:
                signature = self._signature_of(inputs)
                if signature != self._signature:
                    self._capture(inputs, device)
                    self._signature = signature
                self._graph.replay()
                # the Python side effects of a step, which a replay does not run: what the capture recorded
                cache.mark_static_updates(self._updated_layers)
                self.runtime.stats.update(self._stats)
                output = _clone_outputs(self._graph_output)
            completed = True
            return output
        finally:
            cache.end_static_step(completed)

    def _buffer(self, name: str, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The persistent input buffer ``name`` (re-made when shape, dtype or device change)."""
        shape = tuple(like.shape) if shape is None else shape
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return buffer

    def _static_inputs(self, kwargs: dict[str, Any], slot: int) -> dict[str, Any]:
        """The forward's keyword arguments with every tensor in a persistent buffer (see the module docstring)."""
        cache = self.cache
        inputs = dict(kwargs)
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        batch, device = tokens.shape[0], tokens.device
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, slot + 1, dtype=torch.long, device=device)
        if mask.dim() != 2 or mask.shape != (batch, slot + 1):
            raise ValueError(
                f"a static decoding step takes a 2-D attention_mask [batch, cached + 1] = [{batch}, {slot + 1}]; got "
                f"{tuple(mask.shape)}"
            )
        padded = self._buffer("attention_mask", mask, (batch, cache.max_cache_len))
        padded[:, slot + 1 :].zero_()
        padded[:, : slot + 1].copy_(mask)
        inputs["attention_mask"] = padded
        for name in self._derived:
            if kwargs.get(name) is None:  # the model would make it from the host length: make it on the device
                position = torch.empty((1, 1) if name == "position_ids" else (1,), dtype=torch.long, device=device)
                inputs[name] = self._buffer(name, position).fill_(slot)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and name != "attention_mask":
                inputs[name] = self._buffer(name, value).copy_(value)
        return inputs

    def _signature_of(self, inputs: dict[str, Any]) -> tuple:
        tensors = tuple(
            (name, tuple(value.shape), value.dtype, value.data_ptr())
            for name, value in sorted(inputs.items())
            if isinstance(value, torch.Tensor)
        )
        others = tuple(
            (name, repr(value))
            for name, value in sorted(inputs.items())
            if not isinstance(value, torch.Tensor) and name not in _CACHE_KWARGS
        )
        return (
            tensors,
            others,
            _runtime_signature(self.runtime),
            torch.is_grad_enabled(),
            _buffer_addresses(self.cache),
        )

    def _capture(self, inputs: dict[str, Any], device: torch.device) -> None:
        """Warm up (Triton compilation, lazy allocations) on a side stream, then capture one step.

        The warm-up runs write the same slot the replay writes again: a step is idempotent for its slot."""
        self._graph = self._graph_output = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(**inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.forward(**inputs)
        except RuntimeError as error:  # e.g. a host synchronisation inside the model (dynamic RoPE scaling)
            raise RuntimeError(
                f"capturing the decoding step of {type(self.model).__name__} as a CUDA graph failed ({error}); "
                "create the cache with SeerStaticCache(..., cuda_graph=False) to run the same static steps eagerly, "
                "or decode with SeerDynamicCache."
            ) from error
        self._graph, self._graph_output = graph, output
        self._updated_layers = set(self.cache.static_updates)
        self._stats = {layer: dict(stats) for layer, stats in self.runtime.stats.items()}
        self.captures += 1
