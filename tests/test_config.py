import json

import pytest

from seer_adapter import SeerAttentionConfig, SeerConfigError
from seer_adapter.config import CONFIG_NAME


def test_defaults_follow_the_released_design():
    cfg = SeerAttentionConfig()
    assert cfg.block_size == 64
    assert cfg.q_pooling == ["avg"] and cfg.k_pooling == ["max", "min", "avg"]
    assert cfg.sparsity_method == "threshold" and cfg.threshold == 5e-4
    assert cfg.force_sink_block and cfg.force_local_block


def test_json_round_trip(tmp_path):
    cfg = SeerAttentionConfig(
        sparsity_method="nz_ratio", nz_ratio=0.3, dense_layers=[3, 1], layer_overrides={2: {"threshold": 1e-3}}
    )
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["layer_overrides"] == {"2": {"threshold": 1e-3}}
    loaded = SeerAttentionConfig.from_pretrained(tmp_path)
    assert loaded == cfg
    assert loaded.dense_layers == [1, 3]


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 48),
        ("block_size", 0),
        ("sparsity_method", "topk"),
        ("threshold", 0.0),
        ("threshold", 1.5),
        ("nz_ratio", 0.0),
        ("nz_ratio", 1.2),
        ("token_budget", 32),
        ("k_pooling", ["max", "median"]),
        ("k_pooling", []),
        ("q_pooling", ["max"]),
        ("gate_dtype", "float64"),
        ("dense_layers", [-1]),
        ("dense_below_length", -5),
        ("layer_overrides", {"x": {"threshold": 1e-3}}),
        ("layer_overrides", {"0": {"block_size": 32}}),
        ("layer_overrides", {"0": {"nz_ratio": 2.0}}),
        ("layer_overrides", {"0": {"decode_method": "sparse"}}),
        ("layer_overrides", {"0": {"decode_token_budget": 0}}),
        ("layer_overrides", {"0": {"decode_threshold": 1.5}}),
        ("peft_type", "LORA"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(SeerConfigError) as err:
        SeerAttentionConfig(**{field: value})
    assert field.split("_")[0] in str(err.value)


def test_unknown_keys_in_adapter_config_are_refused(tmp_path):
    data = SeerAttentionConfig().to_dict()
    data["lora_alpha"] = 16
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(SeerConfigError, match="lora_alpha"):
        SeerAttentionConfig.from_pretrained(tmp_path)


def test_other_adapter_types_are_recognised(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(SeerConfigError, match="another adapter type"):
        SeerAttentionConfig.from_pretrained(tmp_path)


def test_invalid_json_is_reported(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(SeerConfigError, match="not valid JSON"):
        SeerAttentionConfig.from_pretrained(tmp_path)


def test_per_layer_settings():
    cfg = SeerAttentionConfig(threshold=1e-3, layer_overrides={"1": {"sparsity_method": "nz_ratio", "nz_ratio": 0.2}})
    assert cfg.sparsity_for_layer(0)["threshold"] == 1e-3
    assert cfg.sparsity_for_layer(1)["sparsity_method"] == "nz_ratio"
    assert cfg.sparsity_for_layer(1)["nz_ratio"] == 0.2


def test_replace_validates_and_refuses_unknown_fields():
    cfg = SeerAttentionConfig()
    assert cfg.replace(threshold=2e-3).threshold == 2e-3
    with pytest.raises(SeerConfigError, match="thresh"):
        cfg.replace(thresh=1e-3)
    with pytest.raises(SeerConfigError, match="threshold"):
        cfg.replace(threshold=-1.0)
