"""Ray Serve deployment of the prefill worker (one replica per deployment, so the
scheduler can address each worker; ``num_gpus`` in its ``ray_actor_options`` on GPU clusters)."""

from __future__ import annotations

from ray import serve

from splitserve.prefill.worker import PrefillWorker

# The engine batches internally: let many requests in at once (Serve's default is 5).
MAX_ONGOING_REQUESTS = 4096

PrefillDeployment = serve.deployment(
    PrefillWorker,
    name="PrefillWorker", max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10, graceful_shutdown_timeout_s=5,
    logging_config={"enable_access_log": False},  # the ingress polls load() ten times a second
)
