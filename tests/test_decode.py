"""Sparse decoding: decode gate, K-compression cache, per-step selection, end to end through generate()."""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch
from tiny_models import tiny_model
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from seer_adapter import (
    DecodeCacheError,
    DecodeGate,
    SeerAttentionConfig,
    SeerConfigError,
    SeerDynamicCache,
    SeerModel,
    SeerStaticCache,
    get_seer_model,
)
from seer_adapter.decode import select_decode_blocks
from seer_adapter.gate import pool_blocks
from seer_adapter.rope import apply_rope

BLOCK = 16
# The KV-cache argument of forward() / generate(): "cache" in recent transformers 5.x, "past_key_values" before.
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache(cache) -> dict:
    return {_CACHE_ARGUMENT: cache}


FAMILIES = ["llama", "qwen3", "phi", "gpt_neox", "gemma", "gemma2", "gpt2", "opt"]


def _config(**kw) -> SeerAttentionConfig:
    settings = dict(block_size=BLOCK, dense_below_length=0, sparsity_method="dense", decode_gate=True)
    settings.update(kw)
    return SeerAttentionConfig(**settings)


def _inputs(batch=2, length=50, pad_left=(0, 13), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pad_left):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def _randomise_decode_gates(model: SeerModel, seed: int = 0) -> None:
    """Random decode-gate weights: the mean-pooling prior would hide head-order or position bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates().values():
            for param in gate.decode.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _compressed(cache: SeerDynamicCache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {i: (layer.keys, layer.block_valid) for i, layer in sorted(cache.seer_keys.items())}


def _feed(model, ids, mask, cache, start, stop):
    """Feed tokens ``start:stop`` one at a time (decode steps), as generate() would."""
    for t in range(start, stop):
        model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **_cache(cache), use_cache=True)


# ------------------------------------------------------------------------------------------------------
# decode gate module
# ------------------------------------------------------------------------------------------------------
def test_decode_gate_prior_merges_the_group_by_its_mean():
    gate = DecodeGate(num_q_heads=6, num_kv_heads=2, head_dim=8, gate_dim=8, block_size=4, k_pooling=["max", "avg"])
    q = torch.randn(2, 6, 3, 8)
    merged = gate.query(q)  # no RoPE
    torch.testing.assert_close(merged, q.view(2, 2, 3, 3, 8).mean(dim=2))
    k = torch.randn(2, 2, 12, 8)
    pooled = pool_blocks(k, 4, ["max", "avg"], None)
    torch.testing.assert_close(gate.keys(pooled), pool_blocks(k, 4, ["avg"], None))
    normed = DecodeGate(6, 2, 8, 8, 4, ["max", "avg"], k_norm=True)
    with torch.no_grad():
        normed.k_norm.copy_(torch.arange(16.0).view(2, 8))
    projected = gate.keys(pooled)
    want = projected / projected.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * torch.arange(16.0).view(1, 2, 1, 8)
    torch.testing.assert_close(normed.keys(pooled), want)
    with pytest.raises(ValueError, match="Hq=6"):
        gate.query(torch.randn(2, 4, 1, 8))
    with pytest.raises(ValueError, match="k_pooled"):
        gate.keys(torch.randn(2, 2, 3, 8))


def test_decode_gate_with_several_queries_merges_their_scores():
    """m gate queries per KV head: each starts as the mean of its share of the group's heads (m = g: one head each).
    A block's logit is the log of the mean of the queries' softmaxes over the allowed blocks (the default mixture)
    or the logsumexp of their logits; m must divide the group."""
    gate = DecodeGate(6, 2, 8, 8, 4, ["max", "avg"], num_queries=3)
    assert gate.query_merge == "mixture"
    q = torch.randn(2, 6, 5, 8)
    queries = gate.query(q).unflatten(-1, (3, 8))  # [B, Hkv, N, m, G], no RoPE
    torch.testing.assert_close(queries, q.view(2, 2, 3, 5, 8).transpose(2, 3))
    halves = DecodeGate(4, 1, 8, 8, 4, ["avg"], num_queries=2).query(q[:, :4]).unflatten(-1, (2, 8))
    torch.testing.assert_close(halves, q[:, :4].view(2, 1, 2, 2, 5, 8).mean(dim=3).transpose(2, 3))
    k_gate = torch.randn(2, 2, 7, 8) * 3
    per_head = torch.einsum("bhmnd,bhkd->bhmnk", q.view(2, 2, 3, 5, 8), k_gate) / math.sqrt(8)  # [B, Hkv, m, N, nB]
    allowed = torch.rand(2, 1, 5, 7) > 0.3
    allowed[0, 0, 1] = False  # a row with no allowed block stays finite
    mixture = gate.logits(gate.query(q), k_gate, allowed)
    masked = per_head.masked_fill(~allowed[:, :, None], float("-inf"))
    want = torch.softmax(masked, dim=-1).nan_to_num(0.0).mean(dim=2).log()  # log of the mean distribution
    torch.testing.assert_close(mixture.masked_fill(~allowed, 0.0), want.masked_fill(~allowed, 0.0))
    assert mixture.isfinite().all()
    logsumexp = DecodeGate(6, 2, 8, 8, 4, ["max", "avg"], num_queries=3, query_merge="logsumexp")
    torch.testing.assert_close(logsumexp.logits(logsumexp.query(q), k_gate, allowed), per_head.logsumexp(dim=2))
    with pytest.raises(ValueError, match="query_merge"):
        DecodeGate(6, 2, 8, 8, 4, ["avg"], num_queries=3, query_merge="max")
    # RoPE rotates each gate query at the token's position, as it does the single merged query
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    rotated = gate.query(q, cos, sin).unflatten(-1, (3, 8))
    for j in range(3):
        torch.testing.assert_close(rotated[..., j, :], apply_rope(queries[..., j, :], cos, sin, "half"))
    with pytest.raises(ValueError, match="must divide the GQA group of 3"):
        DecodeGate(6, 2, 8, 8, 4, ["avg"], num_queries=2)
    with pytest.raises(SeerConfigError, match="decode_gate_queries=3 must divide this model's GQA group of 2"):
        get_seer_model(tiny_model("llama"), _config(decode_gate_queries=3))
    with pytest.raises(SeerConfigError, match="decode_gate_queries"):
        SeerAttentionConfig(decode_gate_queries=0)
    with pytest.raises(SeerConfigError, match="decode_gate_query_merge must be one of"):
        SeerAttentionConfig(decode_gate_query_merge="mean")
    # configs written before the merge field had several queries merged by logsumexp: they keep that meaning
    old = SeerAttentionConfig(decode_gate=True, decode_gate_queries=3).to_dict()
    del old["decode_gate_query_merge"]
    assert SeerAttentionConfig.from_dict(old).decode_gate_query_merge == "logsumexp"
    assert SeerAttentionConfig.from_dict({**old, "decode_gate_queries": 1}).decode_gate_query_merge == "mixture"


def test_several_gate_queries_decode_statically_and_round_trip(tmp_path):
    """Two gate queries per KV head: the fused decode scores (dynamic and shape-static steps) select what the
    gate's own logits do; the weights save and load with the field, and generation is unchanged by the round trip."""
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK, decode_gate_queries=2))
    _randomise_decode_gates(model, seed=12)
    gate = next(iter(model.gates().values())).decode
    assert gate.num_queries == 2 and gate.q_proj.weight.shape == (2, 2 * 16, 2 * 16)
    ids, mask = _inputs(batch=2, length=70, pad_left=(0, 9), seed=12)
    want_seq, want = _generate_logits(model, ids, mask, max_new_tokens=20, do_sample=False)
    static = SeerStaticCache(config=model.base_model.config, max_cache_len=100)
    got_seq, got = _generate_logits(model, ids, mask, max_new_tokens=20, do_sample=False, **_cache(static))
    assert torch.equal(got_seq, want_seq)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "two")
    from seer_adapter.adapter_info import format_report, inspect_adapter

    assert "2 gate queries per KV head (mixture merge)" in format_report(inspect_adapter(tmp_path / "two"))
    loaded = SeerModel.from_pretrained(model.unload(), tmp_path / "two")
    assert loaded.peft_config["default"].decode_gate_queries == 2
    loaded_seq, _ = _generate_logits(loaded, ids, mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(loaded_seq, want_seq)
    with pytest.raises(SeerConfigError, match="decode_gate_queries"):
        loaded.set_sparsity(decode_gate_queries=1)


def test_config_knobs_are_validated():
    with pytest.raises(SeerConfigError, match="below one block"):
        SeerAttentionConfig(block_size=64, decode_block_size=None, decode_token_budget=32)
    with pytest.raises(SeerConfigError, match="decode_method"):
        SeerAttentionConfig(decode_method="top_p")
    with pytest.raises(SeerConfigError, match="decode_threshold"):
        SeerAttentionConfig(decode_threshold=1.5)
    model = get_seer_model(tiny_model("llama"), _config())
    with pytest.raises(SeerConfigError, match="decode_gate"):
        model.set_sparsity(decode_gate=False)
    assert model.set_sparsity(decode_token_budget=48).decode_token_budget == 48


def test_select_decode_blocks_budget_threshold_and_forced_blocks():
    logits = torch.tensor([[[0.0, 5.0, 1.0, 4.0, -1.0]]])  # [B=1, Hkv=1, 5 earlier blocks]; block 5 holds the query
    valid = torch.tensor([[False, True, True, True, True]])  # block 0 is all padding: the sink is block 1
    sink = torch.tensor([1])
    idx, cnt, allowed = select_decode_blocks(
        logits, valid, sink, 6, method="token_budget", block_size=4, token_budget=16, threshold=0.5
    )
    assert cnt.tolist() == [[4]] and idx[0, 0, :4].tolist() == [1, 2, 3, 5]  # sink 1, current 5, top-2 {3, 2}
    assert allowed.tolist() == [[5]]  # blocks 1-4 and the current one hold real tokens
    idx, cnt, _ = select_decode_blocks(
        logits, valid, sink, 6, method="threshold", block_size=4, token_budget=16, threshold=0.2
    )
    assert idx[0, 0, : int(cnt)].tolist() == [1, 3, 5]
    # a prompt shorter than one block: nothing earlier, only the current block
    idx, cnt, _ = select_decode_blocks(
        torch.zeros(2, 3, 0), torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, dtype=torch.long), 1,
        method="token_budget", block_size=4, token_budget=4, threshold=0.5,
    )  # fmt: skip
    assert cnt.tolist() == [[1] * 3] * 2 and bool((idx[..., 0] == 0).all())
    with pytest.raises(ValueError, match="below one block"):
        select_decode_blocks(logits, valid, sink, 6, method="token_budget", block_size=4, token_budget=3, threshold=0.5)


