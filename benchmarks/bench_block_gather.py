"""Which gather of one decode block's key slots is cheapest on the GPU (a script; prints a table).

A shape-static decoding step recompresses the block holding the new token from its cache slots, selected by a device
tensor (no host synchronisation, so CUDA graphs can capture it). The slots are gathered from the layer's whole key
buffer (an 8B model at 64k x batch 8: ``[8, 8, 65729, 128]`` bf16) and from the RoPE tables (``[8, 65729, 64]``),
three gathers per layer and step. Each variant is timed by its summed device time over 200 calls (torch profiler),
for 16- and 64-token blocks; the variants are checked equal.

    python3 benchmarks/bench_block_gather.py
"""

import torch
from torch.profiler import ProfilerActivity, profile


def device_us(fn, calls: int = 200) -> float:
    """Summed kernel time of one call of ``fn`` (us), after 5 warm-up calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / calls


def time_block(key: torch.Tensor, cos: torch.Tensor, block_size: int) -> None:
    """Print each gather's time for the slots of one ``block_size``-token block; check they agree."""
    block = torch.tensor([4000 // block_size], device="cuda")  # [1] the current block
    rows = block * block_size + torch.arange(block_size, device="cuda")  # [bs] its slots
    index = rows.view(1, 1, block_size, 1).expand(*key.shape[:2], block_size, key.shape[-1])
    blocks_view = key[..., : (key.shape[2] // block_size) * block_size, :].unflatten(2, (-1, block_size))
    variants = {
        "key.index_select(2, rows)": lambda: key.index_select(2, rows),
        "key[:, :, rows]": lambda: key[:, :, rows],
        "torch.gather(key, 2, idx)": lambda: torch.gather(key, 2, index),
        "unflatten + index_select(block)": lambda: blocks_view.index_select(2, block),
        "cos.index_select(1, rows)": lambda: cos.index_select(1, rows),
        "cos[:, rows]": lambda: cos[:, rows],
    }
    for name, fn in variants.items():
        print(f"bs={block_size:3d} {name:34s} {device_us(fn):7.2f} us")
    want = key.index_select(2, rows)
    assert torch.equal(key[:, :, rows], want) and torch.equal(torch.gather(key, 2, index), want)
    assert torch.equal(blocks_view.index_select(2, block).flatten(2, 3), want)


def main() -> None:
    key = torch.randn(8, 8, 65729, 128, device="cuda", dtype=torch.bfloat16)  # [B, Hkv, C, D]
    cos = torch.randn(8, 65729, 64, device="cuda", dtype=torch.float32)  # [B, C, r]
    for block_size in (16, 64):
        time_block(key, cos, block_size)


if __name__ == "__main__":
    main()
