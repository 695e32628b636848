"""Codecs in train.py's protocol (issue 23, phase B1): what travels up and down goes through
--upload-codec / --download-codec, the bytes are the payloads' (hand-computed here), the server's
global model is the decoded one the clients hold, rounding and topk's error feedback make runs
that --resume bit for bit, and codec none is the uncompressed protocol.

About 40 s on one core in all, most of it the four tiny end-to-end runs' pairs.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import flora_na as fl
import train
from evidence import same_results
from harness import codecs, federation
from test_train import (OWN, bert_args, bert_dir, gen_dir, glue_dir, llama_dir,  # noqa: F401
                        load_state, no_training, rows_of, run_killed_in_round_2, tensors_equal)

# Two layers of one pair's shapes: A (2, 96) has 192 entries, B (80, 2) 160.
SHAPES = {"l0": ((2, 96), (80, 2)), "l1": ((2, 96), (80, 2))}
# Bytes of one pair (A, B) by hand, block 64, topk fraction 0.25: float32 4 bytes an entry,
# fp16/bf16 2; intB: ceil(n B / 8) bytes of codes plus a float32 scale per started block of 64
# (192 = 3 blocks, 160 = 3); topk: ceil(0.25 n) values (float32) and int32 indices.
PAIR_BYTES = {"none": (768, 640), "fp16": (384, 320), "bf16": (384, 320),
              "int8": (192 + 12, 160 + 12), "int4": (96 + 12, 80 + 12),
              "int2": (48 + 12, 40 + 12), "topk": (48 * 8, 40 * 8)}


def message(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(a, generator=g), torch.randn(b, generator=g))
            for n, (a, b) in SHAPES.items()}


def codec(name: str, rounding: str = "stochastic") -> codecs.Codec:
    return codecs.Codec(name, 64, rounding, 0.25)


@pytest.mark.parametrize("parts", ["AB", "A", "B"])
@pytest.mark.parametrize("name", codecs.CODECS)
def test_upload_bytes_by_hand_and_what_is_not_sent_stays(name, parts):
    """Bytes of an upload are those of PAIR_BYTES for each factor sent; a factor that does not
    travel (FFA's frozen A, FedSA's private B) is returned as it is, the sent ones decoded."""
    up = message()
    feedback = {} if name == "topk" else None
    sent, nbytes = train.send_up(up, codec(name), parts, seed=0, round_=0, u=1, feedback=feedback)
    a, b = PAIR_BYTES[name]
    assert nbytes == len(SHAPES) * (a * ("A" in parts) + b * ("B" in parts))
    for n, pair in up.items():
        for i, part in enumerate("AB"):
            if part not in parts:
                assert sent[n][i] is pair[i]
            elif name == "none":                               # the tensor's own storage
                assert sent[n][i].data_ptr() == pair[i].data_ptr()
            else:
                assert sent[n][i].shape == pair[i].shape and sent[n][i].dtype == pair[i].dtype
                assert not torch.equal(sent[n][i], pair[i])
    if name == "topk":          # the error feedback: one residual per tensor sent
        assert sorted(feedback) == sorted(f"{n}.{p}" for n in SHAPES for p in parts)


def test_upload_rounding_is_seeded_by_seed_round_and_client():
    up, int4 = message(), codec("int4")
    draw = lambda **kw: train.send_up(up, int4, "AB", **{"seed": 0, "round_": 0, "u": 0, **kw})[0]
    same = draw()
    assert all(tensors_equal(same[n], draw()[n]) for n in up)                  # repeats
    for other in (dict(seed=1), dict(round_=1), dict(u=1)):                    # each part counts
        assert not all(tensors_equal(same[n], draw(**other)[n]) for n in up), other
    nearest = train.send_up(up, codec("int4", "nearest"), "AB", seed=0, round_=0, u=0)[0]
    assert all(tensors_equal(nearest[n], train.send_up(up, codec("int4", "nearest"), "AB",
                                                       seed=5, round_=3, u=2)[0][n]) for n in up)


@pytest.mark.parametrize("name", codecs.CODECS)
def test_download_is_one_message_decoded_in_place(name):
    """The round's answer: the travelling global factors and every base-weight delta through the
    codec, in place; the bytes are one client's copy (a delta of 80 x 96: 7680 entries)."""
    factors = message(1)
    W = {n: torch.randn(80, 96, generator=torch.Generator().manual_seed(2)) for n in SHAPES}
    update = federation.RoundUpdate(dict(factors), dict(W), 0, 0, {})
    feedback = {} if name == "topk" else None
    nbytes = train.send_down(update, codec(name), "B", seed=0, round_=3, feedback=feedback)
    n = 7680
    w_bytes = {"none": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": n + 4 * 120,
               "int4": n // 2 + 4 * 120, "int2": n // 4 + 4 * 120, "topk": 1920 * 8}[name]
    assert nbytes == len(SHAPES) * (PAIR_BYTES[name][1] + w_bytes)
    for layer, (A, B) in factors.items():
        assert update.factors[layer][0] is A                   # "B" only: A is not sent
        assert torch.equal(update.factors[layer][1], B) == (name == "none")
        assert torch.equal(update.base_delta[layer], W[layer]) == (name == "none")
    if name == "topk":
        assert sorted(feedback) == sorted(f"{n}.{p}" for n in SHAPES for p in "BW")
    restart = federation.RoundUpdate(None, dict(W), 0, 0, {})   # no factors: only the deltas
    assert train.send_down(restart, codec(name), "AB", seed=0, round_=3,
                           feedback={} if name == "topk" else None) == len(SHAPES) * w_bytes


def test_travelling_factors_follow_the_registry():
    expected = {"fedit": "AB", "ffa": "B", "fedsa": "A", "fedex": "AB", "flora": "AB",
                "flexlora": "AB", "lora_fair": "AB", "flora_na": "AB", "fedsb": "A"}
    for round_ in (0, 1, 4):
        assert {n: train.travelling(fl.AGGREGATORS[n], round_) for n in expected} == expected
    assert [train.travelling(fl.AGGREGATORS["rolora"], t) for t in range(4)] == ["B", "A"] * 2


def sent_so_far(name: str, round_: int) -> list[str]:
    """The travelling parts of every round up to `round_` (1-based), one string each."""
    return [train.travelling(fl.AGGREGATORS[name], t) for t in range(round_)]


CODED = [n for n in OWN if fl.AGGREGATORS[n].init is None]   # no core R: codecs take them


# --- end to end on the tiny BERT (hidden 32, 2 layers, query and value, rank 2): every
# factor is 64 entries, one int4 block: 32 bytes of codes and a 4-byte scale


def test_all_aggregators_train_on_int4_uploads(tmp_path, bert_dir, glue_dir):
    """--aggregator all --upload-codec int4: every aggregator runs on the decoded factors; each
    round's upload is 36 bytes per factor sent (4 layers, 3 clients); downloads as uncompressed."""
    out = tmp_path / "run"
    train.main(bert_args(out, bert_dir, glue_dir, aggregator="all", upload_codec="int4"))
    config = json.loads((out / "config.json").read_text())
    assert (config["upload_codec"], config["download_codec"], config["codec_block"]) == (
        "int4", "none", 64)
    rows = rows_of(out)
    assert sorted({r["aggregator"] for r in rows}) == sorted(
        n for n, a in fl.AGGREGATORS.items() if a.init is None)
    for r in rows:
        sent = len("".join(sent_so_far(r["aggregator"], r["round"])))
        assert r["bytes_up"] == 3 * 4 * sent * 36, r["aggregator"]
        assert math.isfinite(r["train_loss"]) and r["metrics"] is not None
    fedit = [r for r in rows if r["aggregator"] == "fedit"]
    assert [r["bytes_down"] for r in fedit] == [3 * 4 * 2 * 64 * 4 * t for t in (1, 2)]


def test_all_aggregators_on_the_tiny_llama_with_int4_uploads(tmp_path, llama_dir, gen_dir):
    """The GQA Llama (hidden 32, 2 layers): q_proj's A and B and v_proj's A are 64 entries (36
    bytes at int4), v_proj's B (16, 2) is 32 entries (16 bytes of codes, one scale: 20). Every
    aggregator of flora_na.py: what `--aggregator all` is in a fresh process (plug-ins that other
    tests register in this one have tests of their own)."""
    out = tmp_path / "run"
    train.main(train.Args(task="gsm8k", model=str(llama_dir), data_dir=str(gen_dir),
                          out=str(out), aggregator=",".join(CODED), upload_codec="int4", clients=2,
                          rounds=2, local_steps=2, batch_size=2, rank=2, lr=5e-3, max_length=64,
                          eval_every=5, max_new_tokens=8, max_eval_examples=2,
                          agg_option=["flora_na.steps=20"], device="cpu", threads=1))
    per_client = {"A": 4 * 36, "B": 2 * 36 + 2 * 20}
    rows = rows_of(out)
    assert sorted({r["aggregator"] for r in rows}) == sorted(CODED)
    for r in rows:
        sent = "".join(sent_so_far(r["aggregator"], r["round"]))
        assert r["bytes_up"] == 2 * sum(per_client[p] for p in sent)
        assert math.isfinite(r["train_loss"])


def test_clients_of_mixed_ranks_upload_at_their_own_rank(tmp_path, bert_dir, glue_dir):
    """Client ranks 1, 2, 1 (cycled): a rank-1 factor is 32 entries (int8: 32 + one 4-byte
    scale), a rank-2 one 64 (68 bytes); 4 layers, A and B each."""
    out = tmp_path / "run"
    train.main(bert_args(out, bert_dir, glue_dir, aggregator="fedit,flora_na", client_ranks="1,2",
                         upload_codec="int8", rounds=1))
    for r in rows_of(out):
        assert r["bytes_up"] == 2 * (4 * 2 * 36) + 4 * 2 * 68


def test_the_global_model_is_the_decoded_download(tmp_path, bert_dir, glue_dir):
    """--download-codec int4 (nearest): the server keeps what clients decode: each global factor
    of a travelling part is on its int4 grid (q * absmax / 7, q integer), FFA's A is not sent
    (the shared init, unchanged), nor RoLoRA's in its first round (it trains B); bytes down are 36 per factor, plus FedEx's 32 x 32 residual
    (16 blocks: 512 + 64 bytes) per layer, for each of 3 clients."""
    out = tmp_path / "run"
    train.main(bert_args(out, bert_dir, glue_dir, aggregator="fedit,ffa,fedex,rolora",
                         download_codec="int4", codec_rounding="nearest", rounds=1))
    rows = {r["aggregator"]: r for r in rows_of(out)}
    assert rows["fedit"]["bytes_down"] == 3 * 4 * 2 * 36
    assert rows["ffa"]["bytes_down"] == rows["rolora"]["bytes_down"] == 3 * 4 * 36
    assert rows["fedex"]["bytes_down"] == 3 * 4 * (2 * 36 + 576)
    on_grid = lambda x: torch.allclose(x / (x.abs().max() / 7), (x / (x.abs().max() / 7)).round(),
                                       atol=1e-4)
    for name in ("fedit", "fedex"):
        for A, B in load_state(out / name)["factors"].values():
            assert on_grid(A) and on_grid(B)
    for name in ("ffa", "rolora"):
        for A, B in load_state(out / name)["factors"].values():
            assert on_grid(B) and not on_grid(A)


@pytest.mark.parametrize("up,down", [("topk", "topk"), ("int4", "int2")])
def test_resume_continues_codecs_bit_for_bit(tmp_path, monkeypatch, bert_dir, glue_dir, up, down):
    """Killed in round 2 of 3 and resumed equals the uninterrupted run (evidence.same_results),
    with 2 of 3 clients a round (a client's error feedback waits while it sits out); topk's
    error feedback is in state.pt, each client's and the server's."""
    def args(out, **kw):
        return bert_args(out, bert_dir, glue_dir, aggregator="fedit,fedex", rounds=3,
                         participation=0.67, upload_codec=up, download_codec=down,
                         topk_fraction=0.25, **kw)
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    train.main(args(straight))
    run_killed_in_round_2(monkeypatch, lambda: train.main(args(out)), "fedex")
    train.main(args(out, resume=True))
    assert same_results.compare(str(straight), str(out)) == []
    for name in ("fedit", "fedex"):
        a, b = load_state(straight / name), load_state(out / name)
        assert ("feedback_up" in a, "feedback_down" in a) == (up == "topk", down == "topk")
        for key in ("factors", "base", "feedback_up", "feedback_down"):
            assert tensors_equal(a.get(key), b.get(key)), (name, key)
    if up == "topk":    # every client's feedback holds a residual per factor, some non-zero
        feedback = load_state(straight / "fedit")["feedback_up"]
        assert all(len(f) == 8 for f in feedback)
        assert any(f["residual"].abs().sum() > 0 for fb in feedback for f in fb.values())


def test_codec_none_is_the_uncompressed_protocol(tmp_path, bert_dir, glue_dir):
    """Codec none sends every factor as it is, so its payload bytes are the aggregators' own
    counts, which the rows keep (the same run, codecs named or not: same_results identical)."""
    a, b = tmp_path / "default", tmp_path / "named"
    train.main(bert_args(a, bert_dir, glue_dir, aggregator="fedit,ffa,fedsa", rounds=1))
    train.main(bert_args(b, bert_dir, glue_dir, aggregator="fedit,ffa,fedsa", rounds=1,
                         upload_codec="none", download_codec="none", codec_block=8,
                         codec_rounding="nearest", topk_fraction=0.5))
    assert same_results.compare(str(a), str(b)) == []
    for r in rows_of(a):
        sent = len(train.travelling(fl.AGGREGATORS[r["aggregator"]], 0))
        assert r["bytes_up"] == r["bytes_down"] == 3 * 4 * sent * 64 * 4


def test_a_run_started_before_codecs_resumes_at_none(tmp_path, bert_dir, glue_dir):
    """A config.json without the codec fields (runs before issue 23) resumes at codec none."""
    out = tmp_path / "run"
    train.main(bert_args(out, bert_dir, glue_dir, rounds=1))
    config = json.loads((out / "config.json").read_text())
    keys = ("upload_codec", "download_codec", "codec_block", "codec_rounding", "topk_fraction")
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in keys}))
    rows = rows_of(out)
    train.main(bert_args(out, bert_dir, glue_dir, rounds=1, resume=True))
    assert rows_of(out) == rows
    with pytest.raises(ValueError, match="different config.*upload_codec"):
        train.main(bert_args(out, bert_dir, glue_dir, rounds=1, resume=True, upload_codec="int8"))


