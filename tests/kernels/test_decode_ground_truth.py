"""Decode-gate distillation target: the Triton kernel against the PyTorch reference (interpreted on CPU at small
shapes, fp16/fp32; bf16 at 4k on a GPU) and the dispatch. The reference itself is checked against the definition in
tests/test_decode.py."""

import pytest
import torch

from seer_adapter.kernels import available_backends, decode_block_ground_truth
from seer_adapter.kernels.decode_ground_truth import decode_block_ground_truth_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 and long sequences)")
requires_triton = pytest.mark.skipif(
    "triton" not in available_backends("decode_ground_truth"), reason="triton not installed"
)


def make_qk(batch, hq, hkv, length, head_dim, dtype, seed=0):
    """q ``[B, Hq, S, D]`` (a transpose of ``[B, S, Hq, D]``, as the models make it), k ``[B, Hkv, S, D]``."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, length, hq, head_dim, generator=gen) * 2).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(batch, hkv, length, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k


def left_padding(batch, length, amounts):
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b, amount in enumerate(amounts[:batch]):
        mask[b, :amount] = False
    return mask.to(DEVICE)


# (batch, hq, hkv, length, head_dim, block_size, left padding per row or None, softcap, dtype, rows)
# rows: None (every token), "strided" (every 3rd after the first quarter, as distillation does), "shuffled" (an
# unsorted subset, so a tile's rows are far apart)
CASES = {
    "mha_s100_fp32": (1, 2, 2, 100, 16, 16, None, None, torch.float32, None),
    "gqa2_pad_fp16": (2, 4, 2, 113, 32, 16, (0, 37), None, torch.float16, "strided"),
    "gqa7_d64_fp16": (1, 14, 2, 150, 64, 32, None, None, torch.float16, "shuffled"),
    "gqa3_softcap_fp32": (2, 3, 1, 90, 24, 16, (50, 0), 3.0, torch.float32, "strided"),
    "one_block_fp16": (1, 2, 1, 16, 16, 16, None, None, torch.float16, None),
    # blocks below 16 keys: several per key tile; the last tile runs past the keys' end
    "block8_gqa2_pad_fp16": (2, 4, 2, 77, 32, 8, (0, 21), None, torch.float16, "strided"),
    "block4_gqa7_fp32": (1, 14, 2, 45, 16, 4, None, None, torch.float32, "shuffled"),
    "block8_softcap_fp32": (1, 3, 1, 9, 16, 8, None, 3.0, torch.float32, None),
}


def case_rows(rows, length):
    if rows is None:
        return None
    if rows == "strided":
        return torch.arange(length - 1, length // 4 - 1, -3).flip(0).to(DEVICE)
    gen = torch.Generator().manual_seed(length)
    return torch.randperm(length, generator=gen)[: length // 2].to(DEVICE)


@requires_triton
@pytest.mark.parametrize("strategy", ["per_head", "grouped"])
@pytest.mark.parametrize("target", ["max", "mass"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_reference(case: str, target: str, strategy: str) -> None:
    """Both strategies: a per-query-head record reduced in PyTorch, or the group's heads stacked in one tile and
    reduced in registers (its record is the result's size)."""
    from seer_adapter.kernels.decode_ground_truth_triton import (
        decode_block_ground_truth_triton_grouped,
        decode_block_ground_truth_triton_per_head,
    )

    batch, hq, hkv, length, head_dim, block_size, pad, softcap, dtype, rows = CASES[case]
    q, k = make_qk(batch, hq, hkv, length, head_dim, dtype, seed=len(case))
    mask = None if pad is None else left_padding(batch, length, pad)
    query_rows = case_rows(rows, length)
    n_rows = length if query_rows is None else query_rows.numel()
    n_blocks = -(-length // block_size)
    kwargs = {"block_size": block_size, "key_padding_mask": mask, "softcap": softcap, "query_rows": query_rows}
    kernel, record_heads = {
        "per_head": (decode_block_ground_truth_triton_per_head, hq),
        "grouped": (decode_block_ground_truth_triton_grouped, hkv),
    }[strategy]
    poisoned = torch.full((batch, record_heads, n_rows, n_blocks - 1), float("nan"), device=DEVICE)
    got = kernel(q, k, target=target, record=poisoned, **kwargs)
    want = decode_block_ground_truth_reference(q, k, target=target, **kwargs)
    assert got.shape == want.shape == (batch, hkv, n_rows, n_blocks) and got.dtype == torch.float32
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    sums = got.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-4) | (sums == 0))  # rows sum to 1 or are empty
    assert (sums > 0).any() == (n_blocks > 1)  # a single block is never strictly earlier than a token


