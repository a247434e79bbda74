"""Sparse decode kernels: the reference against plain dense attention, the Triton split-KV kernel (under the
interpreter on CPU) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from seer_adapter.kernels import available_backends, sparse_decode_attention
from seer_adapter.kernels.sparse_decode import combine_split_results, sparse_decode_reference
from seer_adapter.kernels.sparse_decode_triton import sparse_decode_triton

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")  # the Triton kernels run compiled on a GPU, interpreted on CPU


def _random_lists(batch: int, hkv: int, n_blocks: int, keep: int, generator: torch.Generator):
    """Random distinct block lists per KV head, ragged counts in [1, keep], padded with garbage (-7)."""
    width = keep
    indices = torch.full((batch, hkv, width), -7, dtype=torch.int32)
    counts = torch.zeros(batch, hkv, dtype=torch.int32)
    for b in range(batch):
        for h in range(hkv):
            count = int(torch.randint(1, keep + 1, (1,), generator=generator))
            chosen = torch.randperm(n_blocks, generator=generator)[: min(count, n_blocks)]
            indices[b, h, : len(chosen)] = chosen.to(torch.int32)
            counts[b, h] = len(chosen)
    return indices, counts


def test_reference_with_every_block_equals_dense_attention():
    g = torch.Generator().manual_seed(0)
    batch, hq, hkv, kv_len, dim, bs = 2, 8, 2, 100, 16, 16
    q = torch.randn(batch, hq, dim, generator=g)
    k = torch.randn(batch, hkv, kv_len, dim, generator=g)
    v = torch.randn(batch, hkv, kv_len, dim, generator=g)
    n_blocks = math.ceil(kv_len / bs)
    indices = torch.arange(n_blocks, dtype=torch.int32).flip(0).expand(batch, hkv, n_blocks).contiguous()
    counts = torch.full((batch, hkv), n_blocks, dtype=torch.int32)
    padding = torch.ones(batch, kv_len, dtype=torch.bool)
    padding[1, :37] = False  # left padding of row 1
    out, lse = sparse_decode_reference(
        q, k, v, indices, counts, block_size=bs, key_padding_mask=padding, return_lse=True
    )
    kx = k.repeat_interleave(hq // hkv, dim=1)
    vx = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q, kx) / math.sqrt(dim)
    scores = scores.masked_fill(~padding[:, None, :], float("-inf"))
    expected = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), vx)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_reference_rejects_blocks_outside_the_cache():
    q, k = torch.randn(1, 2, 8), torch.randn(1, 1, 20, 8)
    with pytest.raises(ValueError, match="outside"):
        sparse_decode_reference(
            q, k, k, torch.tensor([[[3]]], dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32), block_size=8
        )
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode_reference(
            torch.randn(1, 3, 8),
            k.expand(1, 2, 20, 8),
            k.expand(1, 2, 20, 8),
            torch.zeros(1, 2, 1, dtype=torch.int32),
            torch.ones(1, 2, dtype=torch.int32),
        )


def test_combine_split_results_matches_one_softmax():
    g = torch.Generator().manual_seed(1)
    scores, values = torch.randn(3, 40, generator=g), torch.randn(40, 5, generator=g)
    chunks = [(0, 13), (13, 13), (13, 40)]  # the middle split is empty
    outs, lses = [], []
    for a, b in chunks:
        if a == b:
            outs.append(torch.zeros(3, 5))
            lses.append(torch.full((3,), float("-inf")))
        else:
            outs.append(scores[:, a:b].softmax(-1) @ values[a:b])
            lses.append(torch.logsumexp(scores[:, a:b], -1))
    out, lse = combine_split_results(torch.stack(outs, -2), torch.stack(lses, -1))
    torch.testing.assert_close(out, scores.softmax(-1) @ values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


CASES = [
    # batch, hq, hkv, kv_len, dim, block_size, keep, splits, dtype, padded, softcap
    (1, 4, 4, 63, 16, 16, 3, 1, torch.float32, False, None),
    (2, 8, 2, 100, 32, 16, 5, 3, torch.float16, True, None),
    (2, 7, 1, 77, 16, 32, 2, 2, torch.float32, True, None),
    (1, 8, 2, 130, 64, 64, 3, None, torch.float16, False, 20.0),
    (3, 4, 1, 17, 16, 16, 2, 4, torch.float32, True, None),
]
GPU_CASES = [  # real sizes (8B-shaped GQA, bf16), compiled kernels only
    (16, 32, 8, 32768 + 37, 128, 64, 64, None, torch.bfloat16, True, None),
    (1, 32, 8, 131072, 128, 64, 128, None, torch.bfloat16, False, None),
    (4, 28, 4, 5000, 64, 64, 20, None, torch.float16, True, None),
]


@pytest.mark.parametrize(
    "batch,hq,hkv,kv_len,dim,bs,keep,splits,dtype,padded,softcap",
    CASES + [pytest.param(*case, marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU")) for case in GPU_CASES],
)
def test_triton_matches_reference(batch, hq, hkv, kv_len, dim, bs, keep, splits, dtype, padded, softcap):
    _check_triton_against_reference(batch, hq, hkv, kv_len, dim, bs, keep, splits, dtype, padded, softcap)


SMALL_BLOCK_CASES = [
    # block_size, tile_slots, keep, splits: list entries gathered into shared tiles (and the old one-block tiles)
    (4, 64, 9, 2),
    (8, 32, 7, None),
    (16, 64, 11, 3),
    (16, 16, 5, 2),
    (32, 64, 3, 1),
]
GPU_SMALL_BLOCK_CASES = [(16, 64, 256, None), (16, 16, 256, None), (8, 64, 300, None)]


@pytest.mark.parametrize(
    "bs,tile_slots,keep,splits",
    SMALL_BLOCK_CASES
    + [
        pytest.param(*case, marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU"))
        for case in GPU_SMALL_BLOCK_CASES
    ],
)
def test_triton_small_blocks_share_tiles(bs, tile_slots, keep, splits):
    """Blocks smaller than a tile: several list entries per tile, the split's last tile partly past its entries."""
    on_gpu_shape = keep > 100
    kv_len = 32768 + 37 if on_gpu_shape else 150
    dtype = torch.bfloat16 if on_gpu_shape else torch.float16
    batch, hq, hkv, dim = (16, 32, 8, 128) if on_gpu_shape else (2, 6, 2, 32)
    _check_triton_against_reference(
        batch, hq, hkv, kv_len, dim, bs, keep, splits, dtype, True, None, tile_slots=tile_slots
    )


