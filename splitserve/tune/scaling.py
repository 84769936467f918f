"""Project worker curves onto devices and models we cannot run here, from stated assumptions. Pure.

A measured profile only describes the machine it was measured on. For an H200
cluster serving Llama-3-8B the curves are derived from first principles (a
roofline), with every number an explicit, documented assumption -- datasheet
peaks times assumed efficiencies -- not a measurement:

* prefill step of ``t`` tokens: ``overhead + (2*P*t + 2*L*d*t^2) / (peak * prefill_mfu)``
  (P parameters; the causal attention of L layers of width d adds ``2*L*d*t^2``);
* decode step of ``n`` sequences holding ``k`` context tokens:
  ``overhead + weight_bytes/(hbm * decode_bw_eff) + k*kv_bytes_per_token/(hbm * decode_bw_eff)
  + n * 2*P/(peak * decode_mfu)`` -- memory and compute terms added, not overlapped (conservative);
* KV transfer: ``latency + tokens*kv_bytes_per_token/(link * link_eff)``, one NIC per GPU, cross-node;
* KV capacity: ``(memory * kv_memory_fraction - weight_bytes) / kv_bytes_per_token``;
* a worker of ``tp`` GPUs (tensor parallel) has ``tp`` times the peaks, times ``tp_efficiency``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from splitserve.tune.curves import DecodeProfile, PrefillProfile, Profiles, TransferProfile


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers (dense bf16, no sparsity)."""

    name: str
    bf16_tflops: float
    hbm_tb_per_s: float
    memory_gb: float
    link_gb_per_s: float  # KV transfer bandwidth per GPU between nodes (one 400 Gb/s NIC = 50 GB/s)
    link_latency_s: float = 50e-6


