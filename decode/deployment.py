"""Ray Serve deployment of the decode (or aggregated, role "both") worker; `splitserve.app` sets its replicas and router."""

from __future__ import annotations

from ray import serve

from splitserve.decode.worker import DecodeWorker

MAX_ONGOING_REQUESTS = 4096

DecodeDeployment = serve.deployment(
    DecodeWorker,
    name="DecodeWorker", max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10,
    logging_config={"enable_access_log": False},  # Serve asks for routing stats several times a second
)
