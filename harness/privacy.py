"""Client-level differential privacy for the federated loop (DP-FedAvg, McMahan et al. 2018,
arXiv 1710.06963), and its accountant.

A client's round change is what it sends minus what it received: the LoRA factors that travel
(those it trains that round, bar a private B) and the head when it travels, one vector. It is
clipped to global L2 norm C (`clip`). Then either
  central: the server adds N(0, sigma^2 C^2) to the sum of the clipped changes and divides by
           the fixed number m of clients sampled (uniform weights p_u = 1/m, so one client's
           addition or removal moves the sum by at most C: sensitivity C, add/remove-one);
           only for aggregators whose release is that fixed-weight sum (flora_na's `linear`);
  local:   each client adds N(0, sigma^2 C^2) to its own clipped change before it uploads;
           whatever the server computes from the uploads is post-processing. A client's two
           possible uploads differ by at most 2C (replace-one of its own data), so the
           accountant sees noise multiplier sigma / 2, and no amplification by sampling (the
           server sees who uploads), composed over every round.
Parts that never leave a client (a private B or head) are neither clipped nor noised: the
simulation's server averages them only to evaluate a global model, which is no release.

The accountant is dp-accounting's (Google's differential-privacy library): RDP by default,
PLD as a cross-check (PLD is tight, RDP an upper bound). Participation: train.py samples a
fixed round(q U) clients; the accountant treats it as Poisson sampling at rate q = m / U, as
DP-FedAvg's analysis does (exact at participation 1). The noise is drawn from seeded torch
generators so that runs repeat and --resume continues exactly; a deployment that needs the
guarantee against an adversary who knows the seed must draw it from a secure source.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("none", "central", "local")
ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True)
class Settings:
    """A run's DP: mode, clipping norm C, noise multiplier sigma (noise std sigma C), delta, and
    the sampling rate q = m / U of the clients in a round (m of U)."""
    mode: str = "none"
    clip: float = 0.0
    noise: float = 0.0
    delta: float = 1e-5
    sampling_rate: float = 1.0

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def accounted(self) -> tuple[float, float]:
        """(noise multiplier, sampling rate) as the accountant sees one round (module doc)."""
        if self.mode == "local":
            return self.noise / 2, 1.0
        return self.noise, self.sampling_rate

    def epsilon(self, rounds: int) -> float | None:
        """Epsilon at self.delta after `rounds` rounds; None without DP or without noise
        (no finite epsilon)."""
        if not self.on or self.noise == 0:
            return None
        return 0.0 if rounds == 0 else epsilon(*self.accounted(), rounds, self.delta)

    def record(self) -> dict:
        """What config.json keeps of it (facts["dp"])."""
        sigma, q = self.accounted()
        return {"mode": self.mode, "clip": self.clip, "noise_multiplier": self.noise,
                "delta": self.delta, "sampling_rate": self.sampling_rate,
                "weights": "uniform 1/m", "accountant": "dp-accounting RDP",
                "adjacency": "add/remove one client" if self.mode == "central"
                else "replace one client's data (sensitivity 2C)",
                "accounted_noise_multiplier": sigma, "accounted_sampling_rate": q}


# --- clipping and noise of a client's change (dicts of tensors, one vector)


def norm(tensors: dict[str, Tensor]) -> float:
    """The global L2 norm of all tensors together, in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def clip(change: dict[str, Tensor], C: float) -> tuple[dict[str, Tensor], float]:
    """change scaled by min(1, C / ||change||) (the global L2 norm), and ||change|| before."""
    n = norm(change)
    factor = min(1.0, C / n) if n > 0 else 1.0
    return {k: (v.double() * factor).to(v.dtype) for k, v in change.items()}, n


def gaussian(like: dict[str, Tensor], std: float, generator: torch.Generator
             ) -> dict[str, Tensor]:
    """N(0, std^2) of each tensor's shape and dtype, drawn in a fixed (sorted) order."""
    return {k: (torch.randn(like[k].shape, generator=generator, dtype=torch.float64) * std
                ).to(like[k].dtype) for k in sorted(like)}


