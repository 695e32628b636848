#!/usr/bin/env bash
# Rebuild the evidence for FLoRA-NA (arXiv 2509.26399) from scratch, stage by stage:
#
#   0 preflight          before any stage: every task the selected stages train on loads (from
#                        --data-dir, $FLORA_DATA, ./data, ../shared/data, else the Hub), and
#                        the MBPP sandbox works where MBPP runs; stops at once otherwise
#   1 tests              python -m pytest -q (TINY: a smoke subset, seconds)
#   2 regime study       where FedIT's aggregation error grows and how much of it FLoRA-NA
#                        removes: SST-2 runs of FedIT that change one factor at a time (local
#                        steps, client lr, Dirichlet alpha, rank, clients) around a base
#                        setting, each round also solving FLoRA-NA's variants on the same
#                        uploads (--track-solvers); then FLoRA-NA vs FedIT over 3 seeds at the
#                        two settings with the largest FedIT error
#   3 GLUE table         every registered aggregator (--aggregator all) x 3 seeds, Dirichlet
#                        0.5, plus a centralised reference (1 client, IID, same examples seen);
#                        QUICK: {stsb, sst2}, FULL and GLUE_TASKS="rte mrpc stsb sst2": all four
#                        (see the QUICK budget's notes)
#   4 (retired)          the sensitivity runs (alpha and client count, one seed) are part of
#                        stage 2 now; the number is kept so that stages 5-7 keep theirs
#   5 solver benchmark   bench_solver.py at LLaMA-2-7B adapter shapes
#   6 generation         a small federated GSM8K run (SmolLM2-135M; FULL: LLaMA-2-7B)
#   7 mixed ranks        clients of different LoRA ranks (heavy-tail profile 2..16) on SST-2:
#                        every mixed-rank aggregator x 3 seeds, and equal-rank FedIT and FLoRA-NA
#                        at the smallest and the largest rank as references (QUICK: one seed)
#   9 compression        SST-2 with compressed uploads: FedIT, FFA-LoRA, FlexLoRA and FLoRA-NA
#                        x upload codecs none, fp16, int8, int4, int2, top-k 10% and 1%
#                        (+ FLoRA-NA with its noise-aware Gram at int4 and int2); each round's
#                        divergence against M of the uncompressed uploads (runs before 8)
#  10 privacy            SST-2 with client-level DP (train.py --dp): accuracy against epsilon
#                        (target 1, 3, 8, 64) under central DP (FedIT, FFA-LoRA: the linear
#                        aggregators) and local DP (FedIT, FFA-LoRA, FLoRA-NA), beside the same
#                        aggregators without DP and with clipping alone, and a centralised
#                        reference (1 client, same examples; runs before 8)
#   8 report             python -m evidence.report -> results/<mode>/REPORT.md and its PNGs;
#                        with --publish also RESULTS.md's generated part (figures in figures/)
#                        and README.md's headline table (never from TINY)
#
# Usage:
#   bash reproduce.sh --tiny             # smoke run, minutes: every code path, numbers meaningless,
#                                        # into results/tiny/ (also: TINY=1 bash reproduce.sh)
#   bash reproduce.sh                    # QUICK: ~96 min on an idle 2-core Xeon (~3 h on an EPYC),
#                                        # + ~16 min for stage 9 and ~20 min for stage 10,
#                                        # into results/quick/
#   bash reproduce.sh --publish          # QUICK, then rewrite RESULTS.md, figures/, README's headline
#   bash reproduce.sh --data-dir DIR     # the data folder (also FLORA_DATA=DIR; default ./data,
#                                        # ../shared/data, else the Hub; python -m harness.data fetch)
#   bash reproduce.sh --only 2,3         # some stages (also: STAGES=2,3 bash reproduce.sh);
#                                        # the report (8) runs after any selection
#   bash reproduce.sh --skip 1,6         # all but some (also: SKIP=1,6)
#   MODE=FULL bash reproduce.sh          # paper scale for a GPU (RoBERTa-large, LLaMA-2-7B)
#   DRY_RUN=1 MODE=FULL bash reproduce.sh  # print the paper-scale commands, run nothing
#   MODE=FULL FLORA_NA_VARIANT=authors bash reproduce.sh   # FLoRA-NA as the authors' released
#                                        # code runs it (aggregator flora_na_authors),
#                                        # into results/full_authors/; RESULTS.md is left alone
#   AGGREGATORS=a,b bash reproduce.sh --only 2,3,7   # some aggregators only (e.g. ones added
#                                        # since the last full run), into results/<mode>_a_b/
#                                        # (or $RESULTS): stage 3 runs them instead of every
#                                        # one, stage 2 compares them over seeds at the picked
#                                        # settings, stage 7 runs those that accept mixed ranks
#                                        # mixed and all of them at equal ranks; the method and
#                                        # the baseline run beside them at REF_SEEDS (default
#                                        # "0") as references; --publish writes only the
#                                        # report's block for these aggregators into RESULTS.md
#   REGIME_ONLY="lr5e-3 steps50" bash reproduce.sh --only 2   # stage 2's sweep at these
#                                        # settings and the base only, the comparison over
#                                        # seeds at them (the picks: as many as they are)
#
# Every training run has its own --out under $RESULTS/runs/<stage>/ and is started with
# --resume, so re-running this script continues killed runs and skips finished ones.
# Environment: FLORA_DATA (data root, as --data-dir), JOBS (parallel runs, default:
# CPU cores in QUICK, 1 in FULL), THREADS (torch threads per run: 1 in QUICK, all in FULL),
# PYTHON, PYTEST_ARGS, ROBERTA and LLAMA (local folders for the FULL models, no Hub needed),
# RESULTS (output folder), PUBLISH=1 (as --publish), FLORA_NA_VARIANT
# (FULL only: authors, the plug-in evidence/authors_variant.py), AGGREGATORS, REF_SEEDS and
# REGIME_ONLY (above). After changing a
# budget, delete the affected results/runs/<stage>/ folders: train.py refuses to resume with
# another config.
set -euo pipefail
cd "$(dirname "$0")"

# --- options --------------------------------------------------------------------------------

