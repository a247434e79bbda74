"""Shape-static decoding steps (`SeerStaticCache`) and their CUDA graphs (`seer_adapter.cuda_graphs`).

On CPU the static steps run eagerly: every test compares them with the dynamic cache, which the rest of the suite
checks against the base model. The CUDA-graph tests need a GPU and are skipped here.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from unittest.mock import patch

import pytest
import torch
from test_decode import BLOCK, _cache, _config, _generate_logits, _inputs, _randomise_decode_gates
from tiny_models import FAMILIES, tiny_model

from seer_adapter import DecodeCacheError, SeerDynamicCache, SeerStaticCache, get_seer_model
from seer_adapter.cuda_graphs import StaticStepRunner
from seer_adapter.decode import GrowableDynamicLayer

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")


def _both_caches(model, ids, mask, capacity, full_sliding_layers=False, **kwargs):
    """(sequences, logits) of generate() with a SeerDynamicCache and with a SeerStaticCache, and the static cache."""
    config = model.base_model.config
    dynamic = _generate_logits(model, ids, mask, **kwargs, **_cache(SeerDynamicCache(config=config)))
    dynamic_stats = model.sparsity_stats()
    static_cache = SeerStaticCache(config=config, max_cache_len=capacity, full_sliding_layers=full_sliding_layers)
    static = _generate_logits(model, ids, mask, **kwargs, **_cache(static_cache))
    assert model.sparsity_stats() == dynamic_stats  # the last step's kept and causal blocks per layer
    return dynamic, static, static_cache


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi", "gpt_neox", "gemma", "gpt2", "opt"])
@pytest.mark.parametrize(
    "settings",
    [
        {"decode_token_budget": BLOCK},  # one block: the current block and the sink only
        {"decode_token_budget": 3 * BLOCK},
        {"decode_method": "threshold", "decode_threshold": 0.3},
        # the prefill gate on 4x larger blocks than the decode gate
        {"decode_token_budget": 2 * BLOCK, "block_size": 4 * BLOCK, "decode_block_size": BLOCK},
        # per-layer decode selection: each layer's list width differs inside one static step
        {
            "decode_token_budget": BLOCK,
            "layer_overrides": {"0": {"decode_token_budget": 3 * BLOCK}, "1": {"decode_method": "dense"}},
        },
    ],
    ids=["one_block", "three_blocks", "threshold", "decode_block_smaller", "per_layer"],
)
def test_static_steps_equal_dynamic_decoding(family, settings):
    """Padded rows of different lengths, a capacity that is not a multiple of the block size, prompt ending inside a
    block: the static cache decodes the same tokens with the same logits and the same kept-block statistics."""
    model = get_seer_model(tiny_model(family), _config(**settings))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=45, pad_left=(0, 30), seed=3)
    (want_seq, want), (got_seq, got), cache = _both_caches(model, ids, mask, 90, max_new_tokens=40, do_sample=False)
    assert isinstance(cache.graph_runner, StaticStepRunner) and cache.get_seq_length() == 84
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_seq, want_seq)
    stats = model.sparsity_stats()
    sparse = [row for row in stats if row["mode"] == "sparse"]
    assert {row["phase"] for row in sparse} == {"decode"} and any(row["density"] < 1 for row in sparse)
    if "layer_overrides" in settings:  # layer 0 keeps 3 blocks per (row, KV head), layer 1 decodes dense
        config = model.base_model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # GPT-2 / OPT: no GQA
        assert [row["mode"] for row in stats[:2]] == ["sparse", "dense"] and stats[0]["kept_blocks"] == 3 * 2 * heads


SLIDING_FAMILIES = {"gemma2", "gemma3_text"}  # sliding-window layers: refused unless full_sliding_layers=True


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_decodes_statically_like_the_dynamic_cache(family):
    """Breadth: every tiny family's static steps give the dynamic cache's tokens and logits; families with
    sliding-window layers get the clear error, then decode statically with full-capacity sliding layers."""
    model = get_seer_model(tiny_model(family), _config(decode_token_budget=3 * BLOCK))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=45, pad_left=(0, 30), seed=3)
    options = {}
    if family in SLIDING_FAMILIES:
        cache = SeerStaticCache(config=model.base_model.config, max_cache_len=70)
        with pytest.raises(DecodeCacheError, match="sliding window.*full_sliding_layers=True.*SeerDynamicCache"):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, **_cache(cache))
        options = {"full_sliding_layers": True}  # every token kept; the masks still apply the window (32 < 65)
    (want_seq, want), (got_seq, got), _ = _both_caches(
        model, ids, mask, 70, max_new_tokens=20, do_sample=False, **options
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_seq, want_seq)


def test_static_stats_and_compressed_keys_equal_dynamic():
    """After the same generation both caches hold the same compressed keys, and the last step's kept blocks match."""
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=40, pad_left=(5, 0), seed=8)
    config = model.base_model.config
    results = []
    for cache in (SeerDynamicCache(config=config), SeerStaticCache(config=config, max_cache_len=100)):
        model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, **_cache(cache))
        stats = [(row["kept_blocks"], row["causal_blocks"]) for row in model.sparsity_stats()]
        keys = {i: (layer.keys.clone(), layer.block_valid.clone()) for i, layer in cache.seer_keys.items()}
        results.append((stats, keys, cache.get_seq_length()))
    (want_stats, want_keys, want_len), (got_stats, got_keys, got_len) = results
    assert got_stats == want_stats and got_len == want_len == 69
    assert want_keys.keys() == got_keys.keys()
    for index, (keys, valid) in want_keys.items():
        torch.testing.assert_close(got_keys[index][0], keys, atol=1e-6, rtol=1e-6)
        assert torch.equal(got_keys[index][1], valid)


