"""KV-transfer bandwidth: NIXL WRITE between two processes vs a plain in-process memcpy.

The parent process plays the prefill worker: it owns a KV pool, registers it through
``KVTransferAgent`` and pushes ``N`` blocks into the pool of a spawned child process
(the decode worker), timing ``write_blocks`` + ``wait`` (initiator-side completion,
median of ``--repeats`` after ``--warmup``). The baseline is ``dst.copy_(src)`` of the
same number of bytes inside one process, timed in turns with the NIXL writes. Two block patterns per size:

* ``contiguous``: blocks 0..N-1 -> 0..N-1, coalesced into one NIXL descriptor;
* ``scattered``: even source blocks -> odd destination blocks, one descriptor per block.

After timing, the child checks that the destination blocks hold the source bytes.

    python benchmarks/kv_transfer.py                       # 12 layers, 4 KV heads, d=64, bf16
    python benchmarks/kv_transfer.py --blocks 64,512 --repeats 11
"""

from __future__ import annotations

import argparse
import importlib.metadata
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import splitserve.transfer  # noqa: F401
except ImportError:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitserve.transfer import KVLayout, KVTransferAgent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--blocks", default="64,256,1024",
                        help="comma-separated block counts to move (64 blocks of 16 = a 1,024-token prompt)")
    parser.add_argument("--patterns", default="contiguous,scattered")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="bound on every single wait")
    return parser.parse_args(argv)


def make_pool(layout: KVLayout, num_blocks: int, fill: bool) -> torch.Tensor:
    """A pool with every page touched; with ``fill`` block ``i`` holds bytes ``i % 251``."""
    shape = (num_blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
    pool = torch.empty(shape, dtype=getattr(torch, layout.dtype))
    raw = pool.view(torch.uint8).view(num_blocks, -1)
    if fill:
        raw.copy_((torch.arange(num_blocks) % 251).to(torch.uint8).unsqueeze(1).expand_as(raw))
    else:
        raw.zero_()
    return pool


def receiver(conn: Any, layout_dict: dict[str, Any], num_blocks: int) -> None:
    """Child process: a decode-side pool that is written to, then checked."""
    layout = KVLayout.from_dict(layout_dict)
    with KVTransferAgent("bench-decode", make_pool(layout, num_blocks, fill=False)) as agent:
        conn.send(agent.info().to_bytes())
        while True:
            msg = conn.recv()
            if msg is None:
                return
            src_ids, dst_ids = msg  # verify: dst block j must hold bytes src_ids[j] % 251
            raw = agent.kv_cache.view(torch.uint8).view(num_blocks, -1)
            expected = (torch.tensor(src_ids) % 251).to(torch.uint8).unsqueeze(1)
            conn.send(bool(torch.equal(raw[dst_ids], expected.expand(len(dst_ids), raw.shape[1]))))


def block_ids(pattern: str, n: int) -> tuple[list[int], list[int]]:
    if pattern == "contiguous":
        return list(range(n)), list(range(n))
    if pattern == "scattered":
        return list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
    raise ValueError(f"unknown pattern {pattern!r}; use contiguous or scattered")


def interleaved_medians(fns: list[Any], repeats: int, warmup: int) -> list[float]:
    """Median seconds of each function, run in turns so that all see the same machine load."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def measure(agent: KVTransferAgent, peer: str, conn: Any, pattern: str, n: int,
            copy_src: torch.Tensor, copy_dst: torch.Tensor, args: argparse.Namespace) -> tuple:
    """One table row: NIXL WRITE of ``n`` blocks and a memcpy of the same bytes, in turns."""
    bpb = agent.layout.bytes_per_block
    src_ids, dst_ids = block_ids(pattern, n)
    src, dst = copy_src[: n * bpb], copy_dst[: n * bpb]
    handles = []

    def write() -> None:
        handles.append(agent.write_blocks(peer, src_ids, dst_ids, b""))
        agent.wait(handles[-1], args.timeout_s)

    nixl_s, copy_s = interleaved_medians([write, lambda: dst.copy_(src)], args.repeats, args.warmup)
    conn.send((src_ids, dst_ids))
    if not conn.poll(60) or not conn.recv():
        raise RuntimeError(f"{pattern} x{n}: destination blocks differ from the source")
    return pattern, n, n * args.block_size, n * bpb, handles[-1].num_descs, nixl_s, copy_s


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    layout = KVLayout(args.num_layers, args.num_kv_heads, args.head_dim, args.block_size, args.dtype)
    sizes = [int(n) for n in args.blocks.split(",")]
    patterns = args.patterns.split(",")
    num_blocks = 2 * max(sizes)  # room for the scattered pattern
    bpb = layout.bytes_per_block
    print(f"layout: {layout}  bytes_per_block={bpb}  pool={num_blocks} blocks "
          f"({num_blocks * bpb / 2**20:.0f} MiB per process)")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"nixl {importlib.metadata.version('nixl')}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=receiver, args=(child_conn, layout.to_dict(), num_blocks), daemon=True)
    child.start()
    rows = []
    copy_src = torch.ones(max(sizes) * bpb, dtype=torch.uint8)  # memcpy baseline, pages touched
    copy_dst = torch.zeros(max(sizes) * bpb, dtype=torch.uint8)
    try:
        with KVTransferAgent("bench-prefill", make_pool(layout, num_blocks, fill=True)) as agent:
            if not conn.poll(120):
                raise TimeoutError("receiver process did not start")
            peer = agent.add_peer(conn.recv())
            for pattern in patterns:
                for n in sizes:
                    rows.append(measure(agent, peer, conn, pattern, n, copy_src, copy_dst, args))
    finally:
        conn.send(None)
        child.join(30)
        if child.is_alive():
            child.kill()

    print()
    header = ("pattern", "blocks", "tokens", "bytes", "descs", "nixl_s", "nixl_GB/s",
              "memcpy_s", "memcpy_GB/s", "nixl/memcpy")
    print("  ".join(f"{h:>11}" for h in header))
    for pattern, n, tokens, nbytes, descs, nixl_s, copy_s in rows:
        cells = (pattern, n, tokens, nbytes, descs, f"{nixl_s:.5f}", f"{nbytes / nixl_s / 1e9:.2f}",
                 f"{copy_s:.5f}", f"{nbytes / copy_s / 1e9:.2f}", f"{copy_s / nixl_s:.2f}")
        print("  ".join(f"{c:>11}" for c in cells))
    print(f"\nmedian of {args.repeats} after {args.warmup} warm-up; GB = 1e9 bytes; "
          "nixl/memcpy = NIXL bandwidth as a fraction of memcpy bandwidth")
    print("reproduce: python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]))


if __name__ == "__main__":
    main()
