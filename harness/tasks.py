"""The experiments' tasks: GLUE, GSM8K and MBPP, each one object the training loop drives.

GLUE is read from the classic `glue_data/<TASK>/{train,dev}.tsv` layout that
`download_glue_data.py` makes (and `python -m harness.data fetch` writes), or from the Hub's
`nyu-mll/glue` when no folder is found (data_root); both give the Hub's label ids, so results
agree either way. GSM8K and MBPP are causal-LM tasks: a plain-text prompt, a target, and loss on
the target tokens only.

Sections: GLUE task table -> GLUE loading -> GLUE metrics -> GSM8K and MBPP -> tokenising and
batching -> tasks as objects (load, partition key, batches, evaluation: what train.py calls).
"""
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from harness import scoring

# --- GLUE task table


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored on disk and on the Hub, and how it is scored."""
    folder: str                   # folder name inside glue_data/
    num_labels: int               # 1 = regression (STS-B)
    label_names: tuple[str, ...]  # position = the Hub's label id
    dev_files: tuple[str, ...]    # MNLI has a matched and a mismatched dev set
    hub_config: str               # config name of nyu-mll/glue
    metrics: tuple[str, ...]      # keys of glue_metrics(); the first is main_metric()
    columns: tuple[str, str | None, str]  # header names of (text_a, text_b, label)
    header: tuple[str, ...] = ()  # column names for a file without a header line (CoLA)


# Headline metrics follow the LoRA paper's GLUE table: MCC for CoLA, Pearson for STS-B, accuracy
# for the rest (MRPC and QQP also report F1 of the positive class).
GLUE_TASKS = {
    "cola": GlueTask("CoLA", 2, ("unacceptable", "acceptable"), ("dev.tsv",), "cola", ("matthews",),
                     ("sentence", None, "label"),
                     header=("source", "label", "original_label", "sentence")),
    "sst2": GlueTask("SST-2", 2, ("negative", "positive"), ("dev.tsv",), "sst2", ("accuracy",),
                     ("sentence", None, "label")),
    "mrpc": GlueTask("MRPC", 2, ("not_equivalent", "equivalent"), ("dev.tsv",), "mrpc",
                     ("accuracy", "f1"), ("#1 String", "#2 String", "Quality")),
    "qqp": GlueTask("QQP", 2, ("not_duplicate", "duplicate"), ("dev.tsv",), "qqp",
                    ("accuracy", "f1"), ("question1", "question2", "is_duplicate")),
    "stsb": GlueTask("STS-B", 1, (), ("dev.tsv",), "stsb", ("pearson", "spearman"),
                     ("sentence1", "sentence2", "score")),
    "mnli": GlueTask("MNLI", 3, ("entailment", "neutral", "contradiction"),
                     ("dev_matched.tsv", "dev_mismatched.tsv"), "mnli", ("accuracy",),
                     ("sentence1", "sentence2", "gold_label")),
    "qnli": GlueTask("QNLI", 2, ("entailment", "not_entailment"), ("dev.tsv",), "qnli",
                     ("accuracy",), ("question", "sentence", "label")),
    "rte": GlueTask("RTE", 2, ("entailment", "not_entailment"), ("dev.tsv",), "rte", ("accuracy",),
                    ("sentence1", "sentence2", "label")),
}


@dataclass(frozen=True)
class Example:
    """One GLUE example: a sentence or sentence pair and its label id (a float score for STS-B)."""
    text_a: str
    text_b: str | None
    label: int | float


def glue_task(task: str) -> GlueTask:
    """The GlueTask for a name like "sst2"; ValueError listing the valid names otherwise."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task]


# --- GLUE loading


