"""Secure aggregation's arithmetic (docs/privacy.md, "Secure aggregation"): pure functions, no Flower.

Under SecAgg+ the server learns only the sum of what the devices send, so the devices send their
part of the method's aggregate already weighted and on one shape. For a method whose rule is a
weighted average per tensor (privacy/support.py's "linear" rules: LEGEND's eq. 17, FedLoRA, FFA-LoRA,
FedRA, HetLoRA's zero-padded average by samples), device i sends, for every tensor k of the GLOBAL
adapter (in sorted key order), w_ik * pad(x_ik) (its trained tensor zero-padded into the global shape:
zero rows/columns beyond its rank, an all-zero tensor for a layer it did not train) and, in one extra
vector, its weights w_ik (0 where it trained nothing). From the sums alone

    S_k = sum_i w_ik pad(x_ik),   W_k = sum_i w_ik,   new_k = S_k / W_k  (W_k > 0; else the global value)

is exactly the layer-wise average (eq. 17), or HetLoRA's zero-padded average: a padded row adds zero
to S_k and the device's weight to W_k, as `aggregation.zero_pad_average` counts it. The weights are
the rule's raw weights (1, or the device's sample count) divided by the largest among the round's
devices, so every value is at most the largest |x|: SecAgg+ quantises values in a fixed range.
The Flower engine passes as "global adapter" only the tensors some plan of the round trains (the
plans are public): a tensor nobody trains would be all zeros in every contribution.
"""

from __future__ import annotations

import numpy as np
import torch

from ..methods.aggregation import DeviceUpdate, lora_pairs, pad_to
from ..spec import AdapterState
from .support import RULES, refusal as dp_refusal


def refusal(cfg) -> str | None:
    """Why secure aggregation cannot run with this config (None: it can)."""
    from ..methods import METHODS

    if cfg.run.engine != "flower":
        return ("secure aggregation runs Flower's SecAgg+ protocol, on the Flower engine only: add --engine flower "
                "(run.engine = 'flower')")
    name = cfg.method.name
    rule = RULES.get(name)
    if rule is not None and rule.kind == "product":
        return (f"method {name!r} aggregates sum_i w_i B_i A_i and refactors it by SVD: a sum, but of dense "
                "d_out x d_in products, which secure aggregation here does not send (only factor-shaped "
                "tensors); use a layer-wise method (legend, fedlora, ffa-lora, fedra, hetlora with "
                "weighting = 'samples')")
    params = getattr(cfg.method, METHODS[name].section, None)
    why = dp_refusal(name, params.model_dump() if hasattr(params, "model_dump") else {})
    if why:   # the same reasons as differential privacy's: the rule is not a fixed-weight sum
        return why.replace("cannot run with differential privacy", "cannot run with secure aggregation").replace(
            "declares no differential-privacy rule", "declares no aggregation rule as a sum")
    return None


def lora_keys(global_state: AdapterState) -> set[str]:
    """The LoRA factors of a state (weighted by the rule's `weight`; every other tensor by `head_weight`)."""
    return {p + s for p in lora_pairs(global_state) for s in (".lora_A", ".lora_B")}


def device_weights(method, samples: dict[int, int]) -> dict[int, tuple[float, float]]:
    """device -> (weight in LoRA tensors, weight in the head and other tensors), each the rule's raw
    weight divided by the largest among `samples`' devices (so every weight is in (0, 1])."""
    rule = RULES[method.info.name]
    raw = {d: (rule.weight(method, DeviceUpdate(d, {}, n)), rule.head_weight(method, DeviceUpdate(d, {}, n)))
           for d, n in samples.items()}
    top_l = max((w for w, _ in raw.values()), default=1.0) or 1.0
    top_h = max((h for _, h in raw.values()), default=1.0) or 1.0
    # a device with zero samples (a weight of 0) would vanish from every average its rule gives it a share of;
    # aggregation.normalized gives such a tensor equal weights when every holder has 0: keep a tiny weight instead
    return {d: (max(w / top_l, 1e-9), max(h / top_h, 1e-9)) for d, (w, h) in raw.items()}


def contribution(global_state: AdapterState, state: AdapterState, weight: float, head_weight: float) -> list[np.ndarray]:
    """What one device sends under secure aggregation: for every global tensor (sorted keys) its weighted
    tensor zero-padded into the global shape (zeros if it did not train it), then the vector of its
    per-tensor weights. float64 (SecAgg+ quantises it)."""
    lora = lora_keys(global_state)
    keys = sorted(global_state)
    out, weights = [], np.zeros(len(keys))
    for j, k in enumerate(keys):
        g = global_state[k]
        if k not in state:
            out.append(np.zeros(tuple(g.shape)))
            continue
        w = weight if k in lora else head_weight
        padded, _ = pad_to(state[k].detach().to(torch.float64), tuple(g.shape))
        out.append(w * padded.numpy())
        weights[j] = w
    return out + [weights]


def zero_contribution(global_state: AdapterState) -> list[np.ndarray]:
    """A device that takes part in the protocol but has no update to give (it failed, or was cut off)."""
    return [np.zeros(tuple(g.shape)) for _, g in sorted(global_state.items())] + [np.zeros(len(global_state))]


def largest_value(vector: list[np.ndarray]) -> float:
    return max((float(np.abs(a).max()) for a in vector if a.size), default=0.0)


def aggregate_sums(global_state: AdapterState, sums: list[np.ndarray], held: float) -> AdapterState:
    """The method's aggregate from the summed contributions: S_k / W_k for every tensor whose summed
    weight exceeds `held` (half the smallest weight a device can have: quantisation noise is far below
    it), the global value elsewhere."""
    keys = sorted(global_state)
    if len(sums) != len(keys) + 1:
        raise ValueError(f"{len(sums)} summed arrays for {len(keys)} tensors (+ the weights)")
    weights = np.asarray(sums[-1], dtype=np.float64).reshape(-1)
    new = dict(global_state)
    for j, k in enumerate(keys):
        if weights[j] > held:
            g = global_state[k]
            new[k] = torch.from_numpy(np.asarray(sums[j], dtype=np.float64) / weights[j]).to(g.dtype).reshape(g.shape)
    return new


def padded_bytes(global_state: AdapterState, itemsize: int = 4) -> int:
    """Bytes of one contribution at `itemsize` bytes per value: every global tensor plus one weight each."""
    return int(sum(t.numel() for t in global_state.values()) + len(global_state)) * itemsize