def _check_triton_against_reference(
    batch, hq, hkv, kv_len, dim, bs, keep, splits, dtype, padded, softcap, tile_slots: int = 64
):
    g = torch.Generator().manual_seed(kv_len)
    q = torch.randn(batch, hq, dim, generator=g).to(dtype)
    k = torch.randn(batch, hkv, kv_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, hkv, kv_len, dim, generator=g).to(dtype)
    n_blocks = math.ceil(kv_len / bs)
    indices, counts = _random_lists(batch, hkv, n_blocks, keep, g)
    padding = None
    if padded:
        padding = torch.ones(batch, kv_len, dtype=torch.bool)
        padding[0, : kv_len // 3] = False
        if batch > 1:
            padding[-1, : kv_len - 2] = False  # a row with two real tokens: most listed blocks are all padding
        padding = padding.to(DEVICE)
    q, k, v, indices, counts = (t.to(DEVICE) for t in (q, k, v, indices, counts))
    ref, ref_lse = sparse_decode_reference(
        q, k, v, indices, counts, block_size=bs, key_padding_mask=padding, softcap=softcap, return_lse=True
    )
    out, lse = sparse_decode_triton(
        q,
        k,
        v,
        indices,
        counts,
        block_size=bs,
        key_padding_mask=padding,
        softcap=softcap,
        return_lse=True,
        num_splits=splits,
        tile_slots=tile_slots,
    )
    assert not out.isnan().any() and not lse.isnan().any()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=tol, rtol=tol)


def test_triton_writes_every_output_and_heads_without_keys_are_zero():
    """Partial buffers come from torch.empty; poison them to catch unwritten elements, and a head whose
    blocks are all padding must give zeros and lse = -inf, never NaN."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 16, generator=g)
    k = torch.randn(2, 2, 40, 16, generator=g)
    v = torch.randn(2, 2, 40, 16, generator=g)
    indices = torch.tensor([[[0, 1], [2, 0]], [[0, 0], [1, 2]]], dtype=torch.int32)
    counts = torch.tensor([[2, 1], [1, 2]], dtype=torch.int32)
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, :16] = False  # block 0 of row 1 is all padding: KV head 0 of row 1 sees nothing
    q, k, v, indices, counts, padding = (t.to(DEVICE) for t in (q, k, v, indices, counts, padding))
    original_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return original_empty(*args, **kwargs).fill_(float("nan"))

    torch.empty = poisoned_empty
    try:
        out, lse = sparse_decode_triton(
            q, k, v, indices, counts, block_size=16, key_padding_mask=padding, return_lse=True, num_splits=2
        )
    finally:
        torch.empty = original_empty
    ref, ref_lse = sparse_decode_reference(
        q, k, v, indices, counts, block_size=16, key_padding_mask=padding, return_lse=True
    )
    assert not out.isnan().any()
    assert torch.equal(out[1, :2].cpu(), torch.zeros(2, 16)) and bool((lse[1, :2] == float("-inf")).all())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[0], ref_lse[0], atol=2e-5, rtol=2e-5)


def test_dispatch_reaches_both_backends():
    assert {"reference", "triton"} <= set(available_backends("decode"))
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 16, generator=g).to(DEVICE), torch.randn(1, 1, 30, 16, generator=g).to(DEVICE)
    indices = torch.tensor([[[1, 0]]], dtype=torch.int32, device=DEVICE)
    counts = torch.tensor([[2]], dtype=torch.int32, device=DEVICE)
    a = sparse_decode_attention(q, k, k, indices, counts, block_size=16, backend="reference")
    b = sparse_decode_attention(q, k, k, indices, counts, block_size=16, backend="triton")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_triton_refuses_tiles_below_its_minimum():
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 30, 16)
    lists, counts = torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="tile_slots >= 16"):
        sparse_decode_triton(q, k, k, lists, counts, block_size=16, tile_slots=8)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        sparse_decode_triton(q, k, k, lists, counts, block_size=12)
    with pytest.raises(ValueError, match="head_dim >= 16"):
        sparse_decode_triton(q[..., :8], k[..., :8], k[..., :8], lists, counts, block_size=16)
