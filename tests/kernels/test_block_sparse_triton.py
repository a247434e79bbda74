"""Triton block-sparse attention against the PyTorch reference.

On CPU the kernels run under the Triton interpreter (see conftest.py): small shapes, fp16/fp32 only (the interpreter's
bf16 ``tl.dot`` is wrong). bf16 and long sequences are covered by the GPU-only tests at the end.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from seer_adapter.kernels import block_lists, block_sparse_attention, block_sparse_triton, select_backend  # noqa: E402
from seer_adapter.kernels.block_sparse_triton import (  # noqa: E402
    ENV_KERNEL_CONFIG,
    KernelConfig,
    block_mask_to_indices,
    block_sparse_attention_triton,
    choose_kernel_config,
)
from seer_adapter.kernels.reference import block_sparse_attention_reference  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 and long sequences)")


def make_qkv(
    batch: int, hq: int, hkv: int, q_len: int, kv_len: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, S, D]`` as a transpose of ``[B, S, Hq, D]`` (as transformers passes it); k, v ``[B, Hkv, Sk, D]``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, hq, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(batch, hkv, kv_len, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, kv_len, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k, v


def random_block_mask(
    batch: int, heads: int, q_len: int, kv_len: int, block_size: int, density: float, seed: int = 0, forced: bool = True
) -> torch.Tensor:
    """bool ``[B, H, nQ, nK]`` with ``density`` of random blocks; ``forced`` keeps the sink block and, for every query
    block, the key blocks holding its rows' own positions (so every row sees at least one key)."""
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    gen = torch.Generator().manual_seed(seed + 1000)
    mask = torch.rand(batch, heads, n_q, n_k, generator=gen) < density
    if forced:
        mask[..., 0] = True
        for q_block in range(n_q):
            first_row, last_row = q_block * block_size, min((q_block + 1) * block_size, q_len) - 1
            mask[..., q_block, (first_row + kv_len - q_len) // block_size] = True
            mask[..., q_block, (last_row + kv_len - q_len) // block_size] = True
    return mask.to(DEVICE)


def padding_mask(batch: int, kv_len: int, side: str | None, amounts: tuple[int, ...]) -> torch.Tensor | None:
    """bool ``[B, Sk]`` with ``amounts[b]`` padding tokens on the ``side`` ("left" / "right") of sequence b."""
    if side is None:
        return None
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b, amount in enumerate(amounts[:batch]):
        if side == "left":
            mask[b, :amount] = False
        else:
            mask[b, kv_len - amount :] = False
    return mask.to(DEVICE)


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}.get(
        dtype, {"atol": 2e-2, "rtol": 2e-2}
    )


def run_poisoned(q, k, v, block_mask, *, block_size, scale=None, key_padding_mask=None, softcap=None, config=None):
    """The kernel writing into NaN-filled ``out`` and ``lse``: any element it forgets stays NaN."""
    batch, hq, q_len, head_dim = q.shape
    out = torch.full((batch, q_len, hq, head_dim), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.full((batch, hq, q_len), float("nan"), dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return block_sparse_triton._launch_block_sparse_forward(
        q, k, v, block_mask, block_size, scale, key_padding_mask, softcap, config=config, out=out, lse=lse
    )


def assert_matches_reference(q, k, v, block_mask, *, block_size, key_padding_mask=None, softcap=None, config=None):
    out, lse = run_poisoned(
        q, k, v, block_mask, block_size=block_size, key_padding_mask=key_padding_mask, softcap=softcap, config=config
    )
    ref_out, ref_lse = block_sparse_attention_reference(
        q, k, v, block_mask, block_size=block_size, key_padding_mask=key_padding_mask, softcap=softcap, return_lse=True
    )
    assert not out.isnan().any(), "kernel left output elements unwritten (NaN)"
    assert not lse.isnan().any(), "kernel left lse elements unwritten (NaN)"
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerances(q.dtype))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without visible keys differ"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-4, rtol=2e-4)


# (batch, hq, hkv, q_len, kv_len, head_dim, block_size, mask_heads, padding side, softcap, dtype, density)
CASES = {
    "s63_mha": (1, 2, 2, 63, 63, 64, 64, "q", None, None, torch.float16, 0.5),
    "s100_gqa4_qmask": (1, 4, 1, 100, 100, 64, 64, "q", None, None, torch.float16, 0.5),
    "s100_gqa4_kvmask": (1, 4, 1, 100, 100, 64, 64, "kv", None, None, torch.float16, 0.5),
    "s200_gqa7_kvmask": (1, 7, 1, 200, 200, 64, 64, "kv", None, None, torch.float16, 0.4),
    "s200_gqa7_qmask": (1, 7, 1, 200, 200, 64, 32, "q", None, None, torch.float16, 0.4),
    "s200_gqa4_kvmask_left_pad": (2, 8, 2, 200, 200, 64, 64, "kv", "left", None, torch.float16, 0.5),
    "s200_gqa4_qmask_right_pad": (2, 8, 2, 200, 200, 64, 64, "q", "right", None, torch.float16, 0.5),
    "sk_gt_s_qmask": (1, 4, 2, 100, 160, 64, 64, "q", None, None, torch.float16, 0.5),
    "sk_gt_s_kvmask_block32": (1, 4, 2, 100, 230, 64, 32, "kv", "left", None, torch.float16, 0.4),
    "block128_d128": (1, 2, 1, 200, 256, 128, 128, "q", None, None, torch.float16, 0.6),
    "softcap_fp32": (1, 2, 1, 100, 100, 64, 64, "q", None, 5.0, torch.float32, 0.6),
    "fp32_kvmask_left_pad": (2, 4, 2, 130, 150, 64, 64, "kv", "left", None, torch.float32, 0.5),
    "head_dim_80": (1, 2, 1, 100, 100, 80, 64, "q", None, None, torch.float16, 0.6),
    "single_query_row": (1, 4, 2, 1, 130, 64, 64, "kv", None, None, torch.float16, 0.5),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case: str) -> None:
    batch, hq, hkv, q_len, kv_len, head_dim, block_size, mask_heads, side, softcap, dtype, density = CASES[case]
    q, k, v = make_qkv(batch, hq, hkv, q_len, kv_len, head_dim, dtype, seed=len(case))
    heads = hq if mask_heads == "q" else hkv
    block_mask = random_block_mask(batch, heads, q_len, kv_len, block_size, density, seed=len(case))
    key_padding_mask = padding_mask(batch, kv_len, side, (37, 90))
    assert_matches_reference(
        q, k, v, block_mask, block_size=block_size, key_padding_mask=key_padding_mask, softcap=softcap
    )


def test_long_sequence_1000() -> None:
    q, k, v = make_qkv(1, 2, 1, 1000, 1000, 64, torch.float16, seed=3)
    block_mask = random_block_mask(1, 2, 1000, 1000, 64, 0.3, seed=3)
    assert_matches_reference(q, k, v, block_mask, block_size=64)


def test_unforced_masks_give_zero_rows_never_nan() -> None:
    """Random masks that leave rows (and whole query blocks) with no visible key: zeros and lse = -inf."""
    q, k, v = make_qkv(2, 4, 2, 150, 150, 64, torch.float16, seed=5)
    block_mask = random_block_mask(2, 4, 150, 150, 64, 0.3, seed=5, forced=False)
    block_mask[0, 1, 2] = False  # an entirely empty query-block row
    key_padding_mask = padding_mask(2, 150, "left", (150, 70))  # sequence 0 is all padding
    assert_matches_reference(q, k, v, block_mask, block_size=64, key_padding_mask=key_padding_mask)
    out, lse = block_sparse_attention_triton(
        q, k, v, block_mask, block_size=64, key_padding_mask=key_padding_mask, return_lse=True
    )
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))