def test_half_precision_compressed_keys_in_both_caches():
    """``decode_key_dtype="bfloat16"`` with fp32 gates: both caches store the compressed keys in bf16, equal to the
    fp32 run's keys rounded; the setting is a run-time one, taken by the next cache; bad values are refused."""
    from seer_adapter import SeerConfigError

    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=40, pad_left=(5, 0), seed=8)
    config = model.base_model.config
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    reference = SeerDynamicCache(config=config)
    model.generate(ids, attention_mask=mask, **kwargs, **_cache(reference))
    model.set_sparsity(decode_key_dtype="bfloat16")
    for cache in (SeerDynamicCache(config=config), SeerStaticCache(config=config, max_cache_len=60)):
        sequences = model.generate(ids, attention_mask=mask, **kwargs, **_cache(cache))
        assert sequences.shape == (2, 52)
        for index, layer in cache.seer_keys.items():
            want = reference.seer_keys[index].keys
            assert layer.keys.dtype == torch.bfloat16 and layer.keys.shape == want.shape
            torch.testing.assert_close(layer.keys.float(), want.to(torch.bfloat16).float(), atol=1e-6, rtol=0)
    model.set_sparsity(decode_key_dtype=None)
    again = SeerDynamicCache(config=config)
    model.generate(ids, attention_mask=mask, **kwargs, **_cache(again))
    assert all(layer.keys.dtype == torch.float32 for layer in again.seer_keys.values())
    with pytest.raises(SeerConfigError, match="decode_key_dtype must be None"):
        model.set_sparsity(decode_key_dtype="int8")