def _naive_select_decode_blocks(
    logits: torch.Tensor,
    candidate_valid: torch.Tensor,
    sink_block: torch.Tensor,
    n_blocks: int,
    *,
    method: str,
    block_size: int,
    token_budget: int,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode selection written out with a boolean mask (the oracle of `select_decode_blocks`).

    Args:
        logits: decode-gate logits ``[B, Hkv, n_blocks - 1]`` of the strictly earlier blocks.
        candidate_valid: bool ``[B, n_blocks - 1]``: the block holds a real token.
        sink_block: long ``[B]``: first block with a real token (always kept).
        n_blocks: key blocks of the cache, ``ceil(Sk / block_size)``; block ``n_blocks - 1`` holds the new token
            and is always kept.
        method: ``"token_budget"`` (``token_budget // block_size`` blocks in all, forced ones included) or
            ``"threshold"`` (gate probability over the valid earlier blocks ``> threshold``).

    Returns:
        ``indices`` int32 ``[B, Hkv, W]`` (ascending; entries past ``counts`` are ``n_blocks``, past the end) and
        ``counts`` int32 ``[B, Hkv]``.
    """
    batch, hkv, n_candidates = logits.shape
    if n_candidates != n_blocks - 1 or tuple(candidate_valid.shape) != (batch, n_candidates):
        raise ValueError(
            f"logits [B, Hkv, n_blocks - 1] and candidate_valid [B, n_blocks - 1] expected for n_blocks={n_blocks}, "
            f"got {tuple(logits.shape)} and {tuple(candidate_valid.shape)}"
        )
    device = logits.device
    blocks = torch.arange(n_blocks, device=device)
    keep = (blocks == n_blocks - 1).expand(batch, hkv, n_blocks).clone()  # [B, Hkv, nB]
    keep |= (blocks[None, :] == sink_block[:, None])[:, None, :]
    if n_candidates:
        scores = logits.float().masked_fill(~candidate_valid[:, None, :], float("-inf"))
        if method == "token_budget":
            if token_budget < block_size:
                raise ValueError(f"token_budget={token_budget} is below one block ({block_size} tokens)")
            extra = min(max(token_budget // block_size - 2, 0), n_candidates)
            if extra:
                ranked = scores.masked_fill((blocks[:n_candidates] == sink_block[:, None])[:, None, :], float("-inf"))
                values, picked = ranked.topk(extra, dim=-1)
                chosen = torch.zeros_like(keep[..., :n_candidates]).scatter_(-1, picked, torch.isfinite(values))
                keep[..., :n_candidates] |= chosen
        elif method == "threshold":
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            keep[..., :n_candidates] |= probs > threshold
        else:
            raise ValueError(f"unknown decode selection method {method!r}; expected 'token_budget' or 'threshold'")
    counts = keep.sum(dim=-1, dtype=torch.int32)
    order = torch.where(keep, blocks, n_blocks).sort(dim=-1).values  # kept blocks first, ascending
    width = n_blocks if method == "threshold" else min(n_blocks, max(token_budget // block_size, 2))
    return order[..., :width].to(torch.int32), counts


@pytest.mark.parametrize("method", ["token_budget", "threshold"])
def test_select_decode_blocks_matches_the_mask_definition(method):
    """Through the prefill's block selection, the decode selection keeps exactly the blocks of its definition:
    random logits, padding-only blocks, sinks past block 0 (one equal to the current block), several budgets."""
    gen = torch.Generator().manual_seed(11)
    for n_blocks, budget, threshold in [(1, 64, 0.5), (2, 128, 0.3), (9, 256, 0.05), (40, 640, 0.01), (40, 64, 0.9)]:
        batch, hkv = 3, 2
        logits = torch.randn(batch, hkv, n_blocks - 1, generator=gen) * 3
        valid = torch.rand(batch, n_blocks - 1, generator=gen) > 0.2
        sink = torch.tensor([0, min(3, n_blocks - 1), n_blocks - 1])
        valid[1, : sink[1]] = False  # padding before the sink
        valid[2] = False  # nothing earlier is real: the sink is the current block
        for row in (0, 1):
            if sink[row] < n_blocks - 1:
                valid[row, sink[row]] = True  # the sink block holds the first real token
        options = dict(method=method, block_size=64, token_budget=budget, threshold=threshold)
        idx, cnt, allowed = select_decode_blocks(logits, valid, sink, n_blocks, **options)
        want_idx, want_cnt = _naive_select_decode_blocks(logits, valid, sink, n_blocks, **options)
        assert torch.equal(cnt, want_cnt), (n_blocks, budget)
        for b in range(batch):
            for h in range(hkv):
                assert idx[b, h, : cnt[b, h]].tolist() == want_idx[b, h, : want_cnt[b, h]].tolist()
        assert torch.equal(allowed, (valid.sum(-1, dtype=torch.int32) + 1)[:, None].expand(batch, hkv))


# ------------------------------------------------------------------------------------------------------
# K-compression cache
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,k_norm", [("llama", False), ("phi", True), ("gpt_neox", False)])
def test_incremental_compression_equals_full_recomputation(family, k_norm):
    """Compressed keys of a sequence prefilled at once == prefilled in part and decoded token by token (left padding,
    a prompt shorter than one block on the padded row), so block RoPE uses the same positions in both."""
    model = get_seer_model(tiny_model(family), _config(decode_k_norm=k_norm))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=70, pad_left=(0, 13), seed=1)
    full = DynamicCache()
    model(input_ids=ids, attention_mask=mask, **_cache(full), use_cache=True)
    assert isinstance(full, SeerDynamicCache)  # converted in place
    stepped = SeerDynamicCache()
    model(input_ids=ids[:, :20], attention_mask=mask[:, :20], **_cache(stepped), use_cache=True)
    _feed(model, ids, mask, stepped, 20, 70)
    want, got = _compressed(full), _compressed(stepped)
    assert sorted(got) == sorted(want) == sorted(model.gates())
    for layer, (keys, valid) in want.items():
        assert keys.shape == (2, model.config.num_key_value_heads, 70 // BLOCK, 16)
        torch.testing.assert_close(got[layer][0], keys, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[layer][1], valid)
        assert valid[1].tolist() == [True] * 4 and valid[0].tolist() == [True] * 4


def test_crop_and_reorder_keep_the_compression_in_step():
    model = get_seer_model(tiny_model("llama"), _config())
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=60, pad_left=(0, 5), seed=2)
    cache = SeerDynamicCache()
    model(input_ids=ids[:, :30], attention_mask=mask[:, :30], **_cache(cache), use_cache=True)
    other = torch.randint(3, 128, (2, 20))
    wrong_ids, wrong_mask = torch.cat((ids[:, :30], other), 1), mask[:, :50]
    _feed(model, wrong_ids, wrong_mask, cache, 30, 50)  # 20 tokens that get cropped away (into block 1)
    cache.crop(0)  # transformers' convention: a no-op
    assert all(layer.n_slots == 50 and layer.keys.shape[2] == 3 for layer in cache.seer_keys.values())
    cache.crop(-27)  # back to 23 slots: block 1 (slots 16..31) is no longer complete
    assert all(layer.n_slots == 23 and layer.keys.shape[2] == 1 for layer in cache.seer_keys.values())
    _feed(model, ids, mask, cache, 23, 60)
    full = SeerDynamicCache()
    model(input_ids=ids, attention_mask=mask, **_cache(full), use_cache=True)
    for layer, (keys, valid) in _compressed(full).items():
        torch.testing.assert_close(cache.seer_keys[layer].keys, keys, atol=1e-5, rtol=1e-5)
        assert torch.equal(cache.seer_keys[layer].block_valid, valid)
    # beam-search reordering swaps rows of the compression cache with the KV cache
    before = {i: layer.keys.clone() for i, layer in cache.seer_keys.items()}
    cache.reorder_cache(torch.tensor([1, 0]))
    for i, layer in cache.seer_keys.items():
        assert torch.equal(layer.keys, before[i].flip(0))
    cache.batch_repeat_interleave(2)
    assert all(layer.keys.shape[0] == 4 and layer.cos.shape[0] == 4 for layer in cache.seer_keys.values())


def test_cache_changed_behind_its_back_or_unsupported_cache_is_a_clear_error():
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=BLOCK))
    ids, mask = _inputs(batch=1, length=40, pad_left=(0,))
    cache = SeerDynamicCache()
    model(input_ids=ids[:, :30], attention_mask=mask[:, :30], **_cache(cache), use_cache=True)
    for layer in cache.layers:  # crop the KV cache without telling the compression cache
        layer.keys, layer.values = layer.keys[:, :, :25], layer.values[:, :, :25]
    with pytest.raises(DecodeCacheError, match="without going through SeerDynamicCache"):
        model(input_ids=ids[:, 25:26], attention_mask=mask[:, :26], **_cache(cache), use_cache=True)

    class OtherCache(DynamicCache):  # any cache type but DynamicCache / SeerDynamicCache
        pass

    with pytest.raises(DecodeCacheError, match="OtherCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, **_cache(OtherCache()), pad_token_id=0)

    # a cache filled before the decode gate saw it: dense decoding goes on, sparse decoding names the problem
    base = model.unload()
    early = DynamicCache()
    base(input_ids=ids[:, :30], attention_mask=mask[:, :30], **_cache(early), use_cache=True)
    model = get_seer_model(base, _config(decode_method="dense"))
    model(input_ids=ids[:, 30:31], attention_mask=mask[:, :31], **_cache(early), use_cache=True)
    model.set_sparsity(decode_method="token_budget")
    with pytest.raises(DecodeCacheError, match="already held 31 tokens"):
        model(input_ids=ids[:, 31:32], attention_mask=mask[:, :32], **_cache(early), use_cache=True)
    # switching adapters within one generation would mix two gates' compressed keys
    model.add_adapter("other", _config(decode_token_budget=BLOCK))
    cache = SeerDynamicCache()
    model(input_ids=ids[:, :30], attention_mask=mask[:, :30], **_cache(cache), use_cache=True)
    model.set_adapter("other")
    with pytest.raises(DecodeCacheError, match="adapter 'default'"):
        model(input_ids=ids[:, 30:31], attention_mask=mask[:, :31], **_cache(cache), use_cache=True)


# ------------------------------------------------------------------------------------------------------
# sparse decoding end to end
# ------------------------------------------------------------------------------------------------------
def _generate_logits(model, ids, mask, **kwargs):
    out = model.generate(
        ids, attention_mask=mask, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs
    )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_sparse_decode_equals_dense(family):
    """A budget covering the whole context keeps every block: greedy decoding == the base model (fp32)."""
    base = tiny_model(family)
    ids, mask = _inputs(batch=2, length=45, pad_left=(0, 30), seed=3)
    want_seq, want = _generate_logits(base, ids, mask, max_new_tokens=25, do_sample=False)
    model = get_seer_model(base, _config(decode_token_budget=128))
    _randomise_decode_gates(model)
    got_seq, got = _generate_logits(model, ids, mask, max_new_tokens=25, do_sample=False)
    stats = [row for row in model.sparsity_stats() if row["layer"] in model.gates()]  # gemma2: sliding layers ungated
    assert {row.get("phase") for row in stats} == {"decode"} and all(row["density"] == 1.0 for row in stats)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_seq, want_seq)


def test_bf16_model_decodes_sparsely():
    """A bf16 model (fp32 gate) runs the whole decode path; logits stay close to the base model's."""
    base = tiny_model("llama", dtype=torch.bfloat16)
    ids, mask = _inputs(batch=2, length=45, pad_left=(0, 20), seed=12)
    _, want = _generate_logits(base, ids, mask, max_new_tokens=6, do_sample=False)
    model = get_seer_model(base, _config(decode_token_budget=128))
    _, got = _generate_logits(model, ids, mask, max_new_tokens=6, do_sample=False)
    assert {row.get("phase") for row in model.sparsity_stats()} == {"decode"}
    # steps 1.. are decode steps; bf16 rounding differs from the base model's SDPA, hence the tolerance
    torch.testing.assert_close(got[:, 1:3].float(), want[:, 1:3].float(), atol=0.1, rtol=0.05)


def test_full_budget_sampling_and_beam_search_equal_dense():
    base = tiny_model("qwen2")
    ids, mask = _inputs(batch=2, length=40, pad_left=(3, 0), seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    torch.manual_seed(0)
    sampled = base.generate(ids, do_sample=True, top_k=0, **kwargs)
    beams = base.generate(ids, num_beams=3, num_return_sequences=2, do_sample=False, **kwargs)
    model = get_seer_model(base, _config(decode_token_budget=64))
    _randomise_decode_gates(model)
    torch.manual_seed(0)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=0, **kwargs), sampled)
    assert torch.equal(model.generate(ids, num_beams=3, num_return_sequences=2, do_sample=False, **kwargs), beams)


def test_prompt_lookup_decoding_crops_and_equals_dense():
    """Prompt-lookup (assisted) decoding verifies several tokens per forward and crops rejected ones."""
    base = tiny_model("llama")
    ids, _ = _inputs(batch=1, length=40, pad_left=(0,), seed=4)
    ids = torch.cat((ids, ids[:, :20]), dim=1)  # a repetition, so the lookup proposes candidates
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False, pad_token_id=0)
    want = base.generate(ids, prompt_lookup_num_tokens=4, **kwargs)
    model = get_seer_model(base, _config(decode_token_budget=256))
    _randomise_decode_gates(model)
    crops = []
    original_crop = SeerDynamicCache.crop

    def counting_crop(self, tokens_to_remove):
        crops.append(tokens_to_remove)
        return original_crop(self, tokens_to_remove)

    SeerDynamicCache.crop = counting_crop
    try:
        got = model.generate(ids, prompt_lookup_num_tokens=4, **kwargs)
    finally:
        SeerDynamicCache.crop = original_crop
    assert torch.equal(got, want)
    assert any(n < 0 for n in crops)  # some candidates were rejected and cropped


