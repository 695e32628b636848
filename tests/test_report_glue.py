"""The GLUE section (evidence/report_glue.py) on run folders written by hand."""
from __future__ import annotations

from evidence import report, report_common, report_glue
from report_runs import (REGISTRY, built, config, line, results, rows, unwrap,  # noqa: F401
                         write_run)



def test_glue_rows_come_from_the_facts_in_registry_order(built):
    md = built[0].body
    best = md[md.index("**Best dev metric"):md.index("**Final-round")]
    labels = [l.split(" | ")[0].removeprefix("| ") for l in best.splitlines() if l.startswith("| ")][1:]
    assert labels == ["FedIT", "FedSA-LoRA (global)", "FedSA-LoRA (personalised)", "Toy",
                      "**FLoRA-NA**", "centralised (1 client, IID)",
                      "majority class (constant prediction)"]
    # mean ± sample std over the two seeds, task average (one task), MB / round (up + down)
    assert line(best, "| FedIT |") == ["| FedIT | 0.700 ± 0.141 | 0.700 | 2.00 |"]
    assert line(best, "| FedSA-LoRA (personalised) |") == [
        "| FedSA-LoRA (personalised) | 0.590 ± 0.014 | 0.590 | — |"]
    assert line(best, "| Toy |") == ["| Toy | **0.810 ± 0.127** | 0.810 | 1.50 |"]   # the best
    assert line(best, "| **FLoRA-NA** |") == ["| **FLoRA-NA** | 0.800 ± 0.071 | 0.800 | 2.00 |"]
    assert line(best, "| centralised") == [
        "| centralised (1 client, IID) | 0.950 (n=1) | 0.950 | — |"]
    assert line(best, "| majority class") == [
        "| majority class (constant prediction) | 0.520 ± 0.014 | — | — |"]
    final = md[md.index("**Final-round"):]
    assert line(final, "| Toy |") == ["| Toy | **0.800 ± 0.141** | 0.800 | 1.50 |"]
    assert "SST-2 (accuracy)" in best


def test_head_size_and_verdicts(built):
    md = built[0].body
    assert "(classifier and pooler, 0.57 MB per client each way)" in md
    assert ("- **FLoRA-NA vs FedIT** (best over rounds, difference of means over seeds): ahead "
            "by more than one std on 0 task(s) (—), behind by more than one std on 0 (—), "
            "within one std on 1 (SST-2 +0.1000).") in md
    assert ("- FLoRA-NA's rank among the federated global models (best over rounds, mean over "
            "seeds): SST-2 2/4.") in md
    assert "Centralised reference vs the best federated global model (best over rounds): " \
           "SST-2 0.950 vs 0.810." in md


OLD_PROTOCOL = ("(personalised): each client's own model (the shared factors with its private "
                "ones, the averaged head) on the shared dev set, unweighted mean over clients, "
                "not a single global model")


def test_the_personalised_rows_name_how_they_were_scored(built, tmp_path):
    """Every personalised number says which protocol produced it (train.py's --personal-eval,
    --personal-weighting, --head-sharing, read from each run's config and facts; runs from
    before these were recorded: as train.py scored them then), naming the runs where they
    differ; the MB note says whose clients keep their head."""
    assert OLD_PROTOCOL in built[0].body and f"- {OLD_PROTOCOL}." in unwrap(built[0].headline)
    kept = {**REGISTRY, "fedsa": {**REGISTRY["fedsa"], "private_head": True}}
    metrics = rows("fedit", {4: 0.6}) + rows("fedsa", {4: 0.7}, personal={4: 0.65})
    write_run(tmp_path, "glue", "sst2_seed0", config(registry=kept, personal_eval="clients",
                                                     personal_weighting="data"), metrics)
    write_run(tmp_path, "glue", "sst2_seed1", config(seed=1, personal_eval="clients",
                                                     personal_weighting="uniform"), metrics)
    write_run(tmp_path, "glue", "sst2_seed2", config(seed=2, registry=kept,
                                                     personal_eval="global"),
              rows("fedit", {4: 0.6}) + rows("fedsa", {4: 0.7}))
    runs = report_common.load_runs(str(tmp_path), "glue")
    text = ("(personalised): in sst2_seed0, each client's own model (the shared factors with its "
            "private ones, its own head) on the shared dev set, mean weighted by the clients' "
            "training examples, not a single global model; in sst2_seed1, "
            + OLD_PROTOCOL.removeprefix("(personalised): ")
            + "; in sst2_seed2, no row, only the global model is scored (--personal-eval global)")
    assert report_glue.personal_text(runs) == text
    assert report_glue.personal_text(runs[2:]) == ("(personalised): no row, only the global model is "
                                              "scored (--personal-eval global)")
    md = report.build_report(str(tmp_path), str(tmp_path)).body
    assert text in md
    assert ("(classifier and pooler, 0.57 MB per client each way), averaged by every method but "
            "FedSA-LoRA, whose clients keep their own, is not counted") in md
    assert "averaged alike by every method" in report_glue.head_text(runs[1:2])


def test_a_regression_task_and_a_headless_model(tmp_path):
    stsb = {"display_name": "STS-B", "main_metric": "pearson"}
    cfg = config("stsb", stsb, 0.0)
    cfg["facts"]["head"] = {"modules": [], "bytes": 0}
    write_run(tmp_path, "glue", "stsb_seed0", cfg, rows("fedit", {4: 0.3}, metric="pearson"))
    md = report.build_report(str(tmp_path), str(tmp_path)).body
    assert "| aggregator | STS-B (pearson) |" in md
    assert line(md, "| majority class") == ["| majority class (constant prediction) | 0.000 | — | — |"] * 2
    assert "(no parameter outside LoRA is trained)" in md