def test_cache_buffers_hold_no_spare_batch_or_capacity():
    """Memory: a static cache's buffers are exactly its capacity (the compressed keys' RoPE tables too: doubling them
    past a 64k capacity cost 17 GB on an 8B model at batch 8), a dynamic cache's grow by an eighth, and a batch
    repeat drops the buffers of the old batch size instead of holding them until the next append."""
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    config = model.base_model.config
    ids, _ = _inputs(batch=1, length=70, pad_left=(0,), seed=2)
    capacity = 101  # not a multiple of the block: the last block is partial
    cache = SeerStaticCache(config=config, max_cache_len=capacity)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **_cache(cache))
    # the model hands every layer the same RoPE tables: one copy serves all layers (a copy each was 9 GiB at 64k x 8)
    assert len(cache.seer_keys) == config.num_hidden_layers > 1 and len(cache.shared_rope_tables()) == 1
    cache.batch_repeat_interleave(3)
    for layer in cache.layers:
        assert layer.keys.shape[0] == 3
        assert all(b is None or b.shape[0] == 3 for b in (layer._key_buffer, layer._value_buffer))
    # re-adopting the repeated keys/values into full-capacity buffers frees each layer's old tensors before the next
    # layer allocates (holding them all was 49 GiB more at 64k x 8 on an 8B model: out of memory on the H200)
    replaced = [weakref.ref(t) for layer in cache.layers for t in (layer.keys, layer.values)]
    appends = []
    adopt = GrowableDynamicLayer._append

    def counting_append(layer, current, new, name):
        appends.append(sum(ref() is not None for ref in replaced))
        return adopt(layer, current, new, name)

    with patch.object(GrowableDynamicLayer, "_append", counting_append):
        cache.begin_static_step()
    # at each append: the tensor being re-adopted and the not-yet-visited ones are alive, nothing already replaced
    assert appends == [len(replaced) - i for i in range(len(replaced))]
    for layer in cache.layers:
        assert layer._key_buffer.shape[:3] == layer._value_buffer.shape[:3] == (3, config.num_key_value_heads, capacity)
    for compressed in cache.seer_keys.values():
        keys, valid, cos, sin = compressed.static_buffers()
        # 7 blocks reserved, but the prefill's 4 came with the minimum growth of 16 spare (never shrunk)
        assert keys.shape[2] == valid.shape[1] == max(-(-capacity // BLOCK), 70 // BLOCK + 16)
        assert cos.shape[:2] == sin.shape[:2] == (3, capacity)
    dynamic = SeerDynamicCache(config=config)
    long_ids, _ = _inputs(batch=1, length=300, pad_left=(0,), seed=4)
    with torch.no_grad():
        model(input_ids=long_ids[:, :200], use_cache=True, **_cache(dynamic))
        for step in range(200, 300):  # one token at a time: the buffers grow, geometrically
            model(input_ids=long_ids[:, step : step + 1], use_cache=True, **_cache(dynamic))
    assert len(dynamic.shared_rope_tables()) == 1
    for compressed in dynamic.seer_keys.values():
        keys, _, cos, _ = compressed.static_buffers()
        assert compressed.n_slots == 300 and cos.shape[1] <= 300 + 300 // 8 + 16
        assert keys.shape[2] <= 300 // BLOCK + 16


def test_static_step_writes_shared_rope_tables_once():
    """In a shape-static step the layers sharing one `SlotRopeTables` receive the same tables: the first layer writes
    the new slot and gathers the block's rows, the others reuse that result (the written tables equal the dynamic
    cache's, which the static == dynamic tests check); the next step computes its own."""
    from seer_adapter.decode import SlotRopeTables

    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    config = model.base_model.config
    ids, mask = _inputs(batch=2, length=40, pad_left=(0, 5), seed=3)
    cache = SeerStaticCache(config=config, max_cache_len=60)
    results = []
    original = SlotRopeTables.static_block_tables

    def recording(tables, *args):
        results.append(original(tables, *args))
        return results[-1]

    with torch.no_grad(), patch.object(SlotRopeTables, "static_block_tables", recording):
        model(input_ids=ids, attention_mask=mask, use_cache=True, **_cache(cache))
        assert config.num_hidden_layers > 1 and len(cache.shared_rope_tables()) == 1
        for step in range(2):
            mask = torch.cat((mask, mask[:, :1]), 1)
            model(input_ids=ids[:, step : step + 1], attention_mask=mask, use_cache=True, **_cache(cache))
    layers = config.num_hidden_layers
    assert len(results) == 2 * layers  # every layer of both static steps asked
    first, second = results[:layers], results[layers:]
    assert all(r is first[0] for r in first) and all(r is second[0] for r in second) and second[0] is not first[0]


def test_shared_rope_tables_refuse_a_layer_with_other_tables():
    """Layers share one `SlotRopeTables` when they received the same table tensors at the prefill; a sharing layer
    that later gets different tables for the same slots is refused (never a silent mix); layers handed tables of
    their own keep a copy each."""
    from seer_adapter.decode import SlotRopeTables

    tables = SlotRopeTables(2, 8, torch.float32, torch.device("cpu"))
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    tables.record(0, 5, cos, sin)
    tables.record(0, 5, cos, sin)  # a second layer of the same forward: nothing more to record
    assert tables.n_slots == 5 and torch.equal(tables.buffers()[0][:, :5], cos.expand(2, -1, -1))
    with pytest.raises(DecodeCacheError, match="received different tables"):
        tables.record(0, 5, cos.clone(), sin)
    # a model handing each layer tables of its own (cloned here by a hook per decoder layer): a copy per layer, and
    # the same generation as with the shared copy
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=45, pad_left=(0, 12), seed=1)
    config = model.base_model.config
    shared = SeerDynamicCache(config=config)
    want = _generate_logits(model, ids, mask, max_new_tokens=20, do_sample=False, **_cache(shared))
    assert len(shared.shared_rope_tables()) == 1

    def own_tables(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (cos.clone(), sin.clone())}

    layers = model.base_model.model.layers
    handles = [layer.register_forward_pre_hook(own_tables, with_kwargs=True) for layer in layers]
    try:
        separate = SeerDynamicCache(config=config)
        got = _generate_logits(model, ids, mask, max_new_tokens=20, do_sample=False, **_cache(separate))
    finally:
        for handle in handles:
            handle.remove()
    assert len(separate.shared_rope_tables()) == len(layers) > 1
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_static_dense_paths_equal_the_base_model():
    """decode_method='dense' and the adapter switched off both run the base model's attention over the whole
    buffers, with the mask made from the device-side slot (the mask a graph would replay)."""
    base = tiny_model("qwen2")
    ids, mask = _inputs(batch=2, length=37, pad_left=(0, 9), seed=2)
    want_seq, want = _generate_logits(base, ids, mask, max_new_tokens=20, do_sample=False)
    model = get_seer_model(base, _config(decode_method="dense"))
    config = base.config
    got_seq, got = _generate_logits(
        model, ids, mask, max_new_tokens=20, do_sample=False, **_cache(SeerStaticCache(config=config, max_cache_len=64))
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_seq, want_seq)
    # an adapter without a decode gate (prefill gates only) decodes dense through static steps as well
    no_decode_gate = get_seer_model(model.unload(), _config(decode_gate=False))
    got_seq, got = _generate_logits(
        no_decode_gate, ids, mask, max_new_tokens=20, do_sample=False,
        **_cache(SeerStaticCache(config=config, max_cache_len=64)),
    )  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_seq, want_seq)
    model = get_seer_model(no_decode_gate.unload(), _config(decode_token_budget=BLOCK))
    with model.disable_adapter():
        cache = SeerStaticCache(config=config, max_cache_len=64)
        got_seq, got = _generate_logits(model, ids, mask, max_new_tokens=20, do_sample=False, **_cache(cache))
    assert isinstance(cache.graph_runner, StaticStepRunner)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_seq, want_seq)