def test_decode_block_size_is_the_decode_gates_own(tmp_path):
    """``decode_block_size`` sets the decode gate's blocks apart from the prefill gate's: validated, fixed once
    trained, saved; decoding keeps whole decode blocks within the budget and distillation trains at that size."""
    from seer_adapter.distill import distillation_loss

    with pytest.raises(SeerConfigError, match="decode_block_size must be a power of two"):
        SeerAttentionConfig(decode_block_size=24)
    with pytest.raises(SeerConfigError, match="below one block of the decode gate"):
        SeerAttentionConfig(block_size=64, decode_block_size=32, decode_token_budget=16)
    config = SeerAttentionConfig(block_size=64, decode_block_size=16, decode_token_budget=32)  # < one prefill block
    assert config.effective_decode_block_size == 16 and SeerAttentionConfig().effective_decode_block_size == 16
    assert SeerAttentionConfig(decode_block_size=None).effective_decode_block_size == 64  # None: the prefill's block
    assert SeerAttentionConfig.from_dict(config.to_dict()) == config
    # a file written before the field existed (default then: the prefill's block) keeps meaning 64-token decode blocks
    # for its trained decode gate; without a decode gate it has nothing to keep and takes today's default
    old_file = {k: v for k, v in SeerAttentionConfig(decode_gate=True).to_dict().items() if k != "decode_block_size"}
    assert SeerAttentionConfig.from_dict(old_file).effective_decode_block_size == 64
    assert SeerAttentionConfig.from_dict({**old_file, "decode_gate": False}).decode_block_size == 16
    model = get_seer_model(tiny_model("llama"), _config(block_size=4 * BLOCK, decode_block_size=BLOCK))
    assert all(g.block_size == 4 * BLOCK and g.decode.block_size == BLOCK for g in model.gates().values())
    with pytest.raises(SeerConfigError, match="decode_block_size"):
        model.set_sparsity(decode_block_size=2 * BLOCK)
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=100, pad_left=(0, 30), seed=6)
    model.set_sparsity(decode_token_budget=3 * BLOCK)
    model.runtime.record_gate_outputs = True
    model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for module in model.base_model.modules():
        state = getattr(module, "seer_state", None)
        if state is not None:
            kept = state.last_block_mask  # [B, Hkv, nB] of the last step: 105 slots in 16-token blocks
            assert kept.shape[-1] == 7 and int(kept.sum(-1).max()) <= 3 + 1  # budget, plus the sink
    _, per_layer = distillation_loss(model, ids, mask)
    assert all(math.isfinite(v) for v in per_layer.values())
    # saved and loaded like any adapter: the decode gates keep their blocks and decode the same tokens and logits
    model.runtime.record_gate_outputs = False
    want_seq, want = _generate_logits(model, ids, mask, max_new_tokens=8, do_sample=False)
    model.save_pretrained(tmp_path)
    reloaded = SeerModel.from_pretrained(model.unload(), tmp_path)
    assert reloaded.peft_config["default"].decode_block_size == BLOCK
    assert all(g.block_size == 4 * BLOCK and g.decode.block_size == BLOCK for g in reloaded.gates().values())
    got_seq, got = _generate_logits(reloaded, ids, mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got_seq, want_seq)
    torch.testing.assert_close(got, want)


