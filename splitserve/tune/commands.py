"""What ``splitserve tune`` does, step by step (the argument parsing is in ``cli.py``).

1. resolve the model (default: SmolLM2-135M-Instruct, see ``engine/default_model``);
2. ``--profile-only``: measure this machine's curves into ``OUT/profile.json`` and stop;
3. otherwise sweep every split that fits ``--units`` at every rate (``sweep.run_sweep``)
   under a tqdm bar; with ``--profile``, simulate the same requests on the same
   splits and put the simulator's goodput and its error beside each measurement;
4. write ``results.csv``, ``requests.csv``, ``goodput.png``, ``latency.png`` and
   ``summary.md``, print the table and the best split.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from splitserve.tune.simulator import NO_LOCAL_PREFILL, LocalPrefill, Split
from splitserve.tune.workload import SLO, Workload


def _model_path(model: str | None) -> str:
    if model is not None:
        from splitserve.engine.weights import inspect_checkpoint

        inspect_checkpoint(model)  # a clear error before anything starts
        return model
    from splitserve.engine.default_model import default_model_path

    return str(default_model_path())


def profile_only(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from splitserve.tune.profile import measure_profile, save_profile
    from splitserve.tune.scaling import describe

    model = _model_path(args.model)
    with tqdm(desc="profiling", bar_format="{desc} [{elapsed}]") as bar:
        t0 = time.monotonic()
        profiles = measure_profile(model, dtype=args.dtype, token_budget=args.max_num_batched_tokens,
                                   kv_capacity_blocks=args.num_kv_blocks, num_busy=args.profile_busy, progress=lambda what: bar.set_description_str(f"profiling: {what}"))
        bar.set_description_str(f"profiled in {time.monotonic() - t0:.0f} s")
    path = save_profile(profiles, Path(args.out) / "profile.json")
    print(describe(profiles))
    print(f"fit error: prefill {profiles.meta['prefill_fit_error']:.1%}, decode {profiles.meta['decode_fit_error']:.1%} (mean |relative|)")
    print(f"wrote {path}")
    return 0


def _parse_splits(text: str | None) -> list[Split] | None:
    if not text:
        return None
    return [Split.parse(s) for s in text.split(",") if s.strip()]


def predict(rows, workload: Workload, slo: SLO, profiles, num_requests: int, seed: int,
            local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> dict[tuple[str, float], float]:
    """The simulator's goodput for each measured (split, rate), on the very same request list."""
    from splitserve.tune.planner import evaluate

    return {(r.split, r.rate): evaluate(Split.parse(r.split), workload, slo, profiles, r.rate, num_requests, seed,
                                        local_prefill=local_prefill).summary.goodput
            for r in rows}


def tune(args: argparse.Namespace, workload: Workload, slo: SLO) -> int:
    import logging

    from tqdm.auto import tqdm

    from splitserve.tune import report
    from splitserve.tune.cli import local_prefill_from
    from splitserve.tune.sweep import SweepConfig, best_of, plan_splits, run_sweep

    profiles = None
    if args.profile:
        from splitserve.tune.cli import resolve_profile

        profiles = resolve_profile(args.profile)  # fail before the long part
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bar
    cfg = SweepConfig(
        model=_model_path(args.model), workload=workload, slo=slo, rates=sorted(args.rates), num_requests=args.num_requests or 20,
        units=args.units, splits=_parse_splits(args.splits), dtype=args.dtype, num_kv_blocks=args.num_kv_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens, port=args.port, ready_timeout_s=args.ready_timeout,
        request_timeout_s=args.request_timeout, seed=args.seed, local_prefill=local_prefill_from(args),
    )
    splits = cfg.splits or plan_splits(cfg.units)
    print(f"workload {workload.describe()}; SLO {slo.describe()}")
    print(f"splits {', '.join(s.label for s in splits)} on {cfg.units} units ({cfg.unit_cpus:g} CPU each); "
          f"rates {', '.join(f'{r:g}' for r in cfg.rates)} req/s; {cfg.num_requests} requests each", flush=True)
    with tqdm(total=len(splits) * len(cfg.rates), desc="tune", unit="run") as bar:
        done = []

        def progress(split: str, rate: float, row) -> None:
            done.append(row)
            report.write_results_csv(done, out / "results.csv")  # partial results survive a crash mid-sweep
            bar.set_postfix_str(f"{split} @ {rate:g}/s: goodput {row.summary.goodput:.3f}")
            bar.update(1)

        rows, records = run_sweep(cfg, progress)
    predicted = predict(rows, workload, slo, profiles, cfg.num_requests, args.seed, cfg.local_prefill) if profiles else None
    extra = {k: {"sim_goodput": v} for k, v in (predicted or {}).items()}
    report.write_results_csv(rows, out / "results.csv", extra)
    report.write_requests_csv(records, slo, out / "requests.csv")
    title = f"{workload.describe()}\nSLO {slo.describe()}"
    table = report.format_table(rows, predicted)
    best, goodput = best_of(rows)
    lines = [f"command: splitserve {' '.join(shlex.quote(a) for a in sys.argv[1:])}",
             f"model: {cfg.model}", title.replace("\n", "; "), "", table, "", f"best split: {best} ({goodput:.3f} req/s goodput)"]
    if predicted:
        errs = [abs(predicted[(r.split, r.rate)] - r.summary.goodput) / r.summary.goodput for r in rows if r.summary.goodput > 0]
        if errs:
            lines.append(f"simulator: mean |error| {sum(errs) / len(errs):.0%} over {len(errs)} points with non-zero measured goodput")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        report.plot_goodput(rows, out / "goodput.png", title, predicted)
        report.plot_latency(rows, slo, out / "latency.png", title)
    except RuntimeError as e:
        print(f"warning: {e}", file=sys.stderr)
    print("\n".join(lines[4:]))
    print(f"wrote {out / 'results.csv'}, {out / 'requests.csv'}, {out / 'goodput.png'}, {out / 'latency.png'}, {out / 'summary.md'}")
    return 0


