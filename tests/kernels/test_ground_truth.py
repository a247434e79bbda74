"""Distillation ground truth: the reference against a naive full-matrix oracle, the Triton kernel against the
reference (interpreted on CPU at small shapes, fp16/fp32), and the dispatch."""

import math

import pytest
import torch

from seer_adapter.kernels import ground_truth
from seer_adapter.kernels.ground_truth import (
    attention_with_block_ground_truth,
    attention_with_block_ground_truth_reference,
)
from seer_adapter.kernels.reference import causal_token_mask

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 and long sequences)")
requires_triton = pytest.mark.skipif("triton" not in ground_truth.GROUND_TRUTH_BACKENDS, reason="triton not installed")


def make_qkv(batch, hq, hkv, q_len, kv_len, head_dim, dtype, seed=0, device=DEVICE):
    """q ``[B, Hq, S, D]`` (a transpose of ``[B, S, Hq, D]``), k, v ``[B, Hkv, Sk, D]``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, hq, head_dim, generator=gen).to(device, dtype).transpose(1, 2)
    k = torch.randn(batch, hkv, kv_len, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, hkv, kv_len, head_dim, generator=gen).to(device, dtype)
    return q, k, v


def padding_mask(batch, kv_len, side, amounts, device=DEVICE):
    if side is None:
        return None
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b, amount in enumerate(amounts[:batch]):
        if side == "left":
            mask[b, :amount] = False
        else:
            mask[b, kv_len - amount :] = False
    return mask.to(device)


def naive_ground_truth(q, k, v, *, block_size, key_padding_mask=None, softcap=None, group_max=False):
    """The definition, spelled out in float64 with the full [S, Sk] probability matrix and loops over blocks."""
    batch, hq, q_len, head_dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    keys, values = k.double().repeat_interleave(group, dim=1), v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ keys.transpose(-1, -2) / math.sqrt(head_dim)  # [B, Hq, S, Sk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = causal_token_mask(q_len, kv_len, q.device).expand(batch, hq, q_len, kv_len)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    out = probs @ values
    block_map = torch.zeros(batch, hq, n_q, n_k, dtype=torch.float64)
    for b in range(batch):
        real_rows = [i for i in range(q_len) if key_padding_mask is None or key_padding_mask[b, i + kv_len - q_len]]
        for h in range(hq):
            for q_block in range(n_q):
                rows = [i for i in real_rows if q_block * block_size <= i < (q_block + 1) * block_size]
                for k_block in range(n_k):
                    if rows:
                        tile = probs[b, h, rows, k_block * block_size : (k_block + 1) * block_size]
                        block_map[b, h, q_block, k_block] = tile.max()
    if group_max:
        block_map = block_map.view(batch, hkv, group, n_q, n_k).amax(dim=2)
    row_sum = block_map.sum(dim=-1, keepdim=True)
    block_map = torch.where(row_sum > 0, block_map / row_sum, 0.0)
    return out, block_map


# (batch, hq, hkv, q_len, kv_len, head_dim, block_size, padding side, softcap)
ORACLE_CASES = {
    "mha_s40": (1, 2, 2, 40, 40, 16, 16, None, None),
    "gqa2_left_pad": (2, 4, 2, 37, 37, 16, 16, "left", None),
    "gqa4_right_pad_sk_gt_s": (2, 4, 1, 30, 53, 16, 16, "right", None),
    "gqa3_softcap": (1, 3, 1, 45, 45, 16, 32, None, 2.0),
}


@pytest.mark.parametrize("group_max", [False, True], ids=["per_q_head", "group_max"])
@pytest.mark.parametrize("case", list(ORACLE_CASES), ids=list(ORACLE_CASES))
def test_reference_matches_naive_oracle(case: str, group_max: bool) -> None:
    batch, hq, hkv, q_len, kv_len, head_dim, block_size, side, softcap = ORACLE_CASES[case]
    q, k, v = make_qkv(batch, hq, hkv, q_len, kv_len, head_dim, torch.float32, seed=len(case), device="cpu")
    key_padding_mask = padding_mask(batch, kv_len, side, (9, 20), device="cpu")
    kwargs = {
        "block_size": block_size,
        "key_padding_mask": key_padding_mask,
        "softcap": softcap,
        "group_max": group_max,
    }
    out, block_map = attention_with_block_ground_truth_reference(q, k, v, **kwargs)
    expected_out, expected_map = naive_ground_truth(q, k, v, **kwargs)
    assert block_map.dtype == torch.float32 and block_map.shape == expected_map.shape
    assert block_map.shape[1] == (hkv if group_max else hq)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_map.double(), expected_map, atol=1e-6, rtol=1e-5)


def test_reference_properties_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows sum to 1 (or are all zero), non-causal blocks are 0, and chunking over query blocks changes nothing."""
    q, k, v = make_qkv(2, 4, 2, 100, 140, 32, torch.float32, seed=1, device="cpu")
    key_padding_mask = padding_mask(2, 140, "left", (140, 30), device="cpu")  # sequence 0 entirely padding
    out, block_map = attention_with_block_ground_truth_reference(
        q, k, v, block_size=32, key_padding_mask=key_padding_mask
    )
    row_sum = block_map.sum(dim=-1)
    assert torch.all(row_sum[0] == 0) and torch.all(out[0] == 0)
    torch.testing.assert_close(row_sum[1], torch.ones_like(row_sum[1]))
    n_q, n_k = block_map.shape[-2:]
    last_row = (torch.arange(n_q) * 32 + 32).clamp(max=100) - 1 + 40
    non_causal = torch.arange(n_k)[None, :] * 32 > last_row[:, None]
    assert torch.all(block_map[..., non_causal] == 0)

    monkeypatch.setattr(ground_truth, "_MAX_SCORE_ELEMENTS", 1)  # one query block per chunk
    chunked_out, chunked_map = attention_with_block_ground_truth_reference(
        q, k, v, block_size=32, key_padding_mask=key_padding_mask
    )
    torch.testing.assert_close(chunked_out, out, atol=0, rtol=0)
    torch.testing.assert_close(chunked_map, block_map, atol=0, rtol=0)


