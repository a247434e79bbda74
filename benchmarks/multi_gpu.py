"""Multi-GPU runs (a script, not a test): data-parallel distillation and a model spread over several GPUs.

Data-parallel distillation of a Llama-3.1-8B-shaped model (random bf16 weights, the same on every rank) at 32k:
``train_gates`` under ``torchrun`` gives every rank every ``world``-th sequence and averages the gate gradients.
Run it once with torchrun and once on one GPU with gradient accumulation over the same global batch; the loss curves
must agree within bf16 noise:

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py ddp --steps 6 --out benchmarks/results
    python benchmarks/multi_gpu.py ddp --steps 6 --grad-accum 2 --out benchmarks/results

A model larger than one GPU (70B-shaped, random bf16 weights, 140 GB) with its layers spread over the GPUs by an
accelerate device map; the gates live on their layers' devices. Sparse prefill against dense at 32k:

    python benchmarks/multi_gpu.py device-map --length 32768 --nz-ratios 0.1 0.3 --out benchmarks/results

Each run writes ``<out>/multi_gpu_<mode>_<time>.json`` (``meta`` with ``gpu`` and ``num_gpus``; ``rows``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_e2e import LLAMA_8B, llama_8b_shaped, time_prefill  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

from seer_adapter import SeerAttentionConfig, get_seer_model  # noqa: E402
from seer_adapter.distill import DistillationArguments, train_gates  # noqa: E402

LLAMA_70B = dict(
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
)  # fmt: skip


def meta_info(mode: str, num_gpus: int) -> dict:
    return {
        "gpu": torch.cuda.get_device_name(),
        "num_gpus": num_gpus,
        "mode": mode,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "launcher": "torchrun" if "LOCAL_RANK" in os.environ else "python",
    }


def write(out: str, mode: str, meta: dict, rows: list[dict]) -> Path:
    path = Path(out) / f"multi_gpu_{mode}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return path


def run_ddp(args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", torch.cuda.current_device())
    base = llama_8b_shaped(device=device)  # the same random weights on every rank (same seed, same device type)
    if world > 1:  # check that the ranks really hold the same model
        probe = torch.stack([p.float().sum() for p in list(base.parameters())[:4]])
        spread = probe.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        assert torch.equal(spread, probe), "ranks built different random weights"
    model = get_seer_model(base, SeerAttentionConfig())
    generator = torch.Generator().manual_seed(1)
    global_batch = world * args.grad_accum
    sequences = [torch.randint(0, LLAMA_8B["vocab_size"], (args.seq_len,), generator=generator)
                 for _ in range(args.steps * global_batch)]  # fmt: skip
    with tempfile.TemporaryDirectory() as output:
        train_args = DistillationArguments(
            output_dir=output, max_steps=args.steps, seq_len=args.seq_len, batch_size=1,
            gradient_accumulation_steps=args.grad_accum, learning_rate=1e-3, warmup_steps=1, save_steps=10**9,
            progress=False,
        )  # fmt: skip
        torch.cuda.synchronize()
        records = train_gates(model, sequences, train_args)
    peak = torch.cuda.max_memory_allocated() / 2**30
    if rank != 0:
        dist.destroy_process_group()
        return
    rows = [{"step": r["step"], "loss": r["loss"], "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"],
             "tokens_per_s_per_gpu": r["tokens_per_s"] / world, "world_size": world, "grad_accum": args.grad_accum,
             "global_batch": global_batch, "seq_len": args.seq_len} for r in records]  # fmt: skip
    steady = rows[1:] or rows  # step 1 includes compilation
    summary = {
        "summary": True, "world_size": world, "global_batch": global_batch,
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "tokens_per_s_per_gpu": sum(r["tokens_per_s_per_gpu"] for r in steady) / len(steady),
        "peak_gib_rank0": peak,
    }  # fmt: skip
    path = write(args.out, "ddp", meta_info("ddp", world), [*rows, summary])
    print(f"wrote {path}")
    print(f"{'step':>4} {'loss':>10} {'s':>7} {'tok/s':>9} {'tok/s/GPU':>10}")
    for r in rows:
        print(f"{r['step']:>4} {r['loss']:>10.4f} {r['seconds']:>7.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['tokens_per_s_per_gpu']:>10.0f}")  # fmt: skip
    print(f"world {world}, global batch {global_batch}: {summary['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, "
          f"peak {peak:.1f} GiB")  # fmt: skip
    if world > 1:
        dist.destroy_process_group()


def build_spread_model(config: LlamaConfig, num_gpus: int) -> torch.nn.Module:
    """Random bf16 weights built directly on the GPUs (decoder layers split evenly), dispatched with accelerate."""
    from accelerate import dispatch_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    # rotary_emb is rebuilt outside the meta context below (its buffers are computed at construction).
    layers = config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": num_gpus - 1, "lm_head": num_gpus - 1}
    for i in range(layers):
        device_map[f"model.layers.{i}"] = i * num_gpus // layers
    for name, gpu in device_map.items():
        if name == "model.rotary_emb":  # its buffers are computed at construction: build it on the device
            model.model.rotary_emb = LlamaRotaryEmbedding(config).to(torch.device("cuda", gpu))  # built on CPU
            continue
        module = model.get_submodule(name)
        module.to_empty(device=torch.device("cuda", gpu), recurse=True)
        with torch.no_grad():
            for param in module.parameters(recurse=True):
                if param.dim() > 1:
                    param.normal_(0.0, 0.02)
                else:
                    param.fill_(1.0)
    return dispatch_model(model, device_map=device_map)


def run_device_map(args: argparse.Namespace) -> None:
    num_gpus = torch.cuda.device_count()
    if num_gpus < 2:
        raise SystemExit("device-map needs at least 2 GPUs")
    config = LlamaConfig(**{**LLAMA_70B, "num_hidden_layers": args.layers})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    started = time.perf_counter()
    base = build_spread_model(config, num_gpus)
    build_s = time.perf_counter() - started
    weights_gib = [torch.cuda.memory_allocated(g) / 2**30 for g in range(num_gpus)]
    print(f"built in {build_s:.0f} s; weights per GPU (GiB): {[round(w, 1) for w in weights_gib]}", flush=True)
    ids = torch.randint(0, config.vocab_size, (1, args.length), device="cuda:0")
    dense_s = time_prefill(base, ids, args.repeats)
    rows = [{"S": args.length, "variant": "dense sdpa (cuDNN)", "nz_ratio": 1.0, "density": 1.0, "seconds": dense_s}]
    print(f"dense {dense_s:.2f} s", flush=True)
    model = get_seer_model(base, SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.5))
    gate_devices = sorted({str(next(g.parameters()).device) for g in model.gates().values()})
    layer_devices_match = all(
        next(module.seer_gate.parameters()).device == next(module.q_proj.parameters()).device
        for module in base.modules()
        if hasattr(module, "seer_gate")
    )
    for nz in args.nz_ratios:
        model.set_sparsity(nz_ratio=nz)
        seconds = time_prefill(model, ids, args.repeats)
        stats = model.sparsity_stats()
        density = sum(s.get("density", 1.0) for s in stats) / len(stats)
        rows.append({"S": args.length, "variant": "seer", "nz_ratio": nz, "density": density, "seconds": seconds,
                     "dense_seconds": dense_s, "speedup": dense_s / seconds})  # fmt: skip
        print(f"nz_ratio {nz}: density {density:.3f}, {seconds:.2f} s ({dense_s / seconds:.2f}x)", flush=True)
    meta = meta_info("device_map", num_gpus)
    meta.update(model=f"Llama-3.1-70B-shaped, random bf16 weights, {args.layers} layers, accelerate device map",
                build_seconds=build_s, weights_gib_per_gpu=weights_gib, gate_devices=gate_devices,
                gates_on_their_layers_devices=layer_devices_match)  # fmt: skip
    path = write(args.out, "device_map", meta, rows)
    print(f"wrote {path}\n{'variant':<20} {'nz':>5} {'density':>8} {'s':>8} {'x dense':>8}")
    for r in rows:
        print(f"{r['variant']:<20} {r['nz_ratio']:>5} {r['density']:>8.3f} {r['seconds']:>8.2f} "
              f"{r.get('speedup', 1.0):>8.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    ddp = sub.add_parser("ddp", help="data-parallel distillation (launch with torchrun) or its 1-GPU reference")
    ddp.add_argument("--steps", type=int, default=6)
    ddp.add_argument("--seq-len", type=int, default=32768)
    ddp.add_argument("--grad-accum", type=int, default=1)
    ddp.add_argument("--out", default=str(Path(__file__).parent / "results"))
    spread = sub.add_parser("device-map", help="a 70B-shaped model over all GPUs: sparse vs dense prefill")
    spread.add_argument("--length", type=int, default=32768)
    spread.add_argument("--layers", type=int, default=80)
    spread.add_argument("--nz-ratios", type=float, nargs="+", default=[0.1, 0.3])
    spread.add_argument("--repeats", type=int, default=1)
    spread.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    run_ddp(args) if args.mode == "ddp" else run_device_map(args)


if __name__ == "__main__":
    main()
