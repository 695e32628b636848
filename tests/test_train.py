"""Tests for train.py, the federated harness: every aggregator end to end on a tiny BERT (GLUE)
and a tiny Llama (GSM8K, MBPP), FedIT with one client against centralised training, partition
properties, resume against an uninterrupted run, saved adapters against the in-memory model,
errors before any training, and the command line in a subprocess.

Models are built from configs (hidden size 32, 2 layers) with tokenizers whose vocabularies are
the words of the synthetic examples, and data is written in the exact original file formats, so nothing is
downloaded and the whole file runs in a few minutes on two CPU cores.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from hypothesis import given, strategies as st

import flora_na as fl
from harness import federation, provenance
from harness import tasks
import train

HERE = Path(__file__).resolve().parent.parent   # the repository root
DATA = Path(os.environ.get("FLORA_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
TIMING = ("client_seconds", "server_seconds")

# --- synthetic data in the original formats

POSITIVE = "good great fine lovely superb charming moving witty".split()
NEGATIVE = "bad awful dull boring bleak poor tedious lame".split()
FILLER = "the movie film story is was a very quite and plot acting ,".split()


def sst2_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is the sentiment of their adjectives, in shuffled word order."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(rng.randint(1, 3))]
        words += [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        rows.append((" ".join(words) + " ", label))   # SST-2 lines end in a space before \t
    return rows


def write_sst2(root: Path, n_train: int = 40, n_dev: int = 12) -> Path:
    """glue_data/SST-2/{train,dev}.tsv: a `sentence\\tlabel` header, then one row per line."""
    folder = root / "glue_data" / "SST-2"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in sst2_rows(n, seed)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def gsm8k_rows(n: int, seed: int) -> list[dict]:
    """GSM8K rows: a question and a worked answer with <<calculator>> marks and "#### N"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append({"question": f"Tom has {a} apples and buys {b} more. How many apples does "
                                 f"Tom have now?",
                     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n"
                               f"#### {a + b}"})
    return rows


def mbpp_row(task_id: int, k: int) -> dict:
    """One MBPP row as mbpp.jsonl stores it (code with Windows line endings)."""
    return {"text": f"Write a function to add {k} to a number.",
            "code": f"def add_{k}(x):\r\n  return x + {k}",
            "task_id": task_id,
            "test_setup_code": "",
            "test_list": [f"assert add_{k}(1) == {1 + k}", f"assert add_{k}(0) == {k}"],
            "challenge_test_list": []}


def write_generation(root: Path) -> Path:
    """gsm8k/{train,test}.jsonl and mbpp/mbpp.jsonl (all four MBPP splits by task id)."""
    (root / "gsm8k").mkdir(parents=True)
    for split, n, seed in (("train", 12, 0), ("test", 4, 1)):
        with open(root / "gsm8k" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in gsm8k_rows(n, seed))
    (root / "mbpp").mkdir()
    ids = [1, 2] + list(range(11, 15)) + [511, 512] + list(range(601, 613))   # prompt/test/val/train
    with open(root / "mbpp" / "mbpp.jsonl", "w") as f:
        f.writelines(json.dumps(mbpp_row(t, k)) + "\n" for k, t in enumerate(ids))
    return root


# --- tiny models, built once per session


def build_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) without a head, as MiniLM is, and a WordPiece tokenizer whose
    vocabulary holds the words of the synthetic SST-2 sentences."""
    words = sorted(set(POSITIVE + NEGATIVE + FILLER))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(special + words) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(special) + len(words), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_llama(folder: Path, texts: list[str]) -> Path:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads) with a word-level tokenizer trained on texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<pad>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def generation_texts() -> list[str]:
    """Every prompt and target the Llama tokenizer must cover."""
    texts = []
    for r in gsm8k_rows(12, 0) + gsm8k_rows(4, 1):
        texts += [tasks.gsm8k_prompt(r["question"]), tasks.gsm8k_target(r["answer"])]
    for k in range(40):
        r = mbpp_row(0, k)
        texts += [tasks.mbpp_prompt(r["text"], r["test_list"]), tasks.mbpp_target(r["code"])]
    return texts


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return build_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama", generation_texts())


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory) -> Path:
    return write_generation(tmp_path_factory.mktemp("gen"))


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """main() sets torch's thread count; give the other test modules theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def bert_args(out: Path, bert: Path, data: Path, **kw) -> train.Args:
    """A tiny federated SST-2 run: 3 clients, 2 rounds of 2 steps, rank 2."""
    base = dict(task="sst2", model=str(bert), data_dir=str(data), out=str(out),
                aggregator="fedit", clients=3, rounds=2, local_steps=2, batch_size=4, rank=2,
                lr=5e-3, max_length=16, eval_every=1, eval_batch_size=8, agg_option=["flora_na.steps=20"],
                device="cpu", threads=1)
    return train.Args(**{**base, **kw})


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def tensors_equal(x, y) -> bool:
    """Exact equality of nested dicts/lists/tuples of tensors (and plain values)."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(
            tensors_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(tensors_equal(a, b) for a, b in zip(x, y))
    return x == y


def load_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "state.pt", weights_only=False)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The saved adapter's weights, plus base_layers.safetensors where the run changed W."""
    from safetensors.torch import load_file
    out = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    if (run_dir / "base_layers.safetensors").exists():
        out.update({"base:" + k: v for k, v in
                    load_file(run_dir / "base_layers.safetensors").items()})
    return out


def glue_logits(model, tokenizer, examples) -> torch.Tensor:
    """Logits of a sequence classifier on examples, in eval mode."""
    model.eval()
    batch = tasks.collate_glue(tokenizer, examples, 16)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.float()


