"""``--plot OUT.png`` on the CLI subcommands: eval (PPL vs density), distill (loss curve), demo (gate map), bench (in
test_cli_bench.py); and the errors for a missing matplotlib or an unknown image type, given before any slow work."""

import json
import random
import sys

import pytest
from tiny_models import tiny_model

from seer_adapter.cli import main

WORDS = "the a of to and in that it is was he for on are with as his they be at one have this from or had by".split()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny llama with a byte-level BPE tokenizer trained on a small text, saved like a Hub model, and a text
    file to evaluate or distil on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli_plot")
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(3000))
    (root / "data").mkdir()
    (root / "data" / "text.txt").write_text(text)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert fast.eos_token_id == 2 and len(fast) <= 300  # the tiny model's eos id and vocabulary
    fast.save_pretrained(root / "model")
    tiny_model("llama", vocab_size=300).save_pretrained(root / "model")
    return root


def test_eval_plot(tiny_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot, out = tmp_path / "figures" / "ppl.png", tmp_path / "eval.json"
    arguments = ["eval", "--model", str(tiny_folder / "model"), "--data", str(tiny_folder / "data" / "text.txt")]
    arguments += ["--window", "256", "--max-windows", "1", "--nz-ratios", "0.6", "0.3"]
    arguments += ["--selectors", "gate", "random", "--device", "cpu", "--out", str(out), "--plot", str(plot), "--json"]
    assert main(arguments) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert [(r["selector"], r.get("nz_ratio")) for r in result["rows"]] == [
        ("dense", None),
        ("gate", 0.6),
        ("gate", 0.3),
        ("random", 0.6),
        ("random", 0.3),
    ]
    assert plot.stat().st_size > 10_000


def test_distill_plot(tiny_folder, tmp_path):
    pytest.importorskip("matplotlib")
    plot, output = tmp_path / "loss.png", tmp_path / "gates"
    arguments = ["distill", "--model", str(tiny_folder / "model"), "--data", str(tiny_folder / "data")]
    arguments += ["--output", str(output), "--seq-len", "128", "--max-steps", "3", "--warmup-steps", "1"]
    arguments += ["--block-size", "16", "--device", "cpu", "--plot", str(plot)]
    assert main(arguments) == 0
    assert len((output / "log.jsonl").read_text().splitlines()) == 3
    assert plot.stat().st_size > 10_000


def test_distill_with_decode_gate(tiny_folder, tmp_path):
    """``--decode-gate`` trains prefill and decode gates together and saves both in one adapter."""
    from safetensors.torch import load_file

    output = tmp_path / "gates"
    arguments = ["distill", "--model", str(tiny_folder / "model"), "--data", str(tiny_folder / "data")]
    arguments += ["--output", str(output), "--seq-len", "128", "--max-steps", "2", "--warmup-steps", "1"]
    arguments += ["--block-size", "16", "--device", "cpu", "--decode-gate"]
    assert main(arguments) == 0
    assert json.loads((output / "adapter_config.json").read_text())["decode_gate"] is True
    keys = load_file(output / "adapter_model.safetensors")
    assert any(".seer_gate.decode.q_proj." in key for key in keys) and any(".seer_gate.k_proj." in key for key in keys)


@pytest.mark.parametrize("command", [["eval"], ["distill", "--output", "unused"], ["demo"], ["bench"]])
def test_plot_without_matplotlib_names_the_plots_extra(command, tmp_path, monkeypatch):
    """The error comes first: here --model points nowhere, so any later step would fail differently."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    model = [] if command[0] in ("demo", "bench") else ["--model", str(tmp_path / "no-such-model")]
    with pytest.raises(SystemExit, match=r"--plot needs matplotlib: pip install 'seer-adapter\[plots\]'"):
        main([*command, *model, "--plot", str(tmp_path / "out.png")])
    assert not (tmp_path / "unused").exists()


def test_unknown_image_type_is_refused_before_loading(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match=r"seer-adapter eval: error: --plot \S*ppl\.text: unknown image type 'text'"):
        main(["eval", "--model", str(tmp_path / "no-such-model"), "--plot", str(tmp_path / "ppl.text")])


@pytest.mark.slow
def test_demo_plot_gate_map_of_a_chosen_layer_and_head(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "gate_map.png"
    small = ["demo", "--tokens", "256", "--prompt-tokens", "100", "--max-new-tokens", "2", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--layer and --head choose the gate map of --plot; add --plot OUT.png"):
        main([*small, "--head", "0"])
    with pytest.raises(SystemExit, match=r"seer-adapter demo: error: --layer 30 has no gate; gated layers: 0\.\.29"):
        main([*small, "--plot", str(plot), "--layer", "30"])
    with pytest.raises(SystemExit, match=r"--head 9: layer 3 has heads 0\.\.8"):
        main([*small, "--plot", str(plot), "--layer", "3", "--head", "9"])
    capsys.readouterr()
    assert main([*small, "--plot", str(plot), "--layer", "3", "--head", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plot"] == {"path": str(plot), "layer": 3, "head": 8}
    assert plot.stat().st_size > 10_000