# (batch, hq, hkv, q_len, kv_len, head_dim, block_size, padding side, softcap, dtype)
TRITON_CASES = {
    "s63_mha": (1, 2, 2, 63, 63, 64, 64, None, None, torch.float16),
    "s100_gqa4": (1, 4, 1, 100, 100, 64, 64, None, None, torch.float16),
    "s200_gqa7_block32": (1, 7, 1, 200, 200, 64, 32, None, None, torch.float16),
    "s200_gqa4_left_pad": (2, 8, 2, 200, 200, 64, 64, "left", None, torch.float16),
    "sk_gt_s_right_pad": (2, 4, 2, 100, 170, 64, 64, "right", None, torch.float16),
    "block128_d128": (1, 2, 1, 200, 256, 128, 128, None, None, torch.float16),
    "softcap_fp32": (1, 2, 1, 100, 100, 64, 64, None, 5.0, torch.float32),
    "head_dim_80_fp32_left_pad": (2, 2, 1, 90, 90, 80, 64, "left", None, torch.float32),
}


TWO_PASS_CASES = ["s100_gqa4", "s200_gqa4_left_pad", "softcap_fp32"]


@requires_triton
@pytest.mark.parametrize("group_max", [False, True], ids=["per_q_head", "group_max"])
@pytest.mark.parametrize(
    "case,single_pass",
    [(case, True) for case in TRITON_CASES] + [(case, False) for case in TWO_PASS_CASES],
    ids=[f"{case}-single_pass" for case in TRITON_CASES] + [f"{case}-two_pass" for case in TWO_PASS_CASES],
)
def test_triton_matches_reference(case: str, single_pass: bool, group_max: bool) -> None:
    batch, hq, hkv, q_len, kv_len, head_dim, block_size, side, softcap, dtype = TRITON_CASES[case]
    q, k, v = make_qkv(batch, hq, hkv, q_len, kv_len, head_dim, dtype, seed=len(case))
    key_padding_mask = padding_mask(batch, kv_len, side, (37, 90))
    kwargs = {
        "block_size": block_size,
        "key_padding_mask": key_padding_mask,
        "softcap": softcap,
        "group_max": group_max,
    }
    poisoned = torch.full((batch, q_len, hq, head_dim), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    out, block_map = ground_truth._launch_ground_truth(
        q, k, v, block_size, None, key_padding_mask, softcap, group_max, out=poisoned, single_pass=single_pass
    )
    expected_out, expected_map = attention_with_block_ground_truth_reference(q, k, v, **kwargs)
    assert not out.isnan().any() and not block_map.isnan().any()
    assert out.dtype == dtype and block_map.dtype == torch.float32 and block_map.shape == expected_map.shape
    atol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.float(), expected_out.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(block_map, expected_map, atol=1e-5, rtol=1e-4)


@requires_triton
def test_triton_query_blocks_split_over_programs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row tiles smaller than a query block (and key tiles smaller than a key block) merge through atomic max."""
    launch = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(ground_truth, "_ground_truth_launch_config", lambda *args: launch)
    q, k, v = make_qkv(2, 2, 1, 100, 120, 64, torch.float16, seed=9)
    key_padding_mask = padding_mask(2, 120, "right", (0, 50))
    for group_max, single_pass in ((False, True), (True, True), (True, False)):
        kwargs = {"block_size": 64, "key_padding_mask": key_padding_mask, "group_max": group_max}
        out, block_map = ground_truth._launch_ground_truth(
            q, k, v, 64, None, key_padding_mask, None, group_max, single_pass=single_pass
        )
        expected_out, expected_map = attention_with_block_ground_truth_reference(q, k, v, **kwargs)
        torch.testing.assert_close(out.float(), expected_out.float(), atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(block_map, expected_map, atol=1e-5, rtol=1e-4)


@requires_triton
def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_qkv(1, 2, 1, 70, 70, 64, torch.float16, seed=3)
    monkeypatch.delenv("SEER_ADAPTER_KERNEL", raising=False)
    expected = ground_truth.GROUND_TRUTH_BACKENDS["triton" if ON_GPU else "reference"](q, k, v, block_size=64)
    auto = attention_with_block_ground_truth(q, k, v, block_size=64)
    torch.testing.assert_close(auto, expected, atol=0, rtol=0)
    monkeypatch.setenv("SEER_ADAPTER_KERNEL", "triton")
    forced = attention_with_block_ground_truth(q, k, v, block_size=64)
    via_argument = attention_with_block_ground_truth(q, k, v, block_size=64, backend="triton")
    torch.testing.assert_close(forced, via_argument, atol=0, rtol=0)
    torch.testing.assert_close(forced[1], expected[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not available"):
        attention_with_block_ground_truth(q, k, v, block_size=64, backend="no-such-kernel")


@requires_gpu
@pytest.mark.parametrize("group_max", [False, True])
@pytest.mark.parametrize("block_size", [64, 128])
def test_gpu_bf16_matches_reference(block_size: int, group_max: bool) -> None:
    q_len = kv_len = 4096 + 37
    q, k, v = make_qkv(1, 32, 8, q_len, kv_len, 128, torch.bfloat16, seed=block_size)
    key_padding_mask = padding_mask(1, kv_len, "left", (300,))
    kwargs = {"block_size": block_size, "key_padding_mask": key_padding_mask, "group_max": group_max}
    out, block_map = ground_truth.attention_with_block_ground_truth_triton(q, k, v, **kwargs)
    expected_out, expected_map = attention_with_block_ground_truth_reference(q, k, v, **kwargs)
    torch.testing.assert_close(out.float(), expected_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(block_map, expected_map, atol=1e-3, rtol=1e-2)
