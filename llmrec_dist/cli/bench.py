"""`llmrec-dist bench`: benchmarks that print a table and write a JSON file each (dataset, config, git
revision, machine, figures); `bench report` turns those files into the results table of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from llmrec_dist.bench.common import DEFAULT_OUT
from llmrec_dist.bench.memory import DEFAULT_SIZES
from llmrec_dist.bench.peers import DEFAULT_WORK as DEFAULT_PEER_WORK
from llmrec_dist.bench.peers import PEERS
from llmrec_dist.bench.serve_load import SCENARIOS as SERVE_SCENARIOS
from llmrec_dist.cli.recommend import add_space_arguments

KINDS = ("quality", "speed", "ingest", "memory", "lm-memory", "startup", "towers", "rating-baselines", "rerank",
         "diversity", "explain", "serve", "privacy", "growth", "peers", "report")


def _common(p, config_required: bool = True) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON result (default {DEFAULT_OUT})")
    p.add_argument("--label", default="", help="suffix of the result file: <benchmark>-<label>.json")
    if config_required:
        p.add_argument("--config", required=True, help="training config (YAML)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = _int_list(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value[0]


def _blends(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative numbers, got {text!r}")
    return values


def _lambdas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers between 0 and 1, got {text!r}")
    return sorted(set(values) | {0.0})  # λ = 0 is the reference the NDCG loss is measured from


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks: quality, speed/scaling, ingest, memory, start-up under load, item towers; "
                  "results table",
        description="Run one benchmark. Each prints a table and writes <out>/<benchmark>[-<label>].json "
                    "with the dataset, config, git revision, machine and figures. `bench report` writes "
                    "the results table (docs/benchmarks.md) from those files. Figures only: nothing here "
                    "asserts a time.")
    kinds = p.add_subparsers(dest="kind", metavar="BENCHMARK", required=True)

    q = kinds.add_parser("quality", help="one full training run; test HR/NDCG/MRR@10 next to published anchors",
                         description="Train the config to its end (early stopping on validation), then report "
                                     "test metrics with full ranking, epochs and wall time. With --refit, train "
                                     "the same config again through each user's validation item for the "
                                     "chosen number of epochs and report its test metrics too.")
    _common(q)
    q.add_argument("--refit", action="store_true",
                   help="after the validated run, refit for its best epoch + 1 epochs on the histories "
                        "through the validation item (train.refit_epochs) and test that model as well")

    s = kinds.add_parser("speed", help="sequences/s with 1 and 2 workers, scaling efficiency, start-up, profile",
                         description="Run `llmrec-dist train` once per worker count, each in its own process; "
                                     "report sequences/s and s/epoch of the last epoch, the time to the first "
                                     "training step, a per-step profile and peak RSS per worker.")
    _common(s)
    s.add_argument("--workers", type=_int_list, default=[1, 2], help="worker counts (default 1,2)")
    s.add_argument("--epochs", type=_positive, default=2, help="epochs per run (default 2; the last is timed)")
    s.add_argument("--profile-steps", type=int, default=20, help="training steps profiled in epoch 0 (default 20)")
    s.add_argument("--ceiling-steps", type=_non_negative, default=20,
                   help="timed steps of each case of the machine's scaling ceiling, measured without Ray "
                        "(default 20; 0 skips it)")

    i = kinds.add_parser("ingest", help="Parquet → worker batches throughput with no model; memory per worker",
                         description="The training data pipeline alone (Ray Data, shard split, shuffle, "
                                     "bucketing, collate), timed per epoch on every worker.")
    _common(i)
    i.add_argument("--epochs", type=_positive, default=3, help="epochs (default 3; epoch 0 is reported apart)")

    m = kinds.add_parser("memory", help="full vs sampled softmax head over synthetic catalogues of 10^3..10^6 items",
                         description="One fresh process per (catalogue size, loss): seconds per training step "
                                     "and peak RSS; full softmax is skipped where its logits cannot fit.")
    _common(m, config_required=False)
    m.add_argument("--sizes", type=_int_list, default=list(DEFAULT_SIZES),
                   help="catalogue sizes (default " + ",".join(str(n) for n in DEFAULT_SIZES) + ")")
    m.add_argument("--batch", type=_positive, default=64, help="sequences per step (default 64: one of 2 workers)")
    m.add_argument("--length", type=_positive, default=200, help="sequence length (default 200)")
    m.add_argument("--steps", type=_positive, default=3, help="timed steps per case (default 3)")
    m.add_argument("--negatives", type=_positive, default=256, help="sampled softmax negatives (default 256)")

    lm = kinds.add_parser("lm-memory", help="peak memory of a worker training the LM, against the pre-flight estimate",
                          description="One fresh process per case (freezing strategy x batch size x "
                                      "train.lm_items_per_step): the worker's model, its largest training "
                                      "steps, an LM cache refresh, a validation pass and a checkpoint, with the "
                                      "measured peak RSS next to the estimate `llmrec-dist train` checks before "
                                      "it starts, seconds per step, and the fitted MB per LM item per step.")
    _common(lm)
    lm.add_argument("--strategies", default="frozen,top_k,full,lora",
                    help="comma-separated: id, frozen, top_k, full, lora (default frozen,top_k,full,lora)")
    lm.add_argument("--batch-sizes", type=_int_list, default=[32, 128], help="per-worker batch sizes (default 32,128)")
    lm.add_argument("--lm-items", type=lambda t: [int(v) for v in t.split(",")], default=[64, 256, 1024],
                    help="train.lm_items_per_step values for top_k/full/lora; 0 = every distinct item "
                         "(default 64,256,1024)")
    lm.add_argument("--steps", type=_positive, default=2, help="largest steps measured per case (default 2)")
    lm.add_argument("--eval-users", type=_positive, default=2048, help="validation users scored (default 2048)")

    st = kinds.add_parser("startup", help="the quickstart's wall time on a quiet machine and beside busy processes",
                          description="Run `llmrec-dist quickstart` twice, each in a fresh process and temporary "
                                      "folder with its own local Ray: once on a quiet machine, once while "
                                      "--busy busy-loop processes keep the cores busy. Report both wall times "
                                      "and start-ups (process start → first training step), their ratios and "
                                      "the lines each run printed.")
    _common(st, config_required=False)
    st.add_argument("--busy", type=_non_negative, default=None,
                    help="busy-loop processes during the loaded run (default: one per core)")
    st.add_argument("--timeout", type=_positive, default=1800, help="seconds allowed per run (default 1800)")
    st.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="quickstart config overrides, e.g. train.epochs=1")

    t = kinds.add_parser("towers", help="item tower × freezing strategy matrix (equal budget per cell)",
                         description="Train one model per item_repr × freeze cell with the same budget; "
                                     "report test NDCG@10 overall, on cold items and by the target's "
                                     "training frequency (eval.freq_buckets), s/epoch, parameters.")
    _common(t)
    t.add_argument("--cells", default="all", help="comma-separated item_repr:freeze cells, e.g. id:-,text:frozen")

    rb = kinds.add_parser("rating-baselines", help="classical rating baselines (mean, biases, SVD, SVD++) on a split",
                          description="Fit the global mean, user + item biases and, when scikit-surprise is "
                                      "installed, SVD and SVD++ on the ratings of the train split's events; "
                                      "choose each one's setting on the validation targets and report RMSE "
                                      "and MAE on the test targets, the pairs the rating task is scored on. "
                                      "The dataset needs explicit feedback (ratings).")
    _common(rb, config_required=False)
    rb.add_argument("--data", required=True, metavar="DIR", help="prepared dataset with ratings")
    rb.add_argument("--seed", type=_non_negative, default=0, help="seed of SVD and SVD++ (default 0)")

    rr = kinds.add_parser("rerank", help="a retriever alone vs retriever + re-ranker (two stages), same users",
                          description="Score the chain of a next-item model (--retriever) and a rating or click "
                                      "model (--reranker) that re-orders its top N, for every --top-n x --blend "
                                      "on validation (full ranking, history left out); choose the best by "
                                      "NDCG@10 and report it on test next to the retriever alone.")
    _common(rr, config_required=False)
    rr.add_argument("--retriever", required=True, help="next-item model: checkpoint/package folder or MLflow URI")
    rr.add_argument("--reranker", required=True, help="rating/click model: checkpoint folder or MLflow URI")
    rr.add_argument("--data", required=True, metavar="DIR", help="the prepared dataset both were trained on")
    rr.add_argument("--top-n", type=_int_list, default=[50, 100, 200], help="retriever items re-ordered (default "
                                                                             "50,100,200)")
    rr.add_argument("--blend", type=_blends, default=[0.0, 0.5, 1.0, 2.0],
                    help="weights of the retriever's standardised score in the chain (default 0,0.5,1,2)")
    rr.add_argument("--workers", type=_positive, default=1, help="Ray Train workers for the evaluations (default 1)")
    rr.add_argument("--tracking-uri", default="", help="MLflow tracking URI for models:/ and runs:/ URIs")

    pv = kinds.add_parser("privacy", help="privacy-utility curve of DP-SGD and a membership-inference audit",
                          description="Train --config without differential privacy and once per --epsilons target "
                                      "(privacy.epsilon), all else equal, each leaving the same --holdout share of "
                                      "users out of training. Report test NDCG@10/HR@10, the share of the "
                                      "non-private NDCG@10 kept, epsilon spent, seconds per epoch and the AUC of a "
                                      "loss-threshold membership-inference attack (trained vs held-out users); "
                                      "plot the curve (<out>/privacy[-<label>].png) and log table, plot and JSON "
                                      "to an MLflow run in --experiment.")
    _common(pv)
    pv.add_argument("--epsilons", type=_blends, default=[1.0, 4.0, 8.0],
                    help="target epsilons, comma-separated (default 1,4,8)")
    pv.add_argument("--holdout", type=float, default=0.2,
                    help="share of users never trained on: the attack's non-members (default 0.2)")
    pv.add_argument("--experiment", default="llmrec-bench-privacy",
                    help="MLflow experiment of the summary run (default llmrec-bench-privacy)")

    for name, help_text, description in (
            ("diversity", "NDCG@10, HR@10, intra-list diversity and coverage of MMR re-ranking per λ",
             "Serve the model's top 10 for each user of --split with recommend(diversity=λ) for every --lambdas "
             "(full ranking, history left out, as evaluate), MMR measuring similarity in --space, and report "
             "NDCG@10, HR@10, intra-list diversity (mean pairwise cosine distance, of the model's item vectors and "
             "of the items' text embeddings) and catalogue coverage@10 per λ, the largest λ within 2 % of λ=0's "
             "NDCG@10 and its ILD gains; plot NDCG@10 against the ILD of --space "
             "(<out>/diversity[-<label>].png), logged with the JSON to an MLflow run when --tracking-uri is given."),
            ("explain", "faithfulness of leave-one-out explanations, and their latency per request",
             "For each user of --split: does removing the top explaining history item of the top recommendation "
             "lower its score (and, separately, its rank) more than removing a random other history item, or the "
             "most recent one? Rates over users (goal >= 80 %), plus p50/p95 milliseconds of a request with and "
             "without explain.")):
        b = kinds.add_parser(name, help=help_text, description=description)
        _common(b, config_required=False)
        b.add_argument("--model", required=True, help="model package folder or MLflow model URI (runs:/…, models:/…)")
        b.add_argument("--data", required=True, metavar="PREPARED", help="the prepared dataset the model was trained on")
        b.add_argument("--split", default="test", choices=("valid", "test"), help="split whose users are served "
                                                                                 "(default test)")
        b.add_argument("--users", type=_non_negative, default=0, help="first N users of the split (default 0: all)")
        b.add_argument("--tracking-uri", default="",
                       help="MLflow tracking URI: resolves models:/ and runs:/ URIs" +
                            ("; given, the figures and the plot are logged to a run in --experiment" if name == "diversity" else ""))
        if name == "diversity":
            b.add_argument("--lambdas", type=_lambdas, default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7],
                           help="MMR λ values (default 0,0.1,0.2,0.3,0.5,0.7; 0 is always added)")
            b.add_argument("--experiment", default="llmrec-bench-diversity",
                           help="MLflow experiment of the run (default llmrec-bench-diversity)")
            add_space_arguments(b, "--space", "MMR: ")
        else:
            b.add_argument("--requests", type=_positive, default=100, help="requests timed per mode (default 100)")
            b.add_argument("--seed", type=_non_negative, default=0, help="seed of the random baseline (default 0)")
    sv = kinds.add_parser("serve", help="open-loop HTTP load on a served model: latency percentiles, req/s, "
                                        "failures, versions",
                          description="Send POST /recommend at a fixed rate (open loop: on schedule, whether or "
                                      "not earlier requests were answered) to --url, or to --model served here "
                                      "on Ray Serve for the run, with histories sampled from a prepared dataset's "
                                      "test split or a file. Scenarios plain, explain and diversity run one after "
                                      "the other (those the model does not support are skipped, with a note). "
                                      "Reports p50/p95/p99 latency, answered req/s, failures and the model "
                                      "versions that answered; --switch-alias moves the served alias half-way "
                                      "through the first scenario.")
    _common(sv, config_required=False)
    target = sv.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running `llmrec-dist serve` (e.g. http://127.0.0.1:8000)")
    target.add_argument("--model", help="serve this model (models:/NAME@ALIAS, ...) for the run, then stop it")
    sv.add_argument("--tracking-uri", default="", help="MLflow tracking URI (for --model and --switch-alias)")
    sv.add_argument("--histories", required=True, metavar="DATASET-OR-FILE",
                    help="a prepared dataset folder (its test split's histories) or a file with one history per "
                         "line (JSON list or comma-separated ids)")
    sv.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    sv.add_argument("--duration", type=float, default=30.0, help="seconds per scenario (default 30)")
    sv.add_argument("--warmup", type=float, default=5.0,
                    help="seconds of untimed load at the scenario's rate before each scenario (default 5)")
    sv.add_argument("--explain-rate", type=float, default=0.0,
                    help="requests per second of the explain scenario (default: --rate); explanations cost "
                         "one forward pass per explained history position")
    sv.add_argument("--k", type=_positive, default=10, help="items per request (default 10)")
    sv.add_argument("--scenarios", default=",".join(SERVE_SCENARIOS),
                    help=f"comma-separated, from {', '.join(SERVE_SCENARIOS)} (default all)")
    sv.add_argument("--switch-alias", default="", metavar="VERSION",
                    help="move the served alias to this version half-way through the first scenario")
    sv.add_argument("overrides", nargs="*", metavar="serve.key=value", help="with --model: serve config overrides")

    gr = kinds.add_parser("growth", help="prepare --stream and one training epoch at 10^6..10^8 interactions",
                          description="For each --sizes: generate that many synthetic interactions (users = "
                                      "interactions / 10, --items items with text), prepare them with prepare "
                                      "--stream, and train --config for one epoch (sizes up to --train-max): wall "
                                      "time, rows/s and peak RSS of each process, the epoch's training seconds and "
                                      "every worker's peak RSS, validation users/s over the full catalogue "
                                      "(eval.max_users users). Sizes above --train-max are extrapolated from the "
                                      "largest trained size, and say so.")
    _common(gr)
    gr.add_argument("--sizes", type=_int_list, default=[10**6, 10**7, 10**8],
                    help="interactions per size, comma-separated (default 1e6,1e7,1e8)")
    gr.add_argument("--items", type=_positive, default=10**6, help="catalogue size at every size (default 1e6)")
    gr.add_argument("--train-max", type=_positive, default=10**7,
                    help="train one epoch only at sizes up to this (default 1e7)")
    gr.add_argument("--work", default="bench-growth", help="folder for the generated and prepared data, the "
                                                           "runs and MLflow (default bench-growth)")

    pe = kinds.add_parser("peers", help="RecBole / RecTools SASRec and BERT4Rec on our split, each in its own venv",
                          description="Export the prepared dataset so that every peer trains and is tested on our "
                                      "users, items and leave-one-out targets; make each peer library's own virtual "
                                      "environment (under --work, reused while it works) and run it with its "
                                      "defaults and with settings matched to ours, early stopping on our "
                                      "validation NDCG@10. Report test HR/NDCG/MRR@10 under our protocol (history "
                                      "left out) and the peer's own, best epoch, seconds to it, seconds per epoch "
                                      "and peak RSS, one row per peer and settings; a peer that fails to install "
                                      "or run gets a row saying why. Our own rows come from `bench quality`.")
    _common(pe, config_required=False)
    pe.add_argument("--data", required=True, metavar="DIR", help="prepared dataset (llmrec-dist prepare)")
    pe.add_argument("--peers", default=",".join(PEERS),
                    help=f"comma-separated, from {', '.join(PEERS)} (default all)")
    pe.add_argument("--settings", default="defaults,matched",
                    help="comma-separated: defaults (the library's own), matched (ours) (default both)")
    pe.add_argument("--matched", default="", metavar="KEY=VALUE,...",
                    help="change the matched settings: max_len, hidden, blocks, heads, dropout, batch_size, lr "
                         "(default max_len=50,hidden=64,blocks=2,heads=2,dropout=0.5,batch_size=128,lr=0.001)")
    pe.add_argument("--max-epochs", type=_positive, default=200, help="epochs at most per run (default 200)")
    pe.add_argument("--patience", type=_positive, default=10,
                    help="epochs without a better validation NDCG@10 before stopping (default 10)")
    pe.add_argument("--budget-min", type=float, default=0.0,
                    help="minutes of training per run: a run stops after the epoch that passes them and is "
                         "tested at its best epoch, its row saying 'time budget' (default 0: no budget)")
    pe.add_argument("--timeout-min", type=float, default=360.0,
                    help="minutes after which a run is killed, its row a timeout without test figures "
                         "(default 360)")
    pe.add_argument("--seed", type=_non_negative, default=42, help="seed of every run (default 42)")
    pe.add_argument("--reuse", action="store_true",
                    help="take a run finished earlier with exactly the same request (runner command, dataset "
                         "content) from --work instead of running it again")
    pe.add_argument("--threads", type=_positive, default=None, help="torch threads per run (default: all cores)")
    pe.add_argument("--work", default=DEFAULT_PEER_WORK,
                    help=f"folder for the peers' venvs, the exported data and the runs (default {DEFAULT_PEER_WORK})")

    r = kinds.add_parser("report", help="write the results table (docs/benchmarks.md) from the JSON files",
                         description="Render every benchmark JSON in --results as one Markdown table; with "
                                     "--readme FILE, replace the table between FILE's result markers.")
    r.add_argument("--results", default=DEFAULT_OUT, help=f"folder of JSON results (default {DEFAULT_OUT})")
    r.add_argument("--readme", metavar="FILE",
                   help="a Markdown file with the result markers (e.g. docs/benchmarks.md), updated in place "
                        "(default: print the table)")


def _command() -> str:
    return "llmrec-dist bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""


def run(args) -> int:
    from llmrec_dist.bench import common

    if args.kind == "report":
        return _report(args)
    if args.kind == "memory":
        from llmrec_dist.bench.memory import COLUMNS, head_scaling

        figures = head_scaling(args.sizes, batch=args.batch, length=args.length, steps=args.steps,
                               num_negatives=args.negatives)
        print(common.table(figures["rows"], COLUMNS))
        print(f"sampled softmax faster from {figures['sampled_faster_from']} items; full softmax does not fit "
              f"from {figures['full_does_not_fit_from']} items")
        path = common.write_result(args.out, "memory", label=args.label, config=_memory_settings(args),
                                   figures=figures, command=_command())
        print(f"wrote {path}")
        return 0

    if args.kind == "startup":
        return _startup(args)
    if args.kind == "rating-baselines":
        return _rating_baselines(args)
    if args.kind == "rerank":
        return _rerank(args)
    if args.kind in ("diversity", "explain"):
        return _diversity_or_explain(args)
    if args.kind == "serve":
        return _serve_load(args)
    if args.kind == "privacy":
        return _privacy(args)
    if args.kind == "growth":
        return _growth(args)
    if args.kind == "peers":
        return _peers(args)

    from llmrec_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.kind == "quality" and args.refit and cfg.train.refit_epochs:
        print("llmrec-dist bench quality: --refit runs the validated run first and chooses the refit's "
              "epochs from it; leave train.refit_epochs at 0 (or drop --refit to run that refit alone)",
              file=sys.stderr)
        return 2
    dataset = common.dataset_info(cfg.data.path)
    config = {"file": args.config, "overrides": args.overrides, "resolved": cfg.to_dict()}
    if args.kind == "quality":
        from llmrec_dist.bench.quality import ANCHOR_COLUMNS, anchor_rows, run_quality
        from llmrec_dist.bench.report import freq_cell, test_cell

        figures = run_quality(cfg, refit=args.refit, counts=dataset["counts"])
        print(f"best epoch {figures['best_epoch']} of {figures['epochs_run']}, {figures['wall_seconds'] / 60:.1f} min")
        name = f"llmrec_dist ({args.label or cfg.model.item_repr})"
        if cfg.task.type == "next_item":
            print(common.table(anchor_rows(figures, name, dataset["counts"]), ANCHOR_COLUMNS))
        else:
            print(f"{name}, {cfg.task.type}, {figures['test_pairs']:.0f} test pairs: test {test_cell(figures)}")
        if cell := freq_cell(figures):
            print(f"test {cell}")
        if "refit" in figures:
            r = figures["refit"]
            print(f"refit through the validation item, {r['refit_epochs']} epochs, {r['wall_seconds'] / 60:.1f} "
                  f"min: test {test_cell(r)}")
    elif args.kind == "speed":
        from llmrec_dist.bench.speed import (COLUMNS, PROFILE_COLUMNS, STARTUP_COLUMNS, profile_table, run_speed,
                                             startup_table)

        figures = run_speed(args.config, args.overrides, workers=args.workers, epochs=args.epochs,
                            profile_steps=args.profile_steps, ceiling_steps=args.ceiling_steps)
        print(common.table(figures["rows"], COLUMNS))
        print(common.table(profile_table(figures["rows"]), PROFILE_COLUMNS))
        print(common.table(startup_table(figures["rows"]), STARTUP_COLUMNS))
        if "scaling_efficiency_1_to_2" in figures:
            print(f"scaling efficiency 1 → 2 workers: {figures['scaling_efficiency_1_to_2']:.1%}")
        if "machine_ceiling" in figures:
            from llmrec_dist.bench.ceiling import COLUMNS as CEILING_COLUMNS
            from llmrec_dist.bench.ceiling import case_table

            c = figures["machine_ceiling"]
            print(common.table(case_table(c), CEILING_COLUMNS))
            print(f"machine ceiling (no Ray, no DDP): {c['ceiling_1_to_2']:.1%} = batch effect {c['batch_effect']:.1%}"
                  f" × contention {c['contention']:.1%}; measured scaling is "
                  f"{figures['scaling_share_of_ceiling']:.1%} of it")
    elif args.kind == "ingest":
        from llmrec_dist.bench.ingest import COLUMNS, run_ingest

        figures = run_ingest(cfg, epochs=args.epochs)
        figures.update(compare_with_training(args.out, args.label, figures))
        print(common.table(figures["per_epoch"], COLUMNS))
        print(f"peak RSS per worker (MB): {', '.join(f'{m:,.0f}' for m in figures['peak_rss_mb_per_worker'])}")
        if figures.get("ratio_to_training"):
            print(f"ingest / training throughput: {figures['ratio_to_training']:.1f}×")
    elif args.kind == "lm-memory":
        from llmrec_dist.bench.lm_memory import COLUMNS, cases, fitted_slopes, run_case

        strategies = [v.strip() for v in args.strategies.split(",") if v.strip()]
        bad = [v for v in strategies if v not in ("id", "frozen", "top_k", "full", "lora")]
        if bad:
            print(f"llmrec-dist bench lm-memory: --strategies: unknown {', '.join(bad)}; valid: id, frozen, "
                  "top_k, full, lora", file=sys.stderr)
            return 2
        rows = []
        for case in cases(strategies, args.batch_sizes, args.lm_items):
            row = run_case(args.config, [*args.overrides, *case], steps=args.steps, eval_users=args.eval_users)
            print(json.dumps({k: v for k, v in row.items() if k not in ("estimate", "phase_peaks_mb")}), flush=True)
            rows.append(row)
        figures = {"rows": rows, "slopes": fitted_slopes([r for r in rows if "error" not in r])}
        print(common.table([r for r in rows if "error" not in r], COLUMNS))
        for freeze, fit in figures["slopes"].items():
            print(f"{freeze}: {fit['mb_per_lm_item']:.2f} MB per LM item per step (+{fit['intercept_mb']:,.0f} MB)")
        if failed := [r for r in rows if "error" in r]:
            print(f"{len(failed)} case(s) failed: " + "; ".join(f"{' '.join(r['overrides'])}: {r['error']}" for r in failed))
    else:  # towers
        from llmrec_dist.bench.towers import parse_cells, run_matrix, table_columns

        try:
            cells = parse_cells(args.cells)
        except ValueError as err:
            print(f"llmrec-dist bench towers: {err}", file=sys.stderr)
            return 2
        figures = {"rows": run_matrix(args.config, args.overrides, cells)}
        print(common.table(figures["rows"], table_columns(figures["rows"])))
    path = common.write_result(args.out, args.kind, label=args.label, config=config, figures=figures,
                               dataset=dataset, command=_command())
    print(f"wrote {path}")
    return 0


def _startup(args) -> int:
    from llmrec_dist.bench import common
    from llmrec_dist.bench.startup import COLUMNS, run_startup

    figures = run_startup(args.busy, args.overrides, timeout=args.timeout)
    print(common.table(figures["rows"], COLUMNS))
    startup = f"; start-up {figures['startup_ratio']:.2f}x" if "startup_ratio" in figures else ""
    print(f"loaded / quiet: wall time {figures['ratio']:.2f}x{startup} ({figures['busy']} busy processes, "
          f"{figures['cores']} cores)")
    for row in figures["rows"]:
        print(f"--- {row['run']}: {row['lines']} lines printed")
        print("\n".join(row["output"]))
    path = common.write_result(args.out, "startup", label=args.label, config={"overrides": args.overrides},
                               figures=figures, command=_command())
    print(f"wrote {path}")
    return 0


def _rating_baselines(args) -> int:
    from llmrec_dist.bench import common
    from llmrec_dist.bench.rating_baselines import COLUMNS, run_baselines
    from llmrec_dist.data.dataset_format import DatasetError, feedback_of, read_manifest, read_split

    try:
        manifest = read_manifest(args.data)
        if not feedback_of(manifest) or feedback_of(manifest)["kind"] != "rating":
            raise DatasetError(f"{args.data}: the dataset has no ratings (its manifest's feedback is "
                               f"{feedback_of(manifest)!r}); prepare MovieLens with ratings, or generic data "
                               "with --rating-col")
        tables = {split: read_split(args.data, split, feedback=True) for split in ("train", "valid", "test")}
    except (OSError, ValueError) as err:
        print(f"llmrec-dist bench rating-baselines: error: {err}", file=sys.stderr)
        return 2
    rows = run_baselines(tables["train"], tables["valid"], tables["test"], seed=args.seed)
    print(common.table(rows, COLUMNS))
    path = common.write_result(args.out, "rating-baselines", label=args.label, config={"seed": args.seed},
                               figures={"rows": rows}, dataset=common.dataset_info(args.data), command=_command())
    print(f"wrote {path}")
    return 0


def _rerank(args) -> int:
    from mlflow.exceptions import MlflowException

    from llmrec_dist.bench import common
    from llmrec_dist.bench.rerank import COLUMNS, run_rerank
    from llmrec_dist.config import EvalConfig
    from llmrec_dist.saved_model import resolve_model_folder

    try:
        retriever = resolve_model_folder(args.retriever, args.tracking_uri)
        reranker = resolve_model_folder(args.reranker, args.tracking_uri)
        figures = run_rerank(retriever, reranker, args.data, args.top_n, args.blend, EvalConfig(), args.workers)
    except (OSError, ValueError, MlflowException) as err:
        print(f"llmrec-dist bench rerank: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(common.table([{**r, "top_n": r["top_n"] or "retriever alone"} for r in figures["rows"]], COLUMNS))
    chosen, alone, chain = figures["chosen"], figures["test_retriever"], figures["test_chain"]
    print("chosen on validation: " + ("the retriever alone (no re-ranking)" if chosen["retriever_alone"] else
                                      f"top N {chosen['top_n']}, blend {chosen['blend']:g}"))
    print(f"test NDCG@10: retriever {alone['ndcg_at_10']:.4f}, chain {chain['ndcg_at_10']:.4f} "
          f"({figures['lift']:+.1%}); HR@10 {alone['hr_at_10']:.4f} -> {chain['hr_at_10']:.4f} "
          f"({int(alone['users'])} users)")
    from llmrec_dist.bench.rerank import LATENCY_COLUMNS, serving_latency
    from llmrec_dist.saved_model import RECOMMENDER_FILE

    if (retriever / RECOMMENDER_FILE).is_file() and (reranker / RECOMMENDER_FILE).is_file():
        figures["latency"] = serving_latency(retriever, reranker, args.data, args.top_n)
        print(common.table(figures["latency"], LATENCY_COLUMNS))
    else:
        print("latency: not measured (it serves model packages: pass the runs' MLflow models, not checkpoints)")
    settings = {"retriever": args.retriever, "reranker": args.reranker, "top_n": args.top_n, "blend": args.blend}
    path = common.write_result(args.out, "rerank", label=args.label, config=settings, figures=figures,
                               dataset=common.dataset_info(args.data), command=_command())
    print(f"wrote {path}")
    return 0


def _privacy(args) -> int:
    from llmrec_dist.bench import common
    from llmrec_dist.bench.privacy import COLUMNS, goals, log_to_mlflow, plot, run_curve
    from llmrec_dist.config import ConfigError, load_config
    from llmrec_dist.tracking import resolve_tracking_uri
    from llmrec_dist.train.launcher import TrainError

    if not 0 < args.holdout < 1:
        print(f"llmrec-dist bench privacy: --holdout must be in (0, 1), got {args.holdout}", file=sys.stderr)
        return 2
    if any(e <= 0 for e in args.epsilons) or not args.epsilons:
        print(f"llmrec-dist bench privacy: --epsilons must be positive, got {args.epsilons}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, [*args.overrides, f"privacy.epsilon={max(args.epsilons)}",
                                        f"data.holdout_users={args.holdout}"])
        rows = run_curve(args.config, args.overrides, args.epsilons, args.holdout)
    except (ConfigError, TrainError) as err:
        print(f"llmrec-dist bench privacy: {err}", file=sys.stderr)
        return 2
    text = common.table(rows, COLUMNS)
    print(text)
    reached = goals(rows)
    print(f"at epsilon {reached['epsilon']:g}: {reached['ndcg_kept']:.1%} of the non-private NDCG@10 kept (goal "
          f">= {reached['keep_goal']:.0%}: {'met' if reached['keep_met'] else 'not met'}); attack AUC "
          f"{reached['attack_auc']:.3f} against {reached['non_private_attack_auc']:.3f} without DP (goal <= "
          f"{reached['auc_goal']}: {'met' if reached['auc_met'] else 'not met'}); "
          f"{reached['cost_ratio']:.1f}x the seconds per epoch")
    name = common.result_name("privacy", args.label)
    png = plot(rows, Path(args.out) / f"{name}.png", f"DP-SGD on {Path(cfg.data.path).name}")
    settings = {"file": args.config, "overrides": args.overrides, "epsilons": args.epsilons,
                "holdout": args.holdout, "experiment": args.experiment}
    path = common.write_result(args.out, "privacy", label=args.label, config=settings,
                               figures={"rows": rows, "goals": reached, "plot": png.name},
                               dataset=common.dataset_info(cfg.data.path), command=_command())
    run_id = log_to_mlflow(resolve_tracking_uri(cfg.mlflow.tracking_uri), args.experiment, settings, rows, text,
                           [png, path])
    print(f"wrote {path} and {png}; logged to MLflow run {run_id} (experiment {args.experiment})")
    return 0


def _peers(args) -> int:
    from llmrec_dist.bench import common
    from llmrec_dist.bench.peer_export import ExportError
    from llmrec_dist.bench.peers import COLUMNS, SETTINGS, RunOptions, parse_choices, parse_matched, row_line, run_peers

    try:
        names = parse_choices(args.peers, PEERS, "--peers")
        settings = parse_choices(args.settings, SETTINGS, "--settings")
        options = RunOptions(max_epochs=args.max_epochs, patience=args.patience, budget_min=args.budget_min,
                             seed=args.seed,
                             timeout_s=args.timeout_min * 60, matched=parse_matched(args.matched))
        if args.threads:
            options.threads = args.threads
        dataset = common.dataset_info(args.data)
        figures = run_peers(args.data, args.label, names, settings, options, args.work,
                            on_row=lambda row: print(row_line(row), flush=True), reuse=args.reuse)
    except (OSError, ValueError, ExportError) as err:
        print(f"llmrec-dist bench peers: error: {err}", file=sys.stderr)
        return 2
    print(common.table(figures["rows"], COLUMNS))
    config = {"peers": names, "settings": settings, "max_epochs": options.max_epochs, "patience": options.patience,
              "budget_min": options.budget_min, "seed": options.seed, "threads": options.threads, "reuse": args.reuse,
              "timeout_s": options.timeout_s, "matched": options.matched, "work": str(Path(args.work).expanduser())}
    path = common.write_result(args.out, "peers", label=args.label, config=config, figures=figures, dataset=dataset,
                               command=_command())
    print(f"wrote {path}")
    return 0


def _growth(args) -> int:
    from llmrec_dist.bench import common
    from llmrec_dist.bench.growth import COLUMNS, growth_summary, run_size
    from llmrec_dist.config import ConfigError, load_config

    try:
        load_config(args.config, [*args.overrides, "data.path=."])  # a bad config fails before hours of data
    except ConfigError as err:
        print(f"llmrec-dist bench growth: {err}", file=sys.stderr)
        return 2
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sorted(args.sizes):
        rows.append(run_size(size, args.items, work, str(Path(args.config).resolve()), args.overrides,
                             train=size <= args.train_max))
        print(common.table(rows[-1:], COLUMNS), flush=True)
    summary = growth_summary(rows)
    print(common.table(rows, COLUMNS))
    print(json.dumps(summary, indent=2))
    settings = {"file": args.config, "overrides": args.overrides, "sizes": args.sizes, "items": args.items,
                "train_max": args.train_max}
    path = common.write_result(args.out, "growth", label=args.label, config=settings,
                               figures={"rows": rows, "summary": summary}, command=_command())
    print(f"wrote {path}")
    return 0


def _diversity_or_explain(args) -> int:
    from mlflow.exceptions import MlflowException

    from llmrec_dist.bench import common
    from llmrec_dist.bench.diversity import eval_rows, load_served

    settings = {"model": args.model, "data": args.data, "split": args.split, "users": args.users}
    try:
        rec = load_served(args.model, args.tracking_uri)
        rows = eval_rows(rec, args.data, args.split, args.users)
        dataset = common.dataset_info(args.data)
    except (OSError, ValueError, MlflowException) as err:
        print(f"llmrec-dist bench {args.kind}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if args.kind == "explain":
        from llmrec_dist.bench.explain import COLUMNS, LATENCY_COLUMNS, explain_latency, faithfulness

        figures = faithfulness(rec, rows, seed=args.seed)
        figures["latency"] = explain_latency(rec, rows, args.requests)
        print(common.table(figures["rows"], COLUMNS))
        print(f"{figures['users_compared']} users compared; {figures['users_unexplained']} without an explanation, "
              f"{figures['users_single_item']} with a single history item")
        print(common.table(figures["latency"], LATENCY_COLUMNS))
        settings.update(seed=args.seed, requests=args.requests)
        path = common.write_result(args.out, "explain", label=args.label, config=settings, figures=figures,
                                   dataset=dataset, command=_command())
        print(f"wrote {path}")
        return 0

    from llmrec_dist.bench.diversity import COLUMNS, chosen_lambda, diversity_curve, log_to_mlflow, plot

    try:
        if args.space == "text":
            text = rec.use_diversity_space("text", args.text_encoder).diversity_vectors()
        else:
            text = rec.text_vectors(args.text_encoder)
    except (OSError, ValueError) as err:
        if args.space == "text":
            print(f"llmrec-dist bench diversity: error: --space text: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        print(f"note: no text embeddings, so no text ILD ({' '.join(str(err).split())})")
        text = None
    curve = diversity_curve(rec, rows, args.lambdas, text_vectors=text)
    chosen = chosen_lambda(curve)
    print(common.table(curve, COLUMNS))
    print(f"largest λ within {chosen['max_ndcg_loss']:.0%} of λ=0's NDCG@10: {chosen['lambda']:g} (NDCG@10 "
          f"{chosen['ndcg_change']:+.1%}; ILD@10 of the model's vectors {chosen['ild_at_10']:.4f}, "
          f"{chosen['ild_gain_relative']:+.1%}; of the text embeddings {chosen['ild_text_at_10']:.4f}, "
          f"{chosen['ild_text_gain_relative']:+.1%}; MMR on the {args.space} vectors; {len(rows)} users)")
    name = common.result_name("diversity", args.label)
    png = plot(curve, chosen, Path(args.out) / f"{name}.png",
               f"MMR on the {args.space} vectors, {Path(args.data).name} ({args.split}, {len(rows)} users)",
               space=args.space)
    settings.update(lambdas=args.lambdas, space=args.space, text_encoder=args.text_encoder)
    figures = {"rows": curve, "chosen": chosen, "plot": png.name}
    if args.tracking_uri:
        settings["experiment"] = args.experiment
    path = common.write_result(args.out, "diversity", label=args.label, config=settings, figures=figures,
                               dataset=dataset, command=_command())
    print(f"wrote {path} and {png}")
    if args.tracking_uri:
        run_id = log_to_mlflow(args.tracking_uri, args.experiment, settings, curve, chosen, [png, path])
        print(f"logged to MLflow run {run_id} (experiment {args.experiment})")
    return 0


def _memory_settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "verb", "kind", "out", "verbose")}


def compare_with_training(out: str, label: str, ingest: dict) -> dict:
    """Ingest throughput over the training throughput that `bench speed` measured with as many
    workers (same --out and --label), when that file exists."""
    from llmrec_dist.bench.common import read_results, result_name

    speed = read_results(out).get(result_name("speed", label)) if Path(out).is_dir() else None
    rows = speed["figures"].get("rows", []) if speed else []
    match = [r for r in rows if r["workers"] == ingest["workers"] and r.get("sequences_per_s")]
    if not match:
        return {}
    train = match[0]["sequences_per_s"]
    return {"training_sequences_per_s": train, "ratio_to_training": ingest["sequences_per_s"] / train}


def _report(args) -> int:
    from llmrec_dist.bench.common import read_results
    from llmrec_dist.bench.report import render, update_readme

    if not Path(args.results).is_dir():
        print(f"llmrec-dist bench report: {args.results}: no such folder", file=sys.stderr)
        return 2
    if not args.readme:
        print(render(read_results(args.results)))
        return 0
    try:
        changed = update_readme(args.readme, args.results)
    except (ValueError, FileNotFoundError) as err:
        print(f"llmrec-dist bench report: {err}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_load(args) -> int:
    import asyncio
    import json as json_module
    import urllib.request

    from llmrec_dist.bench import common
    from llmrec_dist.bench.serve_load import COLUMNS, alias_mover, read_histories, run_load
    from llmrec_dist.tracking import resolve_tracking_uri

    def refuse(message: str) -> int:
        print(f"llmrec-dist bench serve: {message}", file=sys.stderr)
        return 2

    scenarios = [v.strip() for v in args.scenarios.split(",") if v.strip()]
    if not scenarios or any(v not in SERVE_SCENARIOS for v in scenarios):
        return refuse(f"--scenarios: expected some of {', '.join(SERVE_SCENARIOS)}, got {args.scenarios!r}")
    if not args.rate > 0 or not args.duration > 0:
        return refuse("--rate and --duration must be > 0")
    if args.warmup < 0 or args.explain_rate < 0:
        return refuse("--warmup and --explain-rate must be >= 0")
    if args.overrides and not args.model:
        return refuse("serve.key=value overrides apply to --model (the server this command starts)")
    try:
        histories = read_histories(args.histories)
    except (ValueError, OSError) as err:
        return refuse(" ".join(str(err).split()))
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    stop_serving = None
    url = args.url
    if args.model:
        from llmrec_dist.cli.serve import start
        from llmrec_dist.ray_setup import init_ray
        from llmrec_dist.serving.settings import load_serve_config
        from llmrec_dist.serving.source import ModelSource, ModelSourceError

        cfg = load_serve_config(None, args.overrides, {"model": args.model, "tracking_uri": tracking_uri,
                                                       "port": _free_port(), "app_name": "llmrec-bench"})
        try:
            ModelSource(cfg.model, tracking_uri, cfg.trust_remote_code).check()
        except ModelSourceError as err:
            return refuse(str(err))
        init_ray(1, cfg.cpus_per_replica)
        from ray import serve

        print(f"starting {args.model} on Ray Serve ...", flush=True)
        url = start(cfg)
        stop_serving = serve.shutdown
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/version", timeout=30) as response:
            served = json_module.loads(response.read())
        switch = None
        if args.switch_alias:
            if not served.get("follows_alias"):
                return refuse(f"--switch-alias: {url} serves {served.get('uri')}, which follows no alias")
            switch = alias_mover(tracking_uri, served["name"], served["alias"], args.switch_alias)
        rates = {"explain": args.explain_rate} if args.explain_rate else None
        figures = asyncio.run(run_load(url, histories, rate=args.rate, duration=args.duration, k=args.k,
                                       scenarios=scenarios, switch_alias=switch, warmup=args.warmup,
                                       rates=rates))
    finally:
        if stop_serving is not None:
            stop_serving()
    figures["histories"] = {"source": args.histories, "count": len(histories)}
    figures["switch_alias"] = args.switch_alias or None
    print(f"model {served.get('name')} version {served.get('version') or '-'} at {url}; {len(histories)} histories")
    print(common.table(figures["rows"], COLUMNS))
    for scenario, why in figures["skipped"].items():
        print(f"skipped {scenario}: {why}")
    for row in figures["rows"]:
        if row["errors"]:
            print(f"{row['scenario']} failures: " + "; ".join(f"{n}x {e}" for e, n in row["errors"].items()))
    config = {"url": args.url, "model": args.model, "rate": args.rate, "duration": args.duration, "k": args.k,
              "warmup": args.warmup, "explain_rate": args.explain_rate or args.rate,
              "scenarios": scenarios, "overrides": args.overrides}
    path = common.write_result(args.out, "serve", label=args.label, config=config, figures=figures,
                               command=_command())
    print(f"wrote {path}")
    return 0
