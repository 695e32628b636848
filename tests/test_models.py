"""Tests for LoRA on every model family of DEFAULT_TARGETS: folding an update into the frozen
weights (FedEx-LoRA, FLoRA) through a real forward pass with alpha != r, including GPT-2's
Conv1D layers that store W as (in, out), and every aggregator end to end on a tiny GPT-2."""
from __future__ import annotations

import pytest
import torch
import transformers

import flora_na as fl
from harness import models

RANK, ALPHA = 2, 7.0                       # scaling alpha / r = 3.5: a dropped scaling shows


def tiny(family: str):
    """(a 2-layer model of the family built from its config, peft task type)."""
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64)
        return transformers.BertForSequenceClassification(config), "SEQ_CLS"
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=40)
        return transformers.RobertaForSequenceClassification(config), "SEQ_CLS"
    if family in ("llama", "mistral", "qwen2"):
        Config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[family]
        config = Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
        return transformers.AutoModelForCausalLM.from_config(config), "CAUSAL_LM"
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2,
                                         n_positions=40, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config), "CAUSAL_LM"
    raise ValueError(family)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(models.DEFAULT_TARGETS))
def test_folding_an_update_into_w_equals_the_lora_model_it_replaces(family):
    """Give every LoRA layer random non-zero A and B, then fold B @ A into W with add_to_base
    and zero B: the merged model's outputs equal the LoRA model's. Fails if the alpha / r
    scaling or a Conv1D layer's transpose is dropped."""
    model, task_type = tiny(family)
    model = models.add_lora(model, RANK, ALPHA, dropout=0.0, task_type=task_type, head_modules=[])
    g = torch.Generator().manual_seed(1)
    factors = {n: (torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g))
               for n, (A, B) in fl.read_factors(model).items()}
    fl.write_factors(model, factors)
    ids = torch.randint(3, 50, (2, 7), generator=g)
    with_lora = logits(model, ids)
    fl.add_to_base(model, {n: B @ A for n, (A, B) in factors.items()})
    fl.write_factors(model, {n: (A, torch.zeros_like(B)) for n, (A, B) in factors.items()})
    torch.testing.assert_close(logits(model, ids), with_lora, rtol=1e-4, atol=1e-4)
    # and the update mattered: the plain base model answers differently
    with model.disable_adapter():
        fresh, _ = tiny(family)
        assert not torch.allclose(logits(fresh, ids), with_lora, rtol=1e-3, atol=1e-3)


def test_gpt2_conv1d_layers_get_fan_in_fan_out():
    model, _ = tiny("gpt2")
    model = models.add_lora(model, RANK, ALPHA, task_type="CAUSAL_LM")
    layers = fl.lora_layers(model)
    assert layers and all(m.fan_in_fan_out for m in layers.values())
    A, B = next(iter(fl.read_factors(model).values()))
    assert A.shape == (RANK, 32) and B.shape == (96, RANK)      # c_attn: 32 in, 3 x 32 out


@pytest.mark.parametrize("name", [n for n, a in fl.AGGREGATORS.items()   # plug-ins: own tests
                                  if a.aggregate.__module__ == "flora_na"])
def test_every_aggregator_on_a_tiny_gpt2(name, tmp_path):
    """One federated round of each aggregator on GPT-2 (non-square Conv1D c_attn): the global
    model it leaves equals, in outputs, the one its aggregate describes."""
    from harness import federation
    entry = fl.AGGREGATORS[name]
    model, _ = tiny("gpt2")
    model = models.add_lora(model, RANK, ALPHA, dropout=0.0, task_type="CAUSAL_LM")
    g = torch.Generator().manual_seed(2)
    start = fl.read_factors(model)
    trains = entry.trains[0]                    # the others stay at a value the clients share
    shared_B = {n: torch.randn(B.shape, generator=g) for n, (_, B) in start.items()}
    uploads = [{n: (A if "A" not in trains else A + 0.1 * torch.randn(A.shape, generator=g),
                    shared_B[n] if "B" not in trains else torch.randn(B.shape, generator=g))
                for n, (A, B) in start.items()} for _ in range(3)]
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    update = federation.server_step(uploads, p, name)
    ids = torch.randint(3, 50, (2, 7), generator=g)
    # the ideal global model: W + scaling * sum_u p_u B_u A_u, applied by a dense oracle
    ideal, _ = tiny("gpt2")
    ideal = models.add_lora(ideal, RANK, ALPHA, dropout=0.0, task_type="CAUSAL_LM")
    with torch.no_grad():
        for n, m in fl.lora_layers(ideal).items():
            M = sum(w * B.double() @ A.double() for w, (A, B) in zip(p.tolist(),
                                                                        (u[n] for u in uploads)))
            m.get_base_layer().weight.add_((m.scaling["default"] * M.T).float())
    fl.write_factors(ideal, {n: (A, torch.zeros_like(B)) for n, (A, B) in start.items()})
    fl.add_to_base(model, update.base_delta)
    fl.write_factors(model, update.factors if update.factors is not None else
                     {n: (A, torch.zeros_like(B)) for n, (A, B) in start.items()})
    if entry.folds_into_base:                   # exact: FedEx-LoRA and FLoRA reach M itself
        torch.testing.assert_close(logits(model, ids), logits(ideal, ids), rtol=1e-4, atol=1e-4)
    else:                                       # rank r: finite, and the aggregate's own product
        assert torch.isfinite(logits(model, ids)).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fedsb_init_is_the_rank_r_svd_of_adams_first_step(family):
    """fedsb_init against a dense float64 oracle on the plain model (no peft): G = sum over
    samples of dL/dW, one backward per sample; then s B A = the rank-r truncation of
    -lr sign(G), A = R A0 with A0's rows orthonormal and R = A A0^T diagonal (= S / s).
    GPT-2's Conv1D stores W as (in, out): the oracle transposes its gradient."""
    plain, task_type = tiny(family)
    model = models.add_lora(tiny(family)[0], RANK, ALPHA, dropout=0.0, task_type=task_type,
                            head_modules=[])
    g = torch.Generator().manual_seed(5)
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 50, (4, 1, 6),
                                                                          generator=g)]
    lr = 0.01
    core = fl.fedsb_init(model, iter(samples), lr=lr, init_samples=3)
    plain.eval()
    for sample in samples[:3]:                  # accumulates into .grad, one sample at a time
        plain(**sample).loss.backward()
    weights = dict(plain.named_parameters())
    for name, m in fl.lora_layers(model).items():
        W = weights[name.removeprefix("base_model.model.") + ".weight"]
        G = (W.grad.T if m.fan_in_fan_out else W.grad).double()
        U, S, Vh = torch.linalg.svd(-lr * torch.sign(G))
        target = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
        A, B = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        torch.testing.assert_close(m.scaling["default"] * B @ A, target, rtol=0, atol=1e-6)
        A0 = core[name].double()
        torch.testing.assert_close(A0 @ A0.T, torch.eye(RANK, dtype=A0.dtype), atol=1e-6, rtol=0)
        R = A @ A0.T
        torch.testing.assert_close(R @ A0, A, atol=1e-6, rtol=0)          # A = R A0
        torch.testing.assert_close(R, torch.diag(S[:RANK]) / m.scaling["default"], atol=1e-6,
                                   rtol=1e-5)
        assert not m.get_base_layer().weight.requires_grad        # W frozen again


