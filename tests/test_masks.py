import math

import pytest
import torch

from seer_adapter.masks import block_causal_mask, nz_ratio_to_topk, select_blocks


def _probs(batch, heads, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n, n, generator=g)
    allowed = block_causal_mask(n, n, torch.device("cpu"))
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1), allowed[None, None]


@pytest.mark.parametrize("nz", [0.1, 0.3, 0.5, 0.9])
def test_nz_ratio_keeps_about_that_fraction_of_the_triangle(nz):
    n = 256
    probs, allowed = _probs(1, 2, n)
    keep = select_blocks(probs, allowed, method="nz_ratio", nz_ratio=nz, block_size=64, force_local_block=False)
    density = keep.sum().item() / allowed.expand_as(keep).sum().item()
    assert abs(density - nz) < 0.02
    assert nz_ratio_to_topk(1.0, n) == n


def test_threshold_keeps_exactly_the_blocks_above_it():
    probs, allowed = _probs(2, 3, 20)
    keep = select_blocks(probs, allowed, method="threshold", threshold=0.05, block_size=64, force_local_block=False)
    assert torch.equal(keep, (probs > 0.05) & allowed)


def test_token_budget_keeps_budget_over_block_size_blocks():
    probs, allowed = _probs(1, 2, 40)
    keep = select_blocks(
        probs, allowed, method="token_budget", token_budget=640, block_size=64, force_local_block=False
    )
    per_row = keep.sum(-1)
    rows_allowed = allowed.expand_as(keep).sum(-1)
    assert torch.equal(per_row, rows_allowed.clamp(max=10))
    # the kept blocks are the most probable ones
    row = probs[0, 0, 30]
    assert set(row.topk(10).indices.tolist()) == set(keep[0, 0, 30].nonzero().flatten().tolist())


def test_forced_sink_local_and_dense_rows():
    probs, allowed = _probs(2, 1, 12)
    sink = torch.tensor([0, 3])
    keep = select_blocks(
        probs, allowed, method="threshold", threshold=0.99, block_size=64, sink_block=sink, dense_last_query_blocks=2
    )
    idx = torch.arange(12)
    assert keep[:, :, idx, idx].all()  # diagonal
    assert keep[0, 0, :, 0].all()
    assert keep[1, 0, 3:, 3].all() and not keep[1, 0, 3:10, 0].any()
    assert torch.equal(keep[:, :, -2:], allowed.expand_as(keep)[:, :, -2:])
    assert not (keep & ~allowed).any()


def test_dense_keeps_everything_allowed_and_nothing_else():
    probs, allowed = _probs(1, 2, 9)
    keep = select_blocks(probs, allowed, method="dense", block_size=64)
    assert torch.equal(keep, allowed.expand_as(keep))


def test_rows_never_empty_with_forced_blocks():
    probs, allowed = _probs(3, 4, 33)
    keep = select_blocks(
        probs, allowed, method="threshold", threshold=0.999, block_size=64, sink_block=torch.zeros(3, dtype=torch.long)
    )
    assert keep.any(-1).all()


def test_block_causal_mask_bottom_right_aligned():
    m = block_causal_mask(2, 5, torch.device("cpu"))
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    assert math.isclose(block_causal_mask(4, 4, torch.device("cpu")).float().mean().item(), 10 / 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "q_length,kv_length,kv_offset,window", [(1, 45, 0, None), (7, 30, 0, None), (1, 40, 0, 8), (5, 20, 3, 6)]
)
def test_capture_safe_eager_mask_equals_transformers_eager_mask(dtype, q_length, kv_length, kv_offset, window):
    """What static decoding steps of eager-attention models use while a CUDA graph is captured: the same mask as
    transformers' ``eager_mask`` (padding, sliding windows, offsets), and `SeerAttentionMask` picks it only then."""
    from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function

    from seer_adapter import attention

    padding = torch.ones(2, kv_offset + kv_length, dtype=torch.bool)
    padding[1, :9] = False  # a left-padded row
    kwargs = dict(
        batch_size=2,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=kv_offset + kv_length - q_length,
        kv_offset=kv_offset,
        mask_function=causal_mask_function if window is None else sliding_window_causal_mask_function(window),
        attention_mask=padding,
        dtype=dtype,
        allow_is_causal_skip=True,
    )
    want = eager_mask(**kwargs)
    got = attention.eager_mask_without_host_copy(**kwargs)
    assert got.dtype == dtype and torch.equal(got, want)

    capturing = {"value": False}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["value"])
        calls = []
        original = attention.eager_mask_without_host_copy
        patch.setattr(attention, "eager_mask_without_host_copy", lambda **kw: calls.append(1) or original(**kw))
        assert torch.equal(attention.SeerAttentionMask(kwargs).materialize("eager"), want) and not calls
        capturing["value"] = True
        assert torch.equal(attention.SeerAttentionMask(kwargs).materialize("eager"), want) and calls == [1]
