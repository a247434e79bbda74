"""peft itself loads, saves and switches seer adapters after ``import seer_adapter``; both routes share the files."""

import enum
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from seer_adapter import AdapterMismatchError, SeerAttentionConfig, SeerModel, UnsupportedModelError, get_seer_model
from seer_adapter.peft_integration import PEFT_AVAILABLE, add_enum_member, register_with_peft

pytestmark = pytest.mark.skipif(not PEFT_AVAILABLE, reason="needs peft >= 0.21 (pip install -e '.[peft]')")
if PEFT_AVAILABLE:
    from peft import (
        AutoPeftModelForCausalLM,
        LoraConfig,
        PeftModel,
        get_peft_model,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from seer_adapter.peft_integration import SeerAttentionTuner, SeerPeftConfig

IDS = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(0))


def _config(**kw):
    return SeerAttentionConfig(
        **{"block_size": 16, "dense_below_length": 0, "sparsity_method": "nz_ratio", "nz_ratio": 0.8, **kw}
    )


def _randomize(model, seed=1):
    """Gates unlike the untrained initialisation, so loading the wrong weights cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates().values():
            gate.k_proj.weight.copy_(torch.randn(gate.k_proj.weight.shape, generator=generator))


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter saved by SeerModel, and the logits it gives."""
    model = get_seer_model(tiny_model("llama"), _config())
    _randomize(model)
    model.save_pretrained(tmp_path / "gates")
    return tmp_path / "gates", model(IDS).logits


def test_seer_attention_is_a_registered_peft_type():
    assert PeftType.SEER_ATTENTION == "SEER_ATTENTION" and PeftType("SEER_ATTENTION") is PeftType.SEER_ATTENTION
    assert PeftType.SEER_ATTENTION in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SEER_ATTENTION] is SeerPeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SEER_ATTENTION"] is SeerAttentionTuner
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SEER_ATTENTION] == "seer_gate"
    assert register_with_peft() and PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SEER_ATTENTION] is SeerAttentionTuner


def test_add_enum_member_refuses_conflicts():
    class Kind(str, enum.Enum):
        A = "A"

    member = add_enum_member(Kind, "B", "B")
    assert Kind.B is member and Kind("B") is member and list(Kind) == [Kind.A, member]
    assert add_enum_member(Kind, "B", "B") is member
    with pytest.raises(ValueError, match="already exists"):
        add_enum_member(Kind, "B", "X")
    with pytest.raises(ValueError, match="already belongs"):
        add_enum_member(Kind, "C", "A")
    with pytest.raises(ValueError, match="shadow"):
        add_enum_member(Kind, "upper", "u")


