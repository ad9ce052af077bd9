"""`llmrec-dist recommend`: top-K items for one history from a registered model or a package folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEXT_WIDTH = 70


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "recommend", help="recommend items for a history with a registered model",
        description="Load a model (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
                    "models:/MODEL_ID, or a local model-package / MLflow model folder) and print the "
                    "top-K items for one history of original item ids, most recent last. Unknown ids "
                    "are skipped with a warning; an empty history gets the most popular items.")
    p.add_argument("--model", required=True, help="MLflow model URI or local model folder")
    p.add_argument("--history", required=True,
                   help="comma-separated original item ids, most recent last (may be empty: '')")
    p.add_argument("-k", type=int, default=10, help="number of items to recommend (default 10)")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--catalogue", default="",
                   help="CSV or Parquet file with item_id and text columns (optional popularity): the "
                        "catalogue as it is now. Text models then also recommend items added after training "
                        "(from their text alone) and never recommend items missing from the file; "
                        "ID-only models refuse it")
    p.add_argument("--rerank", default="", metavar="MODEL",
                   help="a rating or click model (URI or folder, trained on the same dataset) that re-orders "
                        "--model's top --top-n; the rest keeps --model's order")
    p.add_argument("--top-n", type=int, default=100, help="with --rerank: items re-ordered (default 100)")
    p.add_argument("--blend", type=float, default=0.0,
                   help="with --rerank: weight of the retriever's standardised score added to the re-ranker's "
                        "(default 0: the re-ranker's order)")
    p.add_argument("--feedback", default="",
                   help="with --rerank: comma-separated ratings of the --history items, for a re-ranker that reads "
                        "them (task.feedback_input)")
    p.add_argument("--exclude", default="",
                   help="comma-separated item ids never to recommend (e.g. items out of stock); unknown ids are ignored")
    p.add_argument("--diversity", type=float, default=0.0, metavar="LAMBDA",
                   help="0..1: re-rank the top max(5k, 50) items by maximal marginal relevance, trading relevance "
                        "for items less alike (default 0: the plain ranking; not with --rerank)")
    add_space_arguments(p, "--diversity-space", "with --diversity: ")
    p.add_argument("--explain", action="store_true",
                   help="show, for each item, the history items that most caused it (leave-one-out over the last "
                        "20 history items; not with --rerank)")
    p.add_argument("--json", action="store_true", help="print the recommendations as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model whose text encoder runs its own Python code (model.trust_remote_code); "
                        "refused by default")
    p.set_defaults(func=run)


def add_space_arguments(p, flag: str, when: str = "") -> None:
    """``flag`` (model | text: where MMR measures how alike two items are) and ``--text-encoder``."""
    p.add_argument(flag, choices=("model", "text"), default="model",
                   help=f"{when}how alike two items are, by the model's item vectors (default) or by the text "
                        "embeddings of their titles and descriptions")
    p.add_argument("--text-encoder", default="", metavar="NAME_OR_PATH",
                   help=f"with {flag} text: the encoder of the texts (default: the model's own LM, else "
                        "all-MiniLM-L6-v2, the text extra)")


def parse_history(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def read_catalogue(path: str):
    """The ``--catalogue`` file as a DataFrame (CSV or Parquet), item ids as strings."""
    import pandas as pd

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--catalogue {path}: no such file")
    is_parquet = file.suffix.lower() in (".parquet", ".pq")
    if not is_parquet:
        _check_utf8(file, path)
    try:
        frame = pd.read_parquet(file) if is_parquet else \
            pd.read_csv(file, dtype={"item_id": str}, keep_default_na=False)
    except Exception as err:  # pandas/pyarrow raise many kinds on a bad file
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"--catalogue {path}: cannot read it as {'Parquet' if is_parquet else 'CSV'}: {reason}") \
            from None
    missing = {"item_id", "text"} - set(frame.columns)
    if missing:
        raise ValueError(f"--catalogue {path}: lacks column(s) {', '.join(sorted(missing))} "
                         f"(has {', '.join(map(str, frame.columns))})")
    frame["item_id"] = frame["item_id"].astype(str)
    return frame


def _check_utf8(file: Path, path: str) -> None:
    """A CSV catalogue must be UTF-8; name the first bad byte (pandas reports offsets within a chunk)."""
    data = file.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"--catalogue {path}: not valid UTF-8 at byte offset {err.start} (line {line}, "
                         f"{err.reason}); re-save it as UTF-8, or pass a Parquet file") from None


def load(model: str, tracking_uri: str, catalogue: str = "", trust_remote_code: bool = False,
         rerank: str = "", top_n: int = 100, blend: float = 0.0, diversity_space: str = "model",
         text_encoder: str = ""):
    """``(predict_frame, text_of)`` for a model URI or a local folder.

    A model-package folder is loaded directly; anything else goes through ``mlflow.pyfunc.load_model``
    with ``tracking_uri`` (used for ``models:/`` and ``runs:/`` URIs). With ``catalogue``, the model
    is moved onto that catalogue first (:meth:`Recommender.with_catalogue`). ``trust_remote_code``
    allows a model whose text encoder runs its own Python code (refused otherwise). ``rerank``: a rating
    or click model (URI or folder) chained after ``model``, re-ordering its ``top_n`` with ``blend``.
    ``diversity_space`` / ``text_encoder``: where a next-item model's MMR measures similarity
    (:meth:`Recommender.use_diversity_space`).
    """
    from llmrec_dist.registry.recommender import Recommender
    from llmrec_dist.registry.reranker import Chain, Reranker

    servable, predict = _servable(model, tracking_uri, trust_remote_code, "--model")
    if isinstance(servable, Reranker):
        raise ValueError(f"{model} is a {servable.task} model: it scores candidates, it does not rank the "
                         "catalogue; chain it after a retriever with --rerank")
    if rerank:
        reranker, _ = _servable(rerank, tracking_uri, trust_remote_code, "--rerank")
        if not isinstance(servable, Recommender) or not isinstance(reranker, Reranker):
            raise ValueError("--rerank chains a rating or click model (the re-ranker) after a next-item model "
                             f"(--model); got {_kind(servable)} and {_kind(reranker)}")
        if catalogue:
            raise ValueError("--catalogue does not apply to a chain (the re-ranker knows the trained items only)")
        chain = Chain(servable, reranker, top_n, blend)
        return chain.predict_frame, chain.text_of
    flag = "--catalogue" if catalogue else "--diversity-space" if diversity_space != "model" else ""
    if servable is None:
        if flag:
            raise ValueError(f"{model} is not an llmrec_dist model; {flag} needs one")
        return predict, lambda _id: ""
    if flag and not isinstance(servable, Recommender):
        raise ValueError(f"{flag} applies to a next-item model; {model} is {_kind(servable)}")
    if diversity_space != "model":
        servable.use_diversity_space(diversity_space, text_encoder)
    if catalogue:
        servable = servable.with_catalogue(read_catalogue(catalogue))
        return servable.predict_frame, servable.text_of
    return predict, servable.text_of


def _kind(servable) -> str:
    from llmrec_dist.registry.reranker import Chain, Reranker

    if isinstance(servable, Chain):
        return "a chain"
    if isinstance(servable, Reranker):
        return f"a {servable.task} model"
    return "a next-item model" if servable is not None else "not an llmrec_dist model"


def _servable(model: str, tracking_uri: str, trust_remote_code: bool, flag: str):
    """``(servable, predict)`` of ``model``: :func:`llmrec_dist.registry.loading.load_servable`."""
    from llmrec_dist.registry.loading import load_servable

    return load_servable(model, tracking_uri, trust_remote_code, flag)


def _clip(text: str, width: int = TEXT_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[dict]) -> str:
    """One line per item; under it ``because: title A; title B`` when the rows were explained."""
    id_width = max([len("item id")] + [len(r["item_id"]) for r in rows])
    lines = [f"{'rank':>4}  {'item id':<{id_width}}  {'score':>10}  text"]
    for r in rows:
        lines.append(f"{r['rank']:>4}  {r['item_id']:<{id_width}}  {r['score']:>10.4f}  {_clip(r['text'])}")
        if "because" in r:
            reasons = "; ".join(_clip(b["text"] or b["item_id"], 40) for b in r["because"]) or "-"
            lines.append(f"{'':>4}  {'':<{id_width}}  {'':>10}  because: {reasons}")
    return "\n".join(lines)


def run(args) -> int:
    import pandas as pd

    from llmrec_dist.tracking import resolve_tracking_uri

    from mlflow.exceptions import MlflowException

    history = parse_history(args.history)
    try:
        if args.k <= 0:
            raise ValueError(f"-k must be a positive integer, got {args.k}")
        if args.text_encoder and args.diversity_space != "text":
            raise ValueError("--text-encoder is the encoder of --diversity-space text")
        space = (args.diversity_space, args.text_encoder) if args.diversity else ("model", "")
        predict, text_of = load(args.model, resolve_tracking_uri(args.tracking_uri), args.catalogue,
                                args.trust_remote_code, args.rerank, args.top_n, args.blend, *space)
        request = {"history": [history], "k": [args.k]}
        if args.exclude:  # only the options asked for, so a model that predates them still answers
            request["exclude"] = [parse_history(args.exclude)]
        if args.diversity:
            request["diversity"] = [args.diversity]
        if args.explain:
            request["explain"] = [True]
        if args.feedback:
            request["feedback"] = [[float(v) for v in args.feedback.split(",") if v.strip()]]
        out = predict(pd.DataFrame(request))
    except (ValueError, OSError, MlflowException) as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the source
        print(f"llmrec-dist recommend: {message}", file=sys.stderr)
        return 2

    item_ids, scores = list(out["item_ids"].iloc[0]), list(out["scores"].iloc[0])
    rows = [{"rank": rank, "item_id": str(item_id), "score": float(score), "text": text_of(str(item_id))}
            for rank, (item_id, score) in enumerate(zip(item_ids, scores), start=1)]
    if args.explain:
        because = out["because"].iloc[0] if "because" in out.columns else None
        if because is None:
            print("llmrec-dist recommend: the model gave no explanations (it was logged before --explain "
                  "existed: log it again)", file=sys.stderr)
            return 2
        weights = out["because_scores"].iloc[0]
        for row, ids, values in zip(rows, because, weights):
            row["because"] = [{"item_id": str(i), "text": text_of(str(i)), "contribution": float(v)}
                              for i, v in zip(ids, values)]
    if args.json:
        print(json.dumps({"model": args.model, "history": history, "k": args.k, "recommendations": rows},
                         indent=2, ensure_ascii=False))
    else:
        print(format_table(rows))
    return 0
