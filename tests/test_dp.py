"""Client-level DP in train.py (--dp, harness/privacy.py) on the tiny BERT: the noise lands with
the predicted standard deviation (central: sigma C / m on the mean; local: sigma C / sqrt(m)),
only on what travels; no client's change exceeds C; central DP is refused for aggregators whose
registry entry is not linear, before anything is written; local DP runs with FLoRA-NA; rows
carry the accountant's epsilon; --resume continues to the same rows and tensors.

Statistical tests: the deviation of the global model from the noiseless run's, n entries, is
checked by a two-sided chi-square test of its variance at false-alarm rate 1e-6 (for a random
seed; the seeds here are fixed, so the outcome is too). About 30 s on one core.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

import flora_na as fl
import train
from harness import privacy
from test_train import (bert_args, bert_dir, glue_dir, load_state,  # noqa: F401
                        no_training, rows_of, run_killed_in_round_2, tensors_equal)

C = 0.05            # the tiny runs' changes are ~0.1-0.3: clipping binds


def dp_args(out, bert_dir, glue_dir, **kw):
    return bert_args(out, bert_dir, glue_dir, **{"dp_clip": C, "dp_delta": 1e-3, **kw})


def travelling(state: dict, entry: fl.Aggregator, round_: int, private_head: bool) -> dict:
    """The global model's entries that travel under `entry` in round round_ (train._flat's)."""
    return train._flat(state["factors"], state["head"], train.travelling(entry, round_),
                       not private_head)


def assert_gaussian(dev: torch.Tensor, std: float) -> None:
    """dev ~ N(0, std^2) entrywise: its sum of squares / std^2 within chi2(n)'s two-sided 1e-6
    interval."""
    stat = float(dev.double().square().sum()) / std ** 2
    lo, hi = chi2.ppf([0.5e-6, 1 - 0.5e-6], dev.numel())
    assert lo < stat < hi, (stat, lo, hi, dev.numel())


@pytest.fixture(scope="module")
def noisy_pairs(tmp_path_factory, bert_dir, glue_dir):
    """One round of FedIT and FFA-LoRA, central and local DP, each at sigma 0 and sigma 3."""
    out = {}
    for mode in ("central", "local"):
        for sigma in (0.0, 3.0):
            run = tmp_path_factory.mktemp("dp") / f"{mode}{sigma}"
            train.main(dp_args(run, bert_dir, glue_dir, aggregator="fedit,ffa", rounds=1,
                               dp=mode, dp_noise=sigma))
            out[mode, sigma] = run
    return out


@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("name", ["fedit", "ffa"])
def test_the_noise_lands_with_the_predicted_std_on_what_travels(noisy_pairs, mode, name):
    """Same seeds, sigma 3 against sigma 0: the global factors and head that travel move by
    N(0, (3 C / m)^2) (central: the server's noise on the mean of m = 3) or N(0, 3 C^2 / m)
    (local: the mean of m clients' own noises); what does not travel (FFA's frozen A) is
    bitwise the noiseless run's."""
    entry = fl.AGGREGATORS[name]
    clean = load_state(noisy_pairs[mode, 0.0] / name)
    noisy = load_state(noisy_pairs[mode, 3.0] / name)
    x, y = travelling(clean, entry, 0, False), travelling(noisy, entry, 0, False)
    dev = torch.cat([(y[k].double() - x[k].double()).flatten() for k in x])
    m = 3
    assert_gaussian(dev, 3.0 * C / m if mode == "central" else 3.0 * C / math.sqrt(m))
    if "A" not in train.trained(entry, 0):
        for n, (A, _) in clean["factors"].items():
            assert torch.equal(noisy["factors"][n][0], A)
    rows = rows_of(noisy_pairs[mode, 3.0])
    assert rows[0]["epsilon"] == pytest.approx(privacy.Settings(
        mode, C, 3.0, 1e-3, 1.0).epsilon(1)) and rows[0]["delta"] == 1e-3
    assert rows_of(noisy_pairs[mode, 0.0])[0]["epsilon"] is None       # no noise, no bound


@pytest.mark.parametrize("mode, name", [("central", "fedit"), ("central", "fedsa"),
                                        ("central", "rolora"), ("local", "flora_na"),
                                        ("local", "ffa")])
def test_no_clients_change_exceeds_the_clipping_norm(tmp_path, monkeypatch, bert_dir, glue_dir,
                                                      mode, name):
    """What the server aggregates, against the global model the clients received: the change
    in what travels (and the head where it travels) has norm <= C, though the clients' own
    changes (the rows' dp_norms) exceeded it (RoLoRA: the factor of the round, B then A).
    Local DP at sigma 0 (clipping alone)."""
    seen, server_update = [], train.server_update

    def spy(name_, state, model, uploads, heads, *a, **kw):
        entry, rnd = fl.AGGREGATORS[name_], kw["round_"]
        received = travelling(state, entry, rnd, kw["private_head"])
        divergence = server_update(name_, state, model, uploads, heads, *a, **kw)
        for up, head in zip(uploads, heads):          # as aggregated (central: clipped again)
            sent = train._flat(up, head, train.travelling(entry, rnd), not kw["private_head"])
            seen.append(privacy.norm({k: sent[k].double() - received[k].double()
                                      for k in sent}))
        return divergence

    monkeypatch.setattr(train, "server_update", spy)
    train.main(dp_args(tmp_path / "run", bert_dir, glue_dir, aggregator=name, dp=mode,
                       dp_noise=0.0 if mode == "local" else 1.0))
    assert len(seen) == 6 and max(seen) <= C * (1 + 1e-5)
    norms = [n for r in rows_of(tmp_path / "run") for n in r["dp_norms"]]
    assert len(norms) == 6 and min(norms) > C


def test_central_dp_with_a_target_epsilon_spends_it_and_local_dp_runs_with_flora_na(
        tmp_path, bert_dir, glue_dir):
    """--dp central --dp-target-epsilon 3 over 2 rounds: epsilon rises to 3 (RDP); local DP
    with FLoRA-NA: finite metrics, epsilon from the local accounting (sigma / 2, no sampling)."""
    train.main(dp_args(tmp_path / "c", bert_dir, glue_dir, aggregator="fedit,ffa", dp="central",
                       dp_target_epsilon=3.0))
    eps = [r["epsilon"] for r in rows_of(tmp_path / "c")]
    assert eps[0] < eps[1] and eps[1] == pytest.approx(3.0, abs=1e-3) and eps[1] <= 3.0
    assert eps[2:] == eps[:2]
    train.main(dp_args(tmp_path / "l", bert_dir, glue_dir, aggregator="flora_na", dp="local",
                       dp_noise=1.0, participation=0.67))
    rows = rows_of(tmp_path / "l")
    assert [r["epsilon"] for r in rows] == [privacy.epsilon(0.5, 1.0, t, 1e-3) for t in (1, 2)]
    assert all(math.isfinite(r["metrics"]["accuracy"]) and len(r["dp_norms"]) == 2 for r in rows)


@pytest.mark.parametrize("kw, pattern", [
    (dict(aggregator="fedit,flora_na", dp="central", dp_noise=1.0),
     r"--dp central: FLoRA-NA release something other than a fixed-weight sum .* use --dp "
     r"local .*, or --dp central with fedit, ffa, fedsa"),
    (dict(aggregator="fedex", dp="central", dp_noise=1.0), "--dp central: FedEx-LoRA"),
    (dict(dp="central", dp_noise=1.0, client_ranks="1,2", aggregator="fedit"),
     "--dp central with mixed client ranks"),
    (dict(aggregator="fedsb", dp="local", dp_noise=1.0), "--dp: Fed-SB train an r x r core R"),
    (dict(dp="local"), "needs exactly one of --dp-noise"),
    (dict(dp="local", dp_noise=1.0, dp_target_epsilon=3.0), "needs exactly one of --dp-noise"),
    (dict(dp="local", dp_noise=-1.0), "--dp-noise must be finite and >= 0"),
    (dict(dp="local", dp_target_epsilon=0.0), "--dp-target-epsilon must be finite and > 0"),
    (dict(dp="local", dp_noise=1.0, dp_delta=0.5), r"--dp-delta must be in \(0, 1 / --clients"),
    (dict(dp="laplace", dp_noise=1.0), "--dp must be none or central or local"),
])
def test_bad_dp_options_fail_before_anything_is_written(tmp_path, no_training, bert_dir,
                                                        glue_dir, kw, pattern):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=pattern):
        train.main(dp_args(out, bert_dir, glue_dir, **kw))
    assert not out.exists()
    with pytest.raises(ValueError, match="--dp central: "):
        train.check_args(bert_args(out, bert_dir, glue_dir, aggregator="flora_na", dp="central",
                                   dp_clip=1.0, dp_noise=1.0))
    with pytest.raises(ValueError, match="--dp-clip need --dp central or local"):
        train.check_args(bert_args(out, bert_dir, glue_dir, dp_clip=1.0))