def release(received: dict[str, Tensor], sent: dict[str, Tensor], C: float, std: float = 0.0,
            generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], float]:
    """What a client uploads under DP: received + clip(sent - received, C) (+ N(0, std^2) on
    every entry if std > 0), and the norm of its change before clipping."""
    change, n = clip({k: sent[k].double() - received[k].double() for k in sent}, C)
    if std > 0:
        noise = gaussian(change, std, generator)
        change = {k: v + noise[k] for k, v in change.items()}
    return {k: (received[k].double() + change[k]).to(sent[k].dtype) for k in sent}, n


# --- the accountant (dp-accounting)


def _event(noise_multiplier: float, sampling_rate: float):
    from dp_accounting import dp_event
    event = dp_event.GaussianDpEvent(noise_multiplier)
    return event if sampling_rate >= 1 else dp_event.PoissonSampledDpEvent(sampling_rate, event)


def _accountant(kind: str):
    from dp_accounting import pld, rdp
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant must be {' or '.join(ACCOUNTANTS)}, got {kind!r}")
    return rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant(
        value_discretization_interval=1e-4)


def settings(mode: str, clip: float, delta: float, sampling_rate: float, rounds: int,
             noise: float | None = None, target_epsilon: float | None = None) -> Settings:
    """A run's Settings, its noise multiplier given or, from target_epsilon, the least one that
    spends it over `rounds` rounds as the mode is accounted (Settings.accounted)."""
    if noise is None:
        scale, q = (2.0, 1.0) if mode == "local" else (1.0, sampling_rate)
        noise = scale * noise_for_epsilon(target_epsilon, q, rounds, delta)
    return Settings(mode, clip, noise, delta, sampling_rate)


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon at `delta` of `rounds` Gaussian mechanisms of this noise multiplier (std over
    sensitivity), each on a Poisson sample at `sampling_rate` (1: everyone)."""
    _check(noise_multiplier, sampling_rate, rounds, delta)
    acc = _accountant(accountant)
    with _quiet():
        acc.compose(_event(noise_multiplier, sampling_rate), rounds)
        return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_for_epsilon(target_epsilon: float, sampling_rate: float, rounds: int,
                      delta: float) -> float:
    """The least noise multiplier whose RDP epsilon after `rounds` rounds is <= target_epsilon
    (dp-accounting's calibrate_dp_mechanism, a bisection)."""
    import dp_accounting
    from dp_accounting import dp_event, rdp
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {target_epsilon}")
    _check(1.0, sampling_rate, rounds, delta)
    with _quiet():
        return float(dp_accounting.calibrate_dp_mechanism(
            rdp.RdpAccountant,
            lambda s: dp_event.SelfComposedDpEvent(_event(s, sampling_rate), rounds),
            target_epsilon, delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6))


def _check(noise_multiplier, sampling_rate, rounds, delta) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be finite and > 0, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


class _quiet:
    """Silence absl's warnings of RDP orders it drops (they do not change the bound's validity)."""
    def __enter__(self):
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


# --- which aggregator admits what (the table in flower_app/README.md, from the registry)

TABLE_HEAD = ["| aggregator | server needs only a weighted sum (SecAgg) | central DP | local DP | "
              "upload codec | download codec |", "|---|---|---|---|---|---|"]


def compatibility_table(aggregators: dict) -> list[str]:
    """Markdown rows, one per registry entry (flora_na.Aggregator): its `linear` trait decides
    secure aggregation and central DP; entries whose clients train a core R inside A = R A0
    (`init`) take neither DP nor codecs (not built); every other takes local DP and an upload
    codec, and a download codec unless its clients restart LoRA from a merged update."""
    yes_no = lambda ok, why: "yes" if ok else f"no ({why})"
    rows = []
    for name, a in aggregators.items():
        core = a.init is not None and "not built: a core R travels"   # else False
        down = core or (a.restart and "merged into W, clients restart")
        rows.append(f"| {a.display_name} (`{name}`) | {yes_no(a.linear, 'not a fixed-weight sum')}"
                    f" | {yes_no(a.linear and not core, core or 'refused')}"
                    f" | {yes_no(not core, core)} | {yes_no(not core, core)}"
                    f" | {yes_no(not down, down)} |")
    return TABLE_HEAD + rows


if __name__ == "__main__":        # python -m harness.privacy: the table for flower_app/README.md
    import flora_na
    print("\n".join(compatibility_table({n: a for n, a in flora_na.AGGREGATORS.items()
                                         if a.aggregate.__module__ == "flora_na"})))
