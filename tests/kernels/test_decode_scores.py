"""Decode-gate scores of one step: the reference against the `DecodeGate` it fuses, the Triton kernel (under the
interpreter on CPU) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from seer_adapter.gate import DecodeGate
from seer_adapter.kernels import available_backends, decode_gate_scores
from seer_adapter.kernels.decode_scores import decode_gate_scores_reference
from seer_adapter.kernels.decode_scores_triton import decode_gate_scores_triton
from seer_adapter.rope import apply_rope

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")  # the Triton kernels run compiled on a GPU, interpreted on CPU
LOWEST = torch.finfo(torch.float32).min


def _tables(style: str, rot: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``[N, rot]`` at ``positions`` in the layout ``style`` expects (as the model would pass them)."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = positions.double()[:, None] * freqs[None, :]  # [N, rot / 2]
    angles = angles.repeat_interleave(2, dim=-1) if style == "interleaved" else torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def _gate(
    hq: int, hkv: int, head_dim: int, gate_dim: int, dtype: torch.dtype, seed: int, num_queries: int = 1
) -> DecodeGate:
    gate = DecodeGate(
        hq, hkv, head_dim, gate_dim, block_size=16, k_pooling=["avg", "max"], dtype=dtype, num_queries=num_queries
    )
    with torch.no_grad():  # random weights: the mean-pooling prior would hide head-order bugs
        gate.q_proj.weight.copy_(torch.randn(gate.q_proj.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return gate


@pytest.mark.parametrize("num_queries", [1, 2, 4])
@pytest.mark.parametrize("style", ["half", "interleaved", "interleaved_half_table", None])
def test_reference_is_the_decode_gate_query_and_logits(style, num_queries):
    """The fused step's definition equals the gate's own query + logits (training's path), with one merged gate
    query or several (their logits combined by logsumexp)."""
    g = torch.Generator().manual_seed(1)
    batch, hq, hkv, head_dim, gate_dim, n_c = 3, 8, 2, 16, 16, 9
    gate = _gate(hq, hkv, head_dim, gate_dim, torch.float32, 2, num_queries)
    q = torch.randn(batch, hq, head_dim, generator=g)
    keys = torch.randn(batch, hkv, n_c, gate_dim, generator=g)
    cos = sin = None
    if style is not None:
        cos, sin = _tables("half" if style == "interleaved_half_table" else style, 12, torch.tensor([5, 90, 33]))
    got = decode_gate_scores_reference(
        q,
        cos,
        sin,
        gate.q_proj.weight,
        keys,
        7,
        rope_style=style or "half",
        scale=1 / math.sqrt(gate_dim),
        num_queries=num_queries,
    )
    assert got.shape == (batch, hkv, 1, 8) and got.dtype == torch.float32
    # the decode gate's own path, as attention.py ran it before the fused kernel existed
    q_pre = q[:, :, None]
    tables = (None, None) if cos is None else (cos[:, None], sin[:, None])
    if style is not None:
        q_pre = apply_rope(q_pre, *tables, style, inverse=True)
    want = gate.logits(gate.query(q_pre, *tables, rope_style=style or "half"), keys[:, :, :7])  # [B, Hkv, 1, 7]
    torch.testing.assert_close(got[..., :7], want, atol=1e-5, rtol=1e-5)
    assert bool((got[..., 7] == LOWEST).all())


def test_reference_rejects_bad_input():
    q, w, keys = torch.randn(1, 4, 8), torch.randn(2, 8, 16), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="does not merge"):
        decode_gate_scores_reference(q, None, None, torch.randn(2, 8, 12), keys, 2)
    with pytest.raises(ValueError, match="within the 3 compressed blocks"):
        decode_gate_scores_reference(q, None, None, w, keys, 4)
    with pytest.raises(ValueError, match="come together"):
        decode_gate_scores_reference(q, torch.ones(1, 8), None, w, keys, 2)
    with pytest.raises(ValueError, match="rotary width"):
        decode_gate_scores_reference(q, torch.ones(1, 10), torch.ones(1, 10), w, keys, 2)
    with pytest.raises(ValueError, match="tensor n_earlier must be an int32/int64"):
        decode_gate_scores_reference(q, None, None, w, keys, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"G=8\] \(q_weight's 8 rows are 1 gate query of G\)"):
        decode_gate_scores_reference(q, None, None, w, torch.randn(1, 2, 3, 4), 2)  # 2 queries of 4, unsaid
    with pytest.raises(ValueError, match="num_queries=3 must be a positive divisor"):
        decode_gate_scores_reference(q, None, None, w, keys, 2, num_queries=3)


CASES = [
    # batch, hq, hkv, head_dim, gate_dim, rot, style, n_earlier, capacity, shared_tables
    (2, 8, 2, 16, 16, 16, "half", 37, 50, False),
    (3, 7, 1, 16, 32, 8, "half", 5, 5, True),  # group of 7, partial rotary, gate_dim != head_dim
    (1, 4, 4, 32, 16, 16, "interleaved", 64, 70, False),  # MHA (group 1)
    (2, 6, 2, 24, 24, 24, "interleaved_half_table", 33, 40, False),  # head_dim not a power of two
    (2, 8, 2, 16, 16, 0, None, 20, 21, False),  # no RoPE
    (18, 4, 2, 32, 32, 32, "half", 9, 12, False),  # two tiles of 16 batch rows; RoPE partners in the other 16 channels
    (2, 8, 2, 16, 16, 16, "half", 0, 4, False),  # nothing earlier: only the current block
]


@pytest.mark.parametrize("batch,hq,hkv,head_dim,gate_dim,rot,style,n_earlier,capacity,shared", CASES)
@pytest.mark.parametrize("dtype,gate_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("n_queries,merge", [(1, "mixture"), (3, "mixture"), (3, "logsumexp")])
def test_triton_matches_reference(batch, hq, hkv, head_dim, gate_dim, rot, style, n_earlier, capacity, shared, dtype,
                                  gate_dtype, n_queries, merge):  # fmt: skip
    """``n_queries`` gate queries per KV head (``q_weight [Hkv, m·G, g·D]``), scored against keys read once; the
    mixture's normalisers skip the blocks without a real token (``block_valid``, the first row's first blocks)."""
    g = torch.Generator().manual_seed(batch * 100 + n_earlier)
    weight = torch.randn(hkv, n_queries * gate_dim, hq // hkv * head_dim, generator=g).div(8).to(gate_dtype)
    valid = torch.ones(batch, capacity + 3, dtype=torch.bool)  # wider than the blocks: a view of a larger buffer
    valid[0, : n_earlier // 3] = False  # left padding
    q = torch.randn(batch, hq, 1, head_dim, generator=g).to(dtype)[:, :, 0]  # a [B, Hq, 1, D] query's view
    buffer = torch.randn(batch, hkv, capacity, gate_dim, generator=g).to(gate_dtype)
    keys = buffer[:, :, : max(n_earlier, 1)]  # a view of the growable compression buffer
    cos = sin = None
    if style is not None:
        positions = torch.tensor([7]) if shared else torch.arange(batch) * 31 + 3
        cos, sin = _tables("half" if style == "interleaved_half_table" else style, rot, positions)
    args = [t if t is None else t.to(DEVICE) for t in (q, cos, sin, weight, keys)]
    kwargs = dict(rope_style=style or "half", scale=1 / math.sqrt(gate_dim), num_queries=n_queries,
                  query_merge=merge, block_valid=valid[:, :capacity].to(DEVICE))  # fmt: skip
    got = decode_gate_scores_triton(*args, n_earlier, **kwargs)
    want = decode_gate_scores_reference(*[t if t is None else t.float() for t in args[:3]], *args[3:], n_earlier,
                                        **kwargs)  # fmt: skip
    assert got.shape == (batch, hkv, 1, n_earlier + 1) and not got.isnan().any()
    tolerance = 1e-4 if gate_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=tolerance, rtol=tolerance)
    # n_earlier on the device (shape-static steps): every column of the whole buffer, the lowest float from it on
    args[4] = buffer.to(DEVICE)
    count = torch.tensor([n_earlier], device=DEVICE)
    got_static = decode_gate_scores_triton(*args, count, **kwargs)
    want_static = decode_gate_scores_reference(*[t if t is None else t.float() for t in args[:3]], *args[3:], count,
                                               **kwargs)  # fmt: skip
    assert got_static.shape == (batch, hkv, 1, capacity)
    torch.testing.assert_close(got_static.cpu(), want_static.cpu(), atol=tolerance, rtol=tolerance)
    common = min(n_earlier + 1, capacity)  # the static layout has one column per buffer slot
    torch.testing.assert_close(want_static[..., :common].cpu(), want[..., :common].cpu())
    assert bool((want_static[..., n_earlier:] == torch.finfo(torch.float32).min).all())


@pytest.mark.parametrize("key_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keys_score_like_their_fp32_values(key_dtype):
    """``decode_key_dtype``: fp32 gate queries against half-precision compressed keys score exactly as against those
    keys' fp32 values (the kernel reads them and computes in fp32), in both layouts."""
    g = torch.Generator().manual_seed(4)
    batch, hq, hkv, head_dim, gate_dim, n_earlier, capacity = 2, 8, 2, 16, 16, 70, 90
    weight = torch.randn(hkv, 2 * gate_dim, hq // hkv * head_dim, generator=g).div(8)
    q = torch.randn(batch, hq, head_dim, generator=g)
    buffer = torch.randn(batch, hkv, capacity, gate_dim, generator=g).to(key_dtype)
    cos, sin = _tables("half", 16, torch.tensor([100, 7]))
    args = [t.to(DEVICE) for t in (q, cos, sin, weight)]
    kwargs = dict(scale=0.25, num_queries=2, query_merge="mixture")
    for keys, count in ((buffer[:, :, :n_earlier], n_earlier), (buffer, torch.tensor([n_earlier], device=DEVICE))):
        want = decode_gate_scores_reference(*args, keys.float().to(DEVICE), count, **kwargs)
        for scores in (decode_gate_scores_reference, decode_gate_scores_triton):
            got = scores(*args, keys.to(DEVICE), count, **kwargs)
            torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_queries", [2, 5])
def test_mixture_merge_over_several_chunks_of_blocks(n_queries):
    """The merge kernel walks each row's columns in tiles (1024 with 2 queries, 256 with 5), keeping a running
    maximum and sum per query: a long context spans several tiles, with padding blocks among them, in the dynamic and
    the shape-static layout. The last blocks hold the largest logits, so the running maximum rises in the last tile
    and the sums must be rescaled."""
    batch, hq, hkv, head_dim, gate_dim, n_earlier, capacity = 2, 10, 1, 16, 16, 2100, 2500
    g = torch.Generator().manual_seed(n_queries)
    weight = torch.randn(hkv, n_queries * gate_dim, hq // hkv * head_dim, generator=g).div(4)
    q = torch.randn(batch, hq, head_dim, generator=g)
    buffer = torch.randn(batch, hkv, capacity, gate_dim, generator=g)
    buffer[:, :, 2048:] *= 4
    valid = torch.ones(batch, capacity, dtype=torch.bool)
    valid[1, :1300] = False  # a left-padded row whose real tokens start in the second chunk
    cos, sin = _tables("half", 16, torch.tensor([40000]))
    args = [t.to(DEVICE) for t in (q, cos, sin, weight)]
    kwargs = dict(scale=0.25, num_queries=n_queries, block_valid=valid.to(DEVICE))
    for keys, count in ((buffer[:, :, :n_earlier], n_earlier), (buffer, torch.tensor([n_earlier]))):
        count = count.to(DEVICE) if isinstance(count, torch.Tensor) else count
        got = decode_gate_scores_triton(*args, keys.to(DEVICE), count, **kwargs)
        want = decode_gate_scores_reference(*args, keys.to(DEVICE), count, **kwargs)
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-4, rtol=1e-4)
        # the real blocks' scores are log-probabilities of one distribution per row and KV head
        probability = want[..., :n_earlier].exp().masked_fill(~valid[:, None, None, :n_earlier].to(DEVICE), 0)
        torch.testing.assert_close(probability.sum(-1).cpu(), torch.ones(batch, hkv, 1))


def test_dispatch_picks_triton_on_cuda_and_reference_elsewhere():
    assert "triton" in available_backends("decode_scores") and "reference" in available_backends("decode_scores")
    q, w, keys = torch.randn(1, 4, 16), torch.randn(2, 16, 32), torch.randn(1, 2, 3, 16)
    got = decode_gate_scores(q, None, None, w, keys, 3, backend="reference")
    torch.testing.assert_close(got, decode_gate_scores_reference(q, None, None, w, keys, 3))


@pytest.mark.parametrize("method", ["token_budget", "threshold"])
@pytest.mark.parametrize("gate_queries", [1, 2])
def test_decoding_through_every_triton_kernel_equals_the_reference_path(monkeypatch, method, gate_queries):
    """A whole decoding run of a tiny model (left padding, a block completing on the way, one block of three chosen
    by the gate) with every kernel in Triton (scores, selection, sparse decode attention) gives the reference path's
    logits, with one or two gate queries per KV head."""
    from tiny_models import tiny_model

    from seer_adapter import SeerAttentionConfig, SeerDynamicCache, get_seer_model
    from seer_adapter.evaluation import cache_argument

    model = get_seer_model(
        tiny_model("llama").to(DEVICE),
        SeerAttentionConfig(
            block_size=16, dense_below_length=10_000, decode_gate=True, decode_method=method,
            decode_token_budget=48, decode_threshold=0.2, decode_gate_queries=gate_queries,
        ),
    )  # fmt: skip
    with torch.no_grad():  # random decode gates: the mean prior would make the scores too regular to test order
        for gate in model.gates().values():
            gate.decode.q_proj.weight.normal_(0, 0.3, generator=torch.Generator(DEVICE).manual_seed(5))
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 128, (2, 60), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :21] = 0

    name = cache_argument(model.base_model)

    def run(backend: str) -> torch.Tensor:
        monkeypatch.setenv("SEER_ADAPTER_KERNEL", backend)
        cache, logits = SeerDynamicCache(config=model.config), []
        with torch.no_grad():
            model(input_ids=ids[:, :50], attention_mask=mask[:, :50], **{name: cache}, use_cache=True)
            for t in range(50, 60):  # slot 48 completes block 2 on the way
                out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **{name: cache})
                logits.append(out.logits[:, -1])
        assert all(s["mode"] == "sparse" for s in model.sparsity_stats())
        return torch.stack(logits)

    torch.testing.assert_close(run("triton"), run("reference"), atol=2e-4, rtol=2e-4)