def test_causal_blocks_above_diagonal_are_ignored() -> None:
    """A fully set mask (blocks above the diagonal included) equals dense causal attention."""
    q, k, v = make_qkv(1, 4, 2, 130, 130, 64, torch.float32, seed=7)
    block_mask = torch.ones(1, 2, 3, 3, dtype=torch.bool, device=DEVICE)
    out = block_sparse_attention_triton(q, k, v, block_mask, block_size=64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [KernelConfig(block_m=32, block_n=32, heads=2), KernelConfig(block_m=64, block_n=16, heads=1)],
    ids=["split_rows_stacked_heads", "narrow_key_tiles"],
)
def test_explicit_configs(config: KernelConfig) -> None:
    """Query blocks split over several programs and key blocks over several steps still match."""
    q, k, v = make_qkv(1, 4, 2, 150, 180, 64, torch.float16, seed=11)
    block_mask = random_block_mask(1, 2, 150, 180, 64, 0.5, seed=11)
    assert_matches_reference(q, k, v, block_mask, block_size=64, config=config)


def test_output_is_bshd_backed_and_matches_public_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_qkv(1, 4, 2, 70, 70, 64, torch.float16, seed=13)
    block_mask = random_block_mask(1, 4, 70, 70, 64, 0.5, seed=13)
    out = block_sparse_attention_triton(q, k, v, block_mask, block_size=64)
    assert out.shape == q.shape and out.dtype == q.dtype and out.transpose(1, 2).is_contiguous()
    monkeypatch.setenv("SEER_ADAPTER_KERNEL", "triton")
    assert select_backend(q.device) == "triton"
    torch.testing.assert_close(block_sparse_attention(q, k, v, block_mask, block_size=64), out, atol=0, rtol=0)


