"""``splitserve tune`` (measure splits on this machine) and ``splitserve simulate`` (project larger clusters).

    splitserve tune --profile-only --out runs/tune            # write runs/tune/profile.json (this machine)
    splitserve tune --workload rag-small --rates 0.1,0.2,0.4 --num-requests 16 --profile runs/tune/profile.json --out runs/tune
    splitserve simulate --profile h200:llama-3-8b --units 8,16,64 --workload rag --ttft-slo 0.5 --itl-slo 0.05
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from splitserve.config import RoutingConfig


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    return [int(v) for v in _floats(text)]


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="rag", help="preset: rag (~1024 in / 64 out), chat (~256 / 256), rag-small (~256 / 32)")
    p.add_argument("--prompt-len", default=None, help="override prompt lengths, e.g. 512, normal:1024,128 or lognormal:256,0.5,16,2048")
    p.add_argument("--output-len", default=None, help="override output lengths (same forms)")
    p.add_argument("--arrival", choices=["poisson", "constant"], default=None, help="arrival process (default poisson)")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="time-to-first-token SLO in seconds")
    p.add_argument("--itl-slo", type=float, default=0.2, help="inter-token latency SLO in seconds")
    p.add_argument("--itl-stat", choices=["mean", "p90"], default="mean", help="which per-request inter-token latency the SLO bounds")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per (split, rate); tune: 20, simulate: at least max(300, 60 x workers)")
    p.add_argument("--seed", type=int, default=0)
    routing = RoutingConfig.model_fields
    p.add_argument("--local-prefill-budget-s", type=float, default=routing["local_prefill_budget_s"].default,
                   help="routing.local_prefill_budget_s of the servers: short prompts are prefilled on their decode worker "
                        "(default: splitserve serve's; 0: every prompt through a prefill worker)")
    p.add_argument("--local-prefill-threshold-tokens", type=int, default=routing["local_prefill_threshold_tokens"].default,
                   help="routing.local_prefill_threshold_tokens of the servers (default: splitserve serve's)")


def local_prefill_from(args: argparse.Namespace):
    """The servers' conditional disaggregation, as the simulator models it (``simulator.LocalPrefill``)."""
    from splitserve.tune.simulator import LocalPrefill

    return LocalPrefill(args.local_prefill_threshold_tokens, args.local_prefill_budget_s)


def _workload(args: argparse.Namespace):
    from dataclasses import replace

    from splitserve.tune.workload import SLO, LengthDist, preset

    wl = preset(args.workload, seed=args.seed)
    wl = wl.with_lengths(LengthDist.parse(args.prompt_len) if args.prompt_len else None,
                         LengthDist.parse(args.output_len) if args.output_len else None)
    if args.arrival:
        wl = replace(wl, arrival=args.arrival)
    return wl, SLO(args.ttft_slo, args.itl_slo, args.itl_stat)


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="measure goodput of prefill:decode splits on this machine (CSV + plots + best split)")
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    _workload_args(p)
    p.add_argument("--rates", type=_floats, default=[0.25, 0.5, 1.0], help="request rates (req/s), comma-separated")
    p.add_argument("--units", type=int, default=os.cpu_count() or 1, help="resource units to split; one per worker (default: CPU count)")
    p.add_argument("--splits", default=None, help="only these splits, e.g. 1P1D,agg1,agg2 (default: all that fit --units)")
    p.add_argument("--out", default="tune-results", help="output directory")
    p.add_argument("--profile", default=None, help="profile JSON: also simulate every point and report the simulator's error")
    p.add_argument("--profile-only", action="store_true", help="measure this machine's prefill/decode curves into OUT/profile.json and stop")
    p.add_argument("--profile-busy", type=int, default=1,
                   help="--profile-only: measure while this many units (the measured one included) run the engine (default 1: alone)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-kv-blocks", type=int, default=2048, help="KV blocks per worker")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take before it counts as failed")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for each deployment")
    p.set_defaults(func=run_tune)


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="predict goodput of every split of N GPUs from profiled curves; print the best")
    p.add_argument("--profile", default="h200:llama-3-8b",
                   help="a profile JSON, or DEVICE:MODEL[:tpN] projected from stated assumptions (devices: h200, h100; "
                        "models: llama-3-8b, llama-3-70b)")
    p.add_argument("--units", type=_ints, default=[8, 16, 64], help="cluster sizes in GPUs (units), comma-separated")
    _workload_args(p)
    p.add_argument("--rates", type=_floats, default=None, help="fixed rates to compare at (default: find each split's capacity)")
    p.add_argument("--target-attainment", type=float, default=0.9, help="capacity = highest rate with this fraction in SLO")
    p.add_argument("--token-budget", type=int, default=None, help="projected profiles: tokens per prefill step (default 8192)")
    p.add_argument("--transfer-latency", type=float, default=None, help="override the profile's fixed KV hand-off latency (s)")
    p.add_argument("--out", default=None, help="write simulate.csv (every point) and the profile used here")
    p.add_argument("--against", default=None, help="a tune results.csv: simulate its (split, rate) points, print the error in %%")
    p.add_argument("--calibrate", action="store_true", help="with --against: fit the KV hand-off latency to each "
                   "disaggregated split's lowest measured rate first (the other rates stay a held-out check)")
    p.set_defaults(func=run_simulate)