def test_a_core_client_trains_only_R_and_hands_back_a_plain_lora_pair():
    """local_train with core {layer: A0}: B does not move, A moves only inside A0's row space
    (A = R A0), and the layers are plain peft LoRA again afterwards. trains="B": A does not move at all."""
    model = models.add_lora(tiny("gpt2")[0], RANK, ALPHA, dropout=0.0, task_type="CAUSAL_LM",
                            head_modules=[])
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 50, (3, 2, 6), generator=g)
    batches = [{"input_ids": x, "labels": x} for x in ids]
    core = fl.fedsb_init(model, iter(batches), lr=0.01, init_samples=2)
    before = fl.read_factors(model)
    fl.local_train(model, batches, lr=0.05, trains="A", core=core)
    after = fl.read_factors(model)
    for n, (A, B) in after.items():
        assert torch.equal(B, before[n][1]) and not torch.equal(A, before[n][0])
        torch.testing.assert_close(A @ core[n].T @ core[n], A, atol=1e-6, rtol=0)
    assert all(type(m.lora_A["default"]).__name__ == "Linear" and
               not hasattr(m.lora_A["default"], "parametrizations")
               for m in fl.lora_layers(model).values())
    fl.local_train(model, batches, lr=0.05, trains="B")
    for n, (A, B) in fl.read_factors(model).items():
        assert torch.equal(A, after[n][0]) and not torch.equal(B, after[n][1])


def test_init_core_runs_the_entry_init_once_on_pooled_examples_and_counts_its_broadcast():
    """train.init_core: the entry's init gets the lr, its own options only, and single-example
    batches of the pooled training data in a seeded order; the factors it sets become the
    global ones, its A0 is kept in state["core"], and every client's download of B, A0 and R
    (float32) is counted once; a state that has a core (resumed) is left alone."""
    import train
    model = models.add_lora(tiny("gpt2")[0], RANK, ALPHA, dropout=0.0, task_type="CAUSAL_LM",
                            head_modules=[])
    seen = []

    def init(model, batches, **kw):
        seen.append(kw)
        batches = list(batches)
        seen.append([int(b["input_ids"][0, 0]) for b in batches])
        return fl.fedsb_init(model, iter(batches), **kw)

    entry = fl.Aggregator(fl.fedsb, "Fed-SB", trains=("A",), init=init,
                          options={"init_samples": 2})
    make_batch = lambda idx: {"input_ids": torch.tensor([[3 + i, 5, 7] for i in idx]),
                              "labels": torch.tensor([[3 + i, 5, 7] for i in idx])}
    parts = [[4, 0], [2], [1, 3]]
    state = {"factors": fl.read_factors(model), "bytes_down": 0}
    train.init_core(entry, state, model, make_batch, parts, lr=0.01, seed=0,
                    options={"init_samples": 2, "solver": "als"})
    assert seen[0] == {"lr": 0.01, "init_samples": 2}
    assert sorted(seen[1]) == [3, 4, 5, 6, 7]            # all pooled examples, one a batch
    assert state["factors"].keys() == state["core"].keys() == fl.lora_layers(model).keys()
    for n, (A, B) in fl.read_factors(model).items():
        assert torch.equal(state["factors"][n][0], A) and torch.equal(state["factors"][n][1], B)
    per_client = sum(4 * (B.numel() + RANK * RANK + A.numel())
                     for A, B in state["factors"].values())
    assert state["bytes_down"] == 3 * per_client
    before = dict(state)
    train.init_core(entry, state, model, make_batch, parts, lr=0.01, seed=0, options={})
    assert len(seen) == 2 and state == before