def test_static_sampling_beam_search_and_prompt_lookup_equal_dynamic():
    """Sampling, beam search (reordering within the same buffers) and prompt-lookup decoding (multi-token verify
    forwards and crops between static steps)."""
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    ids, mask = _inputs(batch=2, length=40, pad_left=(3, 0), seed=4)
    config = model.base_model.config
    runs = {
        "sample": dict(do_sample=True, top_k=0, max_new_tokens=15),
        "beams": dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=15),
    }
    for name, kwargs in runs.items():
        outputs = []
        for cache in (SeerDynamicCache(config=config), SeerStaticCache(config=config, max_cache_len=64)):
            torch.manual_seed(0)
            outputs.append(model.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs, **_cache(cache)))
        assert torch.equal(outputs[0], outputs[1]), name
    repeated = torch.cat((ids[:1], ids[:1, :20]), dim=1)  # a repetition, so the lookup proposes candidates
    kwargs = dict(attention_mask=torch.ones_like(repeated), max_new_tokens=30, do_sample=False, pad_token_id=0)
    want = model.generate(repeated, prompt_lookup_num_tokens=4, **kwargs, **_cache(SeerDynamicCache(config=config)))
    cache = SeerStaticCache(config=config, max_cache_len=128)
    got = model.generate(repeated, prompt_lookup_num_tokens=4, **kwargs, **_cache(cache))
    assert torch.equal(got, want)


