"""``seer-adapter inspect``: config, sizes, parameter count, per-layer settings, and the fit check."""

import json

import pytest
from tiny_models import tiny_model

from seer_adapter import SeerAttentionConfig, get_seer_model
from seer_adapter.adapter_info import format_size
from seer_adapter.cli import build_parser, main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    tiny_model("llama").save_pretrained(root / "base")
    tiny_model("llama", num_hidden_layers=3).save_pretrained(root / "base3")
    tiny_model("qwen2").save_pretrained(root / "qwen2")
    config = SeerAttentionConfig(
        block_size=16,
        sparsity_method="nz_ratio",
        nz_ratio=0.4,
        dense_layers=[1],
        layer_overrides={"0": {"sparsity_method": "threshold", "threshold": 1e-3}},
    )
    get_seer_model(tiny_model("llama"), config).save_pretrained(root / "gates")
    return root


def test_report(folders, capsys):
    assert main(["inspect", str(folders / "gates")]) == 0
    out = capsys.readouterr().out
    weights = (folders / "gates" / "adapter_model.safetensors").stat().st_size
    assert f"adapter_model.safetensors {format_size(weights)}" in out
    assert "Parameters: 6,144 (F32)" in out  # 2 layers x 4 heads x 16 x 48
    assert "llama, 2 layers, 4 query / 2 KV heads, head_dim 16" in out
    assert "block_size 16" in out and "nz_ratio" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows[0] == ["0", "gated", "3,072", "threshold", "0.001"]
    assert rows[1] == ["1", "dense", "layer", "3,072", "nz_ratio", "0.4"]
    assert "Fits" not in out


def test_json_and_fit_check(folders, capsys):
    assert main(["inspect", str(folders / "gates"), "--json", "--base-model", str(folders / "base")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 6144 and info["dtypes"] == ["F32"]
    assert info["config"]["layer_overrides"] == {"0": {"sparsity_method": "threshold", "threshold": 1e-3}}
    assert [(row["layer"], row["mode"], row["sparsity_method"]) for row in info["layers"]] == [
        (0, "gated", "threshold"),
        (1, "dense layer", "nz_ratio"),
    ]
    assert info["files"]["adapter_config.json"] == (folders / "gates" / "adapter_config.json").stat().st_size
    assert info["base_model_check"] == {"base_model": str(folders / "base"), "fits": True, "problems": []}


@pytest.mark.parametrize("base, problem", [("base3", "num_hidden_layers: adapter 2 vs model 3"), ("qwen2", "qwen2")])
def test_a_base_model_that_does_not_fit(folders, capsys, base, problem):
    assert main(["inspect", str(folders / "gates"), "--base-model", str(folders / base)]) == 1
    out = capsys.readouterr().out
    assert f"Fits {folders / base}: NO" in out and problem in out


def test_missing_tensors_are_reported(folders, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    (tmp_path / "gates").mkdir()
    (tmp_path / "gates" / "adapter_config.json").write_bytes((folders / "gates" / "adapter_config.json").read_bytes())
    tensors = load_file(folders / "gates" / "adapter_model.safetensors")
    save_file(dict(list(tensors.items())[:1]), tmp_path / "gates" / "adapter_model.safetensors")
    assert main(["inspect", str(tmp_path / "gates"), "--json", "--base-model", str(folders / "base")]) == 1
    check = json.loads(capsys.readouterr().out)["base_model_check"]
    assert not check["fits"] and len(check["problems"]) == 1 and "missing gate tensor" in check["problems"][0]


def test_bad_adapter_path_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit, match="seer-adapter inspect: error: .*not an adapter folder"):
        main(["inspect", str(tmp_path / "nowhere")])
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="LORA adapter"):
        main(["inspect", str(tmp_path / "lora")])
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["inspect", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--base-model PATH" in text and "--json" in text and "meta" in text and "examples:" in text