# Where the data comes from, first found first: --data-dir, $FLORA_DATA, ./data (what
# `python -m harness.data fetch --out data/` writes), ../shared/data (beside this repository's own
# checkout), else the Hugging Face Hub. The folders are relative to the working directory.
LOCAL_DATA = ("data", "../shared/data")
DATA_HELP = ("Supply the data one of three ways: (1) once, while online, `python -m harness.data "
             "fetch --out data/` (then ./data is found); (2) --data-dir DIR or FLORA_DATA=DIR, a "
             "folder holding glue/<TASK>/{train,dev}.tsv, gsm8k/ and mbpp/; (3) run online, and "
             "the loaders read the Hugging Face Hub through `datasets`.")


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data folder, first found first: the argument, $FLORA_DATA, ./data, ../shared/data;
    None means the Hub. A folder given (argument or $FLORA_DATA) must exist."""
    given = data_dir or os.environ.get("FLORA_DATA")
    if given:
        if not Path(given).is_dir():
            source = "--data-dir" if data_dir else "FLORA_DATA"
            raise FileNotFoundError(f"{source} {str(given)!r} is not a folder. {DATA_HELP}")
        return Path(given)
    return next((Path(d) for d in LOCAL_DATA if Path(d).is_dir()), None)


def _from_hub(path: str, config: str, split: str, local: str) -> list[dict]:
    """Rows of a Hub dataset, or an error that says how to work offline instead."""
    import datasets  # slow to import, and only needed without a data folder
    try:
        return list(datasets.load_dataset(path, config, split=split))
    except Exception as err:  # offline, rate-limited, renamed...: the user's fix is the same
        raise RuntimeError(
            f"could not load {path} ({config}, split {split!r}) from the Hugging Face Hub "
            f"({type(err).__name__}: {err}), and found no local copy ({local}): not given with "
            f"--data-dir or FLORA_DATA, and none of {', '.join(LOCAL_DATA)} exists here. "
            + DATA_HELP) from err


def _glue_split(spec: GlueTask, split: str) -> str:
    """Validate a split name; "dev" means the first dev file (MNLI: matched)."""
    names = ["train", *(f.removesuffix(".tsv") for f in spec.dev_files)]
    split = names[1] if split == "dev" else split
    if split not in names:
        raise ValueError(f"unknown split {split!r} for {spec.hub_config}; "
                         f"valid: {', '.join(names)}")
    return split


def _label(spec: GlueTask, raw: str) -> int | float:
    """A label id from its text in the file: a name ("entailment"), an id ("1") or a score."""
    if spec.num_labels == 1:
        return float(raw)
    label = spec.label_names.index(raw) if raw in spec.label_names else int(raw)
    if not 0 <= label < spec.num_labels:
        raise ValueError(f"label {raw!r} out of range")
    return label


def load_glue(task: str, data_dir: str | os.PathLike | None = None,
              split: str = "train") -> list[Example]:
    """Examples of one GLUE split from a glue_data folder (or $FLORA_DATA, or the Hub)."""
    spec = glue_task(task)
    split = _glue_split(spec, split)
    root = data_root(data_dir)
    if root is None:
        rows = _from_hub("nyu-mll/glue", spec.hub_config, split.replace("dev", "validation"),
                         "a glue_data folder")
        # Hub rows hold the text columns in order, then label and idx
        texts = [[v for k, v in row.items() if k not in ("label", "idx")] for row in rows]
        return [Example(t[0], t[1] if len(t) > 1 else None, row["label"])
                for t, row in zip(texts, rows)]
    # also accept the data root holding glue/ next to gsm8k/ and mbpp/: one --data-dir for all
    root = next((root / d for d in ("glue", "glue_data") if (root / d).is_dir()), root)
    path = root / spec.folder / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task} {split}: expected the file {path} "
                                "(glue_data layout, as made by download_glue_data.py)")
    # Split on tabs only, never csv quoting: GLUE text has stray quotes (STS-B, MRPC) that csv would
    # join across fields. newline="" keeps a stray \r inside a sentence from splitting its line.
    numbered = [(i + 1, line.removesuffix("\r"))               # (line number in the file, text)
                for i, line in enumerate(_read_text(path).split("\n")) if line.strip()]
    if not numbered:
        raise ValueError(f"{path} is empty: expected a GLUE tsv file")
    if not spec.header:
        names = numbered.pop(0)[1].split("\t")
        missing = [c for c in spec.columns if c and c not in names]
        if missing:
            raise ValueError(f"{path}, line 1: the header has columns {names}, but GLUE "
                             f"{task} needs {[c for c in spec.columns if c]} (missing {missing})")
    names = list(spec.header) or names
    if not numbered:
        raise ValueError(f"{path} has a header but no data rows")
    a, b, y = (names.index(c) if c else None for c in spec.columns)
    examples, malformed = [], 0
    for n, line in numbered:
        fields = line.split("\t")
        if len(fields) != len(names):  # a few QQP train rows; the Hub loader drops them as well
            malformed += 1
            continue
        try:
            label = _label(spec, fields[y])
        except ValueError as err:
            raise ValueError(f"{path}, line {n}: bad label {fields[y]!r}") from err
        examples.append(Example(fields[a], fields[b] if b is not None else None, label))
    if not examples:
        raise ValueError(f"{path}: no row has the header's {len(names)} tab-separated fields")
    if malformed:
        warnings.warn(f"{path}: skipped {malformed} malformed rows (not {len(names)} fields)")
    return examples


# --- GLUE metrics


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to the label."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1_score(predictions, labels) -> float:
    """F1 of the positive class 1 (sklearn's default); 0 when neither side has a positive."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0  # = 2PR / (P + R)


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation of binary labels; 0 if a confusion-matrix margin is empty (sklearn)."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


_METRICS = {
    "accuracy": accuracy,
    "f1": f1_score,
    "matthews": matthews_corrcoef,
    "pearson": lambda p, y: float(stats.pearsonr(p, y)[0]),
    "spearman": lambda p, y: float(stats.spearmanr(p, y)[0]),
}


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """The task's GLUE metrics, e.g. {"accuracy": .., "f1": ..} for MRPC."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions of shape {p.shape} but labels of shape {y.shape}")
    return {name: _METRICS[name](p, y) for name in glue_task(task).metrics}


def main_metric(task: str) -> str:
    """The headline metric of a task: "matthews" (CoLA), "pearson" (STS-B), else "accuracy"."""
    return glue_task(task).metrics[0]


# --- GSM8K and MBPP

# The standard MBPP split by task_id (Austin et al. 2021), as the Hub's "full" config has it
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
               "train": range(601, 975)}


def _read_text(path: Path) -> str:
    """A file's UTF-8 text (a leading BOM dropped: MRPC has one); ValueError naming the file
    and the line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({err.reason} at byte "
                         f"{err.start}); is it the right file?") from None


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """One dict per line of a .jsonl file, each with `keys`; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"expected the file {path}")
    rows = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {n}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise ValueError(f"{path}, line {n}: expected a JSON object with keys {list(keys)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _check_split(split: str, valid) -> None:
    """ValueError unless split is one of valid."""
    if split not in valid:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(valid)}")


def load_gsm8k(data_dir: str | os.PathLike | None = None, split: str = "train") -> list[dict]:
    """GSM8K rows {"question", "answer"} from data_dir/gsm8k/{train,test}.jsonl (or the Hub)."""
    _check_split(split, ("train", "test"))
    root = data_root(data_dir)
    if root is None:
        return _from_hub("openai/gsm8k", "main", split, "a folder holding gsm8k/{train,test}.jsonl")
    return _read_jsonl(root / "gsm8k" / f"{split}.jsonl", ("question", "answer"))


def load_mbpp(data_dir: str | os.PathLike | None = None, split: str = "train") -> list[dict]:
    """MBPP rows (text, code, task_id, test_list, test_setup_code, ...) from mbpp/mbpp.jsonl."""
    _check_split(split, MBPP_SPLITS)
    root = data_root(data_dir)
    if root is None:
        return _from_hub("google-research-datasets/mbpp", "full", split,
                         "a folder holding mbpp/mbpp.jsonl")
    return [row for row in _read_jsonl(root / "mbpp" / "mbpp.jsonl",
                                       ("task_id", "text", "code", "test_list"))
            if row["task_id"] in MBPP_SPLITS[split]]


def gsm8k_prompt(question: str) -> str:
    """The instruction for one GSM8K question."""
    return ("Solve this math word problem. Reason step by step, then give the final answer on the "
            f"last line as \"#### <number>\".\n\nQuestion: {question.strip()}")


def gsm8k_target(answer: str) -> str:
    """The worked reference answer, ending in its "#### N" line."""
    return answer.strip()


def mbpp_prompt(text: str, test_list: list[str]) -> str:
    """The instruction for one MBPP problem: its text and the asserts the function must pass."""
    tests = "\n".join(test_list)
    return (f"Write a Python function for this task: {text.strip()}\n"
            f"Your code should pass these tests:\n{tests}")


def mbpp_target(code: str) -> str:
    """The reference solution, with the dataset's Windows line endings made plain."""
    return code.replace("\r\n", "\n").strip()


# --- tokenising and batching


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as one user turn of the tokenizer's chat template, or plain with a newline."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def encode_causal(tokenizer, prompt: str, target: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + target + EOS, with labels -100 on the prompt so loss is on the target.

    Special tokens come from format_prompt() (the chat template), not from the tokenizer call, so
    nothing is added twice. Too long: the end of the target is cut. A prompt so long that less than
    a quarter of max_length would be left for the target loses its start instead, because its end
    (the assistant turn) must sit right before the answer.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end the target with")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    budget = max_length - min(len(t), max_length // 4)  # tokens the prompt may take
    p = p[max(len(p) - budget, 0):]
    t = t[:max_length - len(p)]
    return {"input_ids": p + t, "labels": [-100] * len(p) + t}


def collate_causal(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encode_causal() outputs into input_ids, attention_mask and labels (padded -100)."""
    width = max(len(b["input_ids"]) for b in batch)

    def pad(seq, value):
        return seq + [value] * (width - len(seq))
    return {
        "input_ids": torch.tensor([pad(b["input_ids"], pad_id) for b in batch]),  # (B, T)
        "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
        "labels": torch.tensor([pad(b["labels"], -100) for b in batch]),
    }


def collate_glue(tokenizer, examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise GLUE examples (pairs as text/text_pair), padded to the longest, with labels."""
    pairs = examples[0].text_b is not None
    batch = tokenizer([e.text_a for e in examples], [e.text_b for e in examples] if pairs else None,
                      padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    regression = isinstance(examples[0].label, float)  # STS-B scores feed an MSE head
    batch["labels"] = torch.tensor([e.label for e in examples],
                                   dtype=torch.float if regression else torch.long)
    return batch


# --- tasks as objects: the one interface the training loop uses


@dataclass
class TaskData:
    """Training examples, their partition keys, and the evaluation sets by name."""
    train: list
    labels: list                 # what the Dirichlet partition splits on
    evals: dict[str, list]


class Task:
    """A benchmark as the training loop sees it: data, batches, evaluation, baseline."""
    name: str                    # "sst2"
    display_name: str            # "SST-2"
    main_metric: str             # the headline key of evaluate()'s dict
    peft_task_type: str          # "SEQ_CLS" or "CAUSAL_LM"
    num_labels: int | None = None
    eval_splits: tuple[str, ...] = ("test",)

    def read(self, data_dir, split: str) -> list:
        """Every example of one split."""
        raise NotImplementedError

    def partition_key(self, example) -> int | float:
        """What the Dirichlet split of clients is skewed on."""
        raise NotImplementedError

    def load(self, data_dir, max_train: int | None, max_eval: int | None, seed: int) -> TaskData:
        """The training set and evaluation sets, each capped to a seeded random subset."""
        g = torch.Generator().manual_seed(seed)

        def cap(xs, n):
            if n is None or n >= len(xs):
                return xs
            return [xs[i] for i in sorted(torch.randperm(len(xs), generator=g)[:n].tolist())]
        train = cap(self.read(data_dir, "train"), max_train)
        evals = {s: cap(self.read(data_dir, s), max_eval) for s in self.eval_splits}
        for split, xs in [("train", train), *evals.items()]:
            if not xs:
                raise ValueError(f"{self.display_name} {split}: no examples")
        return TaskData(train, [self.partition_key(x) for x in train], evals)

    def batcher(self, tokenizer, examples: list, max_length: int):
        """A function from example indices to one training batch (with labels)."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, examples: list, *, batch_size: int, max_length: int,
                 max_new_tokens: int) -> dict[str, float]:
        """The task's metrics of the model as it stands."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise, before any training, if this machine cannot evaluate the task."""

    def majority_baseline(self, data: TaskData) -> float | None:
        """What a model that learned nothing scores on the first evaluation set (None: no
        such constant prediction)."""
        return None


class Glue(Task):
    """A GLUE task from glue_data files (or the Hub), scored by its GLUE metrics."""
    peft_task_type = "SEQ_CLS"

    def __init__(self, name: str):
        spec = glue_task(name)
        self.name, self.spec, self.display_name = name, spec, spec.folder
        self.main_metric, self.num_labels = spec.metrics[0], spec.num_labels
        self.eval_splits = tuple(f.removesuffix(".tsv") for f in spec.dev_files)

    def read(self, data_dir, split):
        return load_glue(self.name, data_dir, split)

    def partition_key(self, example):
        return example.label

    def batcher(self, tokenizer, examples, max_length):
        return lambda idx: collate_glue(tokenizer, [examples[i] for i in idx], max_length)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples, *, batch_size, max_length, max_new_tokens):
        device = next(model.parameters()).device
        preds = []
        for s in range(0, len(examples), batch_size):
            batch = collate_glue(tokenizer, examples[s:s + batch_size], max_length)
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            preds += (logits[:, 0] if logits.shape[1] == 1 else logits.argmax(-1)).tolist()
        return glue_metrics(self.name, preds, [e.label for e in examples])

    def majority_baseline(self, data):
        labels = [e.label for e in next(iter(data.evals.values()))]
        if isinstance(labels[0], float):              # regression: a constant correlates 0
            return 0.0
        top = max(set(labels), key=labels.count)
        return glue_metrics(self.name, [top] * len(labels), labels)[self.main_metric]


class Generation(Task):
    """A causal-LM task: loss on the target tokens, greedy generation scored as defined."""
    peft_task_type = "CAUSAL_LM"
    reference: str                     # the field holding the reference answer or solution

    def partition_key(self, example):  # Dirichlet over length bins of the reference
        return float(len(example[self.reference]))

    def prompt(self, example) -> str:
        raise NotImplementedError

    def target(self, example) -> str:
        raise NotImplementedError

    def score(self, completion: str, example) -> bool:
        raise NotImplementedError

    def batcher(self, tokenizer, examples, max_length):
        cache: dict[int, dict] = {}                   # each example is encoded once

        def encode(i):
            if i not in cache:
                cache[i] = encode_causal(tokenizer, format_prompt(tokenizer, self.prompt(examples[i])),
                                         self.target(examples[i]), max_length)
            return cache[i]
        return lambda idx: collate_causal([encode(i) for i in idx], tokenizer.pad_token_id)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples, *, batch_size, max_length, max_new_tokens):
        device = next(model.parameters()).device
        tokenizer.padding_side = "left"           # generation continues from the prompt's end
        correct = 0
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            prompts = [format_prompt(tokenizer, self.prompt(x)) for x in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True,  # as encode_causal: the
                            add_special_tokens=False).to(device)         # template adds specials
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
            correct += sum(self.score(text, x) for x, text in zip(chunk, texts))
        tokenizer.padding_side = "right"
        return {self.main_metric: correct / max(len(examples), 1)}


class Gsm8k(Generation):
    name, display_name, main_metric, reference = "gsm8k", "GSM8K", "accuracy", "answer"

    def read(self, data_dir, split):
        return load_gsm8k(data_dir, split)

    def prompt(self, example):
        return gsm8k_prompt(example["question"])

    def target(self, example):
        return gsm8k_target(example["answer"])

    def score(self, completion, example):
        return scoring.gsm8k_correct(completion, example["answer"])


class Mbpp(Generation):
    """MBPP: each generated solution runs with its asserts in the bubblewrap sandbox of
    harness/sandbox.py; allow_unisolated=True runs it without one (rlimits and the audit hook
    only), for machines without bubblewrap whose user trusts the code."""
    name, display_name, main_metric, reference = "mbpp", "MBPP", "pass@1", "code"

    def __init__(self, allow_unisolated: bool = False):
        self.allow_unisolated = allow_unisolated

    def check(self) -> None:
        scoring.check_isolation(allow_unisolated=self.allow_unisolated)

    def read(self, data_dir, split):
        return load_mbpp(data_dir, split)

    def prompt(self, example):
        return mbpp_prompt(example["text"], example["test_list"])

    def target(self, example):
        return mbpp_target(example["code"])

    def score(self, completion, example):
        return scoring.run_mbpp(scoring.extract_code(completion), example["test_list"],
                                example.get("test_setup_code", ""),
                                allow_unisolated=self.allow_unisolated).passed

    def evaluate(self, model, tokenizer, examples, **options):
        """pass@1, and how many of the problems were judged inside the sandbox (their asserts
        cannot be split into literal calls: harness/scoring.py), not by this process."""
        metrics = super().evaluate(model, tokenizer, examples, **options)
        metrics["judged_in_sandbox"] = sum(
            scoring.mbpp_verdict_path(x["test_list"], x.get("test_setup_code", "")) == "in_sandbox"
            for x in examples)
        return metrics


TASKS: dict[str, Task] = {**{name: Glue(name) for name in GLUE_TASKS},
                          "gsm8k": Gsm8k(), "mbpp": Mbpp()}


def get_task(name: str, allow_unisolated_exec: bool = False) -> Task:
    """The Task for a name like "sst2" or "gsm8k"; ValueError listing the valid names.
    allow_unisolated_exec: MBPP may run generated code without the sandbox."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return Mbpp(allow_unisolated_exec) if name == "mbpp" else TASKS[name]