def test_static_cache_edges_and_bad_input():
    model = get_seer_model(tiny_model("llama"), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    config = model.base_model.config
    # a one-token prompt (its forward is a prefill, not a static step) and a prompt ending on a block boundary
    for length in (1, 2 * BLOCK):
        ids, mask = _inputs(batch=1, length=length, pad_left=(0,), seed=length)
        (want_seq, want), (got_seq, got), _ = _both_caches(model, ids, mask, 70, max_new_tokens=20, do_sample=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_seq, want_seq)
    ids, mask = _inputs(batch=1, length=30, pad_left=(0,), seed=1)

    def generate(capacity: int, new_tokens: int):
        cache = SeerStaticCache(config=config, max_cache_len=capacity)
        return model.generate(ids, max_new_tokens=new_tokens, pad_token_id=0, **_cache(cache))

    with pytest.raises(DecodeCacheError, match="max_cache_len=40.*max_new_tokens"):
        generate(40, 20)
    with pytest.raises(DecodeCacheError, match=r"max_cache_len=20\) cannot hold 30"):
        generate(20, 5)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        SeerStaticCache(config=config, max_cache_len=0)
    model.runtime.record_gate_outputs = True
    with pytest.raises(NotImplementedError, match="SeerDynamicCache"):
        generate(40, 3)
    model.runtime.record_gate_outputs = False
    # sliding-window layers cannot decode statically
    gemma2 = get_seer_model(tiny_model("gemma2"), _config())
    ids, mask = _inputs(batch=1, length=20, pad_left=(0,), seed=1)
    with pytest.raises(DecodeCacheError, match="sliding window.*SeerDynamicCache"):
        gemma2.generate(
            ids, max_new_tokens=3, pad_token_id=0, **_cache(SeerStaticCache(config=gemma2.config, max_cache_len=40))
        )


def test_forward_wrapper_keeps_the_signature_follows_deep_copies_and_unloads():
    base = tiny_model("llama")
    model = get_seer_model(base, _config())
    assert "forward" in vars(base)
    # transformers reads forward's parameters (position_ids, logits_to_keep, ...) to build its inputs
    assert inspect.signature(base.forward).parameters == inspect.signature(type(base).forward.__get__(base)).parameters
    twin = copy.deepcopy(base)
    assert twin.forward.__self__ is twin and base.forward.__self__ is base
    ids, mask = _inputs(batch=1, length=20, pad_left=(0,), seed=2)
    for wrapped in (base, twin):
        cache = SeerStaticCache(config=wrapped.config, max_cache_len=30)
        wrapped.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, **_cache(cache))
        assert cache.graph_runner.model is wrapped
    assert model.unload() is base and "forward" not in vars(base)