MODE=${MODE:-QUICK}
TINY=${TINY:-0}
DRY_RUN=${DRY_RUN:-0}
PUBLISH=${PUBLISH:-0}
DATA=${FLORA_DATA:-}
ONLY=${STAGES:-}
SKIP=${SKIP:-}
while (($#)); do
    case $1 in
        --only) ONLY=$2; shift 2 ;;
        --only=*) ONLY=${1#*=}; shift ;;
        --skip) SKIP=$2; shift 2 ;;
        --skip=*) SKIP=${1#*=}; shift ;;
        --mode) MODE=$2; shift 2 ;;
        --mode=*) MODE=${1#*=}; shift ;;
        --tiny) TINY=1; shift ;;
        --publish) PUBLISH=1; shift ;;
        --data-dir) DATA=$2; shift 2 ;;
        --data-dir=*) DATA=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-report) SKIP="${SKIP:+$SKIP,}8"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "reproduce.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
MODE=${MODE^^}
if [[ ",$ONLY," == *",4,"* ]]; then
    echo "reproduce.sh: stage 4 (sensitivity) is retired; stage 2, the regime study, varies alpha" \
         "and client count" >&2; exit 2
fi
[[ $MODE == QUICK || $MODE == FULL ]] || { echo "MODE must be QUICK or FULL, got $MODE" >&2; exit 2; }
if [[ $PUBLISH == 1 && $TINY == 1 ]]; then
    echo "reproduce.sh: --publish takes a QUICK or FULL run; a TINY run's numbers are not results" >&2
    exit 2
fi
VARIANT=${FLORA_NA_VARIANT:-default}
if [[ $VARIANT != default && $MODE != FULL ]]; then
    echo "FLORA_NA_VARIANT=$VARIANT is for MODE=FULL (QUICK keeps the method's own solver)" >&2; exit 2
fi
AGGREGATORS=${AGGREGATORS:-}       # some aggregators only, comma-separated registry names
REF_SEEDS=${REF_SEEDS-0}           # ... and the seeds at which the method and baseline join them (may be empty)
DP_SEEDS_SET=${DP_SEEDS:-}         # stage 10's seeds, when the caller sets them (QUICK: "0")
if [[ -n $AGGREGATORS && $VARIANT != default ]]; then
    echo "reproduce.sh: AGGREGATORS and FLORA_NA_VARIANT do not combine; run them apart" >&2; exit 2
fi

# The comparison the report draws: the method, and the baseline it is measured against
# (stage 2 runs only these two; stage 3 runs every registered aggregator)
METHOD=flora_na; [[ $VARIANT != default ]] && METHOD=flora_na_$VARIANT   # a plug-in aggregator
BASELINE=fedit

PY=${PYTHON:-python}
CORES=$(nproc 2>/dev/null || echo 2)
if [[ $MODE == FULL ]]; then
    JOBS=${JOBS:-1}; THREADS=${THREADS:-0}; RESULTS=${RESULTS:-results/full}
    if [[ $VARIANT != default ]]; then RESULTS=${RESULTS%/}_$VARIANT; fi
else
    # Two single-thread runs side by side beat one two-thread run on 2 cores, and stay fast
    # when other processes load the machine (a 2-thread torch run slowed ~10x under load).
    JOBS=${JOBS:-$CORES}; THREADS=${THREADS:-1}; RESULTS=${RESULTS:-results/quick}
