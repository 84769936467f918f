"""Worker settings travel from the YAML config to every worker: ServeConfig -> build_app's options -> WorkerOptions."""

from __future__ import annotations

import pytest

from splitserve.app import worker_options
from splitserve.config import ServeConfig
from splitserve.worker_base import WorkerOptions

pytestmark = pytest.mark.unit

YAML = """
kv_wait_timeout_s: 75.5
reservation_ttl_s: 900
transfer_timeout_s: 7
warm_up_prompt_tokens: 0
routing:
  prefill_timeout_s: 60
  prefix_report_max_blocks: 512
  migration_limit: 5
  max_queue_wait_s: 15
  degraded_mode: false
faults: {fail_fraction: 0.25, seed: 3}
"""


def test_yaml_settings_reach_the_worker_options(tmp_path):
    path = tmp_path / "splitserve.yaml"
    path.write_text(YAML)
    cfg = ServeConfig.from_yaml(path)
    opts = WorkerOptions(**worker_options(cfg))  # exactly what build_app binds to every worker deployment
    assert (opts.kv_wait_timeout_s, opts.reservation_ttl_s, opts.prefix_report_max_blocks) == (75.5, 900.0, 512)
    assert (opts.transfer_timeout_s, opts.fail_fraction, opts.fault_seed, opts.warm_up_prompt_tokens) == (7.0, 0.25, 3, 0)
    assert (cfg.routing.migration_limit, cfg.routing.max_queue_wait_s, cfg.routing.degraded_mode) == (5, 15.0, False)


def test_defaults_match_the_workers_own():
    opts = WorkerOptions(**worker_options(ServeConfig()))
    assert opts == WorkerOptions()
    r = ServeConfig().routing
    assert (r.migration_limit, r.max_queue_wait_s, r.degraded_mode) == (3, 30.0, True)
    assert ServeConfig.model_validate({"routing": {"max_queue_wait_s": None}}).routing.max_queue_wait_s is None


def test_a_reservation_that_cannot_outlive_its_prefill_is_refused():
    with pytest.raises(ValueError, match=r"reservation_ttl_s \(100\) must exceed routing.prefill_timeout_s \(120\)"):
        ServeConfig(reservation_ttl_s=100)
    # unset, it follows a long prefill timeout (``splitserve tune`` sets it to its request timeout)
    assert WorkerOptions(**worker_options(ServeConfig.model_validate({"routing": {"prefill_timeout_s": 600}}))).reservation_ttl_s == 660.0
    assert ServeConfig().with_overrides({"routing.prefill_timeout_s": 900}).reservation_ttl_seconds == 960.0
    with pytest.raises(ValueError, match="kv_wait_timeout_s"):
        ServeConfig(kv_wait_timeout_s=0)


def test_reserved_blocks_wait_for_their_kv_longer_than_the_router_waits_for_the_prefill():
    """A decode worker that gave up on its KV first freed blocks the prefill worker then wrote into (an outsider's
    8,000-token prompt: the decode side's 60 s ran out inside the router's 120 s, and a healthy decode worker was
    charged with the failure)."""
    with pytest.raises(ValueError, match=r"kv_wait_timeout_s \(60\) must exceed routing.prefill_timeout_s \(120\)"):
        ServeConfig(kv_wait_timeout_s=60)
    assert ServeConfig().kv_wait_timeout_seconds == 150.0
    longer = ServeConfig.model_validate({"routing": {"prefill_timeout_s": 600}})
    assert WorkerOptions(**worker_options(longer)).kv_wait_timeout_s == 630.0


def test_local_prefill_budget_from_the_command_line_or_the_yaml(tmp_path):
    import argparse

    from splitserve.serve_cli import add_serve_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    path = tmp_path / "splitserve.yaml"
    path.write_text("routing: {local_prefill_budget_s: 0.5}\n")
    budget = lambda *argv: config_from_args(parser.parse_args(["serve", *argv])).routing.local_prefill_budget_s  # noqa: E731
    assert budget() == ServeConfig().routing.local_prefill_budget_s > 0  # on by default
    assert budget("--config", str(path)) == 0.5
    assert budget("--config", str(path), "--local-prefill-budget-s", "0") == 0.0  # the flag wins; 0 turns it off
    with pytest.raises(ValueError, match="local_prefill_budget_s"):
        budget("--local-prefill-budget-s", "-1")