def test_all_with_central_dp_runs_the_linear_aggregators_but_a_core(bert_dir, glue_dir, tmp_path):
    args = dp_args(tmp_path / "run", bert_dir, glue_dir, aggregator="all", dp="central",
                   dp_noise=1.0)
    assert train.check_args(args) == [n for n, a in fl.AGGREGATORS.items()
                                      if a.linear and a.init is None]


@pytest.mark.parametrize("mode", ["central", "local"])
def test_resume_continues_the_noise_and_the_accountant(tmp_path, monkeypatch, bert_dir,
                                                       glue_dir, mode):
    """Killed in round 2 of 3, then --resume: the rows (epsilon included) and the global
    model equal an uninterrupted run's."""
    kw = dict(aggregator="fedit", rounds=3, participation=0.67, dp=mode, dp_noise=1.0)
    whole = tmp_path / "whole"
    train.main(dp_args(whole, bert_dir, glue_dir, **kw))
    out = tmp_path / "run"
    run_killed_in_round_2(monkeypatch, lambda: train.main(dp_args(out, bert_dir, glue_dir, **kw)))
    train.main(dp_args(out, bert_dir, glue_dir, resume=True, **kw))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")}
                          for r in rows]
    assert strip(rows_of(out)) == strip(rows_of(whole))
    assert [r["epsilon"] for r in rows_of(out)] == [privacy.Settings(
        mode, C, 1.0, 1e-3, 2 / 3).epsilon(t) for t in (1, 2, 3)]
    a, b = load_state(out / "fedit"), load_state(whole / "fedit")
    assert tensors_equal(a["factors"], b["factors"]) and tensors_equal(a["head"], b["head"])