fi
[[ $TINY == 1 ]] && RESULTS=results/tiny
if [[ -n $AGGREGATORS && (${RESULTS%/} == results/quick || ${RESULTS%/} == results/full) ]]; then
    RESULTS=${RESULTS%/}_${AGGREGATORS//,/_}     # never into a full run's folder
fi
RUNS=$RESULTS/runs
export OMP_NUM_THREADS=${THREADS/#0/$CORES} TOKENIZERS_PARALLELISM=false

# --- budgets --------------------------------------------------------------------------------
declare -A REGIME_BASE   # the regime study's base setting: clients, steps, lr, alpha, rank
# QUICK was sized from measured CPU time on this 2-core Xeon (one torch thread per run, two runs
# side by side): MiniLM-L6 with LoRA r 8, batch 16, 64 tokens takes ~0.37 s per step on SST-2's
# short sentences and ~0.62 s on the MRPC/RTE pairs (full 64 tokens); dev evaluation of 400
# examples, FedSA's per-client evaluation and model loading add ~10-20% to each run;
# SmolLM2-135M, batch 4 x 256 tokens: ~7 CPU-s per step. Expected times assume the 2 cores are
# free; under load they stretch accordingly.
if [[ $MODE == FULL ]]; then
    # Paper scale (PAPER.md): RoBERTa-large, 3 clients, Dirichlet 0.5, 600 rounds x 10 local
    # SGD steps, batch 128, lr 0.02, max length 128, LoRA r 8 alpha 12, query/value.
    GLUE_MODEL=(--model "${ROBERTA:-roberta-large}")
    GLUE_TRAIN=(--rounds 600 --local-steps 10 --batch-size 128 --optimizer sgd --lr 0.02
                --max-length 128 --rank 8 --lora-alpha 12 --eval-every 10)
    GLUE_CLIENTS=3; SEEDS="0 1 2"; CENTRAL_STEPS=30
    # Regime study: the paper's setting as the base, 20 rounds (estimate, not measured)
    REGIME_TRAIN=(--rounds 20 --batch-size 128 --optimizer sgd --max-length 128 --eval-every 5)
    REGIME_BASE=([clients]=3 [steps]=10 [lr]=0.02 [alpha]=0.5 [rank]=8)
    REGIME_SETTINGS="steps50 steps25 clients10 steps5 steps1 lr0.005 lr0.05 alpha0.1 iid rank4 rank16 base"
    REGIME_ALPHA_PER_RANK=1.5; REGIME_PICK=2; REGIME_SEEDS="0 1 2"
    # GSM8K: the paper's LLaMA-2-7B setting; these hyperparameters are ours (PAPER.md lists none).
    GEN_MODEL=(--model "${LLAMA:-meta-llama/Llama-2-7b-hf}" --bf16 --gradient-checkpointing)
    GEN_TRAIN=(--clients 10 --rounds 20 --local-steps 10 --batch-size 16 --lr 3e-4 --rank 16
               --lora-alpha 32 --max-length 512 --eval-every 20 --eval-batch-size 32
               --max-new-tokens 256)
    GEN_AGGS="$BASELINE fedsa $METHOD"   # the paper's GSM8K comparison
    BENCH_ARGS=()
    # GPU times are estimates from FLOPs (~0.35 s per RoBERTa-large step of 128 x 128 tokens
    # in fp32/TF32 on an H100), not measurements.
    T1="~10 min"; T2="~4 GPU-h"; T3="~7 GPU-days (96 aggregator runs of ~1.75 h)"
    T5="~1 min"; T6="~4 GPU-h"
    # mixed ranks at the paper's GLUE scale (RoBERTa-large), clients 10, 100 rounds
    MIX_CLIENTS=10; MIX_RANK=16; MIX_REF_SEEDS=$SEEDS
    MIX_TRAIN=(--rounds 100 --local-steps 10 --batch-size 128 --optimizer sgd --lr 0.02
               --max-length 128 --lora-alpha 16 --eval-every 10)
    T7="~2 GPU-days (36 aggregator runs)"
    # compression at the GLUE stage's settings, 100 rounds (estimate: ~17 min per aggregator
    # run of 3,000 RoBERTa-large steps, 90 of them)
    COMP_TRAIN=(--clients 3 --dirichlet-alpha 0.5 --rounds 100 --local-steps 10 --batch-size 128
                --optimizer sgd --lr 0.02 --max-length 128 --rank 8 --lora-alpha 12
                --eval-every 10)
    COMP_SEEDS="0 1 2"; T9="~1.3 GPU-days (111 aggregator runs)"
    # privacy at the GLUE stage's settings, 100 rounds like compression (estimate: ~17 min per
    # aggregator run, 26 of them a seed); with 3 clients central DP's noise on the mean is
    # sigma C / 3 per value, so more clients (--clients) are what lets DP learn at this scale
    DP_TRAIN=(--clients 3 --participation 1 --dirichlet-alpha 0.5 --rounds 100 --local-steps 10
              --batch-size 128 --optimizer sgd --lr 0.02 --max-length 128 --rank 8
              --lora-alpha 12 --eval-every 10)
    DP_CLIP=1; DP_SEEDS=${DP_SEEDS:-0 1 2}; T10="~22 GPU-h (78 aggregator runs)"
    DP_CENTRAL_STEPS=30    # the centralised reference: 1 client x 30 steps = 3 clients x 10
else
    GLUE_MODEL=(--model minilm)
    # 3 clients (the authors' default), 10 rounds x 6 local AdamW steps of batch 16 at lr 2e-3,
    # 64 tokens, 3000 training examples, dev capped at 400, evaluated at rounds 5 and 10.
    # Calibrated with a centralised run of 300 steps (the trainable BERT pooler, train.py's
    # default --head-modules for BERT, is what lets MiniLM learn the pair tasks: STS-B Pearson
    # 0.81 with it, -0.03 without). Sized to what fits the session that produced RESULTS.md; more local
    # steps or rounds learn more, at proportionally more CPU time.
    GLUE_TRAIN=(--rounds 10 --local-steps 6 --batch-size 16 --lr 2e-3 --max-length 64
                --max-train-examples 3000 --max-eval-examples 400 --eval-every 5)
    GLUE_CLIENTS=3; SEEDS="0 1 2"; CENTRAL_STEPS=18   # 1 client x 18 steps = 3 clients x 6
    # MRPC and RTE are left out of QUICK: at this budget even the centralised run stays at the
    # majority class (MRPC 0.696 vs 0.687 at 180 steps; RTE at chance after 300), and learning
    # them costs far more than an hour of this CPU. Measured (RESULTS.md "Calibration"): with 128
    # tokens, a centralised 600 steps reach MRPC 0.79 (0.84 s/step) but RTE only 0.52-0.56
    # (1.57 s/step); federated FedIT with 3 clients x 20 local steps is still at MRPC's majority
    # after 10 rounds under Dirichlet 0.5 (0.75 with an IID split; ~9 CPU-min per aggregator
    # run), so the 24 runs of a learned MRPC column need several CPU-hours. GLUE_TASKS="rte mrpc stsb sst2"
    # runs them at this budget anyway; FULL mode (RoBERTa-large, 600 rounds) runs all four.
    QUICK_GLUE_TASKS="stsb sst2"
    # Regime study (stage 2; replaces the divergence study, one run of 10 clients x 5 steps
    # whose FedIT error was small, ~5 min, and the sensitivity stage, alpha and clients at one
    # seed, ~16 min): base 4 clients x 10 local steps, lr 2e-3, Dirichlet 0.5, r 8, 3 rounds,
    # every round evaluated. A run costs clients x steps x 3 steps of ~0.37 s (idle CPU) plus
    # ~20 s of loading and evaluation: the 12 sweep runs ~2,100 steps (~9 min with 2 jobs); the
    # accuracy runs 5 aggregator-seeds per picked setting (FedIT's seed 0 is the sweep's run),
    # at most ~4,500 steps (~15 min) when the picks are 50 and 25 local steps.
    REGIME_TRAIN=(--rounds 3 --batch-size 16 --max-length 64 --max-train-examples 4000
                  --max-eval-examples 400 --eval-every 1)
    REGIME_BASE=([clients]=4 [steps]=10 [lr]=2e-3 [alpha]=0.5 [rank]=8)
    REGIME_SETTINGS="steps50 steps25 clients10 steps5 steps1 lr5e-4 lr5e-3 alpha0.1 iid rank4 rank16 base"
    REGIME_ALPHA_PER_RANK=2; REGIME_PICK=2; REGIME_SEEDS="0 1 2"
    GEN_MODEL=(--model smollm2)
    GEN_TRAIN=(--clients 3 --rounds 2 --local-steps 3 --batch-size 4 --lr 2e-4 --max-length 256
               --max-train-examples 600 --max-eval-examples 30 --eval-every 2
               --eval-batch-size 30 --max-new-tokens 192)
    GEN_AGGS="$BASELINE $METHOD"
    BENCH_ARGS=()
    # 8 clients so that the heavy-tail profile holds every rank of 2, 4, 8, 16 (4, 2, 1, 1
    # clients); 6 rounds x 4 local steps, the GLUE stage's client settings otherwise; the
    # equal-rank references with one seed (the mixed-rank runs have three)
    MIX_CLIENTS=8; MIX_RANK=16; MIX_REF_SEEDS="0"
    MIX_TRAIN=(--rounds 6 --local-steps 4 --batch-size 16 --lr 2e-3 --max-length 64
               --max-train-examples 3000 --max-eval-examples 400 --eval-every 3)
    T1="~5 min"; T2="~25 min"; T3="~50 min"; T5="~3 min"; T6="~4 min"; T7="~12 min"
    # compression: 3 clients x 6 local steps x 3 rounds at lr 5e-3 (the regime study's fast
    # learning side: FedIT reached ~0.7 with 60-120 steps), two seeds: per seed 7 codecs x 5
    # aggregators of 54 steps plus evaluation, ~2.5 min a run and 18.3 min for both seeds with
    # 2 jobs on the idle EPYC; a third seed would pass 20 min
    COMP_TRAIN=(--clients 3 --dirichlet-alpha 0.5 --rounds 3 --local-steps 6 --batch-size 16
                --lr 5e-3 --max-length 64 --max-train-examples 3000 --max-eval-examples 400
                --eval-every 3)
    COMP_SEEDS="0 1"; T9="~18 min"
    # privacy: cross-device-like, since client-level DP's noise on the mean shrinks with the
    # clients a round averages (m) and grows with the values each sends (d): 160 clients, a
    # quarter (m = 40) sampled each round (the accountant's amplification by sampling), IID,
    # 4 rounds x 3 local AdamW steps of 8 examples at lr 1e-2, rank 1 (LoRA alpha 32) and no
    # pooler (d ~ 10k values for FedIT, ~5k for FFA-LoRA), C = 1.5 (the clients' change norms
    # are ~1.4-1.9 here). Calibrated on the EPYC: without DP FedIT reached 0.655 and FFA-LoRA
    # 0.693 (majority 0.5125); ~100 s an aggregator run, 26 a seed: ~22 min with 2 jobs.
    # DP_SEEDS="0 1 2" bash reproduce.sh --only 10 runs three seeds (~65 min).
    DP_TRAIN=(--clients 160 --participation 0.25 --dirichlet-alpha 0 --rounds 4 --local-steps 3
              --batch-size 8 --lr 1e-2 --max-length 64 --rank 1 --lora-alpha 32
              --head-modules none --max-train-examples 6000 --max-eval-examples 400
              --eval-every 2)
    DP_CLIP=1.5; DP_SEEDS=${DP_SEEDS:-0}; T10="~22 min"
    # the centralised reference: 1 client x 120 steps = 40 clients x 3, at lr 5e-4: at the
    # clients' 1e-2 one client's 480 sequential steps stay at chance (loss ~0.70 throughout,
    # all 3 seeds); 5e-4 reaches 0.785 (seed 0; 2e-3: 0.715)
    DP_CENTRAL_STEPS=120; DP_CENTRAL_LR=5e-4
fi
COMP_CODECS="none fp16 int8 int4 int2 topk0.1 topk0.01"; COMP_AWARE="int4 int2"
# privacy: the reported delta, the target epsilons: 1, 3, 8 (the usual range) and 64, past it,
# where the noise on the mean is smaller than the clipped signal for central DP at QUICK's m
DP_DELTA=1e-5; DP_EPSILONS="1 3 8 64"
MIX_SEEDS=$SEEDS
if [[ $TINY == 1 ]]; then   # plumbing only: every code path, numbers meaningless, minutes
    # a smoke subset of the tests (the data layer and one report section), not the suite
    PYTEST_ARGS=${PYTEST_ARGS:--x tests/test_data.py tests/test_report_glue.py}
    GLUE_TRAIN=(--rounds 2 --local-steps 1 --batch-size 4 --lr 5e-3 --max-length 32
                --max-train-examples 120 --max-eval-examples 24 --eval-every 1)
    SEEDS="0 1"; CENTRAL_STEPS=3
    REGIME_TRAIN=(--rounds 2 --batch-size 4 --max-length 32 --max-train-examples 200
                  --max-eval-examples 24 --eval-every 1)
    REGIME_BASE=([clients]=3 [steps]=1 [lr]=5e-3 [alpha]=0.5 [rank]=4)
    REGIME_SETTINGS="steps2 base"; REGIME_PICK=1; REGIME_SEEDS="0 1"
    GEN_TRAIN=(--clients 2 --rounds 1 --local-steps 1 --batch-size 2 --lr 2e-4 --max-length 96
               --max-train-examples 40 --max-eval-examples 2 --eval-every 1
               --eval-batch-size 2 --max-new-tokens 24)
    GEN_AGGS=$METHOD
    BENCH_ARGS=(--quick)
    MIX_CLIENTS=4; MIX_SEEDS="0"
    MIX_TRAIN=(--rounds 2 --local-steps 1 --batch-size 4 --max-length 32
               --max-train-examples 200 --max-eval-examples 24 --eval-every 2)
    COMP_TRAIN=(--clients 2 --rounds 1 --local-steps 1 --batch-size 4 --lr 5e-3 --max-length 32
                --max-train-examples 60 --max-eval-examples 16 --eval-every 1)
    COMP_SEEDS="0"; COMP_CODECS="none int4 topk0.01"; COMP_AWARE="int4"
    DP_TRAIN=(--clients 2 --rounds 1 --local-steps 1 --batch-size 4 --lr 5e-3 --max-length 32
              --max-train-examples 60 --max-eval-examples 16 --eval-every 1)
    DP_SEEDS="0"; DP_EPSILONS="8"; DP_CENTRAL_STEPS=2
    T1="~20 s"; T2="~30 s"; T3="~1.5 min"; T5="~20 s"; T6="~1 min"; T7="~30 s"; T9="~40 s"
    T10="~40 s"
fi
# every upload codec, these aggregators: the exact peers that send one factor (FFA-LoRA, RoLoRA)
# or a rank-r SVD (FlexLoRA) beside the baseline and the method
COMP_AGGS=${COMP_AGGS:-$BASELINE,ffa,flexlora,rolora,$METHOD}
# privacy: central DP for aggregators whose release is linear in the uploads (train.py refuses
# the others), local DP for any; both lists also run without DP and with clipping alone
DP_CENTRAL_AGGS=${DP_CENTRAL_AGGS:-$BASELINE,ffa}
DP_LOCAL_AGGS=${DP_LOCAL_AGGS:-$BASELINE,ffa,$METHOD}
# without a folder given, train.py finds the data itself (harness.tasks.data_root)
COMMON=(${DATA:+--data-dir "$DATA"} --threads "$THREADS" --resume)
if [[ $VARIANT != default ]]; then COMMON+=(--plugins "evidence.${VARIANT}_variant"); fi
GLUE_TASKS=${GLUE_TASKS:-${QUICK_GLUE_TASKS:-rte mrpc stsb sst2}}   # longest runs first
if [[ -n ${REGIME_ONLY:-} ]]; then   # these settings and the base (the study's reference)
    REGIME_SETTINGS="${REGIME_ONLY//base/} base"
    REGIME_PICK=$(wc -w <<<"${REGIME_ONLY//base/}")
fi
MIXED_AGGREGATORS=""               # those of AGGREGATORS that accept clients of mixed ranks
if [[ -n $AGGREGATORS ]]; then     # registered names, each once, neither the method nor the baseline
    MIXED_AGGREGATORS=$("$PY" - "$AGGREGATORS" "$METHOD" "$BASELINE" <<'EOF'
import sys
import flora_na as fl
names, refs = sys.argv[1].split(","), sys.argv[2:]
bad = [n for n in names if n not in fl.AGGREGATORS]
if bad or len(set(names)) < len(names) or set(names) & set(refs):
    sys.exit(f"reproduce.sh: AGGREGATORS={sys.argv[1]}: "
             + (f"not registered: {', '.join(bad)} (registered: {', '.join(fl.AGGREGATORS)})"
                if bad else "name each once, and neither " + " nor ".join(refs)
                + " (they run beside them as references)"))
print(",".join(n for n in names if fl.AGGREGATORS[n].mixed_ranks))
EOF
) || exit 2
fi

# --- helpers --------------------------------------------------------------------------------

aggregators_at() {   # aggregators_at SEED REFS: the --aggregator of a run that trains REFS:
    # REFS itself; with AGGREGATORS, those, and REFS beside them only at the seeds in REF_SEEDS
    if [[ -z $AGGREGATORS ]]; then echo "$2"
    elif [[ -n $2 && " $REF_SEEDS " == *" $1 "* ]]; then echo "$AGGREGATORS,$2"
    else echo "$AGGREGATORS"; fi
}

wanted() {   # wanted N: is stage N selected?
    if [[ -n $ONLY && ",$ONLY," != *",$1,"* && $1 != 8 ]]; then return 1; fi
    [[ ",$SKIP," != *",$1,"* ]]
}

banner() {   # banner N "title" "expected time"
    printf '\n==============================================================================\n'
    printf ' Stage %s: %s   [%s, expected %s on %s]\n' "$1" "$2" "$MODE$([[ $TINY == 1 ]] && echo ' TINY')" \
        "$3" "$([[ $MODE == FULL ]] && echo 'one GPU' || echo 'a 2-core CPU')"
    printf '==============================================================================\n'
}

quote() {   # the command as one shell-ready line (quotes only where needed)
    local a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./,=:+@-]+$ ]]; then printf '%s ' "$a"; else printf '%q ' "$a"; fi
    done
}

