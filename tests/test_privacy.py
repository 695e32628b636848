"""Tests for harness/privacy.py: the accountant against the exact Gaussian-mechanism privacy
curve (an oracle from the normal CDF) and RDP against PLD, its monotonicity, noise calibrated
for a target epsilon giving that epsilon, clipping's bound and the noise's standard deviation.
About 10 s on one core (the PLD accountant is the slow part)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st
from scipy.optimize import brentq
from scipy.stats import chi2, norm as normal

from harness import privacy

pytestmark = pytest.mark.usefixtures("one_thread")


def exact_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Epsilon of `rounds` Gaussian mechanisms of noise multiplier sigma at `delta`, exactly:
    their composition is one Gaussian mechanism of mu = sqrt(rounds) / sigma, whose privacy
    curve is delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu) (Balle & Wang 2018)."""
    mu = math.sqrt(rounds) / sigma
    curve = lambda eps: (normal.cdf(mu / 2 - eps / mu)
                         - math.exp(eps) * normal.cdf(-mu / 2 - eps / mu)) - delta
    return brentq(curve, 0.0, 500.0)


@pytest.mark.parametrize("sigma, rounds, delta", [(1.0, 20, 1e-5), (5.0, 20, 1e-5),
                                                  (2.0, 100, 1e-6), (10.0, 3, 1e-3)])
def test_full_participation_matches_the_exact_gaussian_curve(sigma, rounds, delta):
    """q = 1: PLD within 1% of the exact epsilon; RDP an upper bound at most 25% above it."""
    exact = exact_epsilon(sigma, rounds, delta)
    pld = privacy.epsilon(sigma, 1.0, rounds, delta, "pld")
    rdp = privacy.epsilon(sigma, 1.0, rounds, delta, "rdp")
    assert pld == pytest.approx(exact, rel=0.01)
    assert exact * (1 - 1e-9) <= rdp <= 1.25 * exact


@pytest.mark.parametrize("sigma, q, rounds", [(1.0, 0.5, 20), (2.0, 0.1, 100), (0.8, 0.3, 10)])
def test_rdp_and_pld_agree_under_poisson_sampling(sigma, q, rounds):
    """Subsampled: PLD (tight) <= RDP (an upper bound) <= 1.25 PLD."""
    pld = privacy.epsilon(sigma, q, rounds, 1e-5, "pld")
    rdp = privacy.epsilon(sigma, q, rounds, 1e-5, "rdp")
    assert pld <= rdp <= 1.25 * pld


def test_epsilon_is_monotone():
    """More noise, a lower sampling rate, a larger delta: less epsilon; more rounds: more."""
    eps = lambda s=2.0, q=0.5, t=20, d=1e-5: privacy.epsilon(s, q, t, d)
    assert eps(s=1.0) > eps(s=2.0) > eps(s=4.0)
    assert eps(q=0.1) < eps(q=0.5) < eps(q=1.0)
    assert eps(t=5) < eps(t=20) < eps(t=80)
    assert eps(d=1e-3) < eps(d=1e-5) < eps(d=1e-8)


@pytest.mark.parametrize("target, q, rounds", [(1.0, 1.0, 20), (3.0, 0.3, 50), (8.0, 0.5, 10)])
def test_noise_for_a_target_epsilon_gives_that_epsilon(target, q, rounds):
    """The calibrated sigma spends the target (within 1e-3) and 1% less noise overspends it."""
    sigma = privacy.noise_for_epsilon(target, q, rounds, 1e-5)
    assert target - 1e-3 <= privacy.epsilon(sigma, q, rounds, 1e-5) <= target
    assert privacy.epsilon(0.99 * sigma, q, rounds, 1e-5) > target


def test_settings_account_local_dp_at_half_the_noise_without_sampling():
    """Local DP: replace-one sensitivity 2C, no amplification (the server sees who uploads)."""
    local = privacy.Settings("local", clip=1.0, noise=4.0, delta=1e-5, sampling_rate=0.2)
    central = privacy.Settings("central", clip=1.0, noise=4.0, delta=1e-5, sampling_rate=0.2)
    assert local.accounted() == (2.0, 1.0) and central.accounted() == (4.0, 0.2)
    assert local.epsilon(7) == privacy.epsilon(2.0, 1.0, 7, 1e-5)
    assert privacy.Settings("central", clip=1.0, noise=0.0).epsilon(3) is None
    assert privacy.Settings().epsilon(3) is None and central.epsilon(0) == 0.0


@pytest.mark.parametrize("bad", [dict(noise_multiplier=0.0), dict(sampling_rate=1.5),
                                 dict(rounds=0), dict(delta=1.0)])
def test_accountant_refuses_bad_input(bad):
    args = dict(noise_multiplier=1.0, sampling_rate=0.5, rounds=3, delta=1e-5) | bad
    with pytest.raises(ValueError):
        privacy.epsilon(**args)


@given(st.integers(0, 10_000), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_clip_bounds_the_global_norm_and_keeps_the_direction(seed, scale, C):
    g = torch.Generator().manual_seed(seed)
    change = {"a": torch.randn(3, 5, generator=g) * scale, "b": torch.randn(7, generator=g) * scale}
    clipped, n = privacy.clip(change, C)
    assert n == pytest.approx(privacy.norm(change), rel=1e-12)
    assert privacy.norm(clipped) <= C * (1 + 1e-6)
    factor = min(1.0, C / n)
    for k in change:
        torch.testing.assert_close(clipped[k], change[k] * factor, rtol=1e-6, atol=0)


def test_release_adds_noise_of_the_stated_std():
    """received + clip(change) + N(0, std^2): the deviation from the noiseless release has
    variance std^2 by a two-sided chi-square test at false-alarm rate 1e-6 (n = 20000 draws)."""
    g = torch.Generator().manual_seed(0)
    received = {"x": torch.randn(100, 100, generator=g), "y": torch.randn(10000, generator=g)}
    sent = {k: v + torch.randn(v.shape, generator=g) for k, v in received.items()}
    clean, n0 = privacy.release(received, sent, C=2.0)
    noisy, n1 = privacy.release(received, sent, C=2.0, std=0.3,
                                generator=torch.Generator().manual_seed(1))
    assert n0 == n1 > 2.0
    dev = torch.cat([(noisy[k].double() - clean[k].double()).flatten() for k in sent])
    stat = float(dev.square().sum()) / 0.3 ** 2               # ~ chi2(n) if the std is 0.3
    lo, hi = chi2.ppf([0.5e-6, 1 - 0.5e-6], dev.numel())
    assert lo < stat < hi
    assert abs(float(dev.mean())) < 5.3 * 0.3 / math.sqrt(dev.numel())  # two-sided 1e-7