def fresh_classifier(path: Path, num_labels: int = 2):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# Every aggregator, end to end on the tiny BERT (GLUE SST-2)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, bert_dir, glue_dir):
    """One 2-round run of every aggregator; the in-memory global model's logits on the dev
    set are recorded when each aggregator saves its adapter."""
    out = tmp_path_factory.mktemp("runs") / "all"
    args = bert_args(out, bert_dir, glue_dir, aggregator=",".join(fl.AGGREGATORS))
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    dev = tasks.load_glue("sst2", glue_dir, "dev")
    logits, save = {}, train.save_global

    def spy(model, state, run_dir, *args):          # called every round: the last one stays
        logits[os.path.basename(run_dir)] = glue_logits(model, tokenizer, dev)
        save(model, state, run_dir, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_global", spy)
        log = train.main(args)
    return {"args": args, "out": out, "log": log, "logits": logits, "dev": dev,
            "tokenizer": tokenizer}


def test_every_aggregator_runs_and_writes_its_run_dir(bert_run):
    out, args = bert_run["out"], bert_run["args"]
    config = json.loads((out / "config.json").read_text())
    assert config["aggregator"] == args.aggregator and config["rounds"] == 2
    assert config["model"] == args.model and "resume" not in config
    rows = rows_of(out)
    assert rows == bert_run["log"]
    assert [(r["aggregator"], r["round"]) for r in rows] == [
        (a, t) for a in fl.AGGREGATORS for t in (1, 2)]
    for name in fl.AGGREGATORS:
        r1, r2 = (r for r in rows if r["aggregator"] == name)
        for r in (r1, r2):
            assert {"round", "metrics", "train_loss", "divergence", "bytes_up", "bytes_down",
                    "client_seconds", "server_seconds", "clients"} <= r.keys()
            assert r["clients"] == [0, 1, 2]
            assert finite(r["train_loss"]) and r["train_loss"] > 0
            assert finite(r["client_seconds"]) and finite(r["server_seconds"])
            assert r["metrics"]["n_eval"] == 12 and 0 <= r["metrics"]["accuracy"] <= 1
            mean = r["divergence"]["relative_mean"]
            assert set(mean) == {"naive", "aggregate", "bound"}
            assert all(finite(v) and v >= 0 for v in mean.values())
            per_layer = r["divergence"]["relative_per_layer"]
            assert len(per_layer) == 2 * 2          # query and value of 2 layers
        # cumulative communication: the same bytes every round with every client taking part
        # (RoLoRA: B then A, equal in size on the square q, v), bar a one-off initialisation
        once = 3 * 4 * (32 * 2 + 2 * 32 + 2 * 2) * 4 if fl.AGGREGATORS[name].init else 0
        assert r1["bytes_up"] > 0 and r1["bytes_down"] > 0
        assert (r2["bytes_up"], r2["bytes_down"] - once) == (
            2 * r1["bytes_up"], 2 * (r1["bytes_down"] - once))
        run_dir = out / name
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / "state.pt").is_file()
        assert (run_dir / "base_layers.safetensors").is_file() == (name in ("fedex", "flora"))
        if name == "fedsa":                          # personal models: shared A, own B
            assert 0 <= r2["personal_metrics"]["accuracy"] <= 1
    # what each aggregator is known to achieve, as the harness records it
    last = {r["aggregator"]: r for r in rows if r["round"] == 2}
    bytes_of = {n: (r["bytes_up"], r["bytes_down"]) for n, r in last.items()}
    assert bytes_of["flora_na"] == bytes_of["fedit"]          # no extra communication
    assert 2 * bytes_of["rolora"][0] == bytes_of["fedit"][0]  # one factor of two a round
    # Fed-SB: 3 clients x 4 layers x one 2 x 2 core (float32) each way, 2 rounds, + B, A0, R once
    assert bytes_of["fedsb"] == (2 * 3 * 4 * 2 * 2 * 4, 2 * 3 * 4 * 2 * 2 * 4 + 3 * 4 * 132 * 4)
    assert bytes_of["fedex"][1] > bytes_of["fedit"][1]        # a dense residual per client
    for name, r in last.items():
        for layer in r["divergence"]["relative_per_layer"].values():
            if name in ("fedex", "flora", "ffa", "rolora", "fedsb"):   # exact aggregators
                assert layer["aggregate"] < 1e-5
            if name in ("flora_na", "lora_fair", "fedex", "flora", "flexlora"):
                assert layer["aggregate"] <= layer["naive"] * (1 + 1e-6) + 1e-9
            if name == "flexlora":                               # the Eckart-Young optimum
                assert layer["aggregate"] == pytest.approx(layer["bound"], rel=1e-3, abs=1e-7)
            if name == "fedit":
                assert layer["aggregate"] == pytest.approx(layer["naive"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", list(fl.AGGREGATORS))
def test_saved_adapter_reloads_to_the_same_predictions(bert_run, bert_dir, name):
    """load_global(run_dir, fresh base) == the in-memory global model at the end of the run,
    in logits and in the dev metric of the last metrics.jsonl row."""
    run_dir = bert_run["out"] / name
    model, _ = train.load_global(str(run_dir), fresh_classifier(bert_dir))
    logits = glue_logits(model, bert_run["tokenizer"], bert_run["dev"])
    torch.testing.assert_close(logits, bert_run["logits"][name], rtol=1e-5, atol=1e-6)
    task, data = train.load_data(bert_run["args"])
    metrics = train.evaluate(task, model, bert_run["tokenizer"], data,
                             **train.eval_options(bert_run["args"]))
    last = [r for r in bert_run["log"] if r["aggregator"] == name][-1]
    assert metrics == last["metrics"]
    if name in ("fedex", "flora"):   # the changed base weights matter: without them, other logits
        plain = peft.PeftModel.from_pretrained(
            fresh_classifier(bert_dir), str(run_dir / "adapter"))
        assert not torch.allclose(glue_logits(plain, bert_run["tokenizer"], bert_run["dev"]),
                                  logits, rtol=1e-5, atol=1e-6)


def test_a_finished_run_loads_in_a_fresh_process(bert_run):
    """What the README shows: train.load_global(run_dir) in a new Python process, with nothing
    but the run folder, gives the logits of the in-memory global model, for every aggregator;
    the adapter names its base portably (what --model said, never a resolved local path)."""
    script = (
        "import sys, json, torch, train\n"
        "from harness import tasks\n"
        "dev = tasks.load_glue('sst2', sys.argv[2], 'dev')\n"
        "out = {}\n"
        "for name in sys.argv[3].split(','):\n"
        "    model, tok = train.load_global(f'{sys.argv[1]}/{name}')\n"
        "    batch = tasks.collate_glue(tok, dev, 16); batch.pop('labels')\n"
        "    with torch.no_grad():\n"
        "        out[name] = model(**batch).logits.tolist()\n"
        "print(json.dumps(out))\n")
    args = bert_run["args"]
    proc = subprocess.run([sys.executable, "-c", script, str(bert_run["out"]), args.data_dir,
                           ",".join(fl.AGGREGATORS)], cwd=HERE, capture_output=True, text=True,
                          timeout=300, check=True)
    logits = json.loads(proc.stdout.splitlines()[-1])
    for name in fl.AGGREGATORS:
        torch.testing.assert_close(torch.tensor(logits[name]), bert_run["logits"][name],
                                   rtol=1e-5, atol=1e-5)
        config = json.loads((bert_run["out"] / name / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == args.model


def test_the_offline_models_are_named_by_their_hub_ids():
    from harness import models
    assert models.hub_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert models.hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.hub_id("roberta-large") == "roberta-large"


def test_the_adapter_is_complete_after_a_kill_during_its_save(tmp_path, monkeypatch, bert_dir,
                                                              glue_dir):
    """A kill while round 2's adapter is being written leaves round 1's complete adapter in
    place (the link is switched only after the new folder is whole), and --resume finishes."""
    out = tmp_path / "run"
    save, calls = peft.PeftModel.save_pretrained, []

    def dies_midway(self, path, *a, **k):
        calls.append(path)
        save(self, path, *a, **k)
        if len(calls) == 2:                     # round 2: the new folder is written, then...
            os.remove(os.path.join(path, "adapter_config.json"))   # ...half of it is lost
            raise Killed
    monkeypatch.setattr(peft.PeftModel, "save_pretrained", dies_midway)
    with pytest.raises(Killed):
        train.main(bert_args(out, bert_dir, glue_dir, rounds=3))
    adapter = out / "fedit" / "adapter"
    assert os.path.islink(adapter) and os.readlink(adapter) == "adapter-round1"
    assert {f.name for f in adapter.iterdir()} >= {"adapter_config.json",
                                                   "adapter_model.safetensors"}
    monkeypatch.setattr(peft.PeftModel, "save_pretrained", save)
    train.main(bert_args(out, bert_dir, glue_dir, rounds=3, resume=True))
    assert os.readlink(adapter) == "adapter-round3"
    assert sorted(p.name for p in (out / "fedit").iterdir() if "adapter" in p.name) == [
        "adapter", "adapter-round3"]


def toy(A, B, p, **_):
    """An aggregator no other file has heard of: the unweighted mean of A and of B."""
    A_mean, B_mean = torch.stack(A).mean(0), torch.stack(B).mean(0)
    return fl.Aggregate(A_mean, B_mean, None, sum(x.numel() * 4 for x in (*A, *B)),
                        len(A) * (A_mean.numel() + B_mean.numel()) * 4)


def test_a_new_aggregator_is_one_function_and_one_registry_entry(tmp_path, monkeypatch,
                                                                 bert_dir, glue_dir):
    """Register a toy aggregator, and nothing else: it trains end to end through train.py,
    `--aggregator all` includes it, and the report tables it by its display name."""
    from evidence import report
    monkeypatch.setitem(fl.AGGREGATORS, "toy", fl.Aggregator(toy, "Toy (unweighted mean)"))
    args = bert_args(tmp_path / "results" / "runs" / "glue" / "sst2_seed0", bert_dir, glue_dir,
                     aggregator="all", rounds=1)
    assert train.check_args(args)[-1] == "toy"
    log = train.main(args)
    rows = [r for r in log if r["aggregator"] == "toy"]
    assert len(rows) == 1 and 0 <= rows[0]["metrics"]["accuracy"] <= 1
    assert rows[0]["divergence"]["relative_mean"]["aggregate"] > 0
    md = report.build_report(str(tmp_path / "results"), str(tmp_path), method="toy",
                             baseline="fedit").body
    toy_rows = [line for line in md.splitlines()               # the method is set in bold
                if line.startswith("| **Toy (unweighted mean)** |")]
    assert toy_rows, md
    assert f"{rows[0]['metrics']['accuracy']:.3f}" in toy_rows[0]


def test_bert_trains_its_pooler_with_the_classifier(tmp_path, bert_dir, glue_dir):
    """BERT's pooler (dense + tanh) is what RoBERTa keeps inside `classifier`: by default it is
    trained in full and averaged with the classifier; --head-modules none leaves it frozen."""
    def head_modules(**kw):
        args = bert_args(tmp_path / "run", bert_dir, glue_dir, **kw)
        model, _ = train.model_loader(args, torch.device("cpu"))()
        return {n.split(".modules_to_save")[0].removeprefix("base_model.model.")
                for n in fl.head_state(model)}
    assert head_modules() == {"bert.pooler", "classifier"}
    assert head_modules(head_modules="none") == {"classifier"}


def test_track_solvers_records_both_solvers_never_worse_than_fedit(tmp_path, bert_dir, glue_dir):
    """--track-solvers (the divergence study): every round and layer also gets the divergence
    FLoRA-NA's ALS and AdamW solvers reach on that round's uploads, at most FedIT's."""
    log = train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, track_solvers=True))
    assert len(log) == 2
    for row in log:
        for layer in row["divergence"]["relative_per_layer"].values():
            assert set(layer) == {"naive", "aggregate", "bound", *federation.TRACKED_VARIANTS}
            for solver in ("solver_als", "solver_adamw"):               # per layer, data-weighted
                assert layer["bound"] - 1e-9 <= layer[solver] <= layer["naive"] + 1e-9


# ---------------------------------------------------------------------------------------------
# FedIT with one client is centralised training, step for step
# ---------------------------------------------------------------------------------------------


def test_fedit_one_client_equals_centralised_training(tmp_path, bert_dir, glue_dir):
    """clients=1: FedIT's average is the identity, so R rounds of S local steps must equal
    R calls of local_train on the same batches with the same dropout seeds, bit for bit."""
    args = bert_args(tmp_path / "run", bert_dir, glue_dir, clients=1, rounds=3, local_steps=3,
                     lora_dropout=0.1)
    log = train.main(args)
    state = load_state(tmp_path / "run" / "fedit")

    model, tokenizer = train.model_loader(args, torch.device("cpu"))()
    task, data = train.load_data(args)
    make_batch = task.batcher(tokenizer, data.train, args.max_length)
    everything = list(range(len(data.train)))
    losses = []
    for rnd in range(args.rounds):
        torch.manual_seed(train._seed(args.seed, rnd, 0, 1))      # train.py's dropout seed
        batches = train.client_batches(make_batch, everything, local_steps=args.local_steps,
                                       batch_size=args.batch_size, seed=args.seed, round_=rnd,
                                       u=0)
        losses.append(fl.local_train(model, batches, lr=args.lr, optimizer=args.optimizer))
    assert [r["train_loss"] for r in log] == losses
    assert tensors_equal(state["factors"], fl.read_factors(model))
    assert tensors_equal(state["head"], fl.head_state(model))
    # and the factors really moved (B starts at zero), so the comparison is not vacuous
    assert all(B.abs().max() > 0 for _, B in state["factors"].values())


# ---------------------------------------------------------------------------------------------
# Resume: a run killed mid-round and resumed equals an uninterrupted one
# ---------------------------------------------------------------------------------------------

RESUMED = ("fedit", "flora", "fedsa", "rolora", "fedsb")   # plain factors; base weights changed;
#   per-client state; the factor trained alternating by round; frozen factors set once (core)


class Killed(Exception):
    """Stands in for SIGKILL in the middle of a round."""


def resume_args(out: Path, bert_dir: Path, glue_dir: Path, **kw) -> train.Args:
    """3 rounds, 2 of 3 clients per round (so FedSA's per-client B matter), eval every 2."""
    return bert_args(out, bert_dir, glue_dir, aggregator=",".join(RESUMED), rounds=3,
                     participation=0.67, eval_every=2, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, bert_dir, glue_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    train.main(resume_args(out, bert_dir, glue_dir))
    return out


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def run_killed_in_round_2(monkeypatch, run, killed_in: str | None = None) -> None:
    """Run `run()` and kill it in the server step of round 2 of aggregator `killed_in` (of
    the first aggregator to reach round 2 if None), after round 1's state was written."""
    calls, server_step = [], federation.server_step

    def dies_in_round_2(uploads, p, aggregator, *args, **kw):
        calls.append(aggregator)
        if aggregator == (killed_in or aggregator) and calls.count(aggregator) == 2:
            raise Killed
        return server_step(uploads, p, aggregator, *args, **kw)

    monkeypatch.setattr(federation, "server_step", dies_in_round_2)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(federation, "server_step", server_step)


@pytest.mark.parametrize("killed_in", RESUMED)
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, bert_dir, glue_dir,
                                            uninterrupted, killed_in):
    """Kill the run inside round 2 of one aggregator (after round 1's state was written),
    then --resume: metrics.jsonl (but timings) and every saved tensor are identical."""
    out = tmp_path / "run"
    args = resume_args(out, bert_dir, glue_dir)
    run_killed_in_round_2(monkeypatch, lambda: train.main(args), killed_in)
    assert load_state(out / killed_in)["round"] == 1
    done = RESUMED[:RESUMED.index(killed_in)]
    assert [(r["aggregator"], r["round"]) for r in rows_of(out)] == [
        (a, t) for a in done for t in (1, 2, 3)] + [(killed_in, 1)]

    log = train.main(resume_args(out, bert_dir, glue_dir, resume=True))
    expected = rows_of(uninterrupted)
    assert without_timing(rows_of(out)) == without_timing(expected) == without_timing(log)
    assert [r["metrics"] is None for r in expected] == [True, False, False] * len(RESUMED)
    for name in RESUMED:
        assert tensors_equal(adapter_tensors(out / name), adapter_tensors(uninterrupted / name))
        a, b = load_state(out / name), load_state(uninterrupted / name)
        for key in ("round", "factors", "head", "base", "client_B", "client_head", "bytes_up",
                    "bytes_down", "core"):
            assert tensors_equal(a.get(key), b.get(key)), (name, key)
    assert load_state(out / "fedsa")["client_B"] is not None
    assert load_state(out / "fedsa")["client_head"] is not None
    assert load_state(out / "flora")["base"]
    starts = [json.loads(line) for line in open(out / "provenance.jsonl")]
    assert len(starts) == 2 and all(s["git_commit"] == provenance.git_commit()[0] for s in starts)


def test_resume_of_a_finished_run_changes_nothing(bert_dir, glue_dir, uninterrupted):
    rows = rows_of(uninterrupted)
    saved = {name: adapter_tensors(uninterrupted / name) for name in RESUMED}
    train.main(resume_args(uninterrupted, bert_dir, glue_dir, resume=True))
    assert rows_of(uninterrupted) == rows          # timings too: no round was run again
    for name in RESUMED:
        assert tensors_equal(adapter_tensors(uninterrupted / name), saved[name])


# ---------------------------------------------------------------------------------------------
# Personalised aggregators: FedSA-LoRA's private head, and how personalised models are scored
# ---------------------------------------------------------------------------------------------


def spy_on_clients(monkeypatch) -> list[dict]:
    """Record every client_update: its round, client, number of examples, the head it started
    from and the head it sent."""
    calls, client_update = [], train.client_update

    def spy(model, make_batch, idx, *, head, round_, u, **kw):
        factors, sent, loss = client_update(model, make_batch, idx, head=head, round_=round_,
                                            u=u, **kw)
        calls.append({"round": round_, "u": u, "n": len(idx), "start": head, "sent": sent})
        return factors, sent, loss

    monkeypatch.setattr(train, "client_update", spy)
    return calls


def test_fedsa_keeps_each_clients_head_and_the_global_head_is_their_mean(
        tmp_path, monkeypatch, bert_dir, glue_dir):
    """FedSA-LoRA as its paper defines it: each client trains from the head it kept (one that
    has not trained yet from the first round's global head), clients with different data end
    with different heads, and the global model (evaluation, saved adapter) holds the
    data-weighted mean of the heads of the round's clients (float64 oracle)."""
    calls = spy_on_clients(monkeypatch)
    out = tmp_path / "run"
    train.main(bert_args(out, bert_dir, glue_dir, aggregator="fedsa", rounds=3,
                         participation=0.67))
    state = load_state(out / "fedsa")

    def mean_head(rnd: int) -> dict:          # sum_u n_u h_u / sum_u n_u over round rnd's clients
        mine = [c for c in calls if c["round"] == rnd]
        total = sum(c["n"] for c in mine)
        return {k: sum(c["n"] * c["sent"][k].double() for c in mine) / total
                for k in mine[0]["sent"]}

    assert [(c["round"], c["u"]) for c in calls] == [(0, 0), (0, 2), (1, 1), (1, 2), (2, 0), (2, 2)]
    kept = {}
    for c in calls:
        if c["round"] == 0:                               # everyone starts from the model's head
            assert tensors_equal(c["start"], calls[0]["start"])
        elif c["u"] in kept:                              # the head it sent last time
            assert tensors_equal(c["start"], kept[c["u"]])
        else:                                             # client 1 in round 2: round 1's mean
            torch.testing.assert_close(c["start"], {k: v.float() for k, v in mean_head(0).items()},
                                       rtol=1e-6, atol=1e-7)
        kept[c["u"]] = c["sent"]
    assert tensors_equal(state["client_head"], [kept[u] for u in range(3)])
    assert not torch.equal(kept[0]["base_model.model.classifier.modules_to_save.default.weight"],
                           kept[2]["base_model.model.classifier.modules_to_save.default.weight"])
    expected = {k: v.float() for k, v in mean_head(2).items()}
    torch.testing.assert_close(state["head"], expected, rtol=1e-6, atol=1e-7)
    saved = adapter_tensors(out / "fedsa")                # the global model's head
    assert tensors_equal({k.replace("modules_to_save.default.", ""): v
                          for k, v in state["head"].items()},
                         {k: v for k, v in saved.items() if "lora_" not in k})


def test_head_sharing_averaged_is_fedsa_with_a_shared_head_exactly(tmp_path, monkeypatch,
                                                                  bert_dir, glue_dir):
    """--head-sharing averaged is FedSA-LoRA as it ran before its head stayed on the clients:
    bit for bit the run of a registry entry without private_head, in which every client
    starts each round from the global head; keeping the head private changes the run."""
    kw = dict(aggregator="fedsa", rounds=3, participation=0.67)
    calls = spy_on_clients(monkeypatch)
    train.main(bert_args(tmp_path / "averaged", bert_dir, glue_dir, head_sharing="averaged", **kw))
    for rnd in range(3):
        starts = [c["start"] for c in calls if c["round"] == rnd]
        assert len(starts) == 2 and tensors_equal(starts[0], starts[1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fl.AGGREGATORS, "fedsa",
                   dataclasses.replace(fl.AGGREGATORS["fedsa"], private_head=False))
        train.main(bert_args(tmp_path / "shared", bert_dir, glue_dir, **kw))
    train.main(bert_args(tmp_path / "private", bert_dir, glue_dir, **kw))
    averaged, shared, private = (tmp_path / d for d in ("averaged", "shared", "private"))
    assert without_timing(rows_of(averaged)) == without_timing(rows_of(shared))
    assert tensors_equal(adapter_tensors(averaged / "fedsa"), adapter_tensors(shared / "fedsa"))
    a, b = load_state(averaged / "fedsa"), load_state(shared / "fedsa")
    assert a["client_head"] is None and b["client_head"] is None
    for key in ("factors", "head", "client_B"):
        assert tensors_equal(a[key], b[key]), key
    assert [r["train_loss"] for r in rows_of(private)][1:] != [
        r["train_loss"] for r in rows_of(averaged)][1:]
    assert not tensors_equal(adapter_tensors(private / "fedsa"), adapter_tensors(averaged / "fedsa"))


def score(factors: dict, head: dict) -> float:
    """A stand-in dev metric that tells two models apart: the sum of their B factors and head
    (A, shared by all clients, left out)."""
    return (sum(B.double().sum().item() for _, B in factors.values())
            + sum(v.double().sum().item() for v in head.values()))


def score_metric(task, model, tokenizer, data, **options) -> dict:
    """train.evaluate's stand-in: {"score": score of the model as it stands}."""
    return {"score": score(fl.read_factors(model), fl.head_state(model))}


@pytest.mark.parametrize("personal_eval, weighting, head_sharing", [
    ("clients", "uniform", "registry"), ("clients", "data", "registry"),
    ("clients", "data", "averaged"), ("global", "uniform", "registry")])
def test_each_personal_evaluation_protocol_computes_what_it_says(
        tmp_path, monkeypatch, bert_dir, glue_dir, personal_eval, weighting, head_sharing):
    """--personal-eval clients scores each client's own model (its B with the shared A, its
    own head or, with --head-sharing averaged, the global one): personal_metrics is their
    unweighted mean or their mean weighted by n_u, as computed here from state.pt; global
    records no personal_metrics. The global model's score uses the averaged head."""
    monkeypatch.setattr(train, "evaluate", score_metric)
    args = bert_args(tmp_path / "run", bert_dir, glue_dir, aggregator="fedsa",
                     personal_eval=personal_eval, personal_weighting=weighting,
                     head_sharing=head_sharing)
    log = train.main(args)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["personal_eval"], config["personal_weighting"], config["head_sharing"]) == (
        personal_eval, weighting, head_sharing)
    state, last = load_state(tmp_path / "run" / "fedsa"), log[-1]
    assert last["metrics"] == {"score": score(state["factors"], state["head"])}
    if personal_eval == "global":
        assert all("personal_metrics" not in r for r in log)
        return
    _, data = train.load_data(args)
    n_u = [len(ix) for ix in federation.partition(data.labels, 3, 0.5, 0, min_size=1)]
    heads = state["client_head"] or [state["head"]] * 3
    assert (state["client_head"] is None) == (head_sharing == "averaged")
    scores = [score({n: (A, state["client_B"][u][n]) for n, (A, _) in state["factors"].items()},
                    heads[u]) for u in range(3)]
    uniform = sum(scores) / 3
    by_data = sum(n * s for n, s in zip(n_u, scores)) / sum(n_u)
    assert abs(uniform - by_data) > 1e-6                 # the two weightings differ here
    expected = uniform if weighting == "uniform" else by_data
    assert last["personal_metrics"]["score"] == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Partitioning data across clients, and who takes part in a round
# ---------------------------------------------------------------------------------------------

ALPHAS = [None, 0.05, 0.5, 5.0, 100.0]


def check_partition(parts, n: int, n_clients: int, min_size: int) -> None:
    """Every example in exactly one client, each client's indices sorted, min_size each."""
    assert len(parts) == n_clients
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    assert all(part == sorted(part) for part in parts)
    assert min(map(len, parts)) >= min_size


@given(st.data(), st.integers(1, 8), st.sampled_from(ALPHAS), st.integers(0, 2**31),
       st.integers(1, 3))
def test_partition_puts_every_example_in_exactly_one_client(data, n_clients, alpha, seed,
                                                            min_size):
    labels = data.draw(st.lists(st.integers(0, 3), min_size=n_clients * min_size, max_size=60))
    try:
        parts = federation.partition(labels, n_clients, alpha, seed, min_size=min_size)
    except ValueError as err:                     # a too-skewed Dirichlet may give up, loudly
        assert alpha is not None and "100 draws" in str(err)
        return
    check_partition(parts, len(labels), n_clients, min_size)
    assert parts == federation.partition(labels, n_clients, alpha, seed, min_size=min_size)
    if alpha is None:                                # IID: an even split
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@given(st.data(), st.integers(1, 6), st.sampled_from(ALPHAS), st.integers(0, 2**31))
def test_partition_of_float_labels(data, n_clients, alpha, seed):
    """STS-B scores (floats in [0, 5], possibly all equal) are binned, then split."""
    labels = data.draw(st.lists(st.floats(0, 5, allow_nan=False), min_size=n_clients,
                                max_size=50))
    try:
        parts = federation.partition(labels, n_clients, alpha, seed)
    except ValueError as err:
        assert alpha is not None and "100 draws" in str(err)
        return
    check_partition(parts, len(labels), n_clients, 1)


def purity(group: list[bool], parts) -> float:
    """Fraction of examples in their client's majority group: 1 when no client mixes groups,
    about 0.5-0.6 for a random split into two."""
    return sum(max(sum(group[i] for i in part), sum(not group[i] for i in part))
               for part in parts) / len(group)


def mean_purity(group: list[bool], partitions) -> float:
    partitions = list(partitions)
    return sum(purity(group, parts) for parts in partitions) / len(partitions)


# ten distinct small values, then ten distinct large ones: two bins, or twenty classes
SHORT, LONG = [20 + i for i in range(10)], [200 + i for i in range(10)]
IS_LONG = [False] * 10 + [True] * 10


def test_float_labels_are_binned_before_the_dirichlet_split():
    """With a tiny alpha a label bin goes (nearly) whole to one client, and min_size=1 with
    2 clients forces the two bins apart: clients are nearly pure. Twenty distinct classes
    instead would be scattered at random (purity ~0.6)."""
    scores = [n / 50 for n in SHORT + LONG]                     # STS-B-like, 0.4 .. 4.2
    assert mean_purity(IS_LONG, (federation.partition(scores, 2, 0.01, s) for s in range(10))) > 0.85
    as_classes = [int(n) for n in SHORT + LONG]
    assert mean_purity(IS_LONG, (federation.partition(as_classes, 2, 0.01, s) for s in range(10))) < 0.7


def mean_tv(labels: list[int], parts) -> float:
    """Mean total-variation distance of client label distributions from the global one."""
    y = torch.tensor(labels)
    glob = torch.bincount(y, minlength=4).double() / len(y)
    tv = [0.5 * (torch.bincount(y[part], minlength=4).double() / len(part) - glob).abs().sum()
          for part in parts]
    return float(sum(tv) / len(tv))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = [i % 4 for i in range(400)]
    skew = {alpha: sum(mean_tv(labels, federation.partition(labels, 10, alpha, seed))
                       for seed in range(10)) / 10
            for alpha in (None, 100.0, 1.0, 0.1)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.4 and skew[100.0] < 0.15 and skew[None] < 0.15


def test_tiny_alpha_is_at_least_as_skewed():
    """Smaller alpha, more skew, down to the pathological end people use for "one class per
    client" (1e-3, 1e-4): the Dirichlet draw must not underflow into an even (IID) share."""
    labels = [i % 4 for i in range(400)]
    skew = {alpha: sum(mean_tv(labels, federation.partition(labels, 2, alpha, seed))
                       for seed in range(10)) / 10
            for alpha in (1e-2, 1e-3, 1e-4)}
    assert skew[1e-3] >= skew[1e-2] - 0.02 and skew[1e-4] >= skew[1e-3] - 0.02, skew


@pytest.mark.parametrize("alpha", [None, 0.3, 10.0])
def test_partition_min_size(alpha):
    labels = [i % 3 for i in range(60)]
    for seed in range(5):
        check_partition(federation.partition(labels, 4, alpha, seed, min_size=10), 60, 4, 10)


@pytest.mark.parametrize("labels, n_clients, alpha, min_size, match", [
    ([0, 1, 0], 0, None, 1, "at least one client"),
    ([0, 1, 0], 4, None, 1, "3 examples cannot give 4 clients 1 each"),
    ([0, 1, 0, 1], 2, 0.5, 3, "4 examples cannot give 2 clients 3 each"),
    ([0, 1, 0, 1], 2, 0.0, 1, "alpha must be > 0, got 0.0"),
    ([0, 1, 0, 1], 2, -1.0, 1, "alpha must be > 0, got -1.0"),
    ([0] * 16, 4, 0.01, 4, "fewer than 4 examples in 100 draws"),   # needs ~even shares
])
def test_partition_bad_input(labels, n_clients, alpha, min_size, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        federation.partition(labels, n_clients, alpha, 0, min_size=min_size)


@given(st.integers(1, 50), st.floats(0.01, 1.0), st.integers(0, 1000), st.integers(0, 2**31))
def test_participants(n_clients, fraction, round_, seed):
    chosen = federation.participants(n_clients, fraction, round_, seed)
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(range(n_clients))
    assert len(chosen) == max(1, round(fraction * n_clients))
    assert chosen == federation.participants(n_clients, fraction, round_, seed)


def test_participants_change_between_rounds_and_check_the_fraction():
    assert len({tuple(federation.participants(20, 0.25, t, 0)) for t in range(10)}) > 1
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="participation must be in"):
            federation.participants(10, bad, 0, 0)


@pytest.mark.parametrize("task", ["gsm8k", "mbpp"])
def test_generation_tasks_split_on_answer_length_bins(tmp_path, monkeypatch, task):
    """--dirichlet-alpha is documented as over "answer length bins for GSM8K/MBPP": as for
    STS-B scores, answers of distinct lengths fall into a few length bins before the split,
    so with a tiny alpha each of two clients gets one length group (short or long)."""
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    (root / "mbpp").mkdir()
    gsm = [{"question": "q", "answer": "x" * (n - 5) + " #### 1"} for n in SHORT + LONG]
    for split in ("train", "test"):
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    rows = [{**mbpp_row(601 + i, 1), "code": "y" * n} for i, n in enumerate(SHORT + LONG)]
    rows += [mbpp_row(11, 1)]
    (root / "mbpp" / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    parts, partition = [], federation.partition

    class Stop(Exception):
        pass

    def spy(*a, **k):                         # record main's own partition, then stop
        parts.append(partition(*a, **k))
        raise Stop

    monkeypatch.setattr(federation, "partition", spy)
    for seed in range(10):
        args = train.Args(task=task, data_dir=str(root), clients=2, dirichlet_alpha=0.01,
                          seed=seed, out=str(tmp_path / "out"))
        with pytest.raises(Stop):
            train.main(args)
    assert len(parts) == 10
    assert mean_purity(IS_LONG, parts) > 0.85


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any training
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if a client starts training: every error below must come before."""
    def trains(*a, **k):
        raise AssertionError("training started before the bad input was reported")
    monkeypatch.setattr(fl, "local_train", trains)


BAD = {  # name: (Args changes, exception, message pattern); {tmp} is the test's tmp_path
    "unknown task": (dict(task="sst3"), ValueError, "unknown task 'sst3'; choose from"),
    "unknown aggregator": (dict(aggregator="fedit,fedavg"), ValueError,
                           r"unknown aggregator\(s\) \['fedavg'\]; choose from fedit"),
    "no aggregator": (dict(aggregator=" , "), ValueError, "unknown aggregator"),
    "missing data dir": (dict(data_dir="{tmp}/nowhere"), FileNotFoundError,
                         "--data-dir '{tmp}/nowhere' is not a folder"),
    "missing train file": (dict(data_dir="{tmp}"), FileNotFoundError,
                           "expected the file {tmp}/SST-2/train.tsv"),
    "missing target modules": (dict(target_modules="foo"), ValueError,
                               r"no Linear modules named \['foo'\]"),
    "missing head module": (dict(head_modules="poolr"), ValueError,
                            r"no module named \['poolr'\] to train in full"),
    "rank too large": (dict(rank=33), ValueError, "LoRA rank 33 must be in 1..32"),
    "rank zero": (dict(rank=0), ValueError, "--rank must be >= 1, got 0"),
    "no clients": (dict(clients=0), ValueError, "--clients must be >= 1, got 0"),
    "no rounds": (dict(rounds=0), ValueError, "--rounds must be >= 1, got 0"),
    "more clients than examples": (dict(clients=41), ValueError,
                                   "41 clients but only 40 training examples"),
    "capped below the clients": (dict(clients=5, max_train_examples=4), ValueError,
                                 "5 clients but only 4 training examples"),
    "negative alpha": (dict(dirichlet_alpha=-0.5), ValueError,
                       "--dirichlet-alpha must be finite and >= 0"),
    "nan alpha": (dict(dirichlet_alpha=float("nan")), ValueError, "--dirichlet-alpha must be finite"),
    "nan lr": (dict(lr=float("nan")), ValueError, "--lr must be finite and > 0, got nan"),
    "inf lr": (dict(lr=float("inf")), ValueError, "--lr must be finite and > 0, got inf"),
    "zero lr": (dict(lr=0.0), ValueError, "--lr must be finite and > 0, got 0.0"),
    "nan solver lr": (dict(agg_option=["flora_na.lr=nan"]), ValueError,
                      "--agg-option flora_na.lr expected a finite float, got nan"),
    "zero lora alpha": (dict(lora_alpha=0.0), ValueError, "--lora-alpha must be finite and > 0"),
    "dropout 1": (dict(lora_dropout=1.0), ValueError, r"--lora-dropout must be in \[0, 1\)"),
    "negative train cap": (dict(max_train_examples=-5), ValueError,
                           "--max-train-examples must be >= 1, got -5"),
    "zero eval cap": (dict(max_eval_examples=0), ValueError,
                      "--max-eval-examples must be >= 1, got 0"),
    "max length 1": (dict(max_length=1), ValueError, "--max-length must be >= 8, got 1"),
    "eval batch 0": (dict(eval_batch_size=0), ValueError, "--eval-batch-size must be >= 1, got 0"),
    "no new tokens": (dict(max_new_tokens=0), ValueError, "--max-new-tokens must be >= 1"),
    "no solver steps": (dict(agg_option=["flora_na.steps=0"]), ValueError,
                        "--agg-option flora_na.steps must be >= 1, got 0"),
    "negative solver decay": (dict(agg_option=["flora_na.weight_decay=-0.1"]), ValueError,
                              "--agg-option flora_na.weight_decay must be >= 0, got -0.1"),
    "zero solver prox": (dict(agg_option=["flora_na.prox=0"]), ValueError,
                         "--agg-option flora_na.prox must be > 0, got 0.0"),
    "solver path": (dict(agg_option=["flora_na.path=dense"]), ValueError,
                    "--agg-option flora_na.path must be auto or gram or matrix_free, got 'dense'"),
    "solver": (dict(agg_option=["flora_na.solver=lbfgs"]), ValueError,
               "--agg-option flora_na.solver must be als or adamw, got 'lbfgs'"),
    "bool option": (dict(agg_option=["flora_na.tie_layers=maybe"]), ValueError,
                    "--agg-option flora_na.tie_layers expected a bool, got 'maybe'"),
    "unknown option": (dict(agg_option=["flora_na.target=uniform"]), ValueError,
                       "--agg-option 'flora_na.target=uniform': flora_na has no option 'target'"),
    "server option": (dict(agg_option=["fedit.rank=4"]), ValueError,
                      "fedit has no option 'rank'"),
    "unknown aggregator option": (dict(agg_option=["nope.x=1"]), ValueError,
                                  "unknown aggregator 'nope'"),
    "option without a dot": (dict(agg_option=["steps=3"]), ValueError, "write NAME.OPTION=VALUE"),
    "missing plug-in": (dict(plugins=["no_such_plugin"]), ValueError,
                        "--plugins no_such_plugin: cannot import it"),
    "authors' tying needs one shape": (
        dict(aggregator="flora_na_authors", plugins=["evidence.authors_variant"],
             target_modules="query,dense"), ValueError,
        r"ties one \(P, Q\) across all LoRA layers, but this model's come in 3 shapes"),
    "negative threads": (dict(threads=-1), ValueError, "--threads must be >= 0, got -1"),
    "unknown device": (dict(device="tpu0"), ValueError, "--device 'tpu0' is not a device name"),
    "absent cuda device": (dict(device="cuda:99"), ValueError, "--device cuda:99: "),
    "out is a file": (dict(out="{tmp}/file.txt"), ValueError, "--out '{tmp}/file.txt' is a file"),
    "out not writable": (dict(out="/proc/sys/flora-run"), ValueError,
                         "--out '/proc/sys/flora-run': cannot write in /proc/sys"),
    "participation": (dict(participation=1.5), ValueError, r"--participation must be in \(0, 1\]"),
    "optimizer": (dict(optimizer="adam"), ValueError, r"optimizer\b.*'adam'"),
    "head sharing": (dict(head_sharing="private"), ValueError,
                     "--head-sharing must be registry or averaged, got 'private'"),
    "personal eval": (dict(personal_eval="each"), ValueError,
                      "--personal-eval must be clients or global, got 'each'"),
    "personal weighting": (dict(personal_weighting="weighted"), ValueError,
                           "--personal-weighting must be uniform or data, got 'weighted'"),
    "missing model": (dict(model="{tmp}/no-model"), SystemExit,
                      "error: could not load model '{tmp}/no-model'"),
}


def fill(value, **paths):
    return value.format(**paths) if isinstance(value, str) else value


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_training(tmp_path, no_training, bert_dir, glue_dir, case):
    """Each bad value is a clear error before training, and nothing is written: a corrected
    rerun into the same --out needs no --resume."""
    changes, error, pattern = BAD[case]
    changes = {k: fill(v, tmp=tmp_path) for k, v in changes.items()}
    (tmp_path / "file.txt").write_text("not a folder")
    args = bert_args(changes.pop("out", tmp_path / "run"), bert_dir, glue_dir, **changes)
    with pytest.raises(error, match=fill(pattern, tmp=re.escape(str(tmp_path)))):
        train.main(args)
    assert not (tmp_path / "run").exists()


GLUE_HEADER = "sentence\tlabel\n"
BAD_FILES = {  # name: (train.tsv bytes, message pattern naming the file and, where one, the line)
    "empty": (b"", "train.tsv is empty"),
    "header only": (GLUE_HEADER.encode(), "train.tsv has a header but no data rows"),
    "wrong columns": (b"text\tpolarity\ngood \t1\n",
                      r"train.tsv, line 1: the header has columns \['text', 'polarity'\]"),
    "not utf-8": (GLUE_HEADER.encode() + b"good \t1\n\xff\xfe\x00bad\t0\n",
                  "train.tsv, line 3: not UTF-8 text"),
    "bad label": ((GLUE_HEADER + "good \t1\nbad \tmaybe\n").encode(),
                  "train.tsv, line 3: bad label 'maybe'"),
    "no row fits the header": (GLUE_HEADER.encode() + b"just one field\n",
                               "train.tsv: no row has the header's 2 tab-separated fields"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_is_named_before_anything_is_written(tmp_path, no_training, bert_dir,
                                                           glue_dir, case):
    content, pattern = BAD_FILES[case]
    shutil.copytree(glue_dir, tmp_path / "data")
    (tmp_path / "data" / "glue_data" / "SST-2" / "train.tsv").write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        train.main(bert_args(tmp_path / "run", bert_dir, tmp_path / "data"))
    assert not (tmp_path / "run").exists()


def test_header_only_dev_file_is_an_error_not_a_nan_metric(tmp_path, no_training, bert_dir,
                                                           glue_dir):
    shutil.copytree(glue_dir, tmp_path / "data")
    (tmp_path / "data" / "glue_data" / "SST-2" / "dev.tsv").write_text(GLUE_HEADER)
    with pytest.raises(ValueError, match="dev.tsv has a header but no data rows"):
        train.main(bert_args(tmp_path / "run", bert_dir, tmp_path / "data"))


@pytest.mark.parametrize("line, pattern", [("{not json", "line 2: not a JSON object"),
                                           ('{"question": "q"}', "line 2: expected a JSON object "
                                                                 "with keys")])
def test_bad_jsonl_line_is_named(tmp_path, no_training, llama_dir, gen_dir, line, pattern):
    shutil.copytree(gen_dir, tmp_path / "data")
    path = tmp_path / "data" / "gsm8k" / "train.jsonl"
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n" + line + "\n")
    args = train.Args(task="gsm8k", model=str(llama_dir), data_dir=str(tmp_path / "data"),
                      out=str(tmp_path / "run"), clients=1)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ", " + pattern):
        train.main(args)
    assert not (tmp_path / "run").exists()


def test_mbpp_without_a_sandbox_refuses_before_training_unless_allowed(tmp_path, monkeypatch,
                                                                      no_training, llama_dir,
                                                                      gen_dir):
    """No bubblewrap: MBPP scoring would run model-written code unisolated, so the run stops
    before anything is written, naming what to install; --allow-unisolated-exec opts in."""
    from harness import sandbox
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    args = dict(task="mbpp", model=str(llama_dir), data_dir=str(gen_dir), clients=2,
                out=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="bubblewrap.*--allow-unisolated-exec"):
        train.main(train.Args(**args))
    assert not (tmp_path / "run").exists()
    with pytest.raises(AssertionError, match="training started"):   # past every check
        train.main(train.Args(**args, allow_unisolated_exec=True))


def test_a_diverging_client_stops_with_a_clear_error(tmp_path, bert_dir, glue_dir):
    """An lr that makes the loss non-finite stops the run at that step, naming the lr."""
    with pytest.raises(FloatingPointError, match=r"client training loss is (nan|inf) at local "
                                                 r"step \d+ \(lr 1e\+30"):
        train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, lr=1e30, optimizer="sgd",
                             rounds=3, local_steps=5))


def test_missing_dev_file_is_named(tmp_path, no_training, bert_dir):
    folder = tmp_path / "glue_data" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t0\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "dev.tsv"))):
        train.main(bert_args(tmp_path / "run", bert_dir, tmp_path, clients=2))


@pytest.mark.parametrize("task, missing", [("gsm8k", "gsm8k/test.jsonl"),
                                           ("mbpp", "mbpp/mbpp.jsonl")])
def test_missing_generation_file_is_named(tmp_path, no_training, llama_dir, gen_dir, task,
                                          missing):
    shutil.copytree(gen_dir, tmp_path / "data")
    (tmp_path / "data" / missing).unlink()
    args = train.Args(task=task, model=str(llama_dir), data_dir=str(tmp_path / "data"),
                      out=str(tmp_path / "run"), clients=2)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "data" / missing))):
        train.main(args)


def test_existing_run_dir_needs_resume(tmp_path, no_training, bert_dir, glue_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {k: v for k, v in vars(bert_args(tmp_path / "run", bert_dir, glue_dir)).items()
         if k not in ("resume", "device")}))
    with pytest.raises(FileExistsError, match="already holds a run: pass --resume"):
        train.main(bert_args(tmp_path / "run", bert_dir, glue_dir))
    with pytest.raises(ValueError, match=r"--resume with a different config.*'rounds': \(2, 5\)"):
        train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=5, resume=True))


def test_a_run_moved_to_another_machine_resumes(tmp_path, bert_dir, glue_dir):
    """config.json's facts hold this machine's model path; another machine's path (same
    arguments) must not block --resume, and the facts are rewritten for this machine."""
    train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=1))
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    here = config["facts"]["model"]["path"]
    config["facts"]["model"]["path"] = "/elsewhere/tiny-bert"
    config_path.write_text(json.dumps(config))
    train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=1, resume=True))
    assert json.loads(config_path.read_text())["facts"]["model"]["path"] == here


@pytest.mark.parametrize("case", ["missing target modules", "rank too large", "optimizer",
                                  "missing model"])
def test_bad_input_leaves_out_free_for_the_corrected_run(tmp_path, bert_dir, glue_dir, case):
    """A rejected command must not claim --out: rerunning it with the option fixed (same --out,
    no --resume) has to work, not fail with "already holds a run"."""
    changes = {k: fill(v, tmp=tmp_path) for k, v in BAD[case][0].items()}
    with pytest.raises(BAD[case][1]):
        train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=1, **changes))
    train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=1))
    assert [r["round"] for r in rows_of(tmp_path / "run")] == [1]


# ---------------------------------------------------------------------------------------------
# The real GLUE files, when present
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (DATA / "glue" / "SST-2" / "train.tsv").is_file(),
                    reason=f"no real GLUE SST-2 under {DATA}")
def test_load_task_from_the_real_glue_files():
    args = train.Args(task="sst2", data_dir=str(DATA), max_train_examples=64,
                      max_eval_examples=16)
    data = train.load_data(args)[1]
    assert len(data.train) == 64 and list(data.evals) == ["dev"] and len(data.evals["dev"]) == 16
    assert data.labels == [e.label for e in data.train] and set(data.labels) == {0, 1}
    assert all(e.text_a.strip() and e.text_b is None for e in data.train + data.evals["dev"])
    assert train.load_data(args)[1] == data                      # the cap is a seeded subset
    other = train.load_data(train.Args(task="sst2", data_dir=str(DATA), max_train_examples=64,
                                       max_eval_examples=16, seed=1))[1]
    assert other.train != data.train


# ---------------------------------------------------------------------------------------------
# The tiny Llama on GSM8K and MBPP, every aggregator
# ---------------------------------------------------------------------------------------------

# flora_na.py's own aggregators: plug-ins registered by other tests have tests of their own
OWN = [n for n, a in fl.AGGREGATORS.items() if a.aggregate.__module__ == "flora_na"]


@pytest.mark.parametrize("task, metric, n_train", [("gsm8k", "accuracy", 12),
                                                   ("mbpp", "pass@1", 12)])
def test_every_aggregator_on_generation_tasks(tmp_path, llama_dir, gen_dir, task, metric,
                                              n_train):
    args = train.Args(task=task, model=str(llama_dir), data_dir=str(gen_dir),
                      out=str(tmp_path / "run"), aggregator=",".join(OWN),
                      clients=2, rounds=2, local_steps=2, batch_size=2, rank=2, lr=5e-3,
                      max_length=64, eval_every=5, max_new_tokens=8, max_eval_examples=2,
                      agg_option=["flora_na.steps=20"], device="cpu", threads=1)
    data = train.load_data(args)[1]
    assert len(data.train) == n_train and len(data.evals["test"]) == 2
    if task == "mbpp":                       # the train and test splits by task id
        assert all(601 <= x["task_id"] <= 974 for x in data.train)
        assert all(11 <= x["task_id"] <= 510 for x in data.evals["test"])
    rows = train.main(args)
    assert rows == rows_of(tmp_path / "run")
    assert [(r["aggregator"], r["round"]) for r in rows] == [
        (a, t) for a in OWN for t in (1, 2)]
    for r in rows:
        assert finite(r["train_loss"]) and r["train_loss"] > 0
        assert all(finite(v) for v in r["divergence"]["relative_mean"].values())
        if r["round"] == 1:
            assert r["metrics"] is None                    # eval_every 5: only after the last
        else:
            assert r["metrics"]["n_eval"] == 2 and 0 <= r["metrics"][metric] <= 1
        if r["aggregator"] == "fedsa" and r["round"] == 2:
            assert 0 <= r["personal_metrics"][metric] <= 1
    for name in OWN:
        assert (tmp_path / "run" / name / "adapter" / "adapter_model.safetensors").is_file()


def test_generation_batches_train_on_the_target_only(tmp_path, llama_dir, gen_dir):
    """The causal-LM batches of client_batches: prompt tokens masked, the target and EOS kept."""
    args = train.Args(task="gsm8k", model=str(llama_dir), data_dir=str(gen_dir),
                      local_steps=2, batch_size=3, max_length=64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    data = train.load_data(args)[1]
    make_batch = train.get_task("gsm8k").batcher(tokenizer, data.train, args.max_length)
    batches = list(train.client_batches(make_batch, [0, 4, 7], local_steps=args.local_steps,
                                        batch_size=args.batch_size, seed=args.seed, round_=0,
                                        u=0))
    assert len(batches) == 2
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == (3, batch["labels"].shape[1])
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            kept = ids[labels != -100].tolist()
            assert kept and kept[-1] == tokenizer.eos_token_id
            assert "####" in tokenizer.decode(kept)
            assert (labels[mask == 0] == -100).all()


# ---------------------------------------------------------------------------------------------
# The command line, in a subprocess
# ---------------------------------------------------------------------------------------------


def run_train(*argv: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLORA_DATA"}
    return subprocess.run([sys.executable, str(HERE / "train.py"), *argv], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300, check=check)


def test_command_line_smoke(tmp_path, bert_dir, glue_dir):
    out = tmp_path / "run"
    proc = run_train("--task", "sst2", "--model", str(bert_dir), "--data-dir", str(glue_dir),
                     "--aggregator", "fedit,flora_na", "--clients", "2", "--rounds", "2",
                     "--local-steps", "1", "--batch-size", "4", "--rank", "2",
                     "--max-length", "16", "--eval-every", "1", "--threads", "1",
                     "--device", "cpu", "--agg-option", "flora_na.tie_layers=false", "--out", str(out),
                     check=True)
    rows = rows_of(out)
    assert [(r["aggregator"], r["round"]) for r in rows] == [
        ("fedit", 1), ("fedit", 2), ("flora_na", 1), ("flora_na", 2)]
    assert json.loads((out / "config.json").read_text())["clients"] == 2
    lines = [line for line in proc.stdout.splitlines() if " | round " in line]
    assert len(lines) == 4 and lines[0].startswith("fedit | round 1/2 | loss ")
    assert "accuracy" in lines[0] and "Traceback" not in proc.stderr


def field_docstrings(path: Path, cls: str) -> dict[str, str]:
    """{field: its one-line docstring} of a dataclass, read from the source as tyro does."""
    import ast
    body = next(n for n in ast.parse(path.read_text()).body
                if isinstance(n, ast.ClassDef) and n.name == cls).body
    return {a.target.id: d.value.value for a, d in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(d, ast.Expr)}


def test_command_line_help_and_errors(tmp_path):
    env = {**os.environ, "COLUMNS": "400"}                   # tyro wraps help to the terminal
    procs = {argv: subprocess.Popen([sys.executable, str(HERE / "train.py"), *argv], cwd=HERE,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for argv in [("--help",), ("--bogus",),
                          ("--aggregator", "fedavg", "--data-dir", str(tmp_path)),
                          ("--data-dir", str(tmp_path / "nowhere"))]}
    res = {argv: (p.wait(timeout=300), *p.communicate()) for argv, p in procs.items()}
    code, stdout, _ = res[("--help",)]
    assert code == 0
    docs = field_docstrings(HERE / "train.py", "Args")
    assert set(docs) == {f.name for f in dataclasses.fields(train.Args)}
    for name, doc in docs.items():                # every option, with its docstring as help
        flag = "--" + name.replace("_", "-")
        assert flag in stdout and doc in stdout, (flag, doc)
    assert "--no-resume" in stdout
    code, _, stderr = res[("--bogus",)]                       # tyro: a box naming the option
    assert code == 2 and "Traceback" not in stderr
    assert "Unrecognized options: --bogus" in stderr
    for argv, message in [(("--aggregator", "fedavg", "--data-dir", str(tmp_path)),
                           "error: unknown aggregator(s) ['fedavg']"),
                          (("--data-dir", str(tmp_path / "nowhere")),
                           f"error: --data-dir '{tmp_path / 'nowhere'}' is not a folder")]:
        code, stdout, stderr = res[argv]
        assert code == 1 and stdout == ""
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(message), stderr


def test_aggregator_options_parse_to_one_form(monkeypatch):
    """--agg-option values are parsed by the registry entry and written in one canonical form
    (sorted, defaults dropped), so a config.json compares on --resume whichever way they were
    written; each aggregator gets every option it declares."""
    monkeypatch.delenv("FLORA_DATA", raising=False)
    args = train.parse_args(["--agg-option", "flora_na.tie_layers=True", "flora_na.lr=1E-3",
                             "flora_na.solver=als", "lora_fair.fair_lambda=0.5"])
    assert args.agg_option == ["flora_na.lr=0.001", "flora_na.tie_layers=true",
                               "lora_fair.fair_lambda=0.5"]
    options = train.aggregator_options(args, "flora_na")
    assert options == {"solver": "als", "tie_layers": True, "steps": 200, "lr": 1e-3,
                       "weight_decay": 0.0, "max_iter": 200, "tol": 1e-12, "prox": 1e-6,
                       "path": "auto"}
    assert train.aggregator_options(args, "lora_fair") == {"fair_lambda": 0.5}
    assert train.aggregator_options(args, "fedit") == {}


def test_every_flora_na_option_reaches_the_aggregator(tmp_path, monkeypatch, bert_dir, glue_dir):
    """--agg-option's values, and the global factors the clients started from, arrive in the
    flora_na aggregator's call."""
    seen = {}
    entry = fl.AGGREGATORS["flora_na"]

    def spy(A, B, p, **options):
        seen.update(options)
        return entry.aggregate(A, B, p, **options)
    monkeypatch.setitem(fl.AGGREGATORS, "flora_na", dataclasses.replace(entry, aggregate=spy))
    args = bert_args(tmp_path / "run", bert_dir, glue_dir, aggregator="flora_na", rounds=1,
                     agg_option=["flora_na.steps=20", "flora_na.weight_decay=0.5",
                                 "flora_na.max_iter=7", "flora_na.tol=1e-9",
                                 "flora_na.prox=1e-5", "flora_na.path=gram"])
    train.main(args)
    expected = train.aggregator_options(args, "flora_na")
    assert {k: seen[k] for k in expected} == expected
    assert (seen["weight_decay"], seen["max_iter"], seen["steps"]) == (0.5, 7, 20)


def test_a_run_of_the_old_config_format_resumes(tmp_path, bert_dir, glue_dir):
    """A config.json written before the options moved to the registry (fields solver,
    solver_steps, .., tie_layers, flora_na_variant) resumes with the same options given as
    --agg-option; the authors' variant's old runs are refused with a clear message."""
    out = tmp_path / "run"
    args = bert_args(out, bert_dir, glue_dir, aggregator="flora_na", rounds=1,
                     agg_option=["flora_na.solver=adamw", "flora_na.steps=20",
                                 "flora_na.tie_layers=true"])
    train.main(args)
    config = json.loads((out / "config.json").read_text())
    del config["agg_option"], config["plugins"]
    old = {"solver": "adamw", "solver_steps": 20, "solver_lr": 0.01, "solver_weight_decay": 0.0,
           "solver_max_iter": 200, "solver_tol": 1e-12, "solver_prox": 1e-6,
           "solver_path": "auto", "tie_layers": True, "flora_na_target": "data",
           "flora_na_coefficients": "factors", "flora_na_init": "average",
           "flora_na_variant": "default"}
    (out / "config.json").write_text(json.dumps({**config, **old}))
    log = train.main(dataclasses.replace(args, resume=True))
    assert [r["round"] for r in log] == [1]
    assert json.loads((out / "config.json").read_text())["agg_option"] == args.agg_option
    (out / "config.json").write_text(json.dumps({**config, **old, "solver": "als"}))
    with pytest.raises(ValueError, match="different config"):
        train.main(dataclasses.replace(args, resume=True))
    (out / "config.json").write_text(json.dumps({**config, **old, "flora_na_variant": "authors"}))
    with pytest.raises(ValueError, match="now the aggregator flora_na_authors"):
        train.main(dataclasses.replace(args, resume=True))


# A toy aggregator, defined and registered here and nowhere else: adding one touches one file
def _toy(A, B, p, shrink=1.0, **_):
    """FedIT with the average B multiplied by `shrink`."""
    p = fl._check_clients(A, B, p, True, "toy_shrink")   # as every entry: equal ranks, p checked
    A_bar, B_bar = fl.weighted_sum(p, A), shrink * fl.weighted_sum(p, B)
    return fl.Aggregate(A_bar, B_bar, None, fl._nbytes(*A, *B), len(A) * fl._nbytes(A_bar, B_bar))


fl.register("toy_shrink", fl.Aggregator(_toy, "Toy", options={
    "shrink": fl.Option(1.0, "multiplies the average B", minimum=0, above=True)}))


def test_a_toy_aggregator_registered_in_this_file_trains(tmp_path, bert_dir, glue_dir):
    """Registered above and trained through train.py by name with its own option: at
    shrink=1 it is FedIT, row for row; at 0.5 its B is half FedIT's after one round."""
    run = lambda out, *opt: train.main(bert_args(tmp_path / out, bert_dir, glue_dir,   # noqa: E731
                                                 aggregator="toy_shrink,fedit", rounds=1,
                                                 agg_option=list(opt)))
    rows = run("one")
    toy, fedit = rows
    assert toy["aggregator"] == "toy_shrink" and toy["metrics"] == fedit["metrics"]
    assert tensors_equal(adapter_tensors(tmp_path / "one" / "toy_shrink"),
                         adapter_tensors(tmp_path / "one" / "fedit"))
    run("half", "toy_shrink.shrink=0.5")
    half, full = (load_state(tmp_path / "half" / n)["factors"] for n in ("toy_shrink", "fedit"))
    for layer, (A, B) in half.items():
        assert torch.equal(A, full[layer][0]) and torch.allclose(B, 0.5 * full[layer][1])


def test_parse_args_round_trip(monkeypatch):
    monkeypatch.delenv("FLORA_DATA", raising=False)
    assert train.parse_args([]) == train.Args()
    args = train.parse_args(["--clients", "3", "--lr", "0.02", "--track-solvers", "--no-resume",
                             "--max-train-examples", "7", "--target-modules", "q,v"])
    assert (args.clients, args.lr, args.track_solvers, args.resume) == (3, 0.02, True, False)
    assert (args.max_train_examples, args.target_modules) == (7, "q,v")