run() {   # run OUT_DIR CMD...: one logged run, skipped if it already finished with this command
    # its log goes beside the run folder, OUT_DIR.log: train.py refuses an --out holding files
    # that are not a run's
    local out=$1; shift
    local cmd; cmd=$(quote "$@")
    if [[ $DRY_RUN == 1 ]]; then echo "$cmd"; return 0; fi
    if [[ -f $out/DONE && $(cat "$out/DONE") == "$cmd" ]]; then
        echo "  done already: $out"; return 0
    fi
    mkdir -p "$out"
    echo "  start $(date +%H:%M:%S)  $out   (log: $out.log)"
    local t0=$SECONDS pid
    "$@" >>"$out.log" 2>&1 &           # in the background, so a signal can reach it
    pid=$!
    trap 'kill "$pid" 2>/dev/null' INT TERM
    if wait "$pid"; then
        echo "$cmd" >"$out/DONE"
        echo "  done  $(date +%H:%M:%S)  $out   ($((SECONDS - t0)) s)"
    else
        local rc=$?
        if ((rc > 128)); then
            echo "  stopped $out (signal $((rc - 128))); the next run of this script resumes it" >&2
        else
            echo "  FAILED (exit $rc) $out; last lines of $out.log:" >&2
            tail -n 15 "$out.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 15 | sed 's/^/    /' >&2
        fi
        return "$rc"
    fi
}

