"""Simulated heterogeneous fleet after the paper's testbed (section 6.1), and its cost model.

Compute: Jetson TX2 (4 power modes), Xavier NX and AGX Xavier (8 modes each); the fastest
AGX mode is 100x the slowest TX2 mode; every device re-draws its mode at random every
`mode_change_every` rounds. Network: four Wi-Fi distance groups (2, 8, 14, 20 m) whose
bandwidth fluctuates round to round within [1, 30] Mb/s.

The figures are effective training throughputs (GFLOP/s actually sustained by fp32
PyTorch training, not datasheet peaks); only their ratios shape the results. Every draw
comes from a generator keyed by (seed, device, round), so the fleet is a pure function of
the seed: simulated time never reads the host's clock.

Faults: with `dropout_rate` > 0 a device may drop out of a round (`dropout`): it fails before
its upload, after a drawn fraction of its local compute, and its update is lost. The draw has
its own generator, keyed by (seed, 4, device, round), so no other draw changes with the rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import ModelSpec, Ranks


@dataclass(frozen=True)
class DeviceType:
    name: str
    share: int                       # devices of this type per 80 (the paper: 30 / 40 / 10)
    mode_gflops: tuple[float, ...]   # effective throughput per power mode, fastest first


DEVICE_TYPES: dict[str, DeviceType] = {
    "tx2": DeviceType("Jetson TX2", 30, (16.0, 10.0, 6.0, 4.0)),
    "nx": DeviceType("Jetson Xavier NX", 40, (120.0, 92.0, 72.0, 56.0, 44.0, 34.0, 26.0, 20.0)),
    "agx": DeviceType("Jetson AGX Xavier", 10, (400.0, 310.0, 240.0, 185.0, 145.0, 110.0, 85.0, 65.0)),
}

# Wi-Fi distance group (m) -> mean upload bandwidth (Mb/s) before fluctuation.
WIFI_GROUPS: tuple[tuple[float, float], ...] = ((2.0, 24.0), (8.0, 14.0), (14.0, 7.0), (20.0, 3.0))
BANDWIDTH_SIGMA = 0.35  # log-normal fluctuation of the per-round bandwidth


@dataclass(frozen=True)
class Device:
    id: int
    type: str
    wifi_group: int


@dataclass(frozen=True)
class DeviceState:
    """A device's conditions in one round."""
    mode: int
    gflops: float
    up_mbps: float
    down_mbps: float


@dataclass(frozen=True)
class Work:
    """What one device did in one round, in hardware-independent units."""
    forward_flops: float
    backward_flops: float
    bytes_down: int
    bytes_up: int


@dataclass(frozen=True)
class RoundTime:
    """Virtual seconds of one device in one round, and the status report it yields."""
    download_s: float
    forward_s: float
    backward_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        return self.download_s + self.forward_s + self.backward_s + self.upload_s


def _apportion(n: int, shares: list[int]) -> list[int]:
    """Largest-remainder split of n into parts proportional to shares (80 -> 30/40/10)."""
    total = sum(shares)
    exact = [n * s / total for s in shares]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    return counts


class Fleet:
    """The device fleet of one experiment; a pure function of (size, seed, settings)."""

    def __init__(self, num_devices: int, seed: int, mode_change_every: int = 20,
                 bandwidth_min_mbps: float = 1.0, bandwidth_max_mbps: float = 30.0,
                 downlink_factor: float = 4.0, dropout_rate: float = 0.0, backward_cost: float = 1.0):
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        if backward_cost <= 0.0:
            raise ValueError(f"backward_cost must be > 0, got {backward_cost}")
        rng = np.random.default_rng([seed, 7001])
        kinds = list(DEVICE_TYPES)
        counts = _apportion(num_devices, [DEVICE_TYPES[k].share for k in kinds])
        types = np.array(sum(([k] * c for k, c in zip(kinds, counts)), []))
        rng.shuffle(types)
        groups = np.arange(num_devices) % len(WIFI_GROUPS)
        rng.shuffle(groups)
        self.devices = [Device(i, str(types[i]), int(groups[i])) for i in range(num_devices)]
        self.seed = seed
        self.mode_change_every = mode_change_every
        self.bw_range = (bandwidth_min_mbps, bandwidth_max_mbps)
        self.downlink_factor = downlink_factor
        self.dropout_rate = dropout_rate
        self.backward_cost = backward_cost   # seconds per backward FLOP over seconds per forward FLOP
        self.cache = None   # the devices' activation caches (device_cache.DeviceCaches) when the fleet keeps them

    def __len__(self) -> int:
        return len(self.devices)

    def state(self, device: int, round_: int) -> DeviceState:
        d = self.devices[device]
        modes = DEVICE_TYPES[d.type].mode_gflops
        epoch = round_ // self.mode_change_every
        mode = int(np.random.default_rng([self.seed, 1, device, epoch]).integers(len(modes)))
        mean = WIFI_GROUPS[d.wifi_group][1]
        noise = np.random.default_rng([self.seed, 2, device, round_]).lognormal(0.0, BANDWIDTH_SIGMA)
        up = float(np.clip(mean * noise, *self.bw_range))
        return DeviceState(mode, modes[mode], up, up * self.downlink_factor)

    def time(self, device: int, round_: int, work: Work) -> RoundTime:
        s = self.state(device, round_)
        return RoundTime(download_s=work.bytes_down * 8 / (s.down_mbps * 1e6),
                         forward_s=work.forward_flops / (s.gflops * 1e9),
                         backward_s=work.backward_flops * self.backward_cost / (s.gflops * 1e9),
                         upload_s=work.bytes_up * 8 / (s.up_mbps * 1e6))

    def dropout(self, device: int, round_: int) -> float | None:
        """None if the device stays in round `round_`; else the fraction in [0, 1) of its local
        compute done before it drops out (it never uploads). Drawn from the device's own
        generator keyed by (seed, 4, device, round); nothing is drawn at rate 0."""
        if self.dropout_rate <= 0.0:
            return None
        rng = np.random.default_rng([self.seed, 4, device, round_])
        if rng.random() >= self.dropout_rate:
            return None
        return float(rng.random())

    def budgets(self, device: int, round_: int, deadline_s: float | None) -> tuple[float, float]:
        """(C_i, B_i) of eq. 14-15: FLOPs and upload bytes the device can afford before the deadline."""
        if deadline_s is None:
            return float("inf"), float("inf")
        s = self.state(device, round_)
        return s.gflops * 1e9 * deadline_s, s.up_mbps * 1e6 / 8 * deadline_s