# ------------------------------------------------------------------------------------------------------
# CUDA graphs (GPU)
# ------------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize(
    "settings",
    [
        {"decode_token_budget": 2 * BLOCK},
        {"decode_method": "dense"},
        {"decode_token_budget": BLOCK, "layer_overrides": {"0": {"decode_token_budget": 3 * BLOCK}}},
    ],
)
def test_cuda_graph_steps_equal_eager_static_and_dynamic(settings):
    """One capture serves a whole generation; its tokens and logits equal eager static steps and the dynamic cache
    (same Triton kernels); changing the sparsity settings re-captures instead of replaying a stale graph."""
    model = get_seer_model(tiny_model("llama").cuda(), _config(**settings))
    _randomise_decode_gates(model)
    ids, mask = (t.cuda() for t in _inputs(batch=2, length=45, pad_left=(0, 30), seed=3))
    config = model.base_model.config
    kwargs = dict(max_new_tokens=40, do_sample=False)
    want_seq, want = _generate_logits(model, ids, mask, **kwargs, **_cache(SeerDynamicCache(config=config)))
    eager_cache = SeerStaticCache(config=config, max_cache_len=90, cuda_graph=False)
    eager_seq, eager = _generate_logits(model, ids, mask, **kwargs, **_cache(eager_cache))
    graph_cache = SeerStaticCache(config=config, max_cache_len=90)
    got_seq, got = _generate_logits(model, ids, mask, **kwargs, **_cache(graph_cache))
    assert eager_cache.graph_runner.captures == 0 and graph_cache.graph_runner.captures == 1
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_seq, eager_seq) and torch.equal(got_seq, want_seq)
    # the same settings replay the captured graph; a settings change (different from every parametrised case)
    # re-captures instead of replaying a stale one
    graph_cache.crop(-40)
    replay_seq, _ = _generate_logits(model, ids, mask, **kwargs, **_cache(graph_cache))
    assert graph_cache.graph_runner.captures == 1 and torch.equal(replay_seq, want_seq)
    other_layer = {"1": {"decode_token_budget": 2 * BLOCK}}
    model.set_sparsity(decode_method="token_budget", decode_token_budget=BLOCK, layer_overrides=other_layer)
    graph_cache.crop(-40)
    got_seq, _ = _generate_logits(model, ids, mask, **kwargs, **_cache(graph_cache))
    assert graph_cache.graph_runner.captures == 2
    want_seq, _ = _generate_logits(model, ids, mask, **kwargs, **_cache(SeerDynamicCache(config=config)))
    assert torch.equal(got_seq, want_seq)


@needs_gpu
def test_cuda_graph_beam_search_keeps_one_capture():
    """Beam reordering copies rows within the captured buffers, so the graph stays valid across steps."""
    model = get_seer_model(tiny_model("llama").cuda(), _config(decode_token_budget=2 * BLOCK))
    _randomise_decode_gates(model)
    ids, mask = (t.cuda() for t in _inputs(batch=2, length=40, pad_left=(3, 0), seed=4))
    config = model.base_model.config
    kwargs = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=15, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, **kwargs, **_cache(SeerDynamicCache(config=config)))
    cache = SeerStaticCache(config=config, max_cache_len=64)
    got = model.generate(ids, attention_mask=mask, **kwargs, **_cache(cache))
    assert torch.equal(got, want) and cache.graph_runner.captures == 1


@needs_gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_graph_steps_on_every_family(family):
    """Breadth on the GPU: every tiny family decodes under one CUDA-graph capture with the tokens and logits of the
    dynamic cache; the decode gate on 16-token blocks under a 64-token prefill block (the shape we train)."""
    settings = {"decode_token_budget": 2 * BLOCK, "block_size": 4 * BLOCK, "decode_block_size": BLOCK}
    model = get_seer_model(tiny_model(family).cuda(), _config(**settings))
    _randomise_decode_gates(model)
    ids, mask = (t.cuda() for t in _inputs(batch=2, length=45, pad_left=(0, 30), seed=3))
    config = model.base_model.config
    kwargs = dict(max_new_tokens=40, do_sample=False)
    want_seq, want = _generate_logits(model, ids, mask, **kwargs, **_cache(SeerDynamicCache(config=config)))
    graph_cache = SeerStaticCache(config=config, max_cache_len=90, full_sliding_layers=family in SLIDING_FAMILIES)
    got_seq, got = _generate_logits(model, ids, mask, **kwargs, **_cache(graph_cache))
    assert graph_cache.graph_runner.captures == 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_seq, want_seq)
