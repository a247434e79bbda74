"""The reference block-sparse attention against a naive full-matrix oracle in float64."""

import math

import pytest
import torch

from seer_adapter import kernels
from seer_adapter.kernels import reference
from seer_adapter.kernels.reference import block_sparse_attention_reference, causal_token_mask, expand_block_mask


def naive_attention(q, k, v, block_mask, block_size, scale=None, key_padding_mask=None, softcap=None):
    """Materialised masked softmax in float64; GQA by expanding K/V (fine for an oracle)."""
    b, hq, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    kx = k.double().repeat_interleave(g, 1)
    vx = v.double().repeat_interleave(g, 1)
    scores = q.double() @ kx.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = block_mask if block_mask.shape[1] == hq else block_mask.repeat_interleave(g, 1)
    allowed = expand_block_mask(mask, s, sk, block_size) & causal_token_mask(s, sk, q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    lse = torch.logsumexp(scores, -1)
    return probs @ vx, lse


def random_block_mask(b, h, s, sk, bs, density, gen):
    nq, nk = math.ceil(s / bs), math.ceil(sk / bs)
    mask = torch.rand(b, h, nq, nk, generator=gen) < density
    mask[..., 0] = True
    rows = torch.arange(nq)
    mask[..., rows, rows + (nk - nq)] = True
    return mask


CASES = [
    # b, hq, hkv, s, sk, d, bs
    (1, 4, 4, 63, 63, 64, 16),
    (2, 8, 2, 100, 100, 32, 16),
    (1, 7, 1, 200, 200, 64, 64),
    (2, 4, 1, 37, 101, 16, 32),  # queries are the last rows of a longer key sequence
    (1, 2, 2, 1000, 1000, 16, 64),
    (1, 2, 1, 5, 5, 16, 64),  # shorter than one block
]


@pytest.mark.parametrize("b, hq, hkv, s, sk, d, bs", CASES)
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_matches_naive_oracle(b, hq, hkv, s, sk, d, bs, per_kv_head):
    gen = torch.Generator().manual_seed(hash((b, hq, s, sk, per_kv_head)) % 2**31)
    q = torch.randn(b, hq, s, d, generator=gen)
    k = torch.randn(b, hkv, sk, d, generator=gen)
    v = torch.randn(b, hkv, sk, d, generator=gen)
    mask = random_block_mask(b, hkv if per_kv_head else hq, s, sk, bs, 0.4, gen)
    out, lse = block_sparse_attention_reference(q, k, v, mask, block_size=bs, return_lse=True)
    want, want_lse = naive_attention(q, k, v, mask, bs)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_key_padding_scale_and_softcap(side):
    gen = torch.Generator().manual_seed(1)
    b, hq, hkv, s, d, bs = 3, 4, 2, 90, 32, 16
    q, k, v = (
        torch.randn(b, hq, s, d, generator=gen),
        torch.randn(b, hkv, s, d, generator=gen),
        torch.randn(b, hkv, s, d, generator=gen),
    )
    lengths = torch.tensor([90, 50, 17])
    pos = torch.arange(s)[None]
    padding = pos < lengths[:, None] if side == "right" else pos >= (s - lengths)[:, None]
    mask = random_block_mask(b, hq, s, s, bs, 0.5, gen)
    out = block_sparse_attention_reference(
        q, k, v, mask, block_size=bs, key_padding_mask=padding, scale=0.3, softcap=5.0
    )
    want, _ = naive_attention(q, k, v, mask, bs, scale=0.3, key_padding_mask=padding, softcap=5.0)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    if side == "left":  # query rows before the first real token see nothing: zero output, never NaN
        assert (out[2, :, : s - 17] == 0).all()


def test_rows_without_keys_give_zero_and_minus_inf_lse():
    q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[..., 1, 1] = True
    out, lse = block_sparse_attention_reference(q, k, v, mask, block_size=16, return_lse=True)
    assert (out[:, :, :16] == 0).all() and torch.isinf(lse[:, :, :16]).all()
    assert torch.isfinite(out).all()


def test_chunking_does_not_change_the_result(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(1, 4, 300, 16, generator=gen),
        torch.randn(1, 2, 300, 16, generator=gen),
        torch.randn(1, 2, 300, 16, generator=gen),
    )
    mask = random_block_mask(1, 4, 300, 300, 32, 0.5, gen)
    whole = block_sparse_attention_reference(q, k, v, mask, block_size=32)
    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMENTS", 4 * 32 * 300)  # one query block per chunk
    chunked = block_sparse_attention_reference(q, k, v, mask, block_size=32)
    torch.testing.assert_close(whole, chunked)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 70, 32, generator=gen).to(dtype) for _ in range(3))
    mask = random_block_mask(1, 4, 70, 70, 16, 0.5, gen)
    out = block_sparse_attention_reference(q, k, v, mask, block_size=16)
    want, _ = naive_attention(q, k, v, mask, 16)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


def test_bad_shapes_are_reported():
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 3, 64, 16)
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attention_reference(q, k, k, torch.ones(1, 4, 1, 1, dtype=torch.bool), block_size=64)
    k = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="block_mask shape"):
        block_sparse_attention_reference(q, k, k, torch.ones(1, 4, 2, 2, dtype=torch.bool), block_size=64)
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attention_reference(q, k, k, torch.ones(1, 4, 1, 1), block_size=64)


def test_dispatch_uses_reference_on_cpu_and_refuses_unknown_backends(monkeypatch):
    q = torch.randn(1, 2, 16, 8)
    mask = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    assert kernels.select_backend(q.device) == "reference"
    out = kernels.block_sparse_attention(q, q, q, mask, block_size=16)
    torch.testing.assert_close(out, block_sparse_attention_reference(q, q, q, mask, block_size=16))
    monkeypatch.setenv(kernels.ENV_BACKEND, "cuda-magic")
    with pytest.raises(ValueError, match="cuda-magic"):
        kernels.block_sparse_attention(q, q, q, mask, block_size=16)
