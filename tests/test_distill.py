"""Self-distillation: loss, gradients, training loop, exact resume, data pipeline and bad data."""

import json

import pytest
import torch
from tiny_models import tiny_model

from seer_adapter import SeerAttentionConfig, get_seer_model
from seer_adapter.data import DataError, load_text_dataset, packed_sequences
from seer_adapter.distill import DistillationArguments, block_kl_loss, distillation_loss, train_gates

BLOCK = 16


def _model(family="llama", seed=0):
    return get_seer_model(tiny_model(family, seed=seed), SeerAttentionConfig(block_size=BLOCK))


def _sequences(n, length=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length,), generator=gen) for _ in range(n)]


def test_loss_is_zero_when_the_gate_predicts_the_ground_truth():
    gen = torch.Generator().manual_seed(0)
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    target = torch.rand(2, 3, n, n, generator=gen).masked_fill(~causal, 0)
    target = target / target.sum(-1, keepdim=True)
    target[..., 2, :] = 0  # a padding row
    logits = torch.log(target).masked_fill(~causal, float("-inf"))
    assert block_kl_loss(target, logits, skip_first_fraction=0.0).item() == pytest.approx(0.0, abs=1e-6)
    worse = block_kl_loss(target, torch.zeros_like(logits).masked_fill(~causal, float("-inf")), 0.0)
    assert worse.item() > 0.01
    assert torch.isfinite(worse)


def test_first_rows_are_left_out():
    n = 8
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    target = causal.float() / causal.float().sum(-1, keepdim=True)
    logits = torch.zeros(1, 1, n, n).masked_fill(~causal, float("-inf"))
    logits[..., :2, 0] = 5.0  # wrong only in the first quarter of rows
    assert block_kl_loss(target[None, None], logits, 0.25).item() == pytest.approx(0.0, abs=1e-6)
    assert block_kl_loss(target[None, None], logits, 0.0).item() > 0


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "qwen3"])
def test_only_gates_get_gradients_and_base_outputs_stay(family, tmp_path):
    model = _model(family)
    ids = torch.randint(3, 128, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :11] = 0
    with model.disable_adapter():
        before = model(input_ids=ids, attention_mask=mask).logits
    base_state = {k: v.clone() for k, v in model.base_model.state_dict().items() if "seer_gate" not in k}
    loss, per_layer = distillation_loss(model, ids, mask)
    assert loss.requires_grad and torch.isfinite(loss) and set(per_layer) == set(model.gates())
    loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == ("seer_gate" in name), name
    gates_before = {k: g.k_proj.weight.clone() for k, g in model.gates().items()}
    train_gates(
        model,
        _sequences(8, 70),
        DistillationArguments(output_dir=str(tmp_path), max_steps=2, seq_len=70, warmup_steps=1, progress=False),
    )
    assert all(not torch.equal(gates_before[k], g.k_proj.weight) for k, g in model.gates().items())
    for k, v in model.base_model.state_dict().items():
        if "seer_gate" not in k:
            assert torch.equal(v, base_state[k]), k
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)


def test_training_lowers_the_loss(tmp_path):
    model = _model()
    sequences = _sequences(1, 128) * 40  # one sequence again and again: the loss must fall
    records = train_gates(
        model,
        sequences,
        DistillationArguments(
            output_dir=str(tmp_path), max_steps=30, seq_len=128, warmup_steps=2, learning_rate=1e-2, progress=False
        ),
    )
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "layer_loss"} <= set(lines[0])
    # The final checkpoint is a loadable adapter too, with the same gates as the final adapter.
    from seer_adapter import SeerModel

    final = SeerModel.from_pretrained(tiny_model("llama", seed=0), tmp_path)
    checkpoint = SeerModel.from_pretrained(tiny_model("llama", seed=0), tmp_path / "checkpoint-30")
    for a, b in zip(final.gates().values(), checkpoint.gates().values(), strict=True):
        assert torch.equal(a.k_proj.weight, b.k_proj.weight)


class _Killed(Exception):
    pass


def _killing_stream(sequences, after):
    for i, seq in enumerate(sequences):
        if i == after:
            raise _Killed
        yield seq


def test_kill_and_resume_continues_exactly(tmp_path):
    args = dict(
        max_steps=6,
        seq_len=96,
        warmup_steps=1,
        save_steps=2,
        gradient_accumulation_steps=2,
        progress=False,
        learning_rate=5e-3,
    )
    data = _sequences(20)
    straight = _model()
    full = train_gates(straight, data, DistillationArguments(output_dir=str(tmp_path / "a"), **args))

    interrupted = _model()
    with pytest.raises(_Killed):  # 2 sequences per step: dies inside step 4, after the checkpoint of step 2
        train_gates(
            interrupted, _killing_stream(data, 7), DistillationArguments(output_dir=str(tmp_path / "b"), **args)
        )
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    resumed = _model()  # a fresh process: new model, state only from the checkpoint
    rest = train_gates(
        resumed, data, DistillationArguments(output_dir=str(tmp_path / "b"), **args), resume_from_checkpoint=True
    )
    assert [r["step"] for r in rest] == [3, 4, 5, 6]
    # the log lost step 3 of the killed run (after its checkpoint): every step once, the resumed run's records
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged[2:]] == [r["loss"] for r in rest]
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[2:]]
    for a, b in zip(straight.gates().values(), resumed.gates().values(), strict=True):
        assert torch.equal(a.k_proj.weight, b.k_proj.weight)


# --------------------------------------------------------------------------------------------------- data
class _Tokenizer:
    """A character tokenizer: enough to test packing without a model."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 100) for c in text]}


def test_packing_joins_documents_with_eos(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "defgh"}) + "\n")
    dataset = load_text_dataset(str(tmp_path / "a.jsonl"))
    seqs = list(packed_sequences(dataset, _Tokenizer(), 4))
    flat = torch.cat(seqs).tolist()
    tok = _Tokenizer()
    assert flat == (tok("abc")["input_ids"] + [0] + tok("defgh")["input_ids"])[:8]
    streamed = list(packed_sequences(load_text_dataset(str(tmp_path / "a.jsonl"), streaming=True), tok, 4))
    assert torch.equal(torch.cat(streamed), torch.cat(seqs))


def test_text_folder_one_document_per_file(tmp_path):
    (tmp_path / "x.txt").write_text("hello\nworld")
    (tmp_path / "y.txt").write_text("more text")
    rows = list(load_text_dataset(str(tmp_path)))
    assert sorted(r["text"] for r in rows) == ["hello\nworld", "more text"]


def test_bad_data_gives_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_text_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(DataError, match="fewer than 64 tokens"):
        list(packed_sequences(load_text_dataset(str(tmp_path / "short.jsonl")), _Tokenizer(), 64))
    with pytest.raises(DataError, match="shorter than one block"):
        list(packed_sequences(["x" * 100], _Tokenizer(), 8, min_seq_len=16))
    with pytest.raises(DataError, match="another model"):
        list(packed_sequences(["c" * 100], _Tokenizer(), 8, vocab_size=50))
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="text"):
        load_text_dataset(str(tmp_path / "notext.jsonl"))
    with pytest.raises(RuntimeError, match="ran out"):
        train_gates(
            _model(),
            _sequences(2),
            DistillationArguments(output_dir=str(tmp_path / "o"), max_steps=5, seq_len=96, progress=False),
        )
