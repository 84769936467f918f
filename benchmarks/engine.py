"""Engine benchmark: prefill, decode and offline throughput against this machine's own limits.

One run measures, on the same checkpoint and dtype, in this order:

1. the machine's peaks: the bf16 GEMM rate on the model's own GEMM shapes (best
   of the torch kernels the engine can use) and the copy bandwidth of a large
   ``dst.copy_(src)`` (read + write bytes per second, STREAM's convention; a
   read-only ``sum`` is shown beside it);
2. prefill: ``--prefill-len``-token prompts, one and several per step, as tokens/s
   and achieved GFLOP/s (matmul + causal attention FLOPs) against the GEMM peak;
3. decode: one engine step at several batch sizes against the memory floor
   (weights + KV bytes read per step over the copy bandwidth);
4. deterministic mode's cost: prefill and decode again with ``deterministic=True``
   (batch-invariant GEMMs and attention), as a ratio to the default engine;
5. offline: the same prompt set through ``LLM.generate`` and through transformers'
   ``generate`` (left-padded, one batched call; sequential on a few prompts).

Prints one markdown table with ratios against the bounds and baselines of the same
run. Times are medians of ``--repeats`` after a warm-up (offline: ``--offline-repeats``).

    python benchmarks/engine.py
    python benchmarks/engine.py --threads 1 --offline-prompts 8 --hf-sequential 0
    SPLITSERVE_OPENMP=gnu python benchmarks/engine.py   # torch's GNU OpenMP instead of the workers' runtime

It runs on the OpenMP runtime the serving workers preload (``engine/openmp.py``), re-starting itself with it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from common import best_time, load_average, machine_lines, markdown_table, median_time, on_workers_openmp, timed

from splitserve import LLM, SamplingParams
from splitserve.engine.model_config import ModelConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the default model, SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--prefill-batches", default="1,4", help="prompts per prefill step, comma-separated")
    p.add_argument("--decode-batches", default="1,8,32")
    p.add_argument("--decode-context", type=int, default=256, help="prompt length before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=16, help="timed steps per batch size (median)")
    p.add_argument("--offline-prompts", type=int, default=32)
    p.add_argument("--offline-prompt-len", type=int, default=256, help="mean prompt length (lengths vary +-12%%)")
    p.add_argument("--offline-max-tokens", type=int, default=128)
    p.add_argument("--offline-repeats", type=int, default=2)
    p.add_argument("--hf-sequential", type=int, default=2, help="prompts for the one-at-a-time transformers run (0: skip)")
    p.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    p.add_argument("--skip-deterministic", action="store_true", help="do not measure deterministic mode's cost")
    return p.parse_args()


# ---- FLOP and byte accounting -----------------------------------------------------


def layer_gemm_shapes(mc: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of the four GEMMs of one layer: fused qkv, o_proj, fused gate/up, down."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    return [(mc.hidden_size, q + 2 * kv), (q, mc.hidden_size), (mc.hidden_size, 2 * mc.intermediate_size), (mc.intermediate_size, mc.hidden_size)]


def layer_params(mc: ModelConfig) -> int:
    return sum(i * o for i, o in layer_gemm_shapes(mc))


def prefill_flops(mc: ModelConfig, prompt_len: int) -> float:
    """2 x params x tokens for every layer GEMM, the LM head for the one sampled row, and causal
    attention (QK^T and PV: 4 x head_dim x heads per visible key/query pair)."""
    gemm = 2 * mc.num_layers * layer_params(mc) * prompt_len + 2 * mc.hidden_size * mc.vocab_size
    pairs = prompt_len * (prompt_len + 1) / 2
    return gemm + 4 * mc.num_layers * mc.num_heads * mc.head_dim * pairs


def decode_bytes(mc: ModelConfig, context_lens: list[int], itemsize: int) -> float:
    """Bytes a decode step must read at least: every weight once (the embedding only for its
    rows) plus each sequence's cached K and V."""
    weights = mc.num_layers * (layer_params(mc) + 2 * mc.hidden_size) + mc.vocab_size * mc.hidden_size + mc.hidden_size
    weights += len(context_lens) * mc.hidden_size  # embedding rows
    kv = sum(context_lens) * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim
    return (weights + kv) * itemsize


