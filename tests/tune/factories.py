"""Small profiles and workloads for the tuning tests (round numbers, so expectations can be computed by hand)."""

from __future__ import annotations

from splitserve.tune.curves import DecodeProfile, PrefillProfile, Profiles, TransferProfile
from splitserve.tune.workload import LengthDist, Workload


def make_profiles(
    prefill_a: float = 0.01, prefill_b: float = 1e-4, decode_a: float = 0.02, decode_b: float = 1e-3, decode_c: float = 1e-6,
    token_budget: int = 2048, max_num_seqs: int = 64, kv_capacity_tokens: int = 1 << 20, transfer_latency: float = 0.005,
) -> Profiles:
    return Profiles(
        PrefillProfile(prefill_a, prefill_b, 0.0, token_budget),
        DecodeProfile(decode_a, decode_b, decode_c, max_num_seqs, kv_capacity_tokens),
        TransferProfile(bytes_per_token=1000.0, bandwidth_bytes_per_s=1e9, latency_s=transfer_latency),
        {"source": "test"},
    )


def fixed_workload(prompt: int, output: int, arrival: str = "poisson", seed: int = 0) -> Workload:
    return Workload(f"fixed-{prompt}-{output}", LengthDist("fixed", prompt), LengthDist("fixed", output), arrival, seed)  # type: ignore[arg-type]
