"""``mode: auto`` and what ``splitserve serve`` runs when no mode is given.

Disaggregated where each role has hardware of its own (GPUs, custom resources
placing the workers, roles scaled apart); aggregated on plain CPU workers, where
the one worker gets the cores both roles would have had.
"""

from __future__ import annotations

import argparse

import pytest

from splitserve.app import _actor_options
from splitserve.config import ServeConfig, choose_mode
from splitserve.serve_cli import add_serve_parser, config_from_args

pytestmark = pytest.mark.unit


def _cli(*argv: str) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return config_from_args(parser.parse_args(["serve", *argv]))


def test_cpu_workers_aggregate_with_both_roles_cores():
    cfg = ServeConfig(mode="auto")
    assert (cfg.mode, cfg.num_prefill, cfg.num_decode, cfg.decode_resources.num_cpus) == ("aggregated", 0, 1, 2.0)
    assert "CPU workers" in cfg.mode_reason
    # the worker runs as many intra-op threads as it has cores
    assert _actor_options(cfg.decode_resources, cfg.engine.num_threads)["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    # 3 prefill + 2 decode workers of 2 cores each: two aggregated workers of 2 + 3 cores
    wide = ServeConfig(mode="auto", num_prefill=3, num_decode=2, prefill_resources={"num_cpus": 2}, decode_resources={"num_cpus": 2})
    assert (wide.mode, wide.num_prefill, wide.num_decode, wide.decode_resources.num_cpus) == ("aggregated", 0, 2, 5.0)


@pytest.mark.parametrize("fields, why", [
    ({"decode_resources": {"num_gpus": 1}}, "GPUs"),
    ({"prefill_resources": {"num_gpus": 1, "num_cpus": 4}}, "GPUs"),
    ({"prefill_resources": {"resources": {"prefill_node": 1}}}, "custom resources"),
    ({"num_prefill": {"min": 1, "max": 3}}, "scaled separately"),
    ({"num_decode": {"min": 1, "max": 2}}, "scaled separately"),
])
def test_own_hardware_or_separate_scaling_disaggregates(fields, why):
    cfg = ServeConfig.model_validate({"mode": "auto", **fields})
    assert cfg.mode == "disaggregated" and why in cfg.mode_reason
    assert cfg.prefill_resources == ServeConfig.model_validate(fields).prefill_resources  # resources untouched
    assert cfg.decode_resources == ServeConfig.model_validate(fields).decode_resources


def test_a_given_mode_is_kept_and_auto_is_gone_after_validation():
    assert ServeConfig().mode == "disaggregated" and ServeConfig().mode_reason is None
    assert ServeConfig(mode="aggregated", num_prefill=0).decode_resources.num_cpus == 1.0
    resolved = ServeConfig(mode="auto")
    again = ServeConfig.model_validate(resolved.model_dump())  # what the ingress replica receives
    assert (again.mode, again.decode_resources.num_cpus, again.num_prefill) == ("aggregated", 2.0, 0)
    assert choose_mode(ServeConfig(num_prefill=1))[0] == "aggregated"
    with pytest.raises(ValueError, match="num_decode must be >= 1"):
        ServeConfig(mode="auto", num_decode=0)


def test_splitserve_serve_defaults_to_auto_unless_told(tmp_path):
    assert _cli().mode == "aggregated"  # CPU workers
    assert _cli("--worker-gpus", "1").mode == "disaggregated"
    assert _cli("--mode", "disaggregated").mode == "disaggregated"
    assert _cli("--prefill", "2").mode == "disaggregated"  # asking for prefill workers asks for the split
    # auto decides on the final resources: the flags' CPUs, both roles' worth
    assert _cli("--worker-cpus", "3").decode_resources.num_cpus == 6.0
    yaml_mode = tmp_path / "disagg.yaml"
    yaml_mode.write_text("mode: disaggregated\n")
    assert _cli("--config", str(yaml_mode)).mode == "disaggregated"
    yaml_auto = tmp_path / "auto.yaml"
    yaml_auto.write_text("mode: auto\ndecode_resources: {num_cpus: 2}\n")
    assert _cli("--config", str(yaml_auto), "--worker-cpus", "4").decode_resources.num_cpus == 8.0


def test_the_stream_interval_flag_reaches_the_config():
    assert _cli().http.stream_interval == 1
    assert _cli("--stream-interval", "8").http.stream_interval == 8
    with pytest.raises(ValueError, match="stream_interval"):
        _cli("--stream-interval", "0")


def test_the_prefill_tokens_beside_decodes_flag_reaches_the_engine_config():
    assert _cli().engine.max_prefill_tokens_beside_decodes is None
    assert _cli("--max-prefill-tokens-beside-decodes", "256").engine.max_prefill_tokens_beside_decodes == 256
    with pytest.raises(ValueError, match="max_prefill_tokens_beside_decodes"):
        _cli("--max-prefill-tokens-beside-decodes", "0")


def test_workers_schedule_to_the_slo_unless_told_not_to():
    cfg = ServeConfig.model_validate({"slo": {"ttft_s": 2.0, "tpot_s": 0.1}})
    assert (cfg.engine.slo_ttft_s, cfg.engine.slo_tpot_s) == (2.0, 0.1)
    assert _cli().engine.slo_ttft_s == 3.0  # the default server: the default SLO
    fcfs = _cli("--no-slo-scheduling")
    assert (fcfs.slo.schedule, fcfs.engine.slo_ttft_s, fcfs.engine.slo_tpot_s) == (False, None, None)
    # the engine's own targets win over the SLO's
    own = ServeConfig.model_validate({"engine": {"slo_ttft_s": 5.0, "slo_tpot_s": 0.5}})
    assert (own.engine.slo_ttft_s, own.engine.slo_tpot_s) == (5.0, 0.5)
    with pytest.raises(ValueError, match="set both slo_ttft_s and slo_tpot_s"):
        ServeConfig.model_validate({"engine": {"slo_ttft_s": 5.0}})
