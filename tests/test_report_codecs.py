"""The compression section (evidence/report_codecs.py) on run folders written by hand."""
from __future__ import annotations

import pytest

from evidence import report
from report_runs import built, config, line, results, rows, write_run  # noqa: F401


def div(naive: float, aggregate: float, uncompressed: tuple[float, float] | None) -> dict:
    """A round's divergence as train.py logs it under an upload codec (two equal layers)."""
    mean = {"naive": naive, "aggregate": aggregate, "bound": 0.01}
    out = {"relative_mean": mean, "relative_per_layer": {"layer.0": mean, "layer.1": mean}}
    if uncompressed is not None:
        unc = {"naive": uncompressed[0], "aggregate": uncompressed[1]}
        out["uncompressed"] = {"relative_mean": unc,
                               "relative_per_layer": {"layer.0": unc, "layer.1": unc}}
    return out


@pytest.fixture(scope="module")
def compression(tmp_path_factory):
    """Codec none and int4 at seeds 0 and 1, top-k 1% at seed 0, FedIT and FLoRA-NA, two rounds
    each (final accuracy at round 2); and FLoRA-NA's noise-aware runs at int4."""
    res = tmp_path_factory.mktemp("results")
    comp = dict(aggregator="fedit,flora_na", rounds=2, eval_every=2)
    for seed in (0, 1):
        write_run(res, "compression", f"none_seed{seed}", config(seed=seed, **comp),
                  rows("fedit", {2: 0.80 + 0.02 * seed}, rounds=2, div=div(0.2, 0.2, None))
                  + rows("flora_na", {2: 0.82}, rounds=2, div=div(0.2, 0.15, None)))
        write_run(res, "compression", f"int4_seed{seed}",
                  config(seed=seed, upload_codec="int4", **comp),
                  rows("fedit", {2: 0.78}, rounds=2, mb_up=0.125, div=div(0.1, 0.1, (0.3, 0.3)))
                  + rows("flora_na", {2: 0.70 + 0.04 * seed}, rounds=2, mb_up=0.125,
                         div=div(0.1, 0.08, (0.3, 0.36))))
        write_run(res, "compression", f"int4_seed{seed}_noise_aware",
                  config(seed=seed, upload_codec="int4", upload_variance=True,
                         aggregator="flora_na", rounds=2, eval_every=2,
                         agg_option=["flora_na.gram_correction=noise_aware"]),
                  rows("flora_na", {2: 0.79}, rounds=2, mb_up=0.130,
                       div=div(0.1, 0.08, (0.3, 0.24))))
    write_run(res, "compression", "topk0.01_seed0",
              config(seed=0, upload_codec="topk", topk_fraction=0.01, **comp),
              rows("fedit", {2: 0.55}, rounds=2, mb_up=0.01, div=div(0.5, 0.5, (0.9, 0.9)))
              + rows("flora_na", {2: 0.56}, rounds=2, mb_up=0.01, div=div(0.5, 0.5, (0.9, 0.9))))
    out = tmp_path_factory.mktemp("figures")
    return report.build_report(str(res), str(out), "flora_na", "fedit"), out


def test_compression_table_reads_the_uncompressed_divergence(compression):
    """Rows by aggregator (registry order), codecs by MB / round up (most first); FedIT's and
    the aggregator's divergence against the uncompressed M (codec none: the run's own), and the
    share removed, 1 - sum its / sum FedIT's; the noise-aware runs a row of their own."""
    md = compression[0].body
    assert ("| aggregator | upload codec | final accuracy | best accuracy | MB / round up | "
            "FedIT rel. div. | its rel. div. | share of FedIT's removed |") in md
    assert line(md, "| FedIT | none |") == [
        "| FedIT | none | 0.810 ± 0.014 | 0.810 ± 0.014 | 1.000 | 0.200 | 0.200 | 0.0% |"]
    assert line(md, "| **FLoRA-NA** | none |") == [
        "| **FLoRA-NA** | none | 0.820 ± 0.000 | 0.820 ± 0.000 | 1.000 | 0.200 | 0.150 | 25.0% |"]
    assert line(md, "| **FLoRA-NA** | int4 |") == [
        "| **FLoRA-NA** | int4 | 0.720 ± 0.028 | 0.720 ± 0.028 | 0.125 | 0.300 | 0.360 | -20.0% |"]
    assert line(md, "| **FLoRA-NA** | top-k 1% |") == [
        "| **FLoRA-NA** | top-k 1% | 0.560 (n=1) | 0.560 (n=1) | 0.010 | 0.900 | 0.900 | 0.0% |"]
    assert line(md, "| **FLoRA-NA** [gram_correction=noise_aware] | int4 |") == [
        "| **FLoRA-NA** [gram_correction=noise_aware] | int4 | 0.790 ± 0.000 | 0.790 ± 0.000 | "
        "0.130 | 0.300 | 0.240 | 20.0% |"]
    assert md.index("| FedIT | none |") < md.index("| FedIT | int4 |") < md.index(
        "| FedIT | top-k 1% |") < md.index("| **FLoRA-NA** | none |")
    assert ("Uncompressed (codec none), every aggregator learned: final accuracy at least 0.05 "
            "above the majority class. FLoRA-NA removes -20.0% to 25.0% of FedIT's divergence "
            "across codecs; at int4 it is further from the uncompressed M than FedIT on the same "
            "uploads.") in md
    assert (compression[1] / "compression.png").stat().st_size > 0
    assert "<!-- " not in compression[0].blocks["compression"]
    assert compression[0].blocks["compression"].startswith("## Compression")


def test_compression_says_when_not_run_and_when_codec_none_did_not_learn(built, tmp_path):
    """Without runs/compression/ the section says so (and has no block for the results page);
    a codec-none run within 0.05 of the majority class is named as not learned."""
    assert "_Not run: nothing under `runs/compression/` yet._" in built[0].body
    assert "compression" not in built[0].blocks
    write_run(tmp_path, "compression", "none_seed0", config(aggregator="fedit", rounds=2),
              rows("fedit", {2: 0.53}, rounds=2, div=div(0.2, 0.2, None)))
    md = report.build_report(str(tmp_path), str(tmp_path), "flora_na", "fedit").body
    assert ("Uncompressed (codec none), FedIT stayed within 0.05 of the majority class: their "
            "compressed rows say nothing about compression.") in md