def test_peft_model_loads_seer_files(saved):
    path, want = saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_model("llama"), path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert isinstance(model.base_model, SeerAttentionTuner)
    config = model.peft_config["default"]
    assert isinstance(config, SeerPeftConfig) and isinstance(config, SeerAttentionConfig)
    assert config.nz_ratio == 0.8 and config.inference_mode
    assert torch.equal(model(IDS).logits, want)
    assert model.get_nb_trainable_parameters()[0] == 0  # loaded for inference: gates frozen, as peft does
    assert model.sparsity_stats()[0]["density"] < 1.0  # seer methods are reachable through the PeftModel
    trainable = PeftModel.from_pretrained(tiny_model("llama"), path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 4 * 16 * 48


def test_peft_save_writes_the_files_seer_model_writes(saved, tmp_path):
    path, want = saved
    PeftModel.from_pretrained(tiny_model("llama"), path).save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(path / "adapter_model.safetensors"), load_file(tmp_path / "peft/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours_cfg = json.loads((path / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert set(ours_cfg) == set(theirs_cfg)
    assert {k: v for k, v in theirs_cfg.items() if ours_cfg[k] != v} == {
        "inference_mode": True,
        "peft_version": (theirs_cfg["peft_version"]),
    }
    reloaded = SeerModel.from_pretrained(tiny_model("llama"), tmp_path / "peft")
    assert torch.equal(reloaded(IDS).logits, want)


def test_get_peft_model_and_two_adapters_by_name(saved, tmp_path):
    path, want = saved
    model = get_peft_model(tiny_model("llama"), _config())  # a plain SeerAttentionConfig is accepted
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * 16 * 48
    fresh = model(IDS).logits
    model.load_adapter(path, adapter_name="trained")
    model.set_adapter("trained")
    assert model.active_adapter == "trained" and torch.equal(model(IDS).logits, want)
    gates = model.base_model.gates
    assert all(p.requires_grad for g in gates("trained").values() for p in g.parameters())
    assert not any(p.requires_grad for g in gates("default").values() for p in g.parameters())
    model.set_adapter("default")
    assert torch.equal(model(IDS).logits, fresh) and not torch.equal(fresh, want)
    with pytest.raises(ValueError, match="one set of gates"):
        model.base_model.set_adapter(["default", "trained"])

    model.save_pretrained(tmp_path / "both")  # peft layout: default at the root, others in a subfolder
    assert torch.equal(SeerModel.from_pretrained(tiny_model("llama"), tmp_path / "both/trained")(IDS).logits, want)
    assert torch.equal(SeerModel.from_pretrained(tiny_model("llama"), tmp_path / "both")(IDS).logits, fresh)

    model.delete_adapter("default")
    assert model.active_adapter == "trained" and torch.equal(model(IDS).logits, want)
    with pytest.raises(ValueError, match="unload"):
        model.delete_adapter("trained")


def test_disable_adapter_status_and_unload(saved):
    path, _ = saved
    plain = tiny_model("llama")(IDS).logits
    model = PeftModel.from_pretrained(tiny_model("llama"), path)
    status = model.get_model_status()
    assert status.enabled is True and status.available_adapters == ["default"]
    with model.disable_adapter():
        assert torch.equal(model(IDS).logits, plain)
        assert model.get_model_status().enabled is False
    assert not torch.equal(model(IDS).logits, plain)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert base.config._attn_implementation == "sdpa" and not hasattr(base, "peft_config")
    assert not any(hasattr(m, "seer_gate") for m in base.modules())
    assert torch.equal(base(IDS).logits, plain)


def test_auto_peft_model_loads_the_base_named_in_the_config(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    model = get_seer_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), _config())
    _randomize(model)
    want = model(IDS).logits
    model.save_pretrained(tmp_path / "gates")
    assert json.loads((tmp_path / "gates/adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "gates")
    assert isinstance(loaded.base_model, SeerAttentionTuner) and torch.equal(loaded(IDS).logits, want)


def test_combining_with_lora(saved):
    """One PeftModel holds one adapter type (clear peft error); gates on top of LoRA layers work via SeerModel."""
    path, _ = saved
    lora_config = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    lora = get_peft_model(tiny_model("llama"), lora_config)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        lora.load_adapter(path, adapter_name="gates")
    seer_peft = PeftModel.from_pretrained(tiny_model("llama"), path)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        seer_peft.add_adapter("my_lora", lora_config)
    with pytest.raises(UnsupportedModelError, match="get_base_model"):
        get_seer_model(lora, _config())

    with_lora = lora(IDS).logits
    stacked = get_seer_model(lora.get_base_model(), _config(sparsity_method="dense"))  # every block kept
    torch.testing.assert_close(stacked(IDS).logits, with_lora, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(with_lora, tiny_model("llama")(IDS).logits)  # the LoRA layers are in use
    assert all("lora" not in key for key in stacked.get_adapter_state_dict())


def test_wrong_base_model_and_bare_model_injection(saved):
    path, want = saved
    with pytest.raises(AdapterMismatchError, match="num_hidden_layers: adapter 2 vs model 3"):
        PeftModel.from_pretrained(tiny_model("llama", num_hidden_layers=3), path)
    bare = inject_adapter_in_model(_config(), tiny_model("llama"))  # gates in a plain transformers model
    state = load_file(path / "adapter_model.safetensors")
    set_peft_model_state_dict(bare, state)
    assert torch.equal(bare(IDS).logits, want)
    with pytest.raises(AdapterMismatchError, match="1 missing"):
        set_peft_model_state_dict(bare, dict(list(state.items())[:1]))


def test_a_failed_registration_does_not_break_the_import(monkeypatch):
    import seer_adapter.peft_integration as integration

    def broken():
        raise KeyError("peft internals changed")

    monkeypatch.setattr(integration, "_register", broken)
    with pytest.warns(UserWarning, match="could not register with peft.*SeerModel.from_pretrained still does"):
        assert integration.register_with_peft(strict=False) is False
    with pytest.raises(KeyError, match="internals"):
        integration.register_with_peft()
