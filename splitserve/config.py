"""Deployment configuration: one pydantic model, loadable from YAML, overridable from the CLI.

    mode: disaggregated          # or aggregated
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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitserve.engine.config import EngineConfig


class HTTPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, description="when set, /v1 and /admin require 'Authorization: Bearer <key>'")
    max_request_bytes: int = Field(4 * 2**20, ge=1024, description="larger bodies get HTTP 413")
    served_model_name: str | None = Field(None, description="name clients use in 'model'; the checkpoint path is accepted too")
    disconnect_poll_s: float = Field(0.5, gt=0, description="how often a non-streaming request checks that its client is still there")


class WorkerResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="Ray CPU share per worker replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker replica (1 on GPU clusters)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. {prefill_node: 1}")
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    local_prefill_threshold_tokens: int = Field(0, ge=0, description="prompts this short are prefilled on the decode worker")
    prefix_aware: bool = Field(True, description="route a prompt to the worker whose prefix cache holds most of it (workers report cache summaries)")
    max_prefill_queue_tokens: int | None = Field(None, ge=1, description="above this, prefill locally instead of queueing")
    max_attempts: int = Field(3, ge=1, description="tries per request across workers before failing it")
    load_poll_interval_s: float = Field(0.25, gt=0, description="how often the ingress asks each worker for its load")
    load_max_age_s: float = Field(5.0, gt=0, description="a worker whose load report is older is treated as unhealthy")
    prefill_timeout_s: float = Field(120.0, gt=0, description="queueing + prefill + transfer of one request")
    request_timeout_s: float = Field(600.0, gt=0, description="a whole request, end to end")


class FaultConfig(BaseModel):
    """Failure injection in the transfer layer (for tests and chaos drills)."""

    model_config = ConfigDict(extra="forbid")

    fail_fraction: float = Field(0.0, ge=0, le=1)
    delay_fraction: float = Field(0.0, ge=0, le=1)
    delay_s: float = Field(0.0, ge=0)
    seed: int = 0


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["disaggregated", "aggregated"] = "disaggregated"
    num_prefill: int = Field(1, ge=0, description="prefill worker replicas (disaggregated mode)")
    num_decode: int = Field(1, ge=1, description="decode workers, or aggregated workers in aggregated mode")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    prefill_resources: WorkerResources = Field(default_factory=WorkerResources)
    decode_resources: WorkerResources = Field(default_factory=WorkerResources)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    transfer_timeout_s: float = Field(30.0, gt=0, description="one KV transfer")
    app_name: str = "splitserve"

    @model_validator(mode="after")
    def _check_mode(self) -> "ServeConfig":
        if self.mode == "disaggregated" and self.num_prefill < 1:
            raise ValueError("disaggregated mode needs num_prefill >= 1 (or use mode: aggregated)")
        return self

    @property
    def num_prefill_workers(self) -> int:
        return self.num_prefill if self.mode == "disaggregated" else 0

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
        return cls.model_validate(data)

    def with_overrides(self, overrides: dict[str, Any]) -> "ServeConfig":
        """A copy with dotted-key overrides applied, e.g. {"engine.model": "/ckpt", "num_decode": 2}."""
        data = self.model_dump()
        for key, value in overrides.items():
            if value is None:
                continue
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return type(self).model_validate(data)
