"""Ray Serve deployment of the prefill worker; ``splitserve.app`` sets its replicas, resources
(``num_gpus`` on GPU clusters) and the router that lets the scheduler address each replica."""

from __future__ import annotations

from ray import serve

from splitserve.prefill.worker import PrefillWorker

# The engine batches internally: let many requests in at once (Serve's default is 5).
MAX_ONGOING_REQUESTS = 4096

PrefillDeployment = serve.deployment(
    PrefillWorker,
    name="PrefillWorker", max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10,
    logging_config={"enable_access_log": False},  # Serve asks for routing stats several times a second
)