def resolve_profile(text: str, token_budget: int | None = None):
    """A profile from a JSON file, or projected from ``DEVICE:MODEL[:tpN]``."""
    from dataclasses import replace

    from splitserve.tune.profile import load_profile
    from splitserve.tune.scaling import DEVICES, MODELS, Assumptions, project

    if Path(text).suffix == ".json" or Path(text).is_file():
        return load_profile(text)
    parts = text.lower().split(":")
    if len(parts) not in (2, 3) or parts[0] not in DEVICES or parts[1] not in MODELS:
        raise ValueError(f"--profile {text!r} is neither a file nor DEVICE:MODEL[:tpN] with DEVICE in {sorted(DEVICES)} "
                         f"and MODEL in {sorted(MODELS)}")
    tp = int(parts[2].removeprefix("tp")) if len(parts) == 3 else 1
    assume = Assumptions() if token_budget is None else replace(Assumptions(), token_budget=token_budget)
    return project(DEVICES[parts[0]], MODELS[parts[1]], tp, assume)


def run_simulate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from splitserve.tune.planner import MIN_DURATION_S, default_num_requests, search_best_split
    from splitserve.tune.report import write_results_csv
    from splitserve.tune.scaling import describe
    from splitserve.tune.simulator import candidate_splits

    profiles = resolve_profile(args.profile, args.token_budget)
    if args.transfer_latency is not None:
        from dataclasses import replace

        profiles = replace(profiles, transfer=replace(profiles.transfer, latency_s=args.transfer_latency))
    wl, slo = _workload(args)
    tp = int(profiles.meta.get("tp", 1) or 1)
    print(describe(profiles))
    print(f"workload {wl.describe()}; SLO {slo.describe()}")
    if args.against:
        from splitserve.tune.commands import compare_with_measured

        return compare_with_measured(Path(args.against), wl, slo, profiles, args.seed, calibrate=args.calibrate,
                                     out=Path(args.out) if args.out else None, local_prefill=local_prefill_from(args))
    if args.calibrate:
        raise ValueError("--calibrate needs --against (a measured results.csv to fit to)")
    local = local_prefill_from(args)
    print("simulator assumptions: one worker per unit of tp GPUs; least-loaded routing on exact load; KV links never contend; "
          "FCFS prefill with chunking under the token budget; continuous-batching decode; "
          f"prompts prefilled on their decode worker when <= {local.threshold_tokens} tokens or within {local.budget_s:g} s there")
    all_rows, summary = [], []
    for units in args.units:
        workers = units // tp
        if workers < 2:
            print(f"{units} GPUs: only {workers} worker(s) of tp={tp}; skipped")
            continue
        n = args.num_requests or default_num_requests(workers)
        splits = candidate_splits(workers)
        with tqdm(total=len(splits), desc=f"{units} GPUs", unit="split", leave=False) as bar:
            res = search_best_split(workers, wl, slo, profiles, args.rates, num_requests=n, seed=args.seed,
                                    target_attainment=args.target_attainment, progress=lambda _label: bar.update(1),
                                    local_prefill=local)
        all_rows += [r for r in res.rows]
        rank = res.ranking()
        agg = next((v for k, v in rank if k.startswith("agg")), 0.0)
        best = res.score[res.best]
        gain = f"{best / agg:.2f}x the aggregated baseline" if agg > 0 else "aggregated baseline meets the SLO at no rate"
        summary.append((units, res.best, best))
        per_point = f"{n} requests per point" if args.rates else f">= {n} requests and >= {MIN_DURATION_S:g} s of arrivals per point"
        print(f"\n{units} GPUs ({workers} workers of tp={tp}), {per_point}; score = {res.score_kind}")
        print("  top splits: " + ", ".join(f"{k} {v:.1f}" for k, v in rank[:5]) + f"; agg{workers} {agg:.1f}")
        print(f"  best: {res.best} -> {best:.1f} req/s ({best / units:.2f} per GPU), {gain}")
    print("\nrecommendation:")
    for units, best, score in summary:
        print(f"  {units:4d} GPUs: {best:>8s}  ({score:.1f} req/s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_results_csv(all_rows, out / "simulate.csv")
        from splitserve.tune.profile import save_profile

        save_profile(profiles, out / "simulate-profile.json")
        print(f"wrote {out / 'simulate.csv'}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from splitserve.tune.commands import profile_only, tune

    if args.profile_only:
        return profile_only(args)
    wl, slo = _workload(args)
    return tune(args, wl, slo)