def compare_with_measured(results_csv: Path, workload: Workload, slo: SLO, profiles, seed: int, calibrate: bool = False,
                          out: Path | None = None, local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> int:
    """Simulate every (split, rate) of a measured ``results.csv`` on the same requests; print both and the error.

    ``calibrate``: first fit the workers' live slowdown and the hand-off latency to
    each split's lowest rate (``calibrate.calibrate``); those points are marked ``*``
    and the error is also given over the other (held-out) points. With ``out``, the
    calibrated profile is written to ``out/calibrated-profile.json`` (for ``simulate --profile``).
    """
    import csv

    from splitserve.tune.planner import evaluate

    if not results_csv.is_file():
        raise ValueError(f"{str(results_csv)!r} does not exist; it is the results.csv a 'splitserve tune' run writes")
    measured = list(csv.DictReader(open(results_csv)))
    cal = None
    if calibrate:
        from splitserve.tune.calibrate import calibrate as fit

        cal = fit(measured, workload, slo, profiles, seed, local_prefill)
        profiles = cal.profiles
        print(cal.describe())
        if out is not None:
            from splitserve.tune.profile import save_profile

            print(f"wrote {save_profile(profiles, Path(out) / 'calibrated-profile.json')}")
    head = ["split", "rate", "goodput", "sim", "err %", "attain", "sim", "ttft p50", "sim", "itl p50 ms", "sim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    errs, lat_errs, held_out = [], [], []
    for m in measured:
        rate, n = float(m["rate"]), int(m["num_requests"])
        sim = evaluate(Split.parse(m["split"]), workload, slo, profiles, rate, n, seed, keep_gaps=True, local_prefill=local_prefill).summary
        good = float(m["goodput"])
        err = (sim.goodput - good) / good * 100 if good > 0 else float("nan")
        fitted = cal is not None and cal.used(m["split"], rate)
        if good > 0:
            errs.append(abs(err))
            if cal is not None and not fitted:
                held_out.append(abs(err))
        for key in ("ttft_p50", "itl_p50"):
            if m[key] and getattr(sim, key):
                lat_errs.append(abs(getattr(sim, key) - float(m[key])) / float(m[key]) * 100)

        def f(v, scale=1.0, fmt="{:.2f}"):
            return "-" if v in (None, "") else fmt.format(float(v) * scale)

        lines.append("| " + " | ".join([
            m["split"] + (" *" if fitted else ""), f"{rate:g}", f(good, fmt="{:.3f}"), f(sim.goodput, fmt="{:.3f}"), f"{err:+.0f}",
            f(m["attainment"], 100, "{:.0f}%"), f(sim.attainment, 100, "{:.0f}%"), f(m["ttft_p50"]), f(sim.ttft_p50),
            f(m["itl_p50"], 1000, "{:.0f}"), f(sim.itl_p50, 1000, "{:.0f}")]) + " |")
    print("\n".join(lines))
    if errs:
        print(f"simulator vs measured goodput: mean |error| {sum(errs) / len(errs):.0f}% over {len(errs)} points "
              f"(median {statistics.median(errs):.0f}%); TTFT and ITL p50: mean |error| {sum(lat_errs) / max(len(lat_errs), 1):.0f}%")
    if held_out:
        print(f"held out (not used to calibrate; * marks the points that were): mean |error| "
              f"{sum(held_out) / len(held_out):.0f}%, median {statistics.median(held_out):.0f}% over {len(held_out)} points")
    return 0