def test_small_budget_is_sparse_keeps_forced_blocks_and_handles_ragged_rows():
    """Budget of one block (the current one; the sink comes on top), rows of very different lengths (100 vs 4 real
    tokens), a prompt shorter than one block on the short row."""
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=100, pad_left=(0, 96), seed=5)
    model.runtime.record_gate_outputs = True
    seq = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert seq.shape == (2, 120)
    rows = model.sparsity_stats()
    assert all(row["phase"] == "decode" and row["kept_blocks"] < row["causal_blocks"] for row in rows)
    for module in model.base_model.modules():
        state = getattr(module, "seer_state", None)
        if state is None:
            continue
        kept = state.last_block_mask  # [B, Hkv, nB] of the last step: 119 slots -> 8 blocks
        assert kept.shape[-1] == 8 and bool(kept[..., 7].all()) and bool(kept[0, :, 0].all())
        assert bool(kept[1, :, 6].all())  # row 1's sink is its first real block (slot 96 -> block 6)
        assert int(kept[0].sum(-1).max()) <= 2
    # the budget changes at run time and a whole-context budget gives dense decoding again
    model.set_sparsity(decode_method="threshold", decode_threshold=0.05)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0).shape == (2, 103)


def test_layer_overrides_set_each_layers_decode_selection():
    """``layer_overrides`` with decode fields: a layer marked dense decodes densely (no sparse stats), a layer with a
    whole-context budget keeps every block while the others keep two, and overriding every layer to dense equals
    the global dense decoding; a whole-context budget on every layer equals it too."""
    layers = 3
    base = tiny_model("llama", num_hidden_layers=layers)
    ids, mask = _inputs(batch=2, length=100, pad_left=(0, 37), seed=8)
    overrides = {"0": {"decode_method": "dense"}, "1": {"decode_token_budget": 256}}
    model = get_seer_model(base, _config(decode_token_budget=2 * BLOCK, layer_overrides=overrides))
    _randomise_decode_gates(model)
    _, mixed = _generate_logits(model, ids, mask, max_new_tokens=6, do_sample=False)
    rows = {row["layer"]: row for row in model.sparsity_stats()}
    assert rows[0]["mode"] != "sparse"
    assert rows[1]["mode"] == "sparse" and rows[1]["density"] == 1.0
    assert all(rows[i]["kept_blocks"] < rows[i]["causal_blocks"] for i in range(2, layers))
    model.set_sparsity(decode_method="dense")
    _, dense = _generate_logits(model, ids, mask, max_new_tokens=6, do_sample=False)
    assert not torch.allclose(mixed[:, 1:], dense[:, 1:])
    every_dense = {i: {"decode_method": "dense"} for i in range(layers)}
    model.set_sparsity(decode_method="token_budget", layer_overrides=every_dense)
    _, every_layer_dense = _generate_logits(model, ids, mask, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(every_layer_dense, dense, atol=1e-5, rtol=1e-5)
    model.set_sparsity(layer_overrides={i: {"decode_token_budget": 256} for i in range(layers)})
    _, whole_budget = _generate_logits(model, ids, mask, max_new_tokens=6, do_sample=False)
    assert all(row["density"] == 1.0 for row in model.sparsity_stats())
    torch.testing.assert_close(whole_budget, dense, atol=1e-4, rtol=1e-4)
    with pytest.raises(SeerConfigError, match=r"layer_overrides\['2'\]\.decode_token_budget"):
        model.set_sparsity(layer_overrides={2: {"decode_token_budget": BLOCK // 2}})


def test_sparse_or_dense_prefill_with_sparse_decode():
    base = tiny_model("llama")
    ids, mask = _inputs(batch=2, length=64, pad_left=(0, 7), seed=6)
    for prefill in ({"sparsity_method": "nz_ratio", "nz_ratio": 0.3}, {"dense_below_length": 10_000}):
        model = get_seer_model(base, _config(**prefill, decode_token_budget=128))
        _randomise_decode_gates(model)
        _, sparse = _generate_logits(model, ids, mask, max_new_tokens=8, do_sample=False)
        model.set_sparsity(decode_method="dense")
        _, dense = _generate_logits(model, ids, mask, max_new_tokens=8, do_sample=False)
        torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
        model.set_sparsity(decode_method="token_budget", decode_token_budget=BLOCK)
        _, small = _generate_logits(model, ids, mask, max_new_tokens=8, do_sample=False)
        assert small.shape == dense.shape and not torch.allclose(small[:, 1:], dense[:, 1:])
        base = model.unload()


# ------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_with_decode_gate_and_old_adapters(tmp_path):
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=32, decode_k_norm=True))
    _randomise_decode_gates(model, seed=7)
    ids, mask = _inputs(batch=2, length=40, pad_left=(0, 4), seed=7)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path / "both")
    with open(tmp_path / "both" / "adapter_config.json") as f:
        assert json.load(f)["decode_gate"] is True
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "both" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.seer_gate.decode.q_proj.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.seer_gate.decode.k_norm"].shape == (2, 16)
    from seer_adapter.adapter_info import format_report, inspect_adapter

    report = format_report(inspect_adapter(tmp_path / "both"))
    assert "Decode gate: token_budget (token budget 32" in report and "K RMSNorm True" in report
    assert f"{BLOCK}-token blocks" in report
    assert "| decode_gate | " in (tmp_path / "both" / "README.md").read_text()
    loaded = SeerModel.from_pretrained(model.unload(), tmp_path / "both")
    for a, b in zip(model.gates().values(), loaded.gates().values(), strict=True):
        assert b.decode is not None and torch.equal(a.decode.q_proj.weight, b.decode.q_proj.weight)
    assert torch.equal(
        loaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0), want
    )
    # an adapter written before decode gates existed: no decode keys in its config or weights
    base = loaded.unload()
    old = get_seer_model(base, SeerAttentionConfig(block_size=BLOCK))
    old.save_pretrained(tmp_path / "old")
    path = os.path.join(tmp_path, "old", "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    for name in ("decode_gate", "decode_k_norm", "decode_method", "decode_token_budget", "decode_threshold"):
        del data[name]
    with open(path, "w") as f:
        json.dump(data, f)
    assert "Decode gate: none" in format_report(inspect_adapter(tmp_path / "old"))
    reloaded = SeerModel.from_pretrained(old.unload(), tmp_path / "old")
    assert all(gate.decode is None for gate in reloaded.gates().values())
    with pytest.raises(Exception, match="unexpected"):  # decode weights onto a config without a decode gate
        SeerModel.from_pretrained(reloaded.unload(), tmp_path / "both", decode_gate=False)


# ------------------------------------------------------------------------------------------------------
# decode-gate distillation
# ------------------------------------------------------------------------------------------------------
def _naive_decode_target(q, k, block_size, padding, target="max"):
    """Loop-by-loop statement of the target (independent of the vectorised reference)."""
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    group, n_blocks = hq // hkv, -(-length // block_size)
    out = torch.zeros(batch, hkv, length, n_blocks)
    for b in range(batch):
        for t in range(length):
            if not padding[b, t]:
                continue
            keys = [j for j in range(t + 1) if padding[b, j]]
            for h in range(hkv):
                best = torch.zeros(n_blocks)
                for head in range(h * group, (h + 1) * group):
                    scores = torch.stack([q[b, head, t] @ k[b, h, j] / dim**0.5 for j in keys])
                    probs = scores.softmax(0)
                    for p, j in zip(probs, keys, strict=True):
                        if target == "max":
                            best[j // block_size] = max(best[j // block_size], p)
                        else:  # the group's probability mass per block
                            best[j // block_size] += p
                best[t // block_size :] = 0
                if best.sum() > 0:
                    out[b, h, t] = best / best.sum()
    return out


def test_decode_target_reference_matches_the_definition(monkeypatch):
    from seer_adapter.kernels import decode_ground_truth

    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 4, 21, 8, generator=gen), torch.randn(2, 2, 21, 8, generator=gen)
    padding = torch.ones(2, 21, dtype=torch.bool)
    padding[1, :6] = False
    want = _naive_decode_target(q, k, 4, padding)
    got = decode_ground_truth.decode_block_ground_truth_reference(q, k, block_size=4, key_padding_mask=padding)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[:, :, :4], torch.zeros(2, 2, 4, 6))  # first block: nothing earlier
    rows = torch.tensor([3, 4, 9, 20])  # a subset of token positions: the same rows of the full target
    subset = decode_ground_truth.decode_block_ground_truth_reference(
        q, k, block_size=4, key_padding_mask=padding, query_rows=rows
    )
    torch.testing.assert_close(subset, got[:, :, rows])
    monkeypatch.setattr(decode_ground_truth, "_MAX_SCORE_ELEMENTS", 50)  # chunks of one row
    chunked = decode_ground_truth.decode_block_ground_truth_reference(q, k, block_size=4, key_padding_mask=padding)
    torch.testing.assert_close(chunked, got)
    chunked = decode_ground_truth.decode_block_ground_truth_reference(
        q, k, block_size=4, key_padding_mask=padding, query_rows=rows
    )
    torch.testing.assert_close(chunked, subset)
    with pytest.raises(ValueError, match="query_rows"):
        decode_ground_truth.decode_block_ground_truth_reference(q, k, block_size=4, query_rows=torch.tensor([21]))
    # the mass target: summed probabilities instead of maxima, chunked or not
    mass = decode_ground_truth.decode_block_ground_truth_reference(
        q, k, block_size=4, key_padding_mask=padding, target="mass"
    )
    torch.testing.assert_close(mass, _naive_decode_target(q, k, 4, padding, "mass"), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(mass, got)
    with pytest.raises(ValueError, match="decode target must be one of"):
        decode_ground_truth.decode_block_ground_truth_reference(q, k, block_size=4, target="sum")


def test_decode_target_rows_and_the_subsampled_loss():
    """A fraction of the tokens (evenly strided after the skipped ones, the last included) gives the rows of the
    full target and logits; fraction 1 is the full loss."""
    from seer_adapter.attention import compute_decode_gate_logits
    from seer_adapter.distill import GateDistillationHook, block_kl_loss, decode_target_rows
    from seer_adapter.kernels import decode_block_ground_truth

    assert decode_target_rows(10, 0.25, 1.0, "cpu").tolist() == list(range(2, 10))
    assert decode_target_rows(10, 0.0, 0.25, "cpu").tolist() == [1, 5, 9]
    assert decode_target_rows(64, 0.25, 0.5, "cpu").tolist() == list(range(17, 64, 2))
    with pytest.raises(ValueError, match="decode_token_fraction"):
        GateDistillationHook(decode_token_fraction=0.0)
    # no fraction given: all tokens where the target is the Triton kernel, a quarter on the PyTorch reference
    from seer_adapter.distill import default_decode_token_fraction
    from seer_adapter.kernels import available_backends

    cpu = torch.device("cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEER_ADAPTER_KERNEL", "reference")
        assert default_decode_token_fraction(cpu, 1, 14, 16384) == 0.25
        if "triton" in available_backends("decode_ground_truth"):
            patch.setenv("SEER_ADAPTER_KERNEL", "triton")
            assert default_decode_token_fraction(cpu, 1, 14, 16384) == 1.0
            # an 8B model (32 query heads) at 128k: the per-layer record stays under 1 GiB of fp32
            fraction = default_decode_token_fraction(cpu, 1, 32, 131072)
            rows = decode_target_rows(131072, 0.25, fraction, "cpu").numel()
            assert 0.03 < fraction < 0.05 and rows * 32 * 2048 * 4 <= 2**30
            # the default kernel reduces the group in registers: its record has the KV heads' rows only (16-token
            # blocks: 8192 of them at 128k), so 4x the tokens fit; the per-head kernel's record is 4x larger
            grouped = default_decode_token_fraction(cpu, 1, 32, 131072, block_size=16, kv_heads=8)
            assert 2**29 <= decode_target_rows(131072, 0.25, grouped, "cpu").numel() * 8 * 8192 * 4 <= 2**30
            patch.setenv("SEER_ADAPTER_KERNEL", "triton_per_head")
            per_head = default_decode_token_fraction(cpu, 1, 32, 131072, block_size=16, kv_heads=8)
            assert per_head == pytest.approx(grouped / 4)
    model = get_seer_model(tiny_model("qwen3"), _config())
    _randomise_decode_gates(model, seed=4)
    ids, mask = _inputs(batch=2, length=70, pad_left=(0, 11), seed=4)
    seen = {}

    def hook(module, layer, query, key, value, attn_mask, scaling, **kwargs):
        padding = attn_mask.key_padding_mask
        rows = decode_target_rows(query.shape[2], 0.25, 0.25, query.device)
        full_logits = compute_decode_gate_logits(layer, module, query, key, padding)
        sub_logits = compute_decode_gate_logits(layer, module, query, key, padding, query_rows=rows)
        torch.testing.assert_close(sub_logits, full_logits[:, :, rows])
        full_target = decode_block_ground_truth(query, key, block_size=BLOCK, scale=scaling, key_padding_mask=padding)
        seen[layer.layer_idx] = block_kl_loss(full_target, full_logits, 0.25)
        return GateDistillationHook.__call__(whole, module, layer, query, key, value, attn_mask, scaling, **kwargs)

    whole = GateDistillationHook(skip_first_fraction=0.25, decode_token_fraction=1.0)
    model.runtime.distillation = hook
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    model.runtime.distillation = None
    # fraction 1: the decode part of each layer loss is exactly the full-target loss
    for layer, want in seen.items():
        torch.testing.assert_close(whole.decode_losses[layer], want)


@pytest.mark.parametrize("num_queries", [1, 2])
@pytest.mark.parametrize("prefill_block", [BLOCK, 2 * BLOCK], ids=["one_block_size", "decode_block_smaller"])
def test_training_logits_equal_decoding_logits(prefill_block, num_queries):
    """The decode gate sees the same positions in training (every token of a prefill) and in decoding. The budget
    covers the context so that the layers' inputs are the same in both runs. With a prefill block twice the decode
    block, the decode gate still scores (and trains on) its own BLOCK-token blocks."""
    from seer_adapter.attention import compute_decode_gate_logits
    from seer_adapter.kernels import block_sparse_attention_reference

    config = _config(
        block_size=prefill_block, decode_block_size=BLOCK, decode_token_budget=128, decode_gate_queries=num_queries
    )
    model = get_seer_model(tiny_model("qwen3"), config)
    _randomise_decode_gates(model, seed=9)
    ids, mask = _inputs(batch=2, length=60, pad_left=(0, 11), seed=9)
    captured = {}

    def hook(module, layer, query, key, value, attn_mask, scaling, **kwargs):
        padding = attn_mask.key_padding_mask
        captured[layer.layer_idx] = compute_decode_gate_logits(layer, module, query, key, padding)
        assert captured[layer.layer_idx].shape[-1] == -(-query.shape[2] // BLOCK)
        n = -(-query.shape[2] // prefill_block)
        every = torch.ones(query.shape[0], key.shape[1], n, n, dtype=torch.bool)
        return block_sparse_attention_reference(
            query, key, value, every, block_size=prefill_block, scale=scaling, key_padding_mask=padding
        )

    model.runtime.distillation = hook
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    model.runtime.distillation = None
    model.runtime.record_gate_outputs = True
    cache = SeerDynamicCache()
    model(input_ids=ids[:, :20], attention_mask=mask[:, :20], **_cache(cache), use_cache=True)
    states = {m.seer_state.layer_idx: m.seer_state for m in model.base_model.modules() if hasattr(m, "seer_state")}
    for t in range(20, 60):
        _feed(model, ids, mask, cache, t, t + 1)
        earlier = t // BLOCK
        for layer, logits in captured.items():
            want = torch.softmax(logits[:, :, t, :earlier].float(), dim=-1).nan_to_num(0.0)
            torch.testing.assert_close(states[layer].last_gate_probs, want, atol=1e-5, rtol=1e-5)


def test_distillation_trains_the_decode_gate():
    from seer_adapter.distill import distillation_loss

    model = get_seer_model(tiny_model("llama"), _config())
    ids, mask = _inputs(batch=2, length=64, pad_left=(0, 9), seed=10)
    params = [p for gate in model.gates().values() for p in gate.decode.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss, _ = distillation_loss(model, ids, mask, skip_first_fraction=0.0, decode_loss_weight=1.0)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    # weight 0 trains the prefill gates alone: no gradient reaches the decode gates
    optimizer.zero_grad()
    distillation_loss(model, ids, mask, decode_loss_weight=0.0)[0].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in params)
    # the mass target is another loss (same prefill part), and the choice is validated
    _, by_max = distillation_loss(model, ids, mask, decode_target="max")
    _, by_mass = distillation_loss(model, ids, mask, decode_target="mass")
    assert by_max.keys() == by_mass.keys() and by_max != by_mass
    with pytest.raises(ValueError, match="decode_target must be one of"):
        distillation_loss(model, ids, mask, decode_target="sum")
    from seer_adapter.distill import DistillationArguments

    with pytest.raises(ValueError, match="decode_target must be one of"):
        DistillationArguments(output_dir="unused", decode_target="sum")
    # a tempered target is another loss too; temperatures must be positive numbers
    _, tempered = distillation_loss(model, ids, mask, decode_target_temperature=2.0)
    assert tempered.keys() == by_max.keys() and tempered != by_max
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="decode_target_temperature must be a positive number"):
            DistillationArguments(output_dir="unused", decode_target_temperature=bad)


def test_tempered_decode_target_is_the_renormalised_power():
    """temper_target: each row's target to the power 1/T, renormalised; empty rows stay empty; T = 1 is the identity;
    T > 1 flattens (the top block loses probability, the others gain relative to it)."""
    from seer_adapter.distill import temper_target

    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 5, 7, generator=gen) ** 4
    target[0, 1, 2] = 0.0  # a row without a target (a padding token)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    assert temper_target(target, 1.0) is target
    got = temper_target(target, 2.0)
    want = target.sqrt() / target.sqrt().sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[0, 1, 2], torch.zeros(7))
    sums = got.sum(-1)
    torch.testing.assert_close(sums[sums > 0], torch.ones_like(sums[sums > 0]))
    assert bool((got.amax(-1)[sums > 0] < target.amax(-1)[sums > 0]).all())
    sharper = temper_target(target, 0.5)
    assert bool((sharper.amax(-1)[sums > 0] > target.amax(-1)[sums > 0]).all())


def test_train_gates_logs_the_decode_gate_loss(tmp_path):
    """Each log record carries the decode gates' own KL (mean over layers): it falls on a repeated sequence, and is
    None for an adapter without decode gates."""
    from seer_adapter.distill import DistillationArguments, train_gates

    ids, _ = _inputs(batch=1, length=64, pad_left=(0,), seed=12)
    args = dict(max_steps=12, seq_len=64, warmup_steps=1, learning_rate=3e-2, progress=False)
    model = get_seer_model(tiny_model("llama"), _config())
    records = train_gates(model, [ids[0]] * 12, DistillationArguments(output_dir=str(tmp_path / "a"), **args))
    decode = [r["decode_loss"] for r in records]
    assert all(isinstance(value, float) and value > 0 for value in decode) and decode[-1] < decode[0]
    logged = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["decode_loss"] for r in logged] == decode
    plain = get_seer_model(tiny_model("llama"), SeerAttentionConfig(block_size=BLOCK))
    records = train_gates(
        plain, [ids[0]] * 2, DistillationArguments(output_dir=str(tmp_path / "b"), **args | {"max_steps": 2})
    )
    assert [r["decode_loss"] for r in records] == [None, None]


def test_peft_route_decodes_sparsely_and_round_trips(tmp_path):
    """get_peft_model / PeftModel.from_pretrained carry the decode gate too (generate() through peft)."""
    from peft import PeftModel, get_peft_model

    base = tiny_model("llama")
    ids, mask = _inputs(batch=2, length=40, pad_left=(0, 6), seed=11)
    want = base.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    peft_model = get_peft_model(base, _config(decode_token_budget=64))
    got = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert {row.get("phase") for row in peft_model.base_model.sparsity_stats()} == {"decode"}
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(peft_model.unload(), tmp_path)
    assert all(gate.decode is not None for gate in reloaded.base_model.gates().values())


# ----------------------------------------------------------------------------------------- decode quality evaluation
def test_evaluate_decode_full_budget_equals_dense_and_small_budget_differs():
    from seer_adapter.evaluation import decode_continuation, evaluate_decode, format_decode_table

    model = get_seer_model(tiny_model("llama"), _config())
    _randomise_decode_gates(model)
    ids = torch.randint(3, 128, (2 * 150,), generator=torch.Generator().manual_seed(3))
    saved = model.peft_config["default"]
    rows = evaluate_decode(
        model, ids, 100, 50, max_windows=2, budgets=(BLOCK, 160), thresholds=(0.2,), greedy_tokens=12, progress=False
    )
    assert model.peft_config["default"] == saved  # settings restored
    assert [r["decode_method"] for r in rows] == ["dense", "token_budget", "token_budget", "threshold"]
    dense, small, full, threshold = rows
    assert all(r["tokens"] == 2 * 49 and r["windows"] == 2 for r in rows)
    assert dense["decode_density"] == 1.0 and dense["ppl_delta_pct"] == 0.0 and dense["top1_agreement"] == 100.0
    # a budget covering the whole context (150 tokens < 160) attends to every block: dense up to fp32 rounding
    assert full["decode_density"] == 1.0 and abs(full["ppl_delta_pct"]) < 1e-3
    assert full["top1_agreement"] == 100.0 and full["greedy_agreement"] == 100.0 and full["greedy_prefix"] == 12
    # one block of budget: the current block only (plus the sink), so sparse, and the model really changes
    assert 0.0 < small["decode_density"] < 0.5 and abs(small["ppl_delta_pct"]) > 0.01
    assert 0.0 < threshold["decode_density"] <= 1.0
    # the sparse rows' perplexity is the continuation's own, recomputed here with the setting by hand
    model.peft_config["default"] = saved.replace(decode_token_budget=BLOCK, dense_below_length=151)
    try:
        runs = [decode_continuation(model, ids[w * 150 : (w + 1) * 150], 100) for w in range(2)]
    finally:
        model.peft_config["default"] = saved
    assert small["ppl"] == pytest.approx(float(torch.tensor(sum(r["nll"] for r in runs) / 98).exp()), rel=1e-6)
    assert "token_budget" in format_decode_table(rows)


def test_budget_keeping_average():
    from seer_adapter.evaluation import budget_keeping_average

    assert budget_keeping_average(2048, 4096, 5, 24, 16) == 1504  # 5 * 4096 + 19 * 1504 <= 24 * 2048
    assert budget_keeping_average(2048, 4096, 0, 24, 16) == 2048
    assert budget_keeping_average(2048, 2048, 24, 24, 16) == 2048
    assert budget_keeping_average(100, 200, 1, 3, 16) == 48  # 50 rounded down to whole blocks
    with pytest.raises(ValueError, match="exceed the mean budget"):
        budget_keeping_average(2048, 4096, 24, 24, 16)
    with pytest.raises(ValueError, match="12 of 24 layers at 4096 tokens leave the other 12 less than one"):
        budget_keeping_average(2048, 4096, 12, 24, 16)


def test_decode_layer_sensitivity_sweeps_layers_and_returns_usable_overrides():
    """Per-layer sweep on a 3-layer model: rows in order, the model's settings restored (its own overrides kept
    under the sweep's), every layer dense equals dense decoding, and each row's ``layer_overrides`` reproduces its
    perplexity when a user sets them."""
    from seer_adapter.evaluation import decode_continuation, decode_layer_sensitivity, format_layer_sensitivity_table

    layers, window = 3, 150
    own = {"1": {"threshold": 0.01}}  # a prefill override of the adapter's own: kept, and restored after
    model = get_seer_model(tiny_model("llama", num_hidden_layers=layers), _config(layer_overrides=own))
    _randomise_decode_gates(model)
    ids = torch.randint(3, 128, (3 * window,), generator=torch.Generator().manual_seed(5))
    saved = model.peft_config["default"]
    rows = decode_layer_sensitivity(
        model, ids, 100, 50, budget=BLOCK, max_windows=2, top=(1, layers), uniform_budgets=(3 * BLOCK,),
        progress=False,
    )  # fmt: skip
    assert model.peft_config["default"] == saved
    assert [r["run"] for r in rows] == [
        "dense", "all sparse", "layer 0 overridden", "layer 1 overridden", "layer 2 overridden",
        "top 1 overridden", "top 3 overridden", f"all sparse at {3 * BLOCK}",
    ]  # fmt: skip
    dense, sparse, *per_layer = rows[:5]
    assert all(r["tokens"] == 2 * 49 for r in rows) and dense["ppl_delta_pct"] == 0.0
    assert dense["attended_fraction"] == 1.0 and 0.0 < sparse["attended_fraction"] < 0.5
    assert abs(sparse["ppl_delta_pct"]) > 0.01  # one block of budget really changes the model
    for row in per_layer:  # one of three layers dense: a third of the attention whole
        want = (2 * row["sparse_density"] + 1) / 3
        assert row["attended_fraction"] == pytest.approx(want)
    best = min(per_layer, key=lambda r: r["ppl"])
    assert rows[5]["layers_overridden"] == best["layers_overridden"] and rows[5]["ppl"] == pytest.approx(best["ppl"])
    assert rows[6]["layers_overridden"] == [0, 1, 2] and abs(rows[6]["ppl_delta_pct"]) < 1e-3  # all dense = dense
    assert rows[6]["recovered"] == pytest.approx(1.0, abs=1e-4) and rows[6]["attended_fraction"] == 1.0
    assert rows[7]["layer_overrides"] == {} and rows[7]["budget"] == 3 * BLOCK
    # a row's layer_overrides, set by a user on top of the budget, give the row's perplexity
    row = per_layer[1]
    assert row["layer_overrides"] == {"1": {"decode_method": "dense"}}
    merged = {"1": {**own["1"], **row["layer_overrides"]["1"]}}
    model.set_sparsity(decode_token_budget=BLOCK, dense_below_length=window + 1, layer_overrides=merged)
    runs = [decode_continuation(model, ids[w * window : (w + 1) * window], 100) for w in range(2)]
    assert row["ppl"] == pytest.approx(float(torch.tensor(sum(r["nll"] for r in runs) / 98).exp()), rel=1e-6)
    model.peft_config["default"] = saved
    table = format_layer_sensitivity_table(rows)
    assert '{"0": {"decode_method": "dense"}, "1": {"decode_method": "dense"}, "2"' in table

    # given sets with a layer budget (validation on other windows): every layer sparse, so the density counts all
    given = decode_layer_sensitivity(
        model, ids, 100, 50, budget=BLOCK, layer_budget=4 * BLOCK, first_window=1, max_windows=None,
        layer_sets=[[2, 0]], progress=False,
    )  # fmt: skip
    assert [r["run"] for r in given] == ["dense", "all sparse", "2 given overridden"]
    assert given[0]["tokens"] == 2 * 49  # windows 1 and 2 of the three
    assert given[2]["layer_overrides"] == {"0": {"decode_token_budget": 4 * BLOCK}, "2": {"decode_token_budget": 64}}
    assert given[2]["attended_fraction"] == given[2]["sparse_density"] > given[1]["sparse_density"]
    assert given[2]["mean_budget"] == (4 * BLOCK * 2 + BLOCK) / 3
    # keep_average: a set costs no more than the uniform budget; the row's budget and overrides reproduce it
    balanced = decode_layer_sensitivity(
        model, ids, 100, 50, budget=2 * BLOCK, layer_budget=4 * BLOCK, max_windows=2, layer_sets=[[1]],
        keep_average=True, progress=False,
    )  # fmt: skip
    row = balanced[2]
    assert row["budget"] == BLOCK and row["mean_budget"] == balanced[1]["mean_budget"] == 2 * BLOCK
    assert row["layer_overrides"] == {"1": {"decode_token_budget": 4 * BLOCK}}
    merged = {"1": {**own["1"], **row["layer_overrides"]["1"]}}
    model.set_sparsity(decode_token_budget=row["budget"], dense_below_length=window + 1, layer_overrides=merged)
    runs = [decode_continuation(model, ids[w * window : (w + 1) * window], 100) for w in range(2)]
    assert row["ppl"] == pytest.approx(float(torch.tensor(sum(r["nll"] for r in runs) / 98).exp()), rel=1e-6)
    model.peft_config["default"] = saved
    assert "decode_token_budget=16" in format_layer_sensitivity_table(balanced)
    for bad, match in [
        ({"budget": BLOCK, "keep_average": True, "layer_sets": [[1]]}, "keep_average needs a layer_budget"),
        (
            {"budget": 2 * BLOCK, "layer_budget": 4 * BLOCK, "keep_average": True, "layer_sets": [[0, 1]]},
            "leave the other 1 less than one 16-token block",
        ),
        ({"budget": 2 * BLOCK, "layer_budget": 4 * BLOCK, "keep_average": True, "top": (2,)}, "less than one"),
        ({"budget": BLOCK // 2}, "below one block"),
        ({"budget": BLOCK, "layer_budget": 3}, "layer_budget=3 is below one block"),
        ({"budget": BLOCK, "layer_sets": [[0, 7]]}, r"gated layers \[0, 1, 2\]"),
        ({"budget": BLOCK, "layer_sets": []}, r"non-empty sets of gated layers"),
        ({"budget": BLOCK, "top": (4,)}, r"top sizes must lie in 1..3"),
        ({"budget": BLOCK, "first_window": 3}, "need 4 windows"),
        ({"budget": BLOCK, "selector": "random"}, "selector must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            decode_layer_sensitivity(model, ids, 100, 50, progress=False, **bad)
    plain = get_seer_model(tiny_model("llama"), _config(decode_gate=False))
    with pytest.raises(ValueError, match="no decode gate"):
        decode_layer_sensitivity(plain, ids, 100, 50, budget=BLOCK, progress=False)
    assert model.peft_config["default"] == saved


def _naive_decode_oracle(query, key, padding, block_size, scale, n_earlier, target="max"):
    """log of: per strictly earlier block, the largest attention probability of the group's heads (or their summed
    probability mass), renormalised."""
    batch, hq, _, head_dim = query.shape
    hkv = key.shape[1]
    scores = torch.einsum("bhgd,bhsd->bhgs", query.view(batch, hkv, hq // hkv, head_dim).double(), key.double())
    scores = (scores * scale).masked_fill(~padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)[..., : n_earlier * block_size]
    blocks = probs.unflatten(-1, (n_earlier, block_size))  # [B, Hkv, g, n_earlier, bs]
    per_block = blocks.amax(-1).amax(2) if target == "max" else blocks.sum(dim=(-1, 2))  # [B, Hkv, n_earlier]
    return (per_block / per_block.sum(-1, keepdim=True)).log()


@pytest.mark.parametrize("prefill_block", [BLOCK, 4 * BLOCK], ids=["one_block_size", "decode_block_smaller"])
def test_decode_scorers_match_their_definitions_and_replace_the_gate(prefill_block):
    """The scorers work on the decode gate's blocks (``decode_block_size``), whatever the prefill gate's block."""
    from seer_adapter.evaluation import DECODE_SCORERS, decode_block_scorer, moba_decode_scorer, oracle_decode_scorer

    model = get_seer_model(tiny_model("llama"), _config(block_size=prefill_block, decode_block_size=BLOCK))
    layer = next(m.seer_state for m in model.base_model.modules() if hasattr(m, "seer_state"))
    gen = torch.Generator().manual_seed(11)
    batch, hq, hkv, head_dim, kv_len = 2, 4, 2, 8, 3 * BLOCK + 5  # the query's block (3) is partial
    query = torch.randn(batch, hq, 1, head_dim, generator=gen)
    key = torch.randn(batch, hkv, kv_len, head_dim, generator=gen)
    padding = torch.ones(batch, kv_len, dtype=torch.bool)
    padding[1, :7] = False  # left padding on row 1
    got = oracle_decode_scorer(None, layer, query, key, padding, 0.3, 3, None)
    assert got.shape == (batch, hkv, 3)
    want = _naive_decode_oracle(query, key, padding, BLOCK, 0.3, 3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    mass = DECODE_SCORERS["oracle_mass"](None, layer, query, key, padding, 0.3, 3, None)
    torch.testing.assert_close(mass.double(), _naive_decode_oracle(query, key, padding, BLOCK, 0.3, 3, "mass"),
                               atol=1e-5, rtol=0)  # fmt: skip
    moba = moba_decode_scorer(None, layer, query, key, padding, 0.3, 3, None)
    k_mean = torch.stack([key[1, :, 7:BLOCK].mean(1), key[1, :, BLOCK : 2 * BLOCK].mean(1)], dim=1)  # row 1, blocks 0-1
    q_mean = query[1, :, 0].view(hkv, hq // hkv, head_dim).mean(1)
    torch.testing.assert_close(moba[1, :, :2], torch.einsum("hd,hkd->hk", q_mean, k_mean))

    # installed, the scorer is what a decoding step selects with (here: a spy returning the oracle)
    calls = []

    def spy(*args):
        calls.append(args[1].layer_idx)
        return DECODE_SCORERS["oracle"](*args)

    ids, mask = _inputs(batch=2, length=3 * BLOCK + 4, pad_left=(0, 5))
    model.set_sparsity(decode_method="token_budget", decode_token_budget=2 * BLOCK)
    model.runtime.decode_block_scorer = spy
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        model.runtime.decode_block_scorer = None
    layers = sorted({m.seer_state.layer_idx for m in model.base_model.modules() if hasattr(m, "seer_state")})
    assert sorted(set(calls)) == layers and len(calls) == len(layers)  # one decoding step
    with pytest.raises(ValueError, match="unknown decode selector"):
        with decode_block_scorer(model, "untrained"):
            pass


def test_evaluate_decode_runs_every_selector():
    from seer_adapter.evaluation import evaluate_decode, format_decode_table

    model = get_seer_model(tiny_model("llama"), _config())
    _randomise_decode_gates(model)
    ids = torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(3))
    rows = evaluate_decode(
        model, ids, 100, 50, budgets=(3 * BLOCK, 160), greedy_tokens=4, selectors=("gate", "oracle", "moba"),
        progress=False,
    )  # fmt: skip
    assert [(r["selector"], r.get("token_budget")) for r in rows] == [
        ("dense", None), ("gate", 3 * BLOCK), ("gate", 160), ("oracle", 3 * BLOCK), ("oracle", 160),
        ("moba", 3 * BLOCK), ("moba", 160),
    ]  # fmt: skip
    assert model.runtime.decode_block_scorer is None  # restored
    by_setting = {(r["selector"], r.get("token_budget")): r for r in rows}
    for name in ("gate", "oracle", "moba"):
        assert abs(by_setting[name, 160]["ppl_delta_pct"]) < 1e-3  # the whole context: dense whoever scores
        assert 0.0 < by_setting[name, 3 * BLOCK]["decode_density"] < 0.5
    # scorers really select differently at three blocks of budget (current and sink forced: one block chosen)
    assert len({round(by_setting[name, 3 * BLOCK]["ppl"], 6) for name in ("gate", "oracle", "moba")}) == 3
    assert "oracle" in format_decode_table(rows)
    from seer_adapter import cli
    from seer_adapter.config import QUERY_MERGES
    from seer_adapter.evaluation import DECODE_SELECTORS

    assert sorted(cli.DECODE_SELECTORS) == sorted(DECODE_SELECTORS)  # the CLI spells them out (no torch import)
    assert cli.QUERY_MERGES == QUERY_MERGES
    with pytest.raises(ValueError, match="decode selectors must be among"):
        evaluate_decode(model, ids, 100, 20, selectors=("random",), progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_evaluate_decode_on_static_steps_equals_the_dynamic_cache(family):
    """``cache="static"`` (CUDA-graph steps on a GPU, eager static steps here) scores the same continuations as the
    dynamic cache: perplexity, top-1 and greedy tokens and densities; Gemma-2's sliding layers keep every token."""
    from seer_adapter.evaluation import evaluate_decode

    model = get_seer_model(tiny_model(family), _config())
    _randomise_decode_gates(model)
    ids = torch.randint(3, 128, (2 * 120,), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_windows=2, budgets=(BLOCK, 3 * BLOCK), thresholds=(0.2,), greedy_tokens=10, progress=False)
    dynamic = evaluate_decode(model, ids, 90, 30, cache="dynamic", **kwargs)
    static = evaluate_decode(model, ids, 90, 30, cache="static", **kwargs)
    assert [r["cache"] for r in dynamic] == ["dynamic"] * 4 and [r["cache"] for r in static] == ["static"] * 4
    assert any(r["decode_density"] < 0.5 for r in static)  # really sparse somewhere
    for want, got in zip(dynamic, static, strict=True):
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
        assert got["decode_density"] == pytest.approx(want["decode_density"], rel=1e-6)
        assert (got["top1_agreement"], got["greedy_agreement"]) == (want["top1_agreement"], want["greedy_agreement"])
    # the parameter-free selectors on static steps too (the oracle at the static slot, blocks after it discarded)
    selectors = ("oracle", "oracle_mass", "moba")
    dynamic_scorers = evaluate_decode(model, ids, 90, 30, cache="dynamic", selectors=selectors, **kwargs)
    static_scorers = evaluate_decode(model, ids, 90, 30, cache="static", selectors=selectors, **kwargs)
    for want, got in zip(dynamic_scorers, static_scorers, strict=True):
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5) and got["cache"] == "static"
        assert got["decode_density"] == pytest.approx(want["decode_density"], rel=1e-6)
        assert (got["top1_agreement"], got["greedy_agreement"]) == (want["top1_agreement"], want["greedy_agreement"])
    # "auto" is dynamic off CUDA
    auto = evaluate_decode(model, ids, 90, 30, selectors=("gate", "oracle"), **kwargs)
    assert all(r["cache"] == "dynamic" for r in auto)
    with pytest.raises(ValueError, match="cache must be 'auto', 'dynamic' or 'static'"):
        evaluate_decode(model, ids, 90, 30, cache="paged", **kwargs)
    # windows decoded as one batch score what they score one at a time, on either cache
    for cache in ("dynamic", "static"):
        batched = evaluate_decode(model, ids, 90, 30, cache=cache, batch_size=2, **kwargs)
        for want, got in zip(dynamic, batched, strict=True):
            assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5) and got["windows"] == 2
            assert got["decode_density"] == pytest.approx(want["decode_density"], rel=1e-6)
            assert (got["top1_agreement"], got["greedy_agreement"], got["greedy_prefix"]) == (
                want["top1_agreement"], want["greedy_agreement"], want["greedy_prefix"]
            )  # fmt: skip
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_decode(model, ids, 90, 30, batch_size=0, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph decoding steps need a GPU")
def test_evaluate_decode_auto_uses_cuda_graph_steps_on_a_gpu():
    """On CUDA, "auto" decodes every setting from one CUDA graph per continuation (the oracle's too); the graph steps
    score what the dynamic cache scores."""
    from seer_adapter.evaluation import evaluate_decode

    model = get_seer_model(tiny_model("llama").cuda(), _config())
    _randomise_decode_gates(model)
    ids = torch.randint(3, 128, (2 * 120,), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_windows=2, budgets=(BLOCK, 3 * BLOCK), greedy_tokens=10, progress=False)
    auto = evaluate_decode(model, ids, 90, 30, selectors=("gate", "oracle"), **kwargs)
    dynamic = evaluate_decode(model, ids, 90, 30, selectors=("gate", "oracle"), cache="dynamic", **kwargs)
    assert [(r["selector"], r["cache"]) for r in auto] == [
        ("dense", "static"), ("gate", "static"), ("gate", "static"), ("oracle", "static"), ("oracle", "static")
    ]  # fmt: skip
    for want, got in zip(dynamic, auto, strict=True):
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
        assert got["decode_density"] == pytest.approx(want["decode_density"], rel=1e-6)
    # every selector under CUDA graphs (the oracle's target kernel at the device-side slot, no host sync)
    scorers = ("oracle", "oracle_mass", "moba")
    static = evaluate_decode(model, ids, 90, 30, selectors=scorers, cache="static", **kwargs)
    dynamic = evaluate_decode(model, ids, 90, 30, selectors=scorers, cache="dynamic", **kwargs)
    for want, got in zip(dynamic, static, strict=True):
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4) and got["cache"] == "static"
        assert got["decode_density"] == pytest.approx(want["decode_density"], rel=1e-6)


def test_decode_continuation_scores_exactly_the_teacher_forced_logits():
    """Dense decoding token by token scores the same NLL as one full forward over the window."""
    from seer_adapter.evaluation import decode_continuation

    base = tiny_model("llama")
    ids = torch.randint(3, 128, (90,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = base(ids[None]).logits[0].float()
    want = -torch.log_softmax(logits[60:-1], dim=-1).gather(1, ids[61:, None]).sum()
    got = decode_continuation(base, ids, 60, greedy_tokens=5)
    assert got["count"] == 29 and got["nll"] == pytest.approx(float(want), rel=1e-4)
    assert torch.equal(got["top1"], logits[60:-1].argmax(-1)) and got["decode_density"] == 1.0
    assert got["greedy"].numel() == 5 and int(got["greedy"][0]) == int(logits[59].argmax())


def test_evaluate_decode_bad_input_is_a_clear_error():
    from seer_adapter.evaluation import evaluate_decode

    ids = torch.randint(3, 128, (200,))
    no_gate = get_seer_model(tiny_model("llama"), _config(decode_gate=False))
    with pytest.raises(ValueError, match="no decode gate"):
        evaluate_decode(no_gate, ids, 100, 20, progress=False)
    model = get_seer_model(tiny_model("llama"), _config())
    with pytest.raises(ValueError, match="below one block"):
        evaluate_decode(model, ids, 100, 20, budgets=(BLOCK - 1,), progress=False)
    with pytest.raises(ValueError, match="need at least 300 tokens"):
        evaluate_decode(model, ids, 250, 50, progress=False)
    with pytest.raises(ValueError, match="prefill must be"):
        evaluate_decode(model, ids, 100, 20, prefill="sparse", progress=False)


# ----------------------------------------------------------------------------------------- growable KV layers
def test_growable_kv_layers_append_in_place_and_equal_concatenation():
    """SeerDynamicCache's layers write new slots into spare capacity (no whole-cache copy per step) and hold exactly
    what DynamicCache's concatenation holds, through crop, beam reordering and batch repetition."""
    from seer_adapter.decode import GrowableDynamicLayer

    gen = torch.Generator().manual_seed(0)
    ours, plain = SeerDynamicCache(), DynamicCache()

    def step(n):
        k, v = torch.randn(2, 3, n, 8, generator=gen), torch.randn(2, 3, n, 8, generator=gen)
        got, want = ours.update(k, v, 0), plain.update(k, v, 0)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        return got[0]

    first = step(300)
    assert isinstance(ours.layers[0], GrowableDynamicLayer)
    buffer = ours.layers[0]._key_buffer
    assert buffer.shape[2] == 300 + 256  # spare slots: max(256, n / 8)
    for _ in range(200):
        keys = step(1)
    assert keys.data_ptr() == first.data_ptr() == buffer.data_ptr()  # written in place, never copied
    ours.crop(-50)
    plain.crop(-50)
    step(3)  # the crop kept the view of the buffer: appends in place again
    assert ours.layers[0].keys.data_ptr() == buffer.data_ptr()
    for _ in range(120):  # 453 + 120 > 556 slots: one reallocation, the content intact
        step(1)
    assert ours.layers[0]._key_buffer.data_ptr() != buffer.data_ptr()
    beam = torch.tensor([1, 0])
    ours.reorder_cache(beam)
    plain.reorder_cache(beam)
    step(2)
    ours.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    k, v = torch.randn(4, 3, 1, 8, generator=gen), torch.randn(4, 3, 1, 8, generator=gen)
    for a, b in zip(ours.update(k, v, 0), plain.update(k, v, 0), strict=True):
        assert torch.equal(a, b)
    ours.reset()
    assert ours.get_seq_length() == 0 and ours.layers[0]._key_buffer is None


def test_static_cache_generation_is_a_clear_error():
    """transformers builds the mask outside the model for static caches and feeds ours back in: refuse clearly."""
    model = get_seer_model(tiny_model("llama"), _config())
    ids, _ = _inputs(batch=1, length=40, pad_left=(0,), seed=5)
    with pytest.raises(TypeError, match="static caches.*default dynamic cache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static", pad_token_id=0)
