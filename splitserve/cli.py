"""The ``splitserve`` command line.

    splitserve make-model DIR [--size tiny|small]   write a random HF checkpoint (no download)
    splitserve generate --prompt "..." [--model DIR] offline generation with the in-process engine
    splitserve serve [--model DIR] [--mode ...]      the OpenAI-compatible server (mode auto unless given)
    splitserve top [--url URL]                       a refreshing terminal view of a running server
    splitserve dashboard DIR                         write the Grafana dashboard, alert rules, scrape config

Every sub-command that takes ``--model`` falls back to the default model,
SmolLM2-135M-Instruct (converted once into ``$SPLITSERVE_CACHE``), when none is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _cmd_make_model(args: argparse.Namespace) -> int:
    from splitserve.engine.random_models import MODEL_SIZES, make_model

    if args.size not in MODEL_SIZES:
        print(f"error: --size must be one of {', '.join(MODEL_SIZES)}", file=sys.stderr)
        return 2
    path = make_model(args.dir, args.size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.size} checkpoint to {path} (random weights: its text means nothing)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from splitserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, deterministic=args.deterministic)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    prompts = args.prompt or ["The quick brown fox"]
    for out in llm.generate(prompts, params, use_tqdm=len(prompts) > 1):
        m = out.metrics
        print(json.dumps({
            "prompt": out.prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "num_prompt_tokens": len(out.prompt_token_ids), "time_to_first_token_s": round(m.time_to_first_token or 0.0, 4),
            "latency_s": round(m.e2e_latency or 0.0, 4),
        }))
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    import os

    from splitserve import top

    key = args.api_key or os.environ.get("SPLITSERVE_API_KEY")
    return top.run(args.url.rstrip("/"), key, args.interval, args.iterations)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from splitserve.config import SLOTargets
    from splitserve.dashboards import write_all

    for path in write_all(args.dir, SLOTargets(ttft_s=args.slo_ttft_s, tpot_s=args.slo_tpot_s)):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-model", help="write a random-weight HF checkpoint (config.json + safetensors + tokenizer)")
    mk.add_argument("dir", help="output directory")
    mk.add_argument("--size", default="small", help="tiny (tests) or small (~82M params, benchmarks)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--overwrite", action="store_true", help="replace checkpoint files in a non-empty directory")
    mk.set_defaults(func=_cmd_make_model)

    gen = sub.add_parser("generate", help="offline generation with the in-process engine")
    gen.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--deterministic", action="store_true", help="batch-invariant numerics (see README)")
    gen.set_defaults(func=_cmd_generate)

    top = sub.add_parser("top", help="a refreshing terminal view of a running server (/admin/workers and /metrics)")
    top.add_argument("--url", default="http://127.0.0.1:8000")
    top.add_argument("--api-key", default=None, help="default: $SPLITSERVE_API_KEY")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--iterations", type=int, default=None, help="stop after this many refreshes (default: until Ctrl-C)")
    top.set_defaults(func=_cmd_top)

    dash = sub.add_parser("dashboard", help="write the Grafana dashboard, Prometheus alert rules and a scrape config")
    dash.add_argument("dir", help="output directory (grafana/ and prometheus/ are made under it)")
    dash.add_argument("--slo-ttft-s", type=float, default=3.0, help="the SLO named in the attainment alert")
    dash.add_argument("--slo-tpot-s", type=float, default=0.15)
    dash.set_defaults(func=_cmd_dashboard)

    try:
        from splitserve.serve_cli import add_serve_parser
    except ImportError:  # serving extras not importable: offline commands still work
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    from splitserve.tune.cli import add_simulate_parser, add_tune_parser  # tune: measure splits; simulate: project
    add_tune_parser(sub)
    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