# A pool of at most JOBS runs at a time; failures are collected in a file, not lost.
POOL_FAILS=""
pool_start() {
    POOL_FAILS=$(mktemp)
    trap 'kill $(jobs -p) 2>/dev/null; wait; exit 130' INT TERM   # stop this stage's runs
}
pool_run() {   # pool_run OUT_DIR CMD...
    if [[ $DRY_RUN == 1 ]]; then run "$@"; return 0; fi   # printed in order, not raced
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n 2>/dev/null || true; done
    ( run "$@" || echo "$1" >>"$POOL_FAILS" ) &
}
pool_wait() {   # wait for every run; fail if any failed, recording the first one's error
    wait
    if [[ -s $POOL_FAILS ]]; then
        echo "  $(wc -l <"$POOL_FAILS") run(s) failed:" >&2; sed 's/^/    /' "$POOL_FAILS" >&2
        local first; first=$(head -n 1 "$POOL_FAILS")
        [[ -s $FIRST_ERROR ]] || echo "$first: $(tr '\r' '\n' <"$first.log" | grep -v '^\s*$' \
            | grep -i 'error' | tail -n 1)" >"$FIRST_ERROR"
        rm -f "$POOL_FAILS"; return 1
    fi
    rm -f "$POOL_FAILS"
}
trap 'echo "reproduce.sh: interrupted" >&2; exit 130' INT TERM

TRAIN=("$PY" train.py)
FIRST_ERROR=$RESULTS/.first_error   # the first failed run's error, for the stage's record

preflight() {   # every task the selected stages train on loads, from where train.py reads it
    local tasks=()
    wanted 2 && tasks+=(sst2)
    wanted 3 && tasks+=($GLUE_TASKS)
    wanted 6 && tasks+=(gsm8k)
    wanted 7 && tasks+=(sst2)
    wanted 9 && tasks+=(sst2)
    wanted 10 && tasks+=(sst2)
    ((${#tasks[@]})) || return 0
    local list; list=$(printf '%s\n' "${tasks[@]}" | sort -u | paste -sd, -)
    echo "preflight: loading $list ${DATA:+from $DATA}"
    if ! $PY -m harness.data check --tasks "$list" ${DATA:+--data-dir "$DATA"}; then
        echo "reproduce.sh: stopped before any stage: the data above cannot be read." >&2
        exit 2
    fi
}

# --- stages ---------------------------------------------------------------------------------

stage_1() {
    banner 1 "tests" "$T1"
    # shellcheck disable=SC2086
    if [[ $DRY_RUN == 1 ]]; then echo "$PY -m pytest -q ${PYTEST_ARGS:-}"; return 0; fi
    $PY -m pytest -q ${PYTEST_ARGS:-}
}

regime_args() {   # regime_args SETTING: train.py's options for one setting of the regime study
    # SETTING is "base" or one factor changed from REGIME_BASE: steps<N>, lr<LR>, alpha<A>,
    # iid (Dirichlet alpha 0), rank<R> (LoRA alpha scales with it), clients<U>
    local clients=${REGIME_BASE[clients]} steps=${REGIME_BASE[steps]} lr=${REGIME_BASE[lr]}
    local alpha=${REGIME_BASE[alpha]} rank=${REGIME_BASE[rank]}
    case $1 in
        base) ;;
        steps*) steps=${1#steps} ;;
        lr*) lr=${1#lr} ;;
        alpha*) alpha=${1#alpha} ;;
        iid) alpha=0 ;;
        rank*) rank=${1#rank} ;;
        clients*) clients=${1#clients} ;;
        *) echo "reproduce.sh: unknown regime setting $1" >&2; return 2 ;;
    esac
    echo --clients "$clients" --local-steps "$steps" --lr "$lr" --dirichlet-alpha "$alpha" \
        --rank "$rank" --lora-alpha "$(awk "BEGIN {print $REGIME_ALPHA_PER_RANK * $rank}")"
}

