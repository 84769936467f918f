"""Deployment configuration: one pydantic model, loadable from YAML, overridable from the CLI.

    mode: disaggregated          # or aggregated, or auto (chosen from the workers' hardware: see ``choose_mode``)
    num_prefill: 1
    num_decode: 1
    engine: {model: /path/to/ckpt, dtype: bfloat16, max_num_batched_tokens: 2048}
    http: {host: 127.0.0.1, port: 8000, api_key: null}

Validators say how to fix a bad value. The same model is what ``serve run`` /
``serve deploy`` pass (as ``args``) to ``splitserve.app:build_app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from splitserve.engine.config import EngineConfig


class HTTPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, description="when set, every route but /health requires 'Authorization: Bearer <key>'")
    api_key_file: str | None = Field(None, description="read the API key from this file (first line), keeping it out of `ps` and configs")
    public_metrics: bool = Field(False, description="with an API key, leave /metrics open (for a Prometheus without credentials)")
    max_request_bytes: int = Field(4 * 2**20, ge=1024, description="larger bodies get HTTP 413")
    served_model_name: str | None = Field(None, description="name clients use in 'model'; the checkpoint path is accepted too")
    disconnect_poll_s: float = Field(0.5, gt=0, description="how often a non-streaming request checks that its client is still there")
    allow_client_chat_template: bool = Field(False, description="accept a chat template in the request (rendered sandboxed and bounded)")
    chat_template_timeout_s: float = Field(1.0, gt=0, description="a chat template render that takes longer is refused with HTTP 400")
    max_metric_tenants: int = Field(100, ge=1, description="distinct tenant labels in /metrics; later tenants are counted as 'other'")
    max_stop_sequences: int = Field(
        64, ge=1, description="stop strings, and stop_token_ids, one request may give (each is checked at every token)",
    )
    max_stop_chars: int = Field(1000, ge=1, description="characters in one stop string (text that long is held back while streaming)")
    stream_interval: int = Field(
        1, ge=1, description="a stream sends its first token at once, then every this many tokens (and the last ones): "
        "fewer, larger events for less CPU per token, at the cost of smoothness (vLLM's --stream-interval)",
    )

    @model_validator(mode="after")
    def _check_key(self) -> "HTTPConfig":
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set http.api_key or http.api_key_file, not both")
        return self

    def resolved_api_key(self) -> str | None:
        """The API key, read from ``api_key_file`` when that is set (ValueError naming the file if unusable)."""
        if self.api_key_file is None:
            return self.api_key or None
        path = Path(self.api_key_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"http.api_key_file {str(path)!r} cannot be read: {e.strerror}") from e
        key = text.splitlines()[0].strip() if text else ""
        if not key:
            raise ValueError(f"http.api_key_file {str(path)!r} is empty; write the key on its first line")
        return key


class WorkerResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="Ray CPU share per worker replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker replica (1 on GPU clusters)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. {prefill_node: 1}")
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    local_prefill_threshold_tokens: int = Field(0, ge=0, description="prompts this short are prefilled on the decode worker")
    local_prefill_budget_s: float = Field(
        0.02, ge=0, description="prompts the decode worker would prefill this fast (its queue included, at the measured cost of a "
        "prompt token) are prefilled there, not sent through a prefill worker and a KV transfer; 0: off",
    )
    prefix_aware: bool = Field(True, description="route a prompt to the worker whose prefix cache holds most of it (workers report cache summaries)")
    max_prefill_queue_tokens: int | None = Field(None, ge=1, description="above this, prefill locally instead of queueing")
    slo_local_prefill: bool = Field(
        True, description="prefill on the decode worker when the prefill queue would miss slo.ttft_s and decoding has room (slo.tpot_s)",
    )
    max_attempts: int = Field(3, ge=1, description="tries per request across workers before failing it")
    load_report_interval_s: float = Field(0.5, gt=0, description="how often each worker publishes its load (Serve's routing-stats period)")
    load_max_age_s: float = Field(
        15.0, gt=0, description="a worker whose load report is older is treated as unhealthy (a dead one is noticed sooner: by "
        "the call that fails on it, and by Serve removing it)",
    )
    prefill_timeout_s: float = Field(120.0, gt=0, description="queueing + prefill + transfer of one request")
    request_timeout_s: float = Field(600.0, gt=0, description="a whole request, end to end")
    migration_limit: int = Field(3, ge=0, description="times one stream may move to another worker after its decode worker died (0: never)")
    max_queue_wait_s: float | None = Field(
        30.0, gt=0, description="refuse (503 + Retry-After) a request estimated to wait longer than this before its prefill starts; null: never",
    )
    degraded_mode: bool = Field(True, description="with no healthy decode worker, prefill workers serve whole requests (else 503)")
    prefix_report_max_blocks: int = Field(16384, ge=0, description="cached-block hashes a worker's load report carries at most")


class FaultConfig(BaseModel):
    """Failure injection in the transfer layer (for tests and chaos drills)."""

    model_config = ConfigDict(extra="forbid")

    fail_fraction: float = Field(0.0, ge=0, le=1)
    delay_fraction: float = Field(0.0, ge=0, le=1)
    delay_s: float = Field(0.0, ge=0)
    seed: int = 0


class ReplicaRange(BaseModel):
    """An autoscaling range of replicas for one role (``"1:4"`` on the command line)."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(..., ge=0)
    max: int = Field(..., ge=1)
    initial: int | None = Field(None, ge=0, description="replicas at deployment (default: min, at least 1)")

    @model_validator(mode="after")
    def _check(self) -> "ReplicaRange":
        if self.min > self.max:
            raise ValueError(f"replica range min ({self.min}) is above max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"replica range initial ({self.initial}) must lie within [{self.min}, {self.max}]")
        return self

    @property
    def start(self) -> int:
        return self.initial if self.initial is not None else max(1, self.min)

    @classmethod
    def parse(cls, text: str) -> "int | ReplicaRange":
        """``"2"`` -> 2 (fixed); ``"1:4"`` -> a range."""
        low, sep, high = str(text).partition(":")
        try:
            return cls(min=int(low), max=int(high)) if sep else int(low)
        except ValueError as e:
            raise ValueError(f"replicas must be a count (2) or a range (1:4), got {text!r}") from e


class SLOTargets(BaseModel):
    """What counts as a good request in ``splitserve_slo_met_requests_total`` (goodput) and the shipped alerts."""

    model_config = ConfigDict(extra="forbid")
    ttft_s: float = Field(3.0, gt=0, description="time to first token")
    tpot_s: float = Field(0.15, gt=0, description="mean time per output token after the first")
    schedule: bool = Field(
        True, description="workers schedule to these targets: prompts that can still meet ttft_s go before late ones, and prompt "
        "tokens beside running streams only as far as their tpot_s allows (engine.slo_ttft_s / slo_tpot_s, unless set there); "
        "false: first come, first served",
    )


class ResponseCacheConfig(BaseModel):
    """Answers to greedy or seeded requests kept in the ingress and replayed for a repeat (``splitserve.response_cache``)."""

    model_config = ConfigDict(extra="forbid")
    max_entries: int = Field(0, ge=0, description="answers kept per ingress replica (0: no response cache)")
    max_bytes: int = Field(64 * 2**20, ge=1024, description="their text and token ids, at most (least recently used go first)")
    ttl_s: float = Field(600.0, gt=0, description="an answer older than this is generated again")


class PlannerSettings(BaseModel):
    """The SLA planner (``splitserve.tune.sla_planner``): it sets each role's replicas within its range."""

    model_config = ConfigDict(extra="forbid")

    ttft_slo_s: float = Field(..., gt=0, description="time-to-first-token target")
    itl_slo_s: float = Field(..., gt=0, description="inter-token latency target")
    profile: str = Field(..., description="profile.json from `splitserve tune --profile-only` (or a calibrated one)")
    interval_s: float = Field(10.0, gt=0, description="how often the planner decides")
    predictor: Literal["constant", "ema", "linear"] = "ema"
    scale_down_headroom: float = Field(0.2, ge=0)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["disaggregated", "aggregated", "auto"] = Field(
        "disaggregated", description="auto: disaggregated when the workers have accelerators of their own, else aggregated (choose_mode)",
    )
    num_prefill: int | ReplicaRange = Field(1, description="prefill replicas (disaggregated mode): a count, or a range {min, max} to autoscale")
    num_decode: int | ReplicaRange = Field(1, description="decode replicas, or aggregated ones in aggregated mode: a count or a range")
    planner: PlannerSettings | None = Field(None, description="scale the roles to SLOs (needs ranges for the roles it scales)")
    drain_timeout_s: float = Field(
        120.0, gt=0, description="a replica being removed (scale-down, redeploy) finishes its streams for up to this long",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    prefill_resources: WorkerResources = Field(default_factory=WorkerResources)
    decode_resources: WorkerResources = Field(default_factory=WorkerResources)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    slo: SLOTargets = Field(default_factory=SLOTargets, description="targets a request must meet to count as goodput")
    response_cache: ResponseCacheConfig = Field(
        default_factory=ResponseCacheConfig, description="replay answers to repeated greedy or seeded requests (off by default)",
    )
    price_per_accelerator_hour: float | None = Field(
        None, ge=0, description="turns compute-seconds per tenant into splitserve_compute_cost_total (a worker replica = one accelerator)",
    )
    transfer_timeout_s: float = Field(30.0, gt=0, description="one KV transfer")
    warm_up_prompt_tokens: int = Field(
        32, ge=0, description="before serving, each worker times a throwaway prompt this long and a few decode steps: the "
        "first request pays no one-time set-up and routing has the step costs from the start (0: no warm-up)",
    )
    kv_wait_timeout_s: float | None = Field(
        None, gt=0, description="decode side: how long reserved blocks wait for their KV (the prefill worker's queue, prefill and "
        "transfer); must exceed routing.prefill_timeout_s, so a prefill never writes into blocks already given up; default 30 s more",
    )
    reservation_ttl_s: float | None = Field(
        None, gt=0, description="decode blocks reserved for a request that never claims them are freed after this; "
        "default: 300 s, or 60 s more than routing.prefill_timeout_s when that is longer",
    )
    app_name: str = "splitserve"
    _mode_reason: str | None = PrivateAttr(None)  # why mode: auto chose the mode it did

    @model_validator(mode="after")
    def _check_mode(self) -> "ServeConfig":
        if isinstance(self.num_decode, int) and self.num_decode < 1:
            raise ValueError(f"num_decode must be >= 1, got {self.num_decode}")
        if self.mode == "auto":
            self._resolve_auto()
        if self.slo.schedule and self.engine.slo_ttft_s is None:
            self.engine = self.engine.model_copy(update={"slo_ttft_s": self.slo.ttft_s, "slo_tpot_s": self.slo.tpot_s})
        for role, replicas in (("num_prefill", self.num_prefill), ("num_decode", self.num_decode)):
            if isinstance(replicas, ReplicaRange) and replicas.min < 1:
                # the pairing policy serves around a role with no replica (degraded mode), so neither Serve's
                # autoscaler nor the planner would ever see the load that should bring it back
                raise ValueError(f"{role}: a replica range needs min >= 1 (a role scaled to zero is never scaled back), got min {replicas.min}")
        if self.mode == "disaggregated" and self.max_replicas("prefill") < 1:
            raise ValueError("disaggregated mode needs num_prefill >= 1 (or use mode: aggregated)")
        if self.planner is not None and not any(isinstance(r, ReplicaRange) for r in (self.num_decode, self.num_prefill)):
            raise ValueError("planner: give a replica range to at least one role it may scale, e.g. num_decode: {min: 1, max: 4}")
        if self.kv_wait_timeout_s is not None and self.kv_wait_timeout_s <= self.routing.prefill_timeout_s:
            raise ValueError(
                f"kv_wait_timeout_s ({self.kv_wait_timeout_s:g}) must exceed routing.prefill_timeout_s "
                f"({self.routing.prefill_timeout_s:g}): the decode worker must hold the blocks as long as the prefill may "
                "still write into them; raise kv_wait_timeout_s or lower prefill_timeout_s"
            )
        if self.reservation_ttl_s is not None and self.reservation_ttl_s <= self.routing.prefill_timeout_s:
            raise ValueError(
                f"reservation_ttl_s ({self.reservation_ttl_s:g}) must exceed routing.prefill_timeout_s "
                f"({self.routing.prefill_timeout_s:g}): a reservation must outlive the prefill that fills it; "
                "raise reservation_ttl_s or lower prefill_timeout_s"
            )
        return self

    def _resolve_auto(self) -> None:
        """``mode: auto`` becomes what ``choose_mode`` says; aggregated workers take over the prefill workers' CPUs."""
        mode, reason = choose_mode(self)
        self.mode, self._mode_reason = mode, reason
        if mode == "aggregated":
            prefill_cpus = self.prefill_resources.num_cpus * self.num_prefill / self.num_decode  # both counts fixed here
            self.decode_resources = self.decode_resources.model_copy(update={"num_cpus": self.decode_resources.num_cpus + prefill_cpus})
            self.num_prefill = 0

    @property
    def mode_reason(self) -> str | None:
        """Why ``mode: auto`` chose this mode (None when the mode was given)."""
        return self._mode_reason

    @property
    def reservation_ttl_seconds(self) -> float:
        """``reservation_ttl_s``, or its default: 300 s, or 60 s past a longer ``routing.prefill_timeout_s``."""
        if self.reservation_ttl_s is not None:
            return self.reservation_ttl_s
        return max(300.0, self.routing.prefill_timeout_s + 60.0)

    @property
    def kv_wait_timeout_seconds(self) -> float:
        """``kv_wait_timeout_s``, or its default: 30 s past ``routing.prefill_timeout_s``."""
        return self.kv_wait_timeout_s if self.kv_wait_timeout_s is not None else self.routing.prefill_timeout_s + 30.0

    def replicas(self, role: str) -> int | ReplicaRange:
        """The configured replicas of ``role`` ("prefill" or "decode"); prefill is 0 in aggregated mode."""
        if role == "prefill":
            return self.num_prefill if self.mode == "disaggregated" else 0
        return self.num_decode

    def max_replicas(self, role: str) -> int:
        r = self.replicas(role)
        return r.max if isinstance(r, ReplicaRange) else r

    def start_replicas(self, role: str) -> int:
        r = self.replicas(role)
        return r.start if isinstance(r, ReplicaRange) else r

    @property
    def num_prefill_workers(self) -> int:
        """Prefill replicas at deployment."""
        return self.start_replicas("prefill")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        return cls.model_validate(read_yaml(path))

    def with_overrides(self, overrides: dict[str, Any]) -> "ServeConfig":
        """A copy with dotted-key overrides applied, e.g. {"engine.model": "/ckpt", "num_decode": 2}. A ``mode: auto``
        is resolved already: to decide it on overridden resources, ``apply_overrides`` to the raw mapping instead."""
        return type(self).model_validate(apply_overrides(self.model_dump(), overrides))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a splitserve YAML file; ValueError naming the file when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each dotted-key override set (None values skipped); ``data`` itself is changed and returned."""
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def choose_mode(cfg: ServeConfig) -> tuple[str, str]:
    """``mode: auto``: the mode for ``cfg``'s workers and why. Pure: reads the config only.

    Disaggregation pays when each role computes on hardware of its own: a prefill
    burst then never stalls a decode step, and each side is sized to its load. Where
    the roles would split one host's CPU cores instead, the prefill worker computes a
    prompt on a fraction of the cores one aggregated worker would use: measured on a
    2-core host (docs/benchmarks.md, "Serving at four rates"), a one-core prefill of a
    1,024-token prompt misses a 3 s TTFT that the two-core aggregated worker meets, and
    the aggregated deployment had the higher goodput at 0.25 req/s in both runs (its
    ITL p99 is the price: prefills stall its streams). So: disaggregated when the workers
    have GPUs, custom resources placing them, or replica ranges/a planner scaling the
    roles apart; aggregated on plain CPU workers, one worker per decode replica
    holding both roles' cores.
    """
    if cfg.prefill_resources.num_gpus > 0 or cfg.decode_resources.num_gpus > 0:
        return "disaggregated", "the workers have GPUs: each role computes on accelerators of its own"
    if cfg.prefill_resources.resources or cfg.decode_resources.resources:
        return "disaggregated", "custom resources place the roles' workers"
    if cfg.planner is not None or isinstance(cfg.num_prefill, ReplicaRange) or isinstance(cfg.num_decode, ReplicaRange):
        return "disaggregated", "the roles are scaled separately (replica ranges or a planner)"
    if cfg.num_prefill < 1:
        return "aggregated", "no prefill workers asked for"
    return "aggregated", (
        "CPU workers: the roles would split the same cores, and one worker with all of them prefills faster "
        "(--mode disaggregated to split anyway)"
    )