@requires_triton
def test_bad_input_and_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    from seer_adapter.kernels.decode_ground_truth_triton import (
        decode_block_ground_truth_triton_grouped,
        decode_block_ground_truth_triton_per_head,
    )

    q, k = make_qk(1, 4, 2, 70, 16, torch.float16, seed=3)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        decode_block_ground_truth_triton_per_head(q, k, block_size=24)
    with pytest.raises(ValueError, match="query_rows"):
        decode_block_ground_truth_triton_per_head(q, k, block_size=16, query_rows=torch.tensor([70]))
    with pytest.raises(ValueError, match="record must be"):
        decode_block_ground_truth_triton_per_head(q, k, block_size=16, record=torch.zeros(1, 4, 70, 3))
    with pytest.raises(ValueError, match="decode target"):
        decode_block_ground_truth_triton_per_head(q, k, block_size=16, target="sum")
    monkeypatch.delenv("SEER_ADAPTER_KERNEL", raising=False)
    auto = decode_block_ground_truth(q, k, block_size=16)
    expected = (decode_block_ground_truth_triton_grouped if ON_GPU else decode_block_ground_truth_reference)(
        q, k, block_size=16
    )
    torch.testing.assert_close(auto, expected, atol=0, rtol=0)
    forced = decode_block_ground_truth(q, k, block_size=16, backend="triton")
    torch.testing.assert_close(forced, decode_block_ground_truth_reference(q, k, block_size=16), atol=2e-5, rtol=1e-4)
    per_head = decode_block_ground_truth(q, k, block_size=16, backend="triton_per_head")  # by name only
    torch.testing.assert_close(per_head, forced, atol=2e-5, rtol=1e-4)
    from seer_adapter.kernels import select_backend

    assert select_backend(DEVICE) != "triton_per_head"

    with pytest.raises(ValueError, match="record must be"):  # [B, Hkv, R, nK - 1] = [1, 2, 70, 4], not per query head
        decode_block_ground_truth_triton_grouped(q, k, block_size=16, record=torch.zeros(1, 4, 70, 4, device=DEVICE))


@requires_gpu
@pytest.mark.parametrize("target", ["max", "mass"])
@pytest.mark.parametrize(
    "shape",
    [(14, 2, 64, 64), (32, 8, 128, 64), (9, 3, 64, 128), (14, 2, 64, 8)],
    ids=["qwen", "llama8b", "bs128", "qwen_bs8"],
)
def test_gpu_bf16_matches_reference(shape, target: str) -> None:
    hq, hkv, head_dim, block_size = shape
    length = 4096 + 37
    q, k = make_qk(2, hq, hkv, length, head_dim, torch.bfloat16, seed=head_dim)
    mask = left_padding(2, length, (0, 300))
    rows = torch.arange(length - 1, length // 4 - 1, -4, device=DEVICE).flip(0)
    kwargs = {"block_size": block_size, "key_padding_mask": mask, "query_rows": rows, "target": target}
    want = decode_block_ground_truth_reference(q, k, **kwargs)
    for backend in ("triton", "triton_per_head"):
        got = decode_block_ground_truth(q, k, backend=backend, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