stage_2() {
    # Replaces the divergence study (one run whose FedIT error was small, so it could not show
    # where aggregation error matters) and the sensitivity stage (accuracy across alpha and
    # client count at one seed, differences within noise): this sweep covers alpha and client
    # count for the error, and compares accuracy over 3 seeds where the error is largest.
    banner 2 "regime study: $BASELINE on SST-2, one factor at a time around $(regime_args base
        ) ($METHOD's variants tracked); then $METHOD vs $BASELINE${AGGREGATORS:+ with $AGGREGATORS} at the $REGIME_PICK largest errors" "$T2"
    local name seed setting
    pool_start
    for name in $REGIME_SETTINGS; do  # FedIT with every FLoRA-NA variant tracked, seed 0
        setting=$(regime_args "$name")
        # shellcheck disable=SC2086
        pool_run "$RUNS/regime/$name" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" \
            --aggregator "$BASELINE" --track-solvers --seed 0 $setting "${REGIME_TRAIN[@]}" \
            "${COMMON[@]}" --out "$RUNS/regime/$name"
    done
    pool_wait
    if [[ $DRY_RUN == 1 ]]; then
        echo "# then, at the $REGIME_PICK setting(s) with the largest $BASELINE divergence" \
             "(picked from the runs above): $(aggregators_at 0 "$METHOD") at seed 0," \
             "$(aggregators_at 1 "$BASELINE,$METHOD") at the other seeds of {$REGIME_SEEDS}," \
             "into $RUNS/regime/<setting>_seed<seed>"
        return 0
    fi
    local picked
    picked=$($PY -c 'import sys; from evidence.report_regime import largest_error
print(*largest_error(sys.argv[1], int(sys.argv[2])))' "$RESULTS" "$REGIME_PICK")
    echo "  largest $BASELINE divergence: $picked; $METHOD vs $BASELINE over seeds {$REGIME_SEEDS}"
    # longest runs first (clients x local steps; seed 0 trains one aggregator), so that the
    # pool's two jobs end together
    picked=$(for name in $picked; do
        read -r _ clients _ steps _ <<<"$(regime_args "$name")"; echo "$((clients * steps)) $name"
    done | sort -rn | cut -d' ' -f2)
    pool_start
    for name in $picked; do
        setting=$(regime_args "$name")
        for seed in $(printf '%s\n' $REGIME_SEEDS | sort -r); do  # seed 0's FedIT is the tracked run
            local aggs="$BASELINE,$METHOD"
            [[ $seed == 0 ]] && aggs=$METHOD
            aggs=$(aggregators_at "$seed" "$aggs")
            # shellcheck disable=SC2086
            pool_run "$RUNS/regime/${name}_seed$seed" "${TRAIN[@]}" --task sst2 \
                "${GLUE_MODEL[@]}" --aggregator "$aggs" --seed "$seed" $setting \
                "${REGIME_TRAIN[@]}" "${COMMON[@]}" --out "$RUNS/regime/${name}_seed$seed"
        done
    done
    pool_wait
}

stage_3() {
    banner 3 "GLUE table: ${AGGREGATORS:-every aggregator} x {$GLUE_TASKS} x seeds {$SEEDS}, $GLUE_CLIENTS clients, Dirichlet 0.5, + centralised" "$T3"
    pool_start
    local task seed out all=all      # with AGGREGATORS: those, the references at REF_SEEDS
    [[ -n $AGGREGATORS ]] && all="$BASELINE,$METHOD"
    for seed in $SEEDS; do           # seed by seed, so an interrupted stage still covers every
        for task in $GLUE_TASKS; do  # task; the long pair tasks first balances the pool better
            out=$RUNS/glue/${task}_seed$seed
            pool_run "$out" "${TRAIN[@]}" --task "$task" "${GLUE_MODEL[@]}" \
                --aggregator "$(aggregators_at "$seed" "$all")" \
                --clients "$GLUE_CLIENTS" --dirichlet-alpha 0.5 --seed "$seed" \
                "${GLUE_TRAIN[@]}" "${COMMON[@]}" --out "$out"
        done
        [[ -z $AGGREGATORS || " $REF_SEEDS " == *" $seed "* ]] || continue
        for task in $GLUE_TASKS; do
            # centralised reference: one client holding all the data (IID), as many examples
            # per round as all federated clients together (local steps x clients)
            out=$RUNS/glue/${task}_centralised_seed$seed
            # (FedIT with one client is plain training: its average of one is the identity)
            pool_run "$out" "${TRAIN[@]}" --task "$task" "${GLUE_MODEL[@]}" --aggregator fedit \
                --clients 1 --dirichlet-alpha 0 --seed "$seed" \
                "${GLUE_TRAIN[@]}" --local-steps "$CENTRAL_STEPS" "${COMMON[@]}" --out "$out"
        done
    done
    pool_wait
}

stage_5() {
    banner 5 "solver benchmark (bench_solver.py, LLaMA-2-7B adapter shapes)" "$T5"
    local out=$RUNS/bench/bench_solver.json
    local extra=()
    # pass our thread count when the benchmark knows the option
    if $PY -m evidence.bench_solver --help 2>/dev/null | grep -q -- '--threads'; then
        extra=(--threads "$THREADS")
    fi
    if [[ $DRY_RUN == 1 ]]; then quote "$PY" -m evidence.bench_solver "${BENCH_ARGS[@]}" "${extra[@]}" --out "$out"; echo; return 0; fi
    mkdir -p "$(dirname "$out")"
    $PY -m evidence.bench_solver "${BENCH_ARGS[@]}" "${extra[@]}" --out "$out" 2>&1 | tee "$RUNS/bench/log.txt"
}

stage_6() {
    banner 6 "generation: federated GSM8K ($(
        [[ $MODE == FULL ]] && echo LLaMA-2-7B || echo SmolLM2-135M); aggregators {$GEN_AGGS})" "$T6"
    pool_start
    local agg
    for agg in $GEN_AGGS; do         # one process per aggregator, so they run side by side
        local out=$RUNS/generation/gsm8k_$agg
        pool_run "$out" "${TRAIN[@]}" --task gsm8k "${GEN_MODEL[@]}" --aggregator "$agg" \
            --dirichlet-alpha 0.5 --seed 0 "${GEN_TRAIN[@]}" "${COMMON[@]}" --out "$out"
    done
    pool_wait
    [[ $DRY_RUN == 1 ]] && return 0
    for agg in $GEN_AGGS; do         # accuracy with the size of the evaluated subset
        $PY - "$RUNS/generation/gsm8k_$agg/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = [r for r in rows if r["metrics"]][-1]