def test_the_compatibility_table_is_the_registrys_and_train_py_agrees(tmp_path, bert_dir,
                                                                      glue_dir):
    """flower_app/README.md's table is harness.privacy.compatibility_table of flora_na.py's own
    aggregators, README's aggregator table sums each row up (SecAgg, DP, codecs), and each
    "central DP" and "download codec" cell is what check_args does."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "flower_app" / "README.md").read_text()
    block = readme[readme.index("<!-- compatibility:start -->\n") + 29:
                   readme.index("<!-- compatibility:end -->")]
    own = {n: a for n, a in fl.AGGREGATORS.items() if a.aggregate.__module__ == "flora_na"}
    rows = privacy.compatibility_table(own)
    assert block.splitlines() == rows, "regenerate it: python -m harness.privacy"
    top = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for (name, entry), row in zip(own.items(), rows[2:]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        # README's aggregator table sums the row up in its last three columns
        yes = [c.startswith("yes") for c in cells[1:]]
        summary = ["yes" if yes[0] else "no",
                   ", ".join(m for m, ok in zip(("central", "local"), yes[1:3]) if ok) or "no",
                   ", ".join(m for m, ok in zip(("up", "down"), yes[3:5]) if ok) or "no"]
        line = next(x for x in top.splitlines() if x.startswith(f"| `{name}` |"))
        assert [c.strip() for c in line.strip("|").split("|")][-3:] == summary, name
        for cell, kw in ((cells[2], dict(dp="central", dp_clip=1.0, dp_noise=1.0)),
                         (cells[3], dict(dp="local", dp_clip=1.0, dp_noise=1.0)),
                         (cells[4], dict(upload_codec="int8")),
                         (cells[5], dict(download_codec="int8"))):
            args = bert_args(tmp_path / name, bert_dir, glue_dir, aggregator=name, **kw)
            if cell == "yes":
                assert train.check_args(args) == [name]
            else:
                with pytest.raises(ValueError):
                    train.check_args(args)