def test_auto_dispatch_prefers_triton_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEER_ADAPTER_KERNEL", raising=False)
    assert select_backend(torch.device("cpu")) == "reference"
    assert select_backend(torch.device("cuda")) == "triton"


def test_torch_compile_sees_one_custom_op() -> None:
    q, k, v = make_qkv(1, 2, 1, 70, 70, 64, torch.float16, seed=17)
    block_mask = random_block_mask(1, 2, 70, 70, 64, 0.5, seed=17)

    def attention_times_two(q, k, v, block_mask):
        return block_sparse_attention_triton(q, k, v, block_mask, block_size=64) * 2

    compiled = torch.compile(attention_times_two, fullgraph=True, backend="aot_eager")
    expected = block_sparse_attention_reference(q, k, v, block_mask, block_size=64).float() * 2
    torch.testing.assert_close(compiled(q, k, v, block_mask).float(), expected, atol=6e-3, rtol=3e-3)
    torch.library.opcheck(
        torch.ops.seer_adapter.block_sparse_attention_fwd.default, (q, k, v, block_mask, 64, 0.125, None, None)
    )


# ----------------------------------------------------------------------------------------------------------------------
# block_mask_to_indices
# ----------------------------------------------------------------------------------------------------------------------


def index_lists_by_loop(block_mask, block_size, q_len=None, kv_len=None, key_padding_mask=None) -> list:
    batch, heads, n_q, n_k = block_mask.shape
    lists = []
    for b in range(batch):
        for h in range(heads):
            for q_block in range(n_q):
                kept = []
                for k_block in range(n_k):
                    if not block_mask[b, h, q_block, k_block]:
                        continue
                    if q_len is not None:
                        last_row = min((q_block + 1) * block_size, q_len) - 1
                        if k_block * block_size > last_row + kv_len - q_len:
                            continue
                    if key_padding_mask is not None:
                        if not key_padding_mask[b, k_block * block_size : (k_block + 1) * block_size].any():
                            continue
                    kept.append(k_block)
                lists.append(kept)
    return lists


@pytest.mark.parametrize(
    ("q_len", "kv_len", "block_size", "with_lengths", "side"),
    [
        (100, 100, 64, True, None),
        (100, 230, 32, True, "left"),
        (200, 200, 64, False, None),
        (63, 300, 64, True, "right"),
    ],
)
@pytest.mark.parametrize("compact", [True, False])
def test_block_mask_to_indices_matches_loop(q_len, kv_len, block_size, with_lengths, side, compact) -> None:
    block_mask = random_block_mask(2, 3, q_len, kv_len, block_size, 0.5, seed=q_len, forced=False).cpu()
    key_padding_mask = padding_mask(2, kv_len, side, (70, 40))
    key_padding_mask = None if key_padding_mask is None else key_padding_mask.cpu()
    lengths = {"q_len": q_len, "kv_len": kv_len} if with_lengths else {}
    indices, counts = block_mask_to_indices(
        block_mask, block_size=block_size, key_padding_mask=key_padding_mask, compact=compact, **lengths
    )
    expected = index_lists_by_loop(block_mask, block_size, key_padding_mask=key_padding_mask, **lengths)
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32
    assert indices.shape[:3] == counts.shape == block_mask.shape[:3]
    width = max(len(kept) for kept in expected) if compact else block_mask.shape[-1]
    assert indices.shape[-1] == width
    flat_indices, flat_counts = indices.reshape(-1, width), counts.reshape(-1)
    for row, kept in enumerate(expected):
        assert flat_counts[row] == len(kept)
        assert flat_indices[row, : len(kept)].tolist() == kept
        assert (flat_indices[row, len(kept) :] == 0).all()