# ---- machine peaks ---------------------------------------------------------------------


def gemm_peaks(mc: ModelConfig, rows: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of one layer's four GEMMs with ``rows`` tokens, per kernel (best of ``repeats``)."""
    shapes = layer_gemm_shapes(mc)
    xs = [torch.randn(rows, i, dtype=torch.bfloat16) for i, _ in shapes]
    ws = [torch.randn(o, i, dtype=torch.bfloat16) for i, o in shapes]
    kernels = {"torch bf16 GEMM (F.linear)": lambda x, w, _: F.linear(x, w)}
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in ws]
        kernels["oneDNN prepacked bf16 GEMM"] = lambda x, _, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")
    xs32 = [x.float() for x in xs]
    kernels["fp32 GEMM on bf16 weights (incl. cast)"] = lambda x, w, i: F.linear(xs32[i], w.float())
    flops = sum(2 * rows * i * o for i, o in shapes)
    out = {}
    with torch.inference_mode():
        for name, fn in kernels.items():
            t = sum(best_time(lambda: fn(x, w, i), repeats + 2) for i, (x, w) in enumerate(zip(xs, ws)))
            out[name] = flops / t / 1e9
    return out


def memory_bandwidth(repeats: int, nbytes: int = 512 * 2**20) -> tuple[float, float]:
    """GB/s of a copy (read + write traffic) and of a read-only sum, both far larger than the last-level cache."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)
    copy_t = median_time(lambda: dst.copy_(src), max(repeats, 5))
    read_t = median_time(src.sum, max(repeats, 5))
    return 2 * nbytes / copy_t / 1e9, nbytes / read_t / 1e9


# ---- engine measurements ----------------------------------------------------------------


def random_prompts(rng: random.Random, n: int, length: int, vocab: int, jitter: float = 0.0) -> list[list[int]]:
    lens = [max(1, round(length * (1 + rng.uniform(-jitter, jitter)))) for _ in range(n)]
    return [[rng.randrange(5, vocab) for _ in range(k)] for k in lens]


def measure_prefill(llm: LLM, rng: random.Random, batch: int, length: int, repeats: int, vocab: int) -> float:
    """Median seconds to prefill ``batch`` fresh prompts (one step) and sample their first token."""
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        prompts = random_prompts(rng, batch, length, vocab)
        times.append(timed(lambda: llm.generate(prompts, one, use_tqdm=False)))
    return statistics.median(times[1:])


def measure_decode(llm: LLM, rng: random.Random, batch: int, context: int, steps: int, vocab: int) -> tuple[float, list[int]]:
    """Median seconds of one engine step with ``batch`` sequences decoding; their mean context lengths."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in random_prompts(rng, batch, context, vocab)]
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    engine.step()  # first all-decode step: warm-up
    ctx = [s.num_tokens for s in engine.scheduler.running]
    times = [timed(engine.step) for _ in range(steps)]
    mid = [c + steps // 2 for c in ctx]
    for req_id in ids:
        engine.abort_request(req_id)
    return statistics.median(times), mid


def hf_generate(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> int:
    """One left-padded batched greedy ``generate`` call; returns the number of generated tokens."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=pad_id)
    assert out.shape[1] == width + max_tokens, f"transformers stopped early: {out.shape[1] - width} of {max_tokens} tokens"
    return len(prompts) * max_tokens


def measure_offline(llm: LLM, args: argparse.Namespace, prompts: list[list[int]]) -> tuple[float, float | None, float | None, str]:
    """Median seconds of splitserve and of transformers (batched) on ``prompts``, run alternately so that
    load from elsewhere hits both alike; then transformers one prompt at a time (gen tok/s)."""
    gen = args.offline_max_tokens
    greedy = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    if args.skip_hf:
        return statistics.median(timed(lambda: llm.generate(prompts, greedy, use_tqdm=False)) for _ in range(args.offline_repeats)), None, None, ""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hf_generate(hf, prompts[:2], 4, pad)
    ours, theirs = [], []
    for _ in range(args.offline_repeats):
        ours.append(timed(lambda: llm.generate(prompts, greedy, use_tqdm=False)))
        theirs.append(timed(lambda: hf_generate(hf, prompts, gen, pad)))
    seq_rate = None
    if args.hf_sequential:
        k = min(args.hf_sequential, len(prompts))
        seq_rate = k * gen / sum(timed(lambda p=p: hf_generate(hf, [p], gen, pad)) for p in prompts[:k])
    return statistics.median(ours), statistics.median(theirs), seq_rate, hf.config._attn_implementation


def deterministic_rows(args, mc: ModelConfig, llm: LLM, rng: random.Random, prefill_batches: list[int], decode_batches: list[int], vocab: int) -> list[list[str]]:
    """Prefill and decode with ``deterministic=True`` beside the default engine (same pool and budget)."""
    det = LLM(model=args.model, dtype="bfloat16", kv_cache_memory_bytes=llm.engine.cfg.kv_cache_memory_bytes, deterministic=True,
              max_num_batched_tokens=llm.engine.cfg.max_num_batched_tokens, enable_prefix_caching=False, num_threads=args.threads)
    rows = []
    for b in prefill_batches:
        base = measure_prefill(llm, rng, b, args.prefill_len, args.repeats, vocab)
        t = measure_prefill(det, rng, b, args.prefill_len, args.repeats, vocab)
        rows.append([f"deterministic prefill: {b} x {args.prefill_len}-token prompt(s)", f"{b * args.prefill_len / t:.0f} tok/s",
                     f"default engine {b * args.prefill_len / base:.0f} tok/s", f"{t / base:.2f}x the time", ""])
    for b in decode_batches:
        base, _ = measure_decode(llm, rng, b, args.decode_context, args.decode_steps, vocab)
        t, _ = measure_decode(det, rng, b, args.decode_context, args.decode_steps, vocab)
        rows.append([f"deterministic decode: batch {b}, context ~{args.decode_context}", f"{t * 1e3:.1f} ms/step",
                     f"default engine {base * 1e3:.1f} ms/step", f"{t / base:.2f}x the time", ""])
    del det
    return rows


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    on_workers_openmp()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.model is None:
        from splitserve.engine.default_model import default_model_path

        args.model = str(default_model_path())
    mc = ModelConfig.from_pretrained(args.model)
    vocab, itemsize = mc.vocab_size, 2
    rng = random.Random(0)
    prefill_batches = [int(b) for b in args.prefill_batches.split(",")]
    decode_batches = [int(b) for b in args.decode_batches.split(",")]
    header = ["measurement", "result", "bound / baseline (same run)", "ratio", "aim"]
    rows: list[list[str]] = []
    lines = machine_lines(args.threads)

    peaks = gemm_peaks(mc, args.prefill_len, args.repeats)
    peak = max(peaks.values())
    native = next(iter(peaks.values()))
    for name, rate in peaks.items():
        rows.append([f"peak: {name}, {args.prefill_len}-row model GEMMs", f"{rate:.1f} GFLOP/s", "", f"{rate / peak:.0%} of best", ""])
    bandwidth, read_bandwidth = memory_bandwidth(args.repeats)
    rows.append(["peak: copy bandwidth, 512 MiB `dst.copy_(src)`", f"{bandwidth:.1f} GB/s", "read + write bytes; sets the decode floor", "", ""])
    rows.append(["peak: read bandwidth, 512 MiB `src.sum()`", f"{read_bandwidth:.1f} GB/s", "for reference", "", ""])

    max_tokens = max(max(prefill_batches) * args.prefill_len, 2048)
    kv_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * itemsize * 16  # per 16-token block
    need_tokens = max(max(prefill_batches) * (args.prefill_len + 16), max(decode_batches) * (args.decode_context + args.decode_steps + 32),
                      args.offline_prompts * (int(args.offline_prompt_len * 1.2) + args.offline_max_tokens + 16))
    llm = LLM(model=args.model, dtype="bfloat16", kv_cache_memory_bytes=(need_tokens // 16 + 64) * kv_bytes, max_num_batched_tokens=max_tokens,
              enable_prefix_caching=False, num_threads=args.threads)

    for b in prefill_batches:
        t = measure_prefill(llm, rng, b, args.prefill_len, args.repeats, vocab)
        rate = b * prefill_flops(mc, args.prefill_len) / t / 1e9
        rows.append([f"prefill: {b} x {args.prefill_len}-token prompt(s), one step", f"{b * args.prefill_len / t:.0f} tok/s = {rate:.1f} GFLOP/s",
                     f"best GEMM {peak:.1f} (torch bf16 {native:.1f}) GFLOP/s", f"{rate / peak:.0%} ({rate / native:.0%} of bf16)", ">= 80%"])

    for b in decode_batches:
        t, ctx = measure_decode(llm, rng, b, args.decode_context, args.decode_steps, vocab)
        floor = decode_bytes(mc, ctx, itemsize) / (bandwidth * 1e9)
        rows.append([f"decode: batch {b}, context ~{round(statistics.mean(ctx))}", f"{t * 1e3:.1f} ms/step ({b / t:.0f} tok/s)",
                     f"memory floor {floor * 1e3:.1f} ms", f"{t / floor:.2f}x floor", "<= 1.3x" if b == 1 else ""])

    if not args.skip_deterministic:
        rows += deterministic_rows(args, mc, llm, rng, prefill_batches, decode_batches, vocab)

    prompts = random_prompts(rng, args.offline_prompts, args.offline_prompt_len, vocab, jitter=0.12)
    n, gen = len(prompts), args.offline_max_tokens
    workload = f"{n} prompts x ~{args.offline_prompt_len} tok -> {gen} tok"
    ours_t, hf_t, seq_rate, attn_impl = measure_offline(llm, args, prompts)
    ours_rate = n * gen / ours_t
    rows.append([f"offline: splitserve LLM.generate, {n} prompts", f"{ours_rate:.1f} gen tok/s, {n / ours_t:.3f} req/s", workload, "", ""])
    if hf_t is not None:
        hf_rate = n * gen / hf_t
        rows.append([f"offline: transformers, one left-padded batch of {n}", f"{hf_rate:.1f} gen tok/s, {n / hf_t:.3f} req/s", workload, "", ""])
        rows.append([f"offline ratio: splitserve / transformers batched ({attn_impl})", f"{ours_rate / hf_rate:.2f}x", f"{hf_rate:.1f} gen tok/s",
                     f"{ours_rate / hf_rate:.2f}x", ">= 3x"])
    if seq_rate is not None:
        k = min(args.hf_sequential, n)
        rows.append([f"offline: transformers, one prompt at a time (first {k})", f"{seq_rate:.1f} gen tok/s, {seq_rate / gen:.3f} req/s", workload, "", ""])
        rows.append(["offline ratio: splitserve / transformers one at a time", f"{ours_rate / seq_rate:.2f}x", f"{seq_rate:.1f} gen tok/s",
                     f"{ours_rate / seq_rate:.2f}x", ""])

    lines.append(f"- load average at end {load_average()}")
    print("\n".join(lines))
    print(f"- model: {args.model} ({mc.num_layers} layers, hidden {mc.hidden_size}, {mc.num_heads} heads / {mc.num_kv_heads} KV heads, "
          f"vocab {vocab}), bfloat16; {time.perf_counter() - t_start:.0f} s in all\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
