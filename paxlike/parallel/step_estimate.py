"""An estimate of a train step's time and MFU: compiled FLOPs over peak, wire bytes over bandwidth.

Compute time is the program's dot/convolution FLOPs per chip over the chip's peak;
communication time is the bytes each chip sends (ring algorithms, see
paxlike.parallel.collectives) over the bandwidth a ring gets on that generation's ICI, plus the
bytes that cross slices over its DCN bandwidth. The step takes at least the longer of
the two (communication hidden entirely behind compute, or the reverse) and at most
their sum (nothing overlapped). Neither bound models memory bandwidth, elementwise
work, kernel efficiency or latency, so both are estimates, not predictions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """What one chip of a generation sends per second: to torus neighbours (ICI), off the slice (DCN)."""

    ici_link_bytes_per_s: float  # one ICI link, one direction
    ici_links: int  # ICI ports per chip
    dcn_bytes_per_s: float  # per chip
    source: str

    @property
    def ring_bytes_per_s(self) -> float:
        """Send bandwidth of a ring collective: a bidirectional ring on one torus axis drives 2 links."""
        return RING_LINKS * self.ici_link_bytes_per_s


# A ring collective over one mesh axis runs as a bidirectional ring along one torus
# dimension, each chip sending on its two links of that dimension at once. Collectives
# over several axes, and XLA's multi-dimensional algorithms, can drive more links, so
# this overstates their time; a 2-link ring is the conservative common case.
RING_LINKS = 2

# Sources (Google Cloud TPU system-architecture pages, docs.cloud.google.com/tpu/docs/<gen>):
#   v4  (tpu/docs/v4): "All-reduce bandwidth per Pod 1.1 PB/s" for 4096 chips = 268.6 GB/s a
#       chip over its 6 ICI ports -> 44.8 GB/s per link and direction. The page gives no
#       DCN figure; PaLM (Chowdhery et al. 2022, sec. 4) measured an 81 Tbps aggregate
#       burst across the 1536 hosts (6144 chips) of two v4 pods -> 13.2 Gb/s a chip.
#   v5e (tpu/docs/v5e): "Bidirectional ICI bandwidth (per chip) 400 GBps", 4 ports ->
#       50 GB/s per link and direction (matches "All-reduce bandwidth per Pod 51.2 TB/s"
#       over 256 chips); "Data center network bandwidth per Pod 6.4 Tbps" over 256 chips
#       -> 25 Gb/s a chip (2 x 100 Gbps NICs per 8-chip host).
#   v5p (tpu/docs/v5p): "Bidirectional ICI bandwidth per chip 1200 GBps", 6 ports (3-D
#       torus) -> 100 GB/s per link and direction; "DCN bandwidth per chip 50 Gbps".
#   v6e (tpu/docs/v6e): "Bidirectional ICI bandwidth (per chip) 800 GBps", "ICI ports per
#       chip 4" -> 100 GB/s per link and direction ("All-reduce bandwidth per Pod 102.4
#       TB/s" over 256 chips agrees); "Data center network bandwidth per Pod 25.6 Tbps"
#       over 256 chips -> 100 Gb/s a chip (4 x 200 Gbps NICs per 8-chip host).
INTERCONNECT: dict[str, Interconnect] = {
    "v4": Interconnect(1.1e15 / 4096 / 6, 6, 81e12 / 8 / 6144,
                       "Cloud TPU v4 page (all-reduce bandwidth per pod); DCN: PaLM's burst"),
    "v5e": Interconnect(400 * GB / 2 / 4, 4, 6.4e12 / 8 / 256, "Cloud TPU v5e page"),
    "v5p": Interconnect(1200 * GB / 2 / 6, 6, 50e9 / 8, "Cloud TPU v5p page"),
    "v6e": Interconnect(800 * GB / 2 / 4, 4, 25.6e12 / 8 / 256, "Cloud TPU v6e page"),
}

# jax's device_kind -> generation, first match wins ("v5 lite" before "v5").
_KINDS = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"),
          ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"))


def generation_of(device) -> str | None:
    """'v4', 'v5e', 'v5p' or 'v6e' for a TPU device (described or attached), else None."""
    if getattr(device, "platform", "") != "tpu":
        return None
    kind = getattr(device, "device_kind", "").lower()
    return next((gen for needle, gen in _KINDS if needle in kind), None)


def wire_bytes(collectives: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(bytes each chip sends over ICI, over DCN) per step, all collective kinds together."""
    total = sum(c.get("wire_bytes", 0.0) for c in collectives.values())
    dcn = sum(c.get("dcn_wire_bytes", 0.0) for c in collectives.values())
    return total - dcn, dcn


def estimate(hlo_flops: float, collectives: dict[str, dict[str, float]], model_flops_per_step: float,
             num_chips: int, peak: float, peak_source: str, generation: str | None) -> dict[str, Any]:
    """The `estimate_*` fields of a layouts row: compute and communication time, step and MFU bounds."""
    ici, dcn = wire_bytes(collectives)
    compute = hlo_flops / peak
    out: dict[str, Any] = {"estimate_peak_flops_per_device": peak, "estimate_peak_source": peak_source,
                           "estimate_compute_s": compute, "estimate_ici_wire_bytes": ici,
                           "estimate_dcn_wire_bytes": dcn}
    link = INTERCONNECT.get(generation or "")
    if link is None:
        # No published links for this device (e.g. host CPUs): compute alone bounds the step.
        comm = 0.0
        out.update(estimate_ici_s=None, estimate_dcn_s=None, estimate_comm_s=None,
                   estimate_bandwidth_source=f"none for {generation or 'this device'}: "
                                             "communication not estimated")
    else:
        ici_s, dcn_s = ici / link.ring_bytes_per_s, dcn / link.dcn_bytes_per_s
        comm = ici_s + dcn_s
        out.update(estimate_ici_s=ici_s, estimate_dcn_s=dcn_s, estimate_comm_s=comm,
                   estimate_ici_ring_bytes_per_s=link.ring_bytes_per_s,
                   estimate_dcn_bytes_per_s=link.dcn_bytes_per_s,
                   estimate_bandwidth_source=link.source)
    low, high = max(compute, comm), compute + comm
    out["estimate_step_s_low"], out["estimate_step_s_high"] = low, high
    aggregate = num_chips * peak
    out["estimate_mfu_high"] = model_flops_per_step / (aggregate * low) if low > 0 else None
    out["estimate_mfu_low"] = model_flops_per_step / (aggregate * high) if high > 0 else None
    return out
