"""SeerModel API: control, files, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from seer_adapter import (
    AdapterMismatchError,
    SeerAttentionConfig,
    SeerConfigError,
    SeerModel,
    UnsupportedModelError,
    get_seer_model,
)
from seer_adapter.attention import ATTN_IMPLEMENTATION

IDS = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(0))


def _config(**kw):
    kw.setdefault("block_size", 16)
    kw.setdefault("dense_below_length", 0)
    return SeerAttentionConfig(**kw)


def test_trainable_parameters_and_frozen_base(capsys):
    base = tiny_model("llama")
    n_base = sum(p.numel() for p in base.parameters())
    model = get_seer_model(base, _config())
    trainable, total = model.get_nb_trainable_parameters()
    # per layer: Hq x D x 3D = 4 x 16 x 48
    assert trainable == 2 * 4 * 16 * 48 and total == n_base + trainable
    assert all(p.requires_grad == ("seer_gate" in n) for n, p in model.named_parameters())
    model.print_trainable_parameters()
    assert "trainable params: 6,144" in capsys.readouterr().out
    keys = [k for k in model.state_dict() if "seer_gate" in k]
    assert keys == [
        "base_model.model.layers.0.self_attn.seer_gate.default.k_proj.weight",
        "base_model.model.layers.1.self_attn.seer_gate.default.k_proj.weight",
    ]


def test_disable_adapter_and_unload_give_the_exact_base_model():
    base = tiny_model("qwen2")
    want = base(IDS).logits
    keys_before = set(base.state_dict())
    model = get_seer_model(base, _config(sparsity_method="nz_ratio", nz_ratio=0.3))
    assert base.config._attn_implementation == ATTN_IMPLEMENTATION
    sparse = model(IDS).logits
    assert not torch.equal(sparse, want)
    with model.disable_adapter():
        assert torch.equal(model(IDS).logits, want)
    assert torch.equal(model(IDS).logits, sparse)
    restored = model.unload()
    assert restored is base and base.config._attn_implementation == "sdpa"
    assert set(base.state_dict()) == keys_before
    assert not any(hasattr(m, "seer_state") or hasattr(m, "seer_gate") for m in base.modules())
    assert torch.equal(base(IDS).logits, want)
    get_seer_model(base, _config())  # can be wrapped again


def test_wrapping_twice_is_refused():
    model = get_seer_model(tiny_model("llama"), _config())
    with pytest.raises(ValueError, match="already carries seer gates"):
        get_seer_model(model.base_model, _config())


def test_runtime_sparsity_changes_and_statistics():
    model = get_seer_model(tiny_model("llama"), _config(sparsity_method="dense"))
    model(IDS)
    assert [s["density"] for s in model.sparsity_stats()] == [1.0, 1.0]
    model.set_sparsity(
        sparsity_method="nz_ratio",
        nz_ratio=0.2,
        dense_layers=[1],
        layer_overrides={"0": {"sparsity_method": "threshold", "threshold": 0.9}},
    )
    model(IDS)
    stats = model.sparsity_stats()
    assert stats[0]["mode"] == "sparse" and stats[0]["density"] < 0.6
    assert stats[1] == {"layer": 1, "mode": "dense", "reason": "dense layer", "q_len": 90, "density": 1.0}
    model.set_sparsity(dense_layers=[], dense_below_length=91)
    model(IDS)
    assert all(s["mode"] == "dense" and "dense_below_length" in s["reason"] for s in model.sparsity_stats())
    with pytest.raises(SeerConfigError, match="block_size"):
        model.set_sparsity(block_size=32)
    with pytest.raises(SeerConfigError, match="nz_ratio"):
        model.set_sparsity(nz_ratio=3.0)


def test_decode_steps_are_dense_for_now():
    model = get_seer_model(tiny_model("llama"), _config(sparsity_method="nz_ratio", nz_ratio=0.3))
    model.generate(IDS[:1, :40], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert all(s["mode"] == "dense" and s["reason"] == "decode" for s in model.sparsity_stats())


def test_overrides_at_load_and_files(tmp_path):
    model = get_seer_model(tiny_model("llama"), _config(sparsity_method="nz_ratio", nz_ratio=0.3))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_hidden_layers"] == 2 and saved["head_dim"] == 16
    assert saved["num_attention_heads"] == 4 and saved["num_key_value_heads"] == 2 and saved["gated_layers"] == [0, 1]
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.model.layers.0.self_attn.seer_gate.k_proj.weight",
        "base_model.model.model.layers.1.self_attn.seer_gate.k_proj.weight",
    }
    assert "SeerModel.from_pretrained" in (tmp_path / "README.md").read_text()
    loaded = SeerModel.from_pretrained(tiny_model("llama"), tmp_path, threshold=2e-3, sparsity_method="threshold")
    assert loaded.peft_config["default"].sparsity_method == "threshold"
    assert loaded.peft_config["default"].threshold == 2e-3
    trainable = SeerModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_two_adapters_switch(tmp_path):
    # nz_ratio 0.8: at 90 tokens (6 blocks of 16) a lower ratio keeps only the forced sink/local blocks, which
    # count toward top-k, and the gates would not matter.
    model = get_seer_model(tiny_model("llama"), _config(sparsity_method="nz_ratio", nz_ratio=0.8))
    model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        for gate in model.gates().values():
            gate.k_proj.weight.neg_()
    first = model(IDS).logits
    model.load_adapter(tmp_path / "a", adapter_name="other")
    model.set_adapter("other")
    second = model(IDS).logits
    assert not torch.equal(first, second)
    model.set_adapter("default")
    assert torch.equal(model(IDS).logits, first)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("missing")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    base = tiny_model("llama", dtype=dtype)
    want = base(IDS).logits
    model = get_seer_model(base, _config(sparsity_method="dense"))
    got = model(IDS).logits
    assert got.dtype == dtype
    tol = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    model.set_sparsity(sparsity_method="nz_ratio", nz_ratio=0.3)
    assert torch.isfinite(model(IDS).logits).all()


# ------------------------------------------------------------------------------------------- bad input
def test_unsupported_family_is_named():
    config = AutoConfig.for_model("falcon", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    base = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="falcon") as err:
        get_seer_model(base, _config())
    assert "llama" in str(err.value)


def test_uninvertible_rope_is_refused_at_injection():
    config = AutoConfig.for_model("gptj", vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    with pytest.raises(UnsupportedModelError, match="gptj"):
        get_seer_model(AutoModelForCausalLM.from_config(config), _config())


def test_adapter_from_another_base_model(tmp_path):
    get_seer_model(tiny_model("llama"), _config()).save_pretrained(tmp_path)
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(AdapterMismatchError, match="num_hidden_layers: adapter 2 vs model 3"):
        SeerModel.from_pretrained(other, tmp_path)
    with pytest.raises(AdapterMismatchError, match="qwen2"):
        SeerModel.from_pretrained(tiny_model("qwen2"), tmp_path)
    assert other.config._attn_implementation == "sdpa"  # a failed load leaves the model untouched


def test_unknown_keys_and_other_adapter_types(tmp_path):
    get_seer_model(tiny_model("llama"), _config()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "rank": 8}))
    with pytest.raises(SeerConfigError, match="rank"):
        SeerModel.from_pretrained(tiny_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(SeerConfigError, match="LORA"):
        SeerModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_corrupted_or_missing_weights(tmp_path):
    get_seer_model(tiny_model("llama"), _config()).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="corrupted"):
        SeerModel.from_pretrained(base, tmp_path)
    assert base.config._attn_implementation == "sdpa"
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        SeerModel.from_pretrained(base, tmp_path)
    with pytest.raises(FileNotFoundError):
        SeerModel.from_pretrained(base, tmp_path / "nowhere")


def test_bad_target_modules_and_gate_dim():
    with pytest.raises(SeerConfigError, match="matches no attention module"):
        get_seer_model(tiny_model("llama"), _config(target_modules=["mlp"]))
    with pytest.raises(SeerConfigError, match="gate_dim"):
        get_seer_model(tiny_model("llama"), _config(gate_dim=8))
    model = get_seer_model(tiny_model("llama"), _config(target_modules=["model.layers.1.self_attn"]))
    assert list(model.gates()) == [1]
    model(IDS)
    assert model.sparsity_stats()[0]["reason"] == "no gate"


@pytest.mark.parametrize("bad", [{"target_modules": ["mlp"]}, {"gate_dim": 8}])
def test_a_failed_wrap_leaves_the_model_as_it_was(bad):
    base = tiny_model("llama")
    with pytest.raises(SeerConfigError):
        get_seer_model(base, _config(**bad))
    assert not hasattr(base, "_seer_runtime") and not any(hasattr(m, "seer_state") for m in base.modules())
    assert all(p.requires_grad for p in base.parameters()) and base.config._attn_implementation == "sdpa"
    get_seer_model(base, _config())  # and it can be wrapped


def test_adapters_with_different_target_layers(tmp_path):
    model = get_seer_model(
        tiny_model("llama"),
        _config(sparsity_method="nz_ratio", nz_ratio=0.8, target_modules=["model.layers.0.self_attn"]),
    )
    model.add_adapter(
        "second", _config(sparsity_method="nz_ratio", nz_ratio=0.8, target_modules=["model.layers.1.self_attn"])
    )
    model(IDS)
    assert [s["mode"] for s in model.sparsity_stats()] == ["sparse", "dense"]
    model.set_adapter("second")
    model(IDS)
    assert [s["mode"] for s in model.sparsity_stats()] == ["dense", "sparse"]