DEVICES: dict[str, DeviceSpec] = {
    "h200": DeviceSpec("NVIDIA H200 SXM", 989.0, 4.8, 141.0, 50.0),
    "h100": DeviceSpec("NVIDIA H100 SXM", 989.0, 3.35, 80.0, 50.0),
}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs about a decoder: parameters and the attention / KV shape."""

    name: str
    num_params: float
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim


MODELS: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape("Llama-3-8B", 8.03e9, 32, 32, 8, 128),
    "llama-3-70b": ModelShape("Llama-3-70B", 70.6e9, 80, 64, 8, 128),
}


@dataclass(frozen=True)
class Assumptions:
    """Efficiencies and engine settings applied to the datasheet numbers (stated, not measured)."""

    prefill_mfu: float = 0.5  # fraction of peak bf16 FLOP/s a prefill step reaches
    decode_bw_eff: float = 0.7  # fraction of HBM bandwidth a decode step reaches
    decode_mfu: float = 0.5  # per-sequence matmul work in decode, at this fraction of peak
    link_eff: float = 0.8  # fraction of NIC bandwidth a KV transfer reaches
    step_overhead_s: float = 0.003  # scheduling, sampling, launch per engine step
    kv_memory_fraction: float = 0.9  # of GPU memory, minus the weights, for the KV cache
    tp_efficiency: float = 0.85  # scaling of a tensor-parallel worker (per extra GPU factor)
    token_budget: int = 8192  # tokens per prefill (or aggregated) step
    max_num_seqs: int = 256  # running sequences per decode (or aggregated) worker


def project(device: DeviceSpec, model: ModelShape, tp: int = 1, assume: Assumptions = Assumptions()) -> Profiles:
    """Curves of one worker of ``tp`` GPUs of ``device`` serving ``model``, from ``assume``."""
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    scale = tp * (assume.tp_efficiency if tp > 1 else 1.0)
    flops = device.bf16_tflops * 1e12 * scale
    hbm = device.hbm_tb_per_s * 1e12 * scale
    kv_capacity = int((device.memory_gb * 1e9 * tp * assume.kv_memory_fraction - model.weight_bytes) / model.kv_bytes_per_token)
    if kv_capacity < 1:
        raise ValueError(f"{model.name} ({model.weight_bytes / 1e9:.0f} GB of weights) does not fit on {tp} x {device.name}; raise tp")
    prefill = PrefillProfile(
        a_s=assume.step_overhead_s,
        b_s_per_token=2 * model.num_params / (flops * assume.prefill_mfu),
        c_s_per_token2=2 * model.num_layers * model.attention_width / (flops * assume.prefill_mfu),
        token_budget=assume.token_budget,
    )
    decode = DecodeProfile(
        a_s=assume.step_overhead_s + model.weight_bytes / (hbm * assume.decode_bw_eff),
        b_s_per_seq=2 * model.num_params / (flops * assume.decode_mfu),
        c_s_per_ctx_token=model.kv_bytes_per_token / (hbm * assume.decode_bw_eff),
        max_num_seqs=assume.max_num_seqs,
        kv_capacity_tokens=kv_capacity,
    )
    transfer = TransferProfile(
        bytes_per_token=model.kv_bytes_per_token,
        bandwidth_bytes_per_s=device.link_gb_per_s * 1e9 * tp * assume.link_eff,
        latency_s=device.link_latency_s,
    )
    meta = {
        "source": "projected (roofline from datasheet numbers and assumed efficiencies; not a measurement)",
        "device": asdict(device), "model": {**asdict(model), "kv_bytes_per_token": model.kv_bytes_per_token},
        "tp": tp, "assumptions": asdict(assume),
    }
    return Profiles(prefill, decode, transfer, meta)


def describe(profiles: Profiles) -> str:
    """A few lines that state where a profile's numbers come from."""
    m = profiles.meta
    p, d, t = profiles.prefill, profiles.decode, profiles.transfer
    lines = [f"profile: {m.get('source', 'unknown source')}"]
    if "device" in m and isinstance(m["device"], dict):
        dev, mod, a = m["device"], m["model"], m.get("assumptions", {})
        lines.append(
            f"  device {dev['name']} x tp={m.get('tp', 1)}: {dev['bf16_tflops']:g} TFLOP/s bf16 dense, {dev['hbm_tb_per_s']:g} TB/s HBM, "
            f"{dev['memory_gb']:g} GB, KV link {dev['link_gb_per_s']:g} GB/s per GPU")
        lines.append(
            f"  model {mod['name']}: {mod['num_params'] / 1e9:.2f}B params, {mod['num_layers']} layers, "
            f"KV {mod['kv_bytes_per_token'] / 1024:.0f} KiB/token (bf16)")
        lines.append(
            f"  assumed: prefill MFU {a.get('prefill_mfu')}, decode HBM efficiency {a.get('decode_bw_eff')}, decode MFU {a.get('decode_mfu')}, "
            f"link efficiency {a.get('link_eff')}, {a.get('step_overhead_s', 0) * 1e3:g} ms overhead per step, "
            f"{a.get('token_budget')} tokens per prefill step, {a.get('max_num_seqs')} sequences per decode worker")
    else:
        for key in ("device", "model", "num_threads"):
            if key in m:
                lines.append(f"  {key}: {m[key]}")
    lines.append(f"  prefill(t) = {p.a_s * 1e3:.2f} ms + {p.b_s_per_token * 1e6:.3f} us*t + {p.c_s_per_token2 * 1e9:.4f} ns*t^2 (budget {p.token_budget})")
    lines.append(f"  decode(n, k) = {d.a_s * 1e3:.2f} ms + {d.b_s_per_seq * 1e6:.2f} us*n + {d.c_s_per_ctx_token * 1e9:.3f} ns*k "
                 f"(<= {d.max_num_seqs} seqs, {d.kv_capacity_tokens} KV tokens)")
    lines.append(f"  transfer(t) = {t.latency_s * 1e3:.3f} ms + t*{t.bytes_per_token:.0f} B / {t.bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    return "\n".join(lines)
