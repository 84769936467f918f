"""Write what a sweep found: ``results.csv``, ``requests.csv``, ``goodput.png``, ``latency.png`` and text tables.

matplotlib is imported only when a plot is drawn (it is in the ``plots`` and
``test`` extras, not the base install); without it the CSVs are still written
and the error says how to install it.
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

from splitserve.tune.planner import Row
from splitserve.tune.workload import SLO, RequestRecord

RESULT_COLUMNS = ["split", "rate", "goodput", "attainment", "throughput", "ttft_p50", "ttft_p90", "ttft_p99",
                  "itl_p50", "itl_p90", "itl_p99", "completed", "num_requests", "duration_s"]


def row_values(row: Row) -> dict[str, object]:
    s = row.summary
    return {
        "split": row.split, "rate": row.rate, "goodput": s.goodput, "attainment": s.attainment, "throughput": s.throughput,
        "ttft_p50": s.ttft_p50, "ttft_p90": s.ttft_p90, "ttft_p99": s.ttft_p99,
        "itl_p50": s.itl_p50, "itl_p90": s.itl_p90, "itl_p99": s.itl_p99,
        "completed": s.num_completed, "num_requests": s.num_requests, "duration_s": s.duration_s,
    }


def _fmt(v: object) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_results_csv(rows: list[Row], path: Path, extra: dict[tuple[str, float], dict[str, object]] | None = None) -> Path:
    """One line per (split, rate); ``extra`` adds columns (e.g. the simulator's prediction) keyed by (split, rate)."""
    extra = extra or {}
    extra_cols = sorted({k for d in extra.values() for k in d})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RESULT_COLUMNS + extra_cols)
        for r in rows:
            vals = row_values(r)
            more = extra.get((r.split, r.rate), {})
            w.writerow([_fmt(vals[c]) for c in RESULT_COLUMNS] + [_fmt(more.get(c)) for c in extra_cols])
    return path


def write_requests_csv(records: dict[tuple[str, float], list[RequestRecord]], slo: SLO, path: Path) -> Path:
    cols = ["split", "rate", "index", "arrival_s", "prompt_len", "output_len", "num_output_tokens", "ttft_s", "itl_mean_s",
            "itl_p90_s", "finish_s", "meets_slo", "error"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for (split, rate), recs in records.items():
            for r in recs:
                w.writerow([split, rate, r.index, _fmt(r.arrival_s), r.prompt_len, r.output_len, r.num_output_tokens, _fmt(r.ttft_s),
                            _fmt(r.itl_mean_s), _fmt(r.itl_p90_s), _fmt(r.finish_s), int(r.meets(slo)), r.error or ""])
    return path


def format_table(rows: list[Row], predicted: dict[tuple[str, float], float] | None = None) -> str:
    """A markdown table; with ``predicted`` goodput, adds the simulator's number and its error in %."""
    head = ["split", "rate", "goodput", "attain", "ttft p50", "ttft p90", "ttft p99", "itl p50", "itl p90", "itl p99", "done"]
    if predicted:
        head += ["sim goodput", "sim err %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.summary

        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f}"

        cells = [r.split, f"{r.rate:g}", f"{s.goodput:.3f}", f"{s.attainment:.0%}", sec(s.ttft_p50), sec(s.ttft_p90), sec(s.ttft_p99),
                 ms(s.itl_p50), ms(s.itl_p90), ms(s.itl_p99), f"{s.num_completed}/{s.num_requests}"]
        if predicted:
            p = predicted.get((r.split, r.rate))
            cells += ["-" if p is None else f"{p:.3f}", _err(p, s.goodput)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("(goodput and throughput in req/s; TTFT in s; inter-token latency in ms)")
    return "\n".join(lines)


def _err(pred: float | None, meas: float) -> str:
    if pred is None:
        return "-"
    if meas == 0:
        return "0" if pred == 0 else "inf"
    return f"{(pred - meas) / meas * 100:+.0f}"


def _wrap(title: str, width: int) -> str:
    return "\n".join(part for line in title.split("\n") for part in textwrap.wrap(line, width))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'splitserve[plots]' (or pip install matplotlib); "
                           "results.csv was written without them") from e
    return plt


def plot_goodput(rows: list[Row], path: Path, title: str, predicted: dict[tuple[str, float], float] | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rates = sorted({r.rate for r in rows})
    ax.plot(rates, rates, color="0.8", linestyle=":", label="offered rate")
    for i, split in enumerate(dict.fromkeys(r.split for r in rows)):
        mine = sorted((r for r in rows if r.split == split), key=lambda r: r.rate)
        color = f"C{i}"
        ax.plot([r.rate for r in mine], [r.summary.goodput for r in mine], "o-", color=color, label=f"{split} measured")
        if predicted:
            pts = [(r.rate, predicted[(split, r.rate)]) for r in mine if (split, r.rate) in predicted]
            if pts:
                ax.plot(*zip(*pts), "x--", color=color, label=f"{split} simulated")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("goodput (req/s meeting both SLOs)")
    ax.set_title(_wrap(title, 80), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(rows: list[Row], slo: SLO, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, split in enumerate(dict.fromkeys(r.split for r in rows)):
        mine = sorted((r for r in rows if r.split == split), key=lambda r: r.rate)
        x = [r.rate for r in mine]
        for ax, key, scale in ((a1, "ttft", 1.0), (a2, "itl", 1000.0)):
            for pct, style in (("p50", "o-"), ("p99", "^--")):
                ys = [getattr(r.summary, f"{key}_{pct}") for r in mine]
                pts = [(xx, y * scale) for xx, y in zip(x, ys) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{split} {pct}")
    a1.axhline(slo.ttft_s, color="red", linewidth=0.8, label="SLO")
    a2.axhline(slo.itl_s * 1000, color="red", linewidth=0.8, label="SLO")
    a1.set_ylabel("time to first token (s)")
    a2.set_ylabel("inter-token latency (ms)")
    for ax in (a1, a2):
        ax.set_xlabel("request rate (req/s)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_wrap(title, 140), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
