"""Ray Serve deployment of the decode (or aggregated, role "both") worker, one replica each."""

from __future__ import annotations

from ray import serve

from splitserve.decode.worker import DecodeWorker

MAX_ONGOING_REQUESTS = 4096

DecodeDeployment = serve.deployment(
    DecodeWorker,
    name="DecodeWorker", max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10, graceful_shutdown_timeout_s=5,
    logging_config={"enable_access_log": False},  # the ingress polls load() ten times a second
)
