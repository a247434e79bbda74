"""Data-parallel distillation on CPU (gloo): two processes give the same training as one with the same global batch.

`train_gates` under an initialised process group gives rank r every world-th sequence and averages the gate gradients;
with ``batch_size=1`` on two ranks a step sees the same two sequences as one process with
``gradient_accumulation_steps=2``, so the loss curve and the trained gates must match (up to float summation order).
"""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_model

from seer_adapter import SeerAttentionConfig, get_seer_model
from seer_adapter.distill import DistillationArguments, train_gates

STEPS = 3


def _sequences() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (96,), generator=gen) for _ in range(2 * STEPS)]


def _train(output: str, grad_accum: int) -> list[dict]:
    torch.manual_seed(0)
    model = get_seer_model(tiny_model("llama", seed=0), SeerAttentionConfig(block_size=16))
    args = DistillationArguments(
        output_dir=output, max_steps=STEPS, seq_len=96, batch_size=1, gradient_accumulation_steps=grad_accum,
        learning_rate=5e-3, warmup_steps=1, save_steps=100, progress=False,
    )  # fmt: skip
    return train_gates(model, _sequences(), args)


def _worker(rank: int, port: int, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        records = _train(output, grad_accum=1)
        if rank == 0:
            with open(f"{output}/records.json", "w") as f:
                json.dump([{"loss": r["loss"], "grad_norm": r["grad_norm"]} for r in records], f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = json.loads((tmp_path / "ddp" / "records.json").read_text())
    single = _train(str(tmp_path / "single"), grad_accum=2)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4, abs=1e-6)
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4, abs=1e-6)
    assert ddp[0]["loss"] != ddp[-1]["loss"]  # the gates did train
    from safetensors.torch import load_file

    ddp_gates = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    single_gates = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert ddp_gates.keys() == single_gates.keys()
    for key in ddp_gates:
        torch.testing.assert_close(ddp_gates[key], single_gates[key], atol=1e-5, rtol=1e-4)