# ------------------------------------------------------------- cost model (FLOPs)
def block_macs(spec: ModelSpec) -> int:
    """Multiply-accumulates per token of one transformer block's projections. Decoders carry the
    count read off the model (q/k/v/o with grouped-query attention's narrower k and v, and the
    MLP's gate, up and down projections); encoders use 4 h^2 (q, k, v, o) + 2 h i (the FFN)."""
    h, i = spec.hidden, spec.intermediate
    return spec.block_macs or 4 * h * h + 2 * h * i


def layer_forward_flops(spec: ModelSpec, batch: int, width: int) -> float:
    """Forward FLOPs of one frozen transformer layer: projections, FFN, attention scores and mix.

    Scores (Q K^T) and mix (P V) cost 2 * width^2 * (heads x head_dim) FLOPs each per sequence; a
    decoder's causal mask is not subtracted (PyTorch's attention kernels compute the full square)."""
    tokens = batch * width
    return 2.0 * tokens * block_macs(spec) + 4.0 * batch * width * width * (spec.attn_width or spec.hidden)


def lora_forward_flops(spec: ModelSpec, layer: int, rank: int, batch: int, width: int) -> float:
    return 2.0 * batch * width * rank * spec.lora_params_per_rank(layer)


def output_flops(spec: ModelSpec, batch: int, width: int, outputs: int | None = None) -> float:
    """Forward FLOPs of the layer above the blocks at `outputs` positions per sequence: a decoder's
    frozen projection onto the vocabulary (hidden x vocab per position; the LM tasks compute the
    logits of the last k+1 columns only, tasks.lm.answer_loss), an encoder's task head (its
    parameters per pooled sequence). `outputs` None: every position (a decoder), one (an encoder)."""
    if spec.vocab:
        return 2.0 * batch * (width if outputs is None else outputs) * spec.hidden * spec.vocab
    return 2.0 * batch * (1 if outputs is None else outputs) * spec.head_params()


def step_work_flops(spec: ModelSpec, ranks: Ranks, trained: set[int], batch: int, width: int,
                    outputs: int | None = None) -> tuple[float, float]:
    """(forward, backward) FLOPs of one training step; the output layer runs at `outputs` positions
    per sequence (output_flops).

    Forward runs through all L layers (plus the LoRA of every layer that has one) and the output layer.
    Backward runs only from the output down to the lowest trained layer: gradients w.r.t.
    activations cost about one forward of each frozen layer, LoRA weights about two. A trained
    head (encoders) costs two forwards (its weights' and its input's gradients); a decoder's frozen
    lm_head one (its input's gradient), and none when nothing below it trains.
    """
    head = output_flops(spec, batch, width, outputs)
    fwd = head + sum(layer_forward_flops(spec, batch, width) for _ in range(spec.num_layers))
    fwd += sum(lora_forward_flops(spec, l, r, batch, width) for l, r in ranks.items())
    lowest = min(trained) if trained else spec.num_layers
    if spec.vocab:
        bwd = head if lowest < spec.num_layers else 0.0
    else:
        bwd = 2.0 * head
    for l in range(lowest, spec.num_layers):
        bwd += layer_forward_flops(spec, batch, width)
        if l in ranks:
            bwd += 2.0 * lora_forward_flops(spec, l, ranks[l], batch, width)
    return fwd, bwd


def round_work(spec: ModelSpec, ranks: Ranks, batch_shapes: list[tuple[int, int, int]],
               bytes_down: int, bytes_up: int) -> Work:
    """Work of a round of local training made of batches of (batch size, padded width, output-layer
    positions per sequence): client.step_shape's triples."""
    fwd = bwd = 0.0
    trained = set(ranks)
    for b, w, o in batch_shapes:
        f, g = step_work_flops(spec, ranks, trained, b, w, o)
        fwd += f
        bwd += g
    return Work(fwd, bwd, bytes_down, bytes_up)
