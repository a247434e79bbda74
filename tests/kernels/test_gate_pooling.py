"""Fused gate pooling (inverse RoPE + block pooling): the reference against the definition, the Triton kernel against
the reference (interpreted on CPU at small shapes, fp16/fp32), the dispatch, and the gate logits built on it."""

import importlib
import math

import pytest
import torch

from seer_adapter import kernels
from seer_adapter.gate import AttnGate, block_has_tokens, pool_blocks
from seer_adapter.kernels import gate_pooling
from seer_adapter.rope import apply_rope

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU and "triton" in gate_pooling.GATE_POOLING_BACKENDS and not gate_pooling._KERNEL_INTERPRETED:
    # The package was imported (compiled kernels) before tests/kernels/conftest.py set TRITON_INTERPRET=1.
    importlib.reload(gate_pooling)
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 and long sequences)")
requires_triton = pytest.mark.skipif("triton" not in gate_pooling.GATE_POOLING_BACKENDS, reason="triton not installed")
ALL_POOLINGS = ["avg", "max", "min"]


def make_x(batch, heads, length, head_dim, dtype, seed=0, device=DEVICE):
    """Post-RoPE-like ``[B, H, S, D]`` as the transpose of a contiguous ``[B, S, H, D]`` (the attention layout)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2)


def make_tables(batch, length, rot_dim, table_batch, dtype=torch.float32, seed=1, device=DEVICE):
    """Random (not unit) cos / sin, so that a wrong channel or table index cannot cancel out.

    table_batch: ``"full"`` -> ``[B, S, r]``, ``"one"`` -> ``[1, S, r]``, ``"none"`` -> ``[S, r]``.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = {"full": (batch, length, rot_dim), "one": (1, length, rot_dim), "none": (length, rot_dim)}[table_batch]
    cos, sin = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    return cos.to(device, dtype), sin.to(device, dtype)


