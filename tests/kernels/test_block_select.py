"""Fused block selection (Triton) against the PyTorch path (softmax -> select_blocks -> block_mask_to_indices).

On CPU the Triton kernel runs under the interpreter (see conftest.py).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from seer_adapter.kernels import (  # noqa: E402
    BlockLists,
    block_select_triton,
    block_sparse_attention,
    select_block_lists,
)
from seer_adapter.kernels.block_lists import (  # noqa: E402
    block_mask_to_indices,
    causal_block_allowed,
    select_block_lists_reference,
)
from seer_adapter.kernels.block_select_triton import select_block_lists_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def lists_as_rows(lists: BlockLists) -> list[list[int]]:
    counts = lists.counts.flatten().tolist()
    indices = lists.indices.flatten(0, 2).cpu()
    return [indices[row, :count].tolist() for row, count in enumerate(counts)]


def make_case(batch, heads, q_len, kv_len, block_size, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    scores = (torch.randn(batch, heads, n_q, n_k, generator=gen) * 3).to(DEVICE)
    block_valid = sink = None
    if padded:
        # Left padding: the first `pad` tokens of row b are padding.
        pads = torch.randint(0, kv_len // 2, (batch,), generator=gen)
        tokens = torch.arange(kv_len)[None, :] >= pads[:, None]  # [B, Sk]
        padded_tokens = torch.nn.functional.pad(tokens, (0, n_k * block_size - kv_len))
        block_valid = padded_tokens.view(batch, n_k, block_size).any(-1).to(DEVICE)
        sink = (pads // block_size).to(DEVICE)
    return scores, block_valid, sink


@pytest.fixture(params=[False, True], ids=["full_bisection", "early_exit"])
def bisection_exit(request, monkeypatch) -> bool:
    """Run a test with the kernel's top-k bisection run to the end and stopped at the first exact count."""
    monkeypatch.setattr(block_select_triton, "EARLY_EXIT_SEARCH", request.param)
    return request.param


CASES = [
    # batch, heads, q_len, kv_len, block_size
    (1, 1, 63, 63, 16),
    (2, 3, 100, 100, 16),
    (1, 2, 1000, 1000, 64),
    (2, 2, 300, 700, 32),
    (1, 4, 640, 640, 64),
]


@pytest.mark.usefixtures("bisection_exit")
@pytest.mark.parametrize("method,params", [("threshold", {"threshold": 0.05}), ("token_budget", {"token_budget": 640})])
@pytest.mark.parametrize("n_blocks", [1, 2, 37, 3000])
def test_decode_shaped_selection_matches_reference(n_blocks, method, params) -> None:
    """A decoding step as `seer_adapter.decode.select_decode_blocks` poses it: one query row (the cache's last slot)
    per KV head, the current block scored with the lowest finite float, padding-only blocks, a sink past block 0."""
    gen = torch.Generator().manual_seed(n_blocks)
    batch, heads, block_size = 3, 2, 64
    scores = torch.randn(batch, heads, 1, n_blocks, generator=gen) * 3
    scores[..., -1] = torch.finfo(torch.float32).min
    block_valid = torch.ones(batch, n_blocks, dtype=torch.bool)
    sink = torch.tensor([0, min(2, n_blocks - 1), n_blocks - 1])
    block_valid[1, : sink[1]] = False
    block_valid[2, :-1] = False  # nothing earlier is real: the sink is the current block
    kwargs = dict(
        method=method, block_size=block_size, q_len=1, kv_len=n_blocks * block_size,
        block_valid=block_valid.to(DEVICE), sink_block=sink.to(DEVICE), **params,
    )  # fmt: skip
    expected, expected_allowed = select_block_lists_reference(scores.to(DEVICE), **kwargs)
    got, got_allowed = select_block_lists_triton(scores.to(DEVICE), **kwargs)
    assert torch.equal(got_allowed.cpu(), expected_allowed.cpu())
    assert torch.equal(got.counts.cpu(), expected.counts.cpu())
    assert lists_as_rows(got) == lists_as_rows(expected)
    assert all(row[-1] == n_blocks - 1 for row in lists_as_rows(got))  # the current block is always kept
    # The same step laid out as a shape-static step does: a wider buffer (stale scores and validity after the
    # current block), the current block read from the device through local_block.
    spare = 5
    wide_scores = torch.cat((scores, torch.randn(batch, heads, 1, spare, generator=gen) * 9), dim=-1)
    wide_valid = torch.cat((block_valid, torch.rand(batch, spare, generator=gen) > 0.5), dim=-1)
    wide = dict(kwargs, kv_len=(n_blocks + spare) * block_size, block_valid=wide_valid.to(DEVICE))
    local = torch.tensor([n_blocks - 1], device=DEVICE)
    for select in (select_block_lists_reference, select_block_lists_triton):
        static, static_allowed = select(wide_scores.to(DEVICE), local_block=local, **wide)
        assert torch.equal(static_allowed.cpu(), expected_allowed.cpu()), select.__name__
        assert lists_as_rows(static) == lists_as_rows(expected), select.__name__