m = last["metrics"]
print(f"  GSM8K {last['aggregator']}: accuracy {m['accuracy']:.3f} = "
      f"{round(m['accuracy'] * m['n_eval'])}/{m['n_eval']} test problems after round {last['round']}")
EOF
    done
}

stage_7() {
    banner 7 "mixed ranks: SST-2, $MIX_CLIENTS clients of heavy-tail ranks up to $MIX_RANK, ${AGGREGATORS:+of $AGGREGATORS }every mixed-rank aggregator x seeds {$MIX_SEEDS}" "$T7"
    if [[ $VARIANT != default ]]; then   # its coefficients act on changes from one global rank
        echo "  skipped: FLORA_NA_VARIANT=$VARIANT needs every client at the global rank"; return 0
    fi
    if [[ -n $AGGREGATORS && $MIXED_AGGREGATORS != "$AGGREGATORS" ]]; then
        echo "  mixed ranks: ${MIXED_AGGREGATORS:-none} of $AGGREGATORS (the others run at equal ranks only)"
    fi
    pool_start
    local seed r out aggs
    for seed in $MIX_SEEDS; do
        out=$RUNS/mixed_ranks/heavy_tail_seed$seed
        aggs=all                     # with AGGREGATORS: those that accept mixed ranks (+ references)
        if [[ -n $AGGREGATORS ]]; then
            aggs=$MIXED_AGGREGATORS
            [[ " $REF_SEEDS " == *" $seed "* ]] && aggs=${aggs:+$aggs,}$BASELINE,$METHOD
        fi
        [[ -n $aggs ]] && pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" \
            --aggregator "$aggs" --clients "$MIX_CLIENTS" --rank "$MIX_RANK" \
            --rank-profile heavy_tail --dirichlet-alpha 0.5 --seed "$seed" "${MIX_TRAIN[@]}" \
            "${COMMON[@]}" --out "$out"
        [[ " $MIX_REF_SEEDS " == *" $seed "* ]] || continue
        for r in 2 "$MIX_RANK"; do   # references: every client at the smallest / largest rank
            out=$RUNS/mixed_ranks/equal_rank${r}_seed$seed
            pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" \
                --aggregator "$(aggregators_at "$seed" "$BASELINE,$METHOD")" \
                --clients "$MIX_CLIENTS" --rank "$r" \
                --dirichlet-alpha 0.5 --seed "$seed" "${MIX_TRAIN[@]}" "${COMMON[@]}" --out "$out"
        done
    done
    pool_wait
}

codec_args() {   # codec_args SPEC: train.py's options for an upload codec (topk<fraction>: top-k)
    case $1 in
        topk*) echo --upload-codec topk --topk-fraction "${1#topk}" ;;
        *) echo --upload-codec "$1" ;;
    esac
}

stage_9() {
    banner 9 "compression: SST-2, {$COMP_AGGS} x upload codecs {$COMP_CODECS} x seeds {$COMP_SEEDS}; $METHOD's noise-aware Gram at {$COMP_AWARE}" "$T9"
    pool_start
    local seed spec out
    for seed in $COMP_SEEDS; do
        for spec in $COMP_CODECS; do
            out=$RUNS/compression/${spec}_seed$seed
            # shellcheck disable=SC2046
            pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" --aggregator "$COMP_AGGS" \
                $(codec_args "$spec") --seed "$seed" "${COMP_TRAIN[@]}" "${COMMON[@]}" --out "$out"
        done
        [[ $VARIANT == default ]] || continue   # the noise-aware Gram is the method's option
        for spec in $COMP_AWARE; do   # this project's own addition (flora_na.py, section 3)
            out=$RUNS/compression/${spec}_seed${seed}_noise_aware
            # shellcheck disable=SC2046
            pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" --aggregator "$METHOD" \
                $(codec_args "$spec") --upload-variance \
                --agg-option "$METHOD.gram_correction=noise_aware" --seed "$seed" \
                "${COMP_TRAIN[@]}" "${COMMON[@]}" --out "$out"
        done
    done
    pool_wait
}

stage_10() {
    banner 10 "privacy: SST-2, client-level DP (C $DP_CLIP, delta $DP_DELTA) at target epsilons {$DP_EPSILONS} x seeds {$DP_SEEDS}: central {$DP_CENTRAL_AGGS}, local {$DP_LOCAL_AGGS}, and {$DP_LOCAL_AGGS} without DP and with clipping alone" "$T10"
    local seed eps out dp=(--dp-clip "$DP_CLIP" --dp-delta "$DP_DELTA")
    pool_start
    for seed in $DP_SEEDS; do
        # the references: no DP; clipping to C alone (local DP with no noise, epsilon unbounded)
        out=$RUNS/privacy/none_seed$seed
        pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" --aggregator "$DP_LOCAL_AGGS" \
            --seed "$seed" "${DP_TRAIN[@]}" "${COMMON[@]}" --out "$out"
        out=$RUNS/privacy/clip_seed$seed
        pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" --aggregator "$DP_LOCAL_AGGS" \
            --dp local --dp-noise 0 "${dp[@]}" --seed "$seed" "${DP_TRAIN[@]}" "${COMMON[@]}" \
            --out "$out"
        # centralised reference (the guide's check that this budget teaches at all): one client
        # holding all the data, IID, as many examples a round as the m sampled clients together
        # (DP_CENTRAL_LR, where set: an lr for its sequential steps)
        out=$RUNS/privacy/centralised_seed$seed
        pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" --aggregator "$BASELINE" \
            --seed "$seed" "${DP_TRAIN[@]}" --clients 1 --participation 1 --dirichlet-alpha 0 \
            --local-steps "$DP_CENTRAL_STEPS" ${DP_CENTRAL_LR:+--lr "$DP_CENTRAL_LR"} \
            "${COMMON[@]}" --out "$out"
        for eps in $DP_EPSILONS; do   # sigma calibrated to spend eps over the planned rounds
            out=$RUNS/privacy/local_eps${eps}_seed$seed
            pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" \
                --aggregator "$DP_LOCAL_AGGS" --dp local --dp-target-epsilon "$eps" "${dp[@]}" \
                --seed "$seed" "${DP_TRAIN[@]}" "${COMMON[@]}" --out "$out"
            out=$RUNS/privacy/central_eps${eps}_seed$seed
            pool_run "$out" "${TRAIN[@]}" --task sst2 "${GLUE_MODEL[@]}" \
                --aggregator "$DP_CENTRAL_AGGS" --dp central --dp-target-epsilon "$eps" \
                "${dp[@]}" --seed "$seed" "${DP_TRAIN[@]}" "${COMMON[@]}" --out "$out"
        done
    done
    pool_wait
}