BAD = {
    "upload codec": (dict(upload_codec="int3"), "--upload-codec must be one of none, fp16, bf16"
                                                ", int8, int4, int2, topk, got 'int3'"),
    "download codec": (dict(download_codec="gzip"), "--download-codec must be one of"),
    "block": (dict(codec_block=0), "--codec-block must be >= 1, got 0"),
    "rounding": (dict(codec_rounding="up"), "--codec-rounding must be stochastic or nearest, "
                                            "got 'up'"),
    "fraction 0": (dict(topk_fraction=0.0), r"--topk-fraction must be in \(0, 1\], got 0.0"),
    "fraction 2": (dict(topk_fraction=2.0), r"--topk-fraction must be in \(0, 1\], got 2.0"),
    "fraction nan": (dict(topk_fraction=float("nan")), r"--topk-fraction must be in \(0, 1\]"),
    "download, mixed ranks": (dict(download_codec="int8", aggregator="fedit", client_ranks="1,2"),
                              "--download-codec with mixed client ranks"),
    "download, flora": (dict(download_codec="int8", aggregator="fedit,flora"),
                        "--download-codec: flora merge the update into W"),
    "upload, fedsb": (dict(upload_codec="int8", aggregator="fedit,fedsb"),
                      "--upload-codec/--download-codec: fedsb send an r x r core"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_codec_input_fails_before_training(tmp_path, no_training, bert_dir, glue_dir, case):
    changes, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, **changes))
    assert not (tmp_path / "run").exists()


def test_all_with_a_download_codec_leaves_out_what_cannot_take_it(tmp_path, bert_dir, glue_dir):
    args = bert_args(tmp_path / "run", bert_dir, glue_dir, aggregator="all", download_codec="fp16")
    assert train.check_args(args) == [n for n, a in fl.AGGREGATORS.items()
                                      if not a.restart and a.init is None]