def rope_tables(style, length, rot_dim, device=DEVICE):
    """Real RoPE tables ``[1, S, r]`` laid out the way the model family delivers them."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None, :]
    angles = angles.repeat_interleave(2, dim=-1) if style == "interleaved" else torch.cat((angles, angles), dim=-1)
    return angles.cos()[None].float().to(device), angles.sin()[None].float().to(device)


def padding_mask(batch, length, side, amounts, device=DEVICE):
    if side is None:
        return None
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b, amount in enumerate(amounts[:batch]):
        if side == "left":
            mask[b, :amount] = False
        else:
            mask[b, length - amount :] = False
    return mask.to(device)


def poisoned_triton(x, cos, sin, **kwargs):
    """The Triton launch into a NaN-filled output buffer: every element must be written."""
    batch, heads, length, head_dim = x.shape
    n_blocks = math.ceil(length / kwargs["block_size"])
    out = torch.full(
        (batch, heads, n_blocks, len(kwargs["poolings"]) * head_dim), float("nan"), dtype=torch.float32, device=x.device
    )
    result = gate_pooling._launch_pool_pre_rope_blocks(
        x, cos, sin, kwargs["rope_style"], kwargs["block_size"], kwargs["poolings"], kwargs["token_valid"], out=out
    )
    assert result is out
    return out


# (dtype, B, H, S, D, block_size, style, rot_dim (None: no RoPE), table batch, padding side)
CASES = [
    (torch.float32, 2, 4, 100, 32, 16, "half", 32, "full", None),
    (torch.float16, 2, 2, 100, 32, 16, "half", 32, "one", "left"),
    (torch.float32, 1, 3, 63, 16, 16, "interleaved", 16, "none", None),
    (torch.float16, 2, 2, 130, 32, 64, "interleaved", 32, "full", "right"),
    (torch.float32, 2, 2, 130, 32, 64, "interleaved_half_table", 32, "full", "left"),
    (torch.float16, 1, 4, 63, 16, 16, "interleaved_half_table", 16, "one", None),
    (torch.float32, 2, 2, 100, 64, 64, "half", 16, "full", "left"),  # partial rotary (GPT-NeoX 0.25)
    (torch.float16, 2, 2, 130, 48, 16, "half", 24, "one", "right"),  # head_dim 48 (not a power of two), r/2 odd
    (torch.float32, 1, 2, 100, 32, 16, "interleaved", 12, "none", None),  # partial interleaved
    (torch.float32, 2, 2, 63, 40, 16, "interleaved_half_table", 20, "full", "left"),  # partial GLM-style
    (torch.float16, 2, 3, 130, 32, 64, None, None, None, "left"),  # no RoPE
    (torch.float32, 1, 2, 100, 32, 24, "half", 32, "full", "right"),  # block size not a power of two
]


def case_id(case):
    dtype, batch, heads, length, head_dim, block, style, rot_dim, table_batch, side = case
    rope = "norope" if style is None else f"{style}-r{rot_dim}-{table_batch}"
    return f"{str(dtype)[6:]}-B{batch}H{heads}S{length}D{head_dim}-bs{block}-{rope}-{side or 'nopad'}"


@requires_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case):
    dtype, batch, heads, length, head_dim, block, style, rot_dim, table_batch, side = case
    x = make_x(batch, heads, length, head_dim, dtype)
    assert not x.is_contiguous()
    cos = sin = None
    if style is not None:
        cos, sin = make_tables(batch, length, rot_dim, table_batch)
    valid = padding_mask(batch, length, side, [20, 37])  # left 20 with block 16: the first block has no real token
    kwargs = {"rope_style": style or "half", "block_size": block, "poolings": ALL_POOLINGS, "token_valid": valid}
    expected = gate_pooling.pool_pre_rope_blocks_reference(x, cos, sin, **kwargs)
    got = poisoned_triton(x, cos, sin, **kwargs)
    assert got.shape == (batch, heads, math.ceil(length / block), 3 * head_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    if side == "left" and block == 16:
        assert (got[1, :, 0] == 0).all()  # a block of padding only pools to 0


@requires_triton
@pytest.mark.parametrize("poolings", [["avg"], ["max", "min"], ["min", "avg", "max"], ["max", "avg", "max"]])
def test_triton_pooling_subsets_and_order(poolings):
    x = make_x(2, 2, 100, 32, torch.float32, seed=3)
    cos, sin = make_tables(2, 100, 32, "full", seed=4)
    valid = padding_mask(2, 100, "right", [5, 70])
    kwargs = {"rope_style": "half", "block_size": 16, "poolings": poolings, "token_valid": valid}
    expected = gate_pooling.pool_pre_rope_blocks_reference(x, cos, sin, **kwargs)
    torch.testing.assert_close(poisoned_triton(x, cos, sin, **kwargs), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("style", ["half", "interleaved", "interleaved_half_table"])
@pytest.mark.parametrize("rot_dim", [32, 16])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_pools_the_pre_rope_tensor(style, rot_dim, backend):
    """With real tables, pooling RoPE(x) through the op gives the pools of x itself (the definition)."""
    x_pre = make_x(2, 2, 100, 32, torch.float32, seed=5)
    cos, sin = rope_tables(style, 100, rot_dim)
    x_post = apply_rope(x_pre, cos, sin, style)
    valid = padding_mask(2, 100, "left", [3, 40])
    got = gate_pooling.pool_pre_rope_blocks(
        x_post, cos, sin, rope_style=style, block_size=16, poolings=ALL_POOLINGS, token_valid=valid, backend=backend
    )
    torch.testing.assert_close(got, pool_blocks(x_pre, 16, ALL_POOLINGS, valid), atol=1e-5, rtol=1e-5)


def test_reference_is_the_composition():
    x = make_x(1, 2, 63, 16, torch.float16, seed=6)
    cos, sin = make_tables(1, 63, 8, "full", dtype=torch.bfloat16)
    valid = padding_mask(1, 63, "right", [10])
    got = gate_pooling.pool_pre_rope_blocks_reference(
        x, cos, sin, rope_style="interleaved", block_size=16, poolings=["min", "avg"], token_valid=valid
    )
    expected = pool_blocks(apply_rope(x.float(), cos, sin, "interleaved", inverse=True), 16, ["min", "avg"], valid)
    assert torch.equal(got, expected)


def test_dispatch_uses_select_backend(monkeypatch):
    x = make_x(1, 2, 40, 16, torch.float32)
    cos, sin = make_tables(1, 40, 16, "full")
    kwargs = {"rope_style": "half", "block_size": 16, "poolings": ["avg"]}
    reference = gate_pooling.pool_pre_rope_blocks_reference(x, cos, sin, **kwargs)
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    assert torch.equal(gate_pooling.pool_pre_rope_blocks(x, cos, sin, backend="reference", **kwargs), reference)
    if not ON_GPU:  # auto on CPU is the reference
        assert torch.equal(gate_pooling.pool_pre_rope_blocks(x, cos, sin, **kwargs), reference)
    monkeypatch.setenv(kernels.ENV_BACKEND, "reference")
    assert torch.equal(gate_pooling.pool_pre_rope_blocks(x, cos, sin, **kwargs), reference)
    with pytest.raises(ValueError, match="not available"):
        gate_pooling.pool_pre_rope_blocks(x, cos, sin, backend="nonexistent", **kwargs)


def test_attention_only_backend_leaves_pooling_to_the_default(monkeypatch):
    """A backend registered for attention only: forced by name it raises, chosen by the env var it is skipped."""
    name = "attention_only_test_backend"
    monkeypatch.setitem(kernels._OPS["attention"], name, kernels.block_sparse_attention_reference)
    x = make_x(1, 2, 40, 16, torch.float32)
    kwargs = {"rope_style": "half", "block_size": 16, "poolings": ["avg"]}
    with pytest.raises(ValueError, match="no gate_pooling implementation"):
        gate_pooling.pool_pre_rope_blocks(x, None, None, backend=name, **kwargs)
    monkeypatch.setenv(kernels.ENV_BACKEND, name)
    expected = gate_pooling.pool_pre_rope_blocks_reference(x, None, None, **kwargs)
    torch.testing.assert_close(gate_pooling.pool_pre_rope_blocks(x, None, None, **kwargs), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(2, 40, 16)}, r"\[B, H, S, D\]"),
        ({"block_size": 0}, "block_size"),
        ({"poolings": ["avg", "median"]}, "unknown pooling"),
        ({"poolings": []}, "at least one"),
        ({"sin": None}, "both"),
        ({"rope_style": "spiral"}, "rope_style"),
        ({"cos": torch.zeros(1, 39, 16), "sin": torch.zeros(1, 39, 16)}, "cos/sin"),
        ({"cos": torch.zeros(3, 40, 16), "sin": torch.zeros(3, 40, 16)}, "cos/sin"),
        ({"cos": torch.zeros(1, 40, 15), "sin": torch.zeros(1, 40, 15)}, "even"),
        ({"cos": torch.zeros(1, 40, 18), "sin": torch.zeros(1, 40, 18)}, "even"),
        ({"token_valid": torch.ones(2, 40)}, "token_valid"),
        ({"token_valid": torch.ones(2, 41, dtype=torch.bool)}, "token_valid"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_clear_errors(change, message, backend):
    args = {
        "x": torch.zeros(2, 2, 40, 16),
        "cos": torch.zeros(1, 40, 16),
        "sin": torch.zeros(1, 40, 16),
        "rope_style": "half",
        "block_size": 16,
        "poolings": ["avg"],
        "token_valid": None,
    }
    args.update(change)
    args = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    x, cos, sin = args.pop("x"), args.pop("cos"), args.pop("sin")
    with pytest.raises(ValueError, match=message):
        gate_pooling.pool_pre_rope_blocks(x, cos, sin, backend=backend, **args)


@requires_triton
def test_triton_refuses_inputs_that_need_a_gradient():
    x = make_x(1, 2, 32, 16, torch.float32).requires_grad_()
    with pytest.raises(RuntimeError, match="no backward"):
        gate_pooling.pool_pre_rope_blocks(x, None, None, block_size=16, backend="triton")
    with torch.no_grad():
        gate_pooling.pool_pre_rope_blocks(x, None, None, block_size=16, backend="triton")
    gate_pooling.pool_pre_rope_blocks(x.detach(), None, None, block_size=16, backend="triton")


@requires_triton
def test_empty_sequence():
    x = torch.zeros(1, 2, 0, 16, device=DEVICE)
    out = gate_pooling.pool_pre_rope_blocks(x, None, None, block_size=16, poolings=["avg", "max"], backend="triton")
    assert out.shape == (1, 2, 0, 32)


@requires_triton
def test_torch_compile_sees_one_custom_op():
    x = make_x(1, 2, 40, 16, torch.float32)
    cos, sin = make_tables(1, 40, 16, "full")

    def pooled_times_two(x, cos, sin):
        return 2 * gate_pooling.pool_pre_rope_blocks(
            x, cos, sin, rope_style="half", block_size=16, poolings=["avg", "max"], backend="triton"
        )

    compiled = torch.compile(pooled_times_two, fullgraph=True, backend="aot_eager")
    expected = 2 * gate_pooling.pool_pre_rope_blocks_reference(
        x, cos, sin, rope_style="half", block_size=16, poolings=["avg", "max"]
    )
    torch.testing.assert_close(compiled(x, cos, sin), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("use_q_proj", [False, True])
def test_gate_logits_from_fused_pooling_match_gate_forward(backend, use_q_proj):
    """GQA gate: logits from the fused pooled inputs equal `AttnGate.forward` on explicitly de-rotated Q / K, and
    gradients reach the gate weights only."""
    batch, hq, hkv, length, head_dim, block = 2, 4, 2, 100, 32, 16
    gate = AttnGate(
        hq, hkv, head_dim, head_dim, block,
        q_pooling=["avg", "max"] if use_q_proj else ["avg"], k_pooling=["max", "min", "avg"], use_q_proj=use_q_proj,
    ).to(DEVICE)  # fmt: skip
    torch.nn.init.normal_(gate.k_proj.weight, std=0.1)
    q, k = (
        make_x(batch, hq, length, head_dim, torch.float16, seed=7),
        make_x(batch, hkv, length, head_dim, torch.float16),
    )
    cos, sin = rope_tables("half", length, head_dim)
    valid = padding_mask(batch, length, "left", [20, 3])
    block_cos, block_sin = cos[:, ::block], sin[:, ::block]
    pool = {"rope_style": "half", "block_size": block, "token_valid": valid, "backend": backend}
    q_pooled = gate_pooling.pool_pre_rope_blocks(q, cos, sin, poolings=gate.q_pooling, **pool)
    k_pooled = gate_pooling.pool_pre_rope_blocks(k, cos, sin, poolings=gate.k_pooling, **pool)
    logits = gate.logits_from_pooled(
        q_pooled, k_pooled, block_cos=block_cos, block_sin=block_sin, block_valid=block_has_tokens(valid, block)
    )
    expected = gate(
        apply_rope(q.float(), cos, sin, "half", inverse=True),
        apply_rope(k.float(), cos, sin, "half", inverse=True),
        block_cos=block_cos,
        block_sin=block_sin,
        token_valid=valid,
    )
    assert torch.equal(torch.isinf(logits), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(logits[finite], expected[finite], atol=1e-4, rtol=1e-4)
    assert torch.isinf(logits[0, :, :, 0]).all()  # key block 0 of sequence 0 is padding only
    logits[finite].sum().backward()
    assert gate.k_proj.weight.grad is not None and gate.k_proj.weight.grad.abs().sum() > 0
    assert not q_pooled.requires_grad and not k_pooled.requires_grad


def test_logits_from_pooled_checks_shapes():
    gate = AttnGate(4, 2, 16, 16, 16, q_pooling=["avg"], k_pooling=["avg", "max"])
    q_pooled, k_pooled = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 32)
    assert gate.logits_from_pooled(q_pooled, k_pooled).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="q_pooled"):
        gate.logits_from_pooled(torch.zeros(1, 2, 3, 16), k_pooled)
    with pytest.raises(ValueError, match="k_pooled"):
        gate.logits_from_pooled(q_pooled, torch.zeros(1, 2, 3, 16))
    with pytest.raises(ValueError, match="block_valid"):
        gate.logits_from_pooled(q_pooled, k_pooled, block_valid=torch.ones(1, 4, dtype=torch.bool))


@requires_gpu
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_bf16_long_sequence_on_gpu(style):
    """Production shape class on a GPU: bf16, GQA-sized heads, 4k+ tokens, partial rotary and left padding."""
    batch, heads, length, head_dim, block = 2, 8, 4096 + 37, 128, 64
    x = make_x(batch, heads, length, head_dim, torch.bfloat16, seed=9)
    cos, sin = make_tables(batch, length, 64, "full", dtype=torch.bfloat16)
    valid = padding_mask(batch, length, "left", [100, 1000])
    kwargs = {"rope_style": style, "block_size": block, "poolings": ALL_POOLINGS, "token_valid": valid}
    expected = gate_pooling.pool_pre_rope_blocks_reference(x, cos, sin, **kwargs)
    got = poisoned_triton(x, cos, sin, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    auto = gate_pooling.pool_pre_rope_blocks(x, cos, sin, **kwargs)  # auto picks Triton on CUDA
    torch.testing.assert_close(auto, expected, atol=1e-5, rtol=1e-5)