def test_block_mask_to_indices_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    block_mask = random_block_mask(1, 2, 640, 640, 64, 0.5, seed=1, forced=False).cpu()
    whole = block_mask_to_indices(block_mask, block_size=64, q_len=640, kv_len=640)
    monkeypatch.setattr(block_lists, "_INDEX_CHUNK_ELEMENTS", 16)
    chunked = block_mask_to_indices(block_mask, block_size=64, q_len=640, kv_len=640)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_block_mask_to_indices_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bool"):
        block_mask_to_indices(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="both"):
        block_mask_to_indices(torch.ones(1, 1, 2, 2, dtype=torch.bool), q_len=100)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration and input checks
# ----------------------------------------------------------------------------------------------------------------------


def test_config_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KERNEL_CONFIG, raising=False)
    assert choose_kernel_config(128, 64, 4, mask_per_kv_head=False) == KernelConfig(64, 64, 1, 4, 3)
    assert choose_kernel_config(128, 64, 4, mask_per_kv_head=True) == KernelConfig(64, 64, 2, 8, 3)
    assert choose_kernel_config(128, 64, 7, mask_per_kv_head=True).heads == 1
    assert choose_kernel_config(128, 128, 4, mask_per_kv_head=True) == KernelConfig(128, 64, 1, 8, 3)
    assert choose_kernel_config(256, 128, 4, mask_per_kv_head=False) == KernelConfig(64, 32, 1, 8, 2)
    assert choose_kernel_config(64, 32, 8, mask_per_kv_head=True) == KernelConfig(32, 32, 4, 8, 3)
    assert choose_kernel_config(128, 64, 4, True, torch.float32) == KernelConfig(64, 32, 1, 8, 1)
    monkeypatch.setenv(ENV_KERNEL_CONFIG, "block_m=32,warps=2")
    assert choose_kernel_config(128, 64, 4, mask_per_kv_head=True) == KernelConfig(32, 64, 2, 2, 3)
    monkeypatch.setenv(ENV_KERNEL_CONFIG, "block_m=48")
    with pytest.raises(ValueError, match="power of two"):
        choose_kernel_config(128, 64, 4, mask_per_kv_head=True)
    monkeypatch.setenv(ENV_KERNEL_CONFIG, "rows=64")
    with pytest.raises(ValueError, match="expected"):
        choose_kernel_config(128, 64, 4, mask_per_kv_head=True)


def test_rejects_unsupported_inputs() -> None:
    q, k, v = make_qkv(1, 2, 1, 96, 96, 64, torch.float16)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        block_sparse_attention_triton(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE), block_size=48)
    with pytest.raises(ValueError, match="one dtype"):
        block_sparse_attention_triton(
            q, k.float(), v.float(), torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE), block_size=64
        )
    with pytest.raises(ValueError, match="block_mask is on meta"):  # (the custom op would route meta to its fake)
        block_sparse_triton._launch_block_sparse_forward(
            q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool, device="meta"), 64, 0.125, None, None
        )
    with pytest.raises(ValueError, match="block_mask shape"):
        block_sparse_attention_triton(q, k, v, torch.ones(1, 2, 3, 2, dtype=torch.bool, device=DEVICE), block_size=64)


# ----------------------------------------------------------------------------------------------------------------------
# GPU only: bf16, realistic shapes
# ----------------------------------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("mask_heads", ["q", "kv"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_bf16_matches_reference(block_size: int, mask_heads: str, head_dim: int) -> None:
    q_len = kv_len = 4096 + 37
    q, k, v = make_qkv(1, 32, 8, q_len, kv_len, head_dim, torch.bfloat16, seed=block_size)
    block_mask = random_block_mask(1, 32 if mask_heads == "q" else 8, q_len, kv_len, block_size, 0.3, seed=block_size)
    key_padding_mask = padding_mask(1, kv_len, "left", (500,))
    assert_matches_reference(q, k, v, block_mask, block_size=block_size, key_padding_mask=key_padding_mask)


@requires_gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_bf16_dense_mask_matches_sdpa(head_dim: int) -> None:
    q, k, v = make_qkv(2, 32, 8, 8192, 8192, head_dim, torch.bfloat16, seed=head_dim)
    block_mask = torch.ones(2, 8, 128, 128, dtype=torch.bool, device=DEVICE)
    out = block_sparse_attention_triton(q, k, v, block_mask, block_size=64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
