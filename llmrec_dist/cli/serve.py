"""`llmrec-dist serve`: a registered next-item model behind HTTP, on Ray Serve."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path


def add_parser(subparsers) -> None:
    from llmrec_dist.serving.settings import describe

    p = subparsers.add_parser(
        "serve", help="serve a registered next-item model over HTTP (Ray Serve), following its alias",
        description="Start a Ray Serve application that answers POST /recommend (a history of original item "
                    "ids in, the top-k items out), GET /healthz and GET /version, on the local Ray or on the "
                    "cluster at $RAY_ADDRESS. With models:/NAME@ALIAS the replicas follow the alias: a new "
                    "version is loaded and swapped in without dropping requests. Runs until Ctrl-C or "
                    "SIGTERM. Config keys (serve.KEY=VALUE):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a "
                                                 "model-package folder (overrides serve.model)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides serve.tracking_uri)")
    p.add_argument("--host", default=None, help="HTTP host (overrides serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (overrides serve.port, default 8000)")
    p.add_argument("--config", default=None, help="YAML file with a serve: section (e.g. configs/serve.yaml)")
    p.add_argument("--write-config", default=None, metavar="FILE",
                   help="write a Ray Serve config file for `serve deploy FILE` (on a cluster) and exit "
                        "without starting anything")
    p.add_argument("overrides", nargs="*", metavar="serve.key=value", help="dotted config overrides")
    p.set_defaults(func=run)


def load_checked(args):
    """``(cfg, source, version)``: the config, and the model resolved in the registry. Nothing is
    started; every problem is a ConfigError / ModelSourceError with a one-line message."""
    from llmrec_dist.serving.settings import load_serve_config
    from llmrec_dist.serving.source import ModelSource
    from llmrec_dist.tracking import resolve_tracking_uri

    flags = {"model": args.model, "tracking_uri": args.tracking_uri, "host": args.host, "port": args.port}
    cfg = load_serve_config(args.config, args.overrides, flags)
    source = ModelSource(cfg.model, resolve_tracking_uri(cfg.tracking_uri), cfg.trust_remote_code)
    return cfg, source, source.check()


def serve_config_file(cfg) -> dict:
    """A Ray Serve config (``serve deploy``) that runs this app through the application builder."""
    from llmrec_dist.serving.app import IMPORT_PATH
    from llmrec_dist.serving.source import ModelSource
    from llmrec_dist.tracking import resolve_tracking_uri

    values = cfg.to_dict()
    values["tracking_uri"] = resolve_tracking_uri(cfg.tracking_uri)
    source = ModelSource(cfg.model, values["tracking_uri"])
    if source.kind == "folder":
        values["model"] = source.uri
    return {"proxy_location": "EveryNode",
            "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [{"name": cfg.app_name, "route_prefix": "/", "import_path": IMPORT_PATH,
                              "args": values}]}


def write_serve_config(cfg, path: str) -> Path:
    import yaml

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Ray Serve config written by `llmrec-dist serve --write-config`; deploy it with:\n"
              f"#   serve deploy {target.name}        (RAY_ADDRESS / --address: the cluster's dashboard)\n")
    target.write_text(header + yaml.safe_dump(serve_config_file(cfg), sort_keys=False), encoding="utf-8")
    return target


def start(cfg) -> str:
    """Start Serve's HTTP proxy and the application on the connected Ray; returns the app's URL."""
    from ray import serve

    from llmrec_dist.serving.app import application, logging_config

    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config(cfg))
    serve.run(application(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    return cfg.url()


def run(args) -> int:
    from mlflow.exceptions import MlflowException

    from llmrec_dist.serving.source import ModelSourceError

    try:
        cfg, source, version = load_checked(args)
    except (ModelSourceError, MlflowException, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"llmrec-dist serve: {message}", file=sys.stderr)
        return 2
    if args.write_config:
        path = write_serve_config(cfg, args.write_config)
        print(f"wrote {path}; deploy it with: serve deploy {path}")
        return 0

    import math

    from ray import serve

    from llmrec_dist import console
    from llmrec_dist.ray_setup import init_ray

    replicas = cfg.max_replicas if cfg.autoscaling else cfg.num_replicas
    init_ray(1, cfg.cpus_per_replica, local_cpus=max(os.cpu_count() or 1,
                                                     math.ceil(replicas * cfg.cpus_per_replica) + 1))
    attached = bool(os.environ.get("RAY_ADDRESS"))
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        what = f"{source.uri}" + (f" (version {version})" if version else "")
        console.say(f"starting {what} on Ray Serve ...")
        url = start(cfg)
        console.say(f"serving {what} at {url}  (POST /recommend, GET /healthz, GET /version); Ctrl-C stops")
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        console.say("stopping ...")
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            if attached:
                serve.delete(cfg.app_name)  # leave the cluster's Serve (and other apps) running
            else:
                serve.shutdown()
        except Exception as err:  # stopping should never hide why we stopped
            print(f"llmrec-dist serve: while stopping: {err}", file=sys.stderr)
    return 0
