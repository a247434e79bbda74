"""Breadth: tiny random models of every tested family, wrapped, compared with the base model and an oracle."""

import math
import sys

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from seer_adapter import SeerAttentionConfig, SeerModel, get_seer_model, kernels
from seer_adapter.kernels.reference import causal_token_mask, expand_block_mask
from seer_adapter.model import TESTED_FAMILIES

BLOCK = 16


def _inputs(batch=2, length=100, pad_left=(0, 23), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pad_left):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def _config(**kw):
    return SeerAttentionConfig(block_size=BLOCK, dense_below_length=0, **kw)


def test_tested_families_list_matches_the_tests():
    assert sorted(TESTED_FAMILIES) == sorted(FAMILIES)


def test_every_block_kept_gives_the_base_logits(family):
    base = tiny_model(family)
    ids, mask = _inputs()
    want = base(input_ids=ids, attention_mask=mask).logits
    model = get_seer_model(base, _config(sparsity_method="dense"))
    got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    stats = model.sparsity_stats()
    assert any(s["mode"] == "sparse" for s in stats), stats
    assert all(s["density"] == 1.0 for s in stats)


def _naive_oracle(q, k, v, block_mask, *, block_size, scale, key_padding_mask, softcap, return_lse):
    """Materialised masked softmax in float64, GQA by expansion: independent of the reference's chunking."""
    hq, hkv = q.shape[1], k.shape[1]
    kx, vx = k.double().repeat_interleave(hq // hkv, 1), v.double().repeat_interleave(hq // hkv, 1)
    scores = q.double() @ kx.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if block_mask.shape[1] != hq:
        block_mask = block_mask.repeat_interleave(hq // hkv, 1)
    allowed = expand_block_mask(block_mask, q.shape[2], k.shape[2], block_size)
    allowed = allowed & causal_token_mask(q.shape[2], k.shape[2], q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ vx).to(q.dtype)


kernels.register_backend("naive_oracle", _naive_oracle, device_types=())


def test_sparse_path_matches_naive_masked_softmax(family, monkeypatch):
    base = tiny_model(family)
    ids, mask = _inputs(seed=1)
    model = get_seer_model(base, _config(sparsity_method="nz_ratio", nz_ratio=0.4))
    monkeypatch.setenv(kernels.ENV_BACKEND, "reference")
    got = model(input_ids=ids, attention_mask=mask).logits
    densities = [s["density"] for s in model.sparsity_stats() if s["mode"] == "sparse"]
    assert densities and max(densities) < 0.9, "the test must run a really sparse mask"
    monkeypatch.setenv(kernels.ENV_BACKEND, "naive_oracle")
    want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    with model.disable_adapter():
        dense = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(got[real], dense[real], atol=1e-4), "sparsity should change something"


def test_save_load_round_trip(family, tmp_path):
    model = get_seer_model(tiny_model(family), _config(sparsity_method="nz_ratio", nz_ratio=0.5))
    with torch.no_grad():
        for gate in model.gates().values():
            gate.k_proj.weight.normal_()  # trained-looking weights, not the initial prior
    ids, mask = _inputs(seed=2)
    want = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    loaded = SeerModel.from_pretrained(tiny_model(family), tmp_path)
    for (i, a), (j, b) in zip(model.gates().items(), loaded.gates().items(), strict=True):
        assert i == j and torch.equal(a.k_proj.weight, b.k_proj.weight)
    assert not any(p.requires_grad for p in loaded.parameters())
    got = loaded(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=0, rtol=0)


def test_generate_with_left_padding(family):
    base = tiny_model(family)
    ids, mask = _inputs(batch=2, length=40, pad_left=(0, 9), seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = base.generate(ids, **kwargs)
    model = get_seer_model(base, _config(sparsity_method="dense"))
    assert torch.equal(model.generate(ids, **kwargs), want)
    model.set_sparsity(sparsity_method="nz_ratio", nz_ratio=0.3)
    out = model.generate(ids, **kwargs)
    assert out.shape == want.shape


@pytest.mark.parametrize("length", [1, 5, BLOCK, BLOCK + 1, 3 * BLOCK - 1])
def test_short_and_unaligned_lengths(length):
    for family in ("llama", "gpt_neox", "gemma3_text"):
        base = tiny_model(family)
        ids, mask = _inputs(batch=2, length=length, pad_left=(0, length // 3), seed=length)
        want = base(input_ids=ids, attention_mask=mask).logits
        model = get_seer_model(base, _config(sparsity_method="dense"))
        got = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
        model.set_sparsity(sparsity_method="threshold", threshold=0.5)
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits[real]).all()
        model.unload()


@pytest.mark.parametrize("family", ["llama", "cohere", "glm", "gpt_neox", "qwen3"])
def test_gate_sees_pre_rope_qk_and_block_rope(family):
    """Recompute the gate's probabilities independently: projections hooked before RoPE, the family's own
    apply_rotary_pos_emb at each block's first position, pooling by hand."""
    base = tiny_model(family)
    model = get_seer_model(base, _config(sparsity_method="dense"))
    with torch.no_grad():
        for gate in model.gates().values():
            gate.k_proj.weight.normal_(std=0.2)
    model.runtime.record_gate_outputs = True
    attn = next(m for m in base.modules() if hasattr(m, "seer_state"))
    captured = {}

    def grab(name):
        def hook(module, args, out):
            captured[name] = out

        return hook

    handles = [
        attn.register_forward_pre_hook(lambda m, a, k: captured.update(pe=k["position_embeddings"]), with_kwargs=True)
    ]
    if family == "gpt_neox":
        handles.append(attn.query_key_value.register_forward_hook(grab("qkv")))
    else:
        handles += [attn.q_proj.register_forward_hook(grab("q")), attn.k_proj.register_forward_hook(grab("k"))]
    for norm in ("q_norm", "k_norm"):
        if hasattr(attn, norm) and isinstance(getattr(attn, norm), torch.nn.Module):
            handles.append(getattr(attn, norm).register_forward_hook(grab(norm)))
    ids = torch.randint(3, 128, (1, 70))
    model(input_ids=ids)
    for h in handles:
        h.remove()

    gate = model.gates()[attn.seer_state.layer_idx]
    hq, hkv, d = gate.num_q_heads, gate.num_kv_heads, gate.head_dim
    if family == "gpt_neox":
        qkv = captured["qkv"].view(1, 70, hq, 3 * d).transpose(1, 2)
        q, k = qkv[..., :d], qkv[..., d : 2 * d]
    else:
        q = captured.get("q_norm", captured["q"].view(1, 70, hq, d)).reshape(1, 70, hq, d).transpose(1, 2)
        k = captured.get("k_norm", captured["k"].view(1, 70, hkv, d)).reshape(1, 70, hkv, d).transpose(1, 2)
    n = math.ceil(70 / BLOCK)
    pad = n * BLOCK - 70
    qb = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(1, hq, n, BLOCK, d)
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(1, hkv, n, BLOCK, d)
    counts = torch.tensor([min(BLOCK, 70 - i * BLOCK) for i in range(n)]).view(1, 1, n, 1)
    q_avg = qb.sum(3) / counts
    k_max = torch.stack([k[:, :, i * BLOCK : (i + 1) * BLOCK].amax(2) for i in range(n)], 2)
    k_min = torch.stack([k[:, :, i * BLOCK : (i + 1) * BLOCK].amin(2) for i in range(n)], 2)
    k_cat = torch.cat([k_max, k_min, kb.sum(3) / counts], -1).repeat_interleave(hq // hkv, 1)
    k_gate = torch.einsum("bhni,hoi->bhno", k_cat, gate.k_proj.weight)
    cos, sin = captured["pe"]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q_rot, k_rot = rope(q_avg, k_gate, cos[:, ::BLOCK], sin[:, ::BLOCK])
    logits = q_rot @ k_rot.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    want = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(attn.seer_state.last_gate_probs, want, atol=1e-5, rtol=1e-4)
