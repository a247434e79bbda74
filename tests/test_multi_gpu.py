"""A wrapped model whose layers are spread over two GPUs (accelerate device map). Skipped without two GPUs."""

import pytest
import torch
from tiny_models import tiny_model

from seer_adapter import SeerAttentionConfig, get_seer_model

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.parametrize("distill", [False, True], ids=["sparse_prefill", "distillation_loss"])
def test_layers_on_two_gpus_match_one_gpu(distill):
    from accelerate import dispatch_model

    from seer_adapter.distill import distillation_loss

    config = SeerAttentionConfig(block_size=64, sparsity_method="nz_ratio", nz_ratio=0.3, dense_below_length=64)
    ids = torch.randint(3, 128, (2, 700), generator=torch.Generator().manual_seed(0))
    single = get_seer_model(tiny_model("llama", seed=0).to("cuda:0", torch.bfloat16), config)
    base = tiny_model("llama", seed=0).to(torch.bfloat16)
    layers = base.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map.update({f"model.layers.{i}": int(i >= layers // 2) for i in range(layers)})
    spread = get_seer_model(dispatch_model(base, device_map=device_map), config)
    gate_devices = {str(next(gate.parameters()).device) for gate in spread.gates().values()}
    assert gate_devices == {"cuda:0", "cuda:1"}
    for module in spread.base_model.modules():
        if hasattr(module, "seer_gate"):
            assert next(module.seer_gate.parameters()).device == module.q_proj.weight.device
    with torch.no_grad():
        for a, b in zip(single.gates().values(), spread.gates().values(), strict=True):
            b.load_state_dict(a.state_dict())
    if distill:
        want, _ = distillation_loss(single, ids.to("cuda:0"))
        got, _ = distillation_loss(spread, ids.to("cuda:0"))
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=1e-3, rtol=1e-3)
        got.backward()
        assert all(any(p.grad is not None for p in gate.parameters()) for gate in spread.gates().values())
    else:
        with torch.no_grad():
            want = single(input_ids=ids.to("cuda:0")).logits.float().cpu()
            got = spread(input_ids=ids.to("cuda:0")).logits.float().cpu()
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        assert all(s["mode"] == "sparse" for s in spread.sparsity_stats())