@pytest.mark.usefixtures("bisection_exit")
@pytest.mark.parametrize(
    "batch,heads,q_len,kv_len,block_size,padded",
    [(*case, False) for case in CASES] + [(*CASES[1], True), (*CASES[3], True)],
)
@pytest.mark.parametrize(
    "method,params",
    [
        ("dense", {}),
        ("threshold", {"threshold": 0.02}),
        ("nz_ratio", {"nz_ratio": 0.3}),
        ("nz_ratio", {"nz_ratio": 0.9}),
        ("token_budget", {"token_budget": 96}),
    ],
)
def test_select_block_lists_matches_reference(batch, heads, q_len, kv_len, block_size, method, params, padded) -> None:
    scores, block_valid, sink = make_case(batch, heads, q_len, kv_len, block_size, padded, seed=q_len + heads)
    kwargs = dict(
        method=method, block_size=block_size, q_len=q_len, kv_len=kv_len, block_valid=block_valid, sink_block=sink,
        **params,
    )  # fmt: skip
    expected, expected_allowed = select_block_lists_reference(scores, **kwargs)
    got, got_allowed = select_block_lists_triton(scores, **kwargs)
    assert torch.equal(got_allowed.cpu(), expected_allowed.cpu())
    assert torch.equal(got.counts.cpu(), expected.counts.cpu())
    assert lists_as_rows(got) == lists_as_rows(expected)


@pytest.mark.parametrize("apply_softmax", [True, False])
@pytest.mark.parametrize("dense_last", [0, 2])
@pytest.mark.parametrize("force_local", [True, False])
def test_select_block_lists_options(apply_softmax, dense_last, force_local) -> None:
    scores, _, _ = make_case(2, 2, 500, 500, 32, False, seed=7)
    if not apply_softmax:
        scores = scores.softmax(-1)  # probabilities from an external scorer
    kwargs = dict(
        method="nz_ratio", nz_ratio=0.2, block_size=32, q_len=500, kv_len=500, apply_softmax=apply_softmax,
        dense_last_query_blocks=dense_last, force_local_block=force_local,
        sink_block=torch.zeros(2, dtype=torch.long, device=DEVICE),
    )  # fmt: skip
    expected, _ = select_block_lists_reference(scores, **kwargs)
    got, _ = select_block_lists_triton(scores, **kwargs)
    assert lists_as_rows(got) == lists_as_rows(expected)


@pytest.mark.usefixtures("bisection_exit")
def test_select_block_lists_ties_keep_k_lowest_blocks() -> None:
    # All-equal scores: every row keeps k blocks (forced ones first), the remaining ones the lowest indices.
    n_blocks = 20
    scores = torch.zeros(1, 1, n_blocks, n_blocks, device=DEVICE)
    lists, _ = select_block_lists_triton(
        scores, method="token_budget", token_budget=4 * 16, block_size=16, q_len=16 * n_blocks, kv_len=16 * n_blocks,
        sink_block=torch.zeros(1, dtype=torch.long, device=DEVICE),
    )  # fmt: skip
    for q_block, row in enumerate(lists_as_rows(lists)):
        allowed = list(range(q_block + 1))
        expected = allowed if len(allowed) <= 4 else sorted({0, q_block} | set(allowed[1:3]))
        assert row == expected, (q_block, row)


@pytest.mark.usefixtures("bisection_exit")
def test_select_block_lists_always_keeps_forced_blocks_and_stays_causal() -> None:
    scores, block_valid, sink = make_case(2, 3, 900, 900, 64, True, seed=3)
    lists, allowed_counts = select_block_lists_triton(
        scores, method="nz_ratio", nz_ratio=0.05, block_size=64, q_len=900, kv_len=900, block_valid=block_valid,
        sink_block=sink,
    )  # fmt: skip
    mask = lists.to_mask().cpu()
    allowed = causal_block_allowed(15, 15, block_size=64, q_len=900, kv_len=900, block_valid=block_valid.cpu())
    assert not (mask & ~allowed).any()
    assert torch.equal(allowed_counts.cpu(), allowed.expand_as(mask).sum(-1, dtype=torch.int32))
    rows = torch.arange(15)
    assert torch.equal(mask[:, :, rows, rows], allowed.expand_as(mask)[:, :, rows, rows])  # diagonal where allowed
    for b in range(2):
        assert mask[b, :, int(sink[b]) :, int(sink[b])].all()  # sink block of every row that can see it