stage_8() {
    banner 8 "report: $RESULTS/REPORT.md and figures" "~30 s"
    local pages=()
    # RESULTS.md, figures/ and README's headline are rewritten only with --publish, and only
    # from a real run kept inside this repository (never TINY, nor RESULTS=/somewhere/else)
    if [[ $PUBLISH == 1 ]]; then
        if [[ $VARIANT == default && $RESULTS != /* && $RESULTS != ..* ]]; then
            pages=(--page RESULTS.md --readme README.md)
            # some aggregators only: their own block on the results page, no headline
            [[ -n $AGGREGATORS ]] && pages=(--page RESULTS.md)
        else
            echo "  --publish: not from $RESULTS (FLORA_NA_VARIANT or a folder outside the repository)" >&2
        fi
    fi
    local cmd=("$PY" -m evidence.report "$RESULTS" --method "$METHOD" --baseline "$BASELINE"
               ${AGGREGATORS:+--aggregators "$AGGREGATORS"} "${pages[@]}")
    if [[ $DRY_RUN == 1 ]]; then quote "${cmd[@]}"; echo; return 0; fi
    "${cmd[@]}"
}

# --- main -----------------------------------------------------------------------------------

# the command this run amounts to, for each stage's provenance line in the report
INVOCATION="bash reproduce.sh${ONLY:+ --only $ONLY}${SKIP:+ --skip $SKIP}"
[[ $MODE == FULL ]] && INVOCATION+=" --mode FULL"
[[ $TINY == 1 ]] && INVOCATION+=" --tiny"
[[ $VARIANT != default ]] && INVOCATION="FLORA_NA_VARIANT=$VARIANT $INVOCATION"
[[ -n ${REGIME_ONLY:-} ]] && INVOCATION="REGIME_ONLY=\"$REGIME_ONLY\" $INVOCATION"
[[ -n ${DP_SEEDS_SET:-} ]] && INVOCATION="DP_SEEDS=\"$DP_SEEDS_SET\" $INVOCATION"
[[ -n $AGGREGATORS ]] && INVOCATION="AGGREGATORS=$AGGREGATORS REF_SEEDS=\"$REF_SEEDS\" $INVOCATION"
NAMES=([1]=tests [2]=regime [3]=glue [5]=bench [6]=generation [7]=mixed_ranks [9]=compression
       [10]=privacy [8]=report)
echo "reproduce.sh: MODE=$MODE TINY=$TINY results in $RESULTS/, data from ${DATA:-the first of ./data, ../shared/data, the Hub}," \
     "$JOBS parallel run(s) x $THREADS thread(s) (0 = all), $(date '+%F %T')"
if [[ $DRY_RUN != 1 ]]; then
    preflight
    mkdir -p "$RUNS"
    printf '{"mode": "%s", "tiny": %s, "started": "%s", "jobs": %s, "threads": %s, "only": "%s", "skip": "%s", "aggregators": "%s"}\n' \
        "$MODE" "$([[ $TINY == 1 ]] && echo true || echo false)" "$(date '+%F %T')" "$JOBS" \
        "$THREADS" "$ONLY" "$SKIP" "$AGGREGATORS" >"$RESULTS/pipeline.json"
fi
FAILED=()
for n in 1 2 3 5 6 7 9 10 8; do   # the report (8) last
    wanted "$n" || continue
    t0=$SECONDS
    rm -f "$FIRST_ERROR"
    set +e
    ( set -e; "stage_$n" )          # a subshell, so errexit holds inside the stage
    rc=$?
    set -e
    status=$([[ $rc == 0 ]] && echo ok || echo "failed($rc)")
    error=""
    if ((rc != 0)); then
        FAILED+=("$n")
        error=$(cat "$FIRST_ERROR" 2>/dev/null || echo "exit status $rc; see the output above")
        error=$(printf '%s' "$error" | tr '\t\n' '  ')
    fi
    if [[ $DRY_RUN != 1 ]]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "${NAMES[$n]}" "$status" \
            "$((SECONDS - t0))" "$(date '+%F %T')" "$MODE$([[ $TINY == 1 ]] && echo ' TINY')" \
            "$JOBS" "$THREADS" "$INVOCATION" "$error" >>"$RESULTS/stage_times.tsv"
    fi
    echo "stage $n (${NAMES[$n]}): $status in $((SECONDS - t0)) s"
done
if ((${#FAILED[@]})); then
    echo "reproduce.sh: stage(s) ${FAILED[*]} failed; their logs are under $RUNS/" >&2
    exit 1
fi
echo "reproduce.sh: all selected stages finished; the report is $RESULTS/REPORT.md (figures beside it)"
if [[ $TINY == 1 ]]; then
    echo "  That was the smoke run: its numbers are not results. The full CPU run, bash reproduce.sh" \
         "(QUICK), takes ~96 min on an idle 2-core Xeon and ~3 h on a 2-core EPYC (stage 3 alone" \
         "~95 min there); MODE=FULL, the paper's scale, needs a GPU for days (DRY_RUN=1 lists it)."
elif [[ $PUBLISH != 1 && $DRY_RUN != 1 ]]; then
    echo "  RESULTS.md, figures/ and README.md are untouched; --publish writes this run into them."
fi