def test_block_lists_to_mask_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 9, 9, generator=gen) < 0.4
    mask &= torch.ones(9, 9, dtype=torch.bool).tril()
    indices, counts = block_mask_to_indices(mask, block_size=16, q_len=144, kv_len=144)
    assert torch.equal(BlockLists(indices, counts, 9).to_mask(), mask)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_sparse_attention_accepts_block_lists(backend) -> None:
    if backend == "triton" and not ON_GPU:
        import os

        assert os.environ.get("TRITON_INTERPRET") == "1"
    gen = torch.Generator().manual_seed(1)
    batch, hq, hkv, seq, dim, block = 2, 4, 2, 200, 32, 32
    dtype = torch.float16 if ON_GPU else torch.float32
    q = torch.randn(batch, hq, seq, dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, seq, dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, seq, dim, generator=gen).to(DEVICE, dtype)
    n_blocks = math.ceil(seq / block)
    scores = torch.randn(batch, hkv, n_blocks, n_blocks, generator=gen).to(DEVICE)
    lists, _ = select_block_lists(
        scores, method="nz_ratio", nz_ratio=0.4, block_size=block, q_len=seq, kv_len=seq, backend=backend
    )
    expected = block_sparse_attention(q, k, v, lists.to_mask(), block_size=block, backend="reference")
    out = block_sparse_attention(q, k, v, lists, block_size=block, backend=backend)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-3, rtol=2e-3)


def test_select_block_lists_rejects_bad_input() -> None:
    scores = torch.zeros(1, 1, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="unknown sparsity method"):
        select_block_lists_triton(scores, method="top_p", block_size=16, q_len=64, kv_len=64)
    with pytest.raises(ValueError, match="do not fit"):
        select_block_lists_triton(scores, method="dense", block_size=16, q_len=100, kv_len=100)
    with pytest.raises(ValueError, match="block_valid"):
        select_block_lists_triton(
            scores, method="dense", block_size=16, q_len=64, kv_len=64, block_valid=torch.ones(1, 3, dtype=torch.bool)
        )
    for select in (select_block_lists_reference, select_block_lists_triton):  # local_block: one query row only
        with pytest.raises(ValueError, match="local_block must be an int"):
            select(scores, method="dense", block_size=16, q_len=64, kv_len=64, local_block=torch.tensor([1]))


def _selection_and_attention(q, k, v, scores, block):
    lists, _ = select_block_lists(
        scores, method="nz_ratio", nz_ratio=0.3, block_size=block, q_len=q.shape[2], kv_len=k.shape[2]
    )
    return block_sparse_attention(q, k, v, lists, block_size=block)


def test_torch_compile_sees_selection_and_indexed_attention_as_ops() -> None:
    gen = torch.Generator().manual_seed(2)
    dtype = torch.float16 if ON_GPU else torch.float32
    q = torch.randn(1, 2, 130, 32, generator=gen).to(DEVICE, dtype)
    k = torch.randn(1, 1, 130, 32, generator=gen).to(DEVICE, dtype)
    v = torch.randn(1, 1, 130, 32, generator=gen).to(DEVICE, dtype)
    scores = torch.randn(1, 2, 5, 5, generator=gen).to(DEVICE)
    expected = _selection_and_attention(q, k, v, scores, 32)
    compiled = torch.compile(_selection_and_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, scores, 32), expected, atol=0, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
def test_selection_and_attention_replay_in_a_cuda_graph() -> None:
    """No host synchronisation on the sparse path: scores -> lists -> attention captures into one CUDA graph."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, 4096, 128, generator=gen).to(DEVICE, torch.bfloat16)
    k = torch.randn(1, 2, 4096, 128, generator=gen).to(DEVICE, torch.bfloat16)
    v = torch.randn(1, 2, 4096, 128, generator=gen).to(DEVICE, torch.bfloat16)
    scores = torch.randn(1, 8, 64, 64, generator=gen).to(DEVICE)
    expected = _selection_and_attention(q, k, v, scores, 64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _selection_and_attention(q, k, v, scores, 64)  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _selection_and_attention(q, k, v, scores, 64)
    scores.copy_(torch.randn(1, 8, 64, 64, generator=gen).to(DEVICE))  # new gate scores, same buffers
    graph.replay()
    torch.testing.assert_close(captured, _selection_and_attention(q, k, v, scores, 64), atol=0, rtol=0)
    assert not torch.equal(captured, expected)
