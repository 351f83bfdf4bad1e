"""`selfsup` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import json
import os
import sys

from selfsup.platform import api, data_commands
from selfsup.platform.api import DEFAULT_DATA, DEFAULT_RUNS
from selfsup.platform.usage import UsageError, positive as _positive


def _storage(args) -> int:
    from selfsup.pipelines.seaweed import EmbeddedS3

    server = EmbeddedS3()
    if args.action == "up":
        ep = server.up()
        print(f"embedded S3 server running at {ep.url} (data in {server.data})")
        print(f"credentials: `eval $(selfsup storage env)` or `source {server.env_file}`")
    elif args.action == "down":
        print("stopped" if server.down() else "not running")
    elif args.action == "status":
        st = server.status()
        print(json.dumps(st, indent=1))
        return 0 if st["running"] else 1
    else:
        sys.stdout.write(server.env_text())
    return 0


def _config_show(args) -> int:
    from selfsup.platform.config import load_config, to_yaml

    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def _methods_list(args) -> int:
    from selfsup.methods import METHODS

    for name, cls in METHODS.items():
        doc = " ".join((sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0].split())
        print(f"{name:14} views={cls.view_kind:11} {doc.split('. ')[0].rstrip('.')}.")
    return 0


def _train(args) -> int:
    from selfsup.platform.config import load_config
    from selfsup.platform.trainer import train

    summary = train(load_config(args.config, args.overrides), show_progress=True)
    print(json.dumps(summary, indent=1))
    return 0 if summary["status"] == "finished" else 1


def _tune(args) -> int:
    from selfsup.platform.runs import format_trials
    from selfsup.platform.sweeps import tune_sweep

    state = tune_sweep(args.config, args.overrides, space=args.space, searcher=args.searcher, samples=args.samples,
                       metric=args.metric, mode=args.mode, grace_period=args.grace_period,
                       max_concurrent=args.max_concurrent, name=args.name)
    print(format_trials(state))
    return 0


def _sweeps(args) -> int:
    from selfsup.platform.runs import format_sweeps, format_trials, list_sweeps, show_sweep

    if args.action == "list":
        sweeps, bad = list_sweeps(args.root)
        print(format_sweeps(sweeps))
        for line in bad:
            print(f"selfsup: error: {line}", file=sys.stderr)
        return 1 if bad else 0
    if not args.sweep:
        raise UsageError("sweeps show needs SWEEP (a name under --root)")
    print(format_trials(show_sweep(args.root, args.sweep)))
    return 0


def _runs(args) -> int:
    from selfsup.pipelines.storage import open_store
    from selfsup.platform.runs import format_runs, list_runs, read_metrics, read_summary, resolve_run

    if args.action == "list":
        runs, bad = list_runs(args.root)
        print(format_runs(runs))
        for line in bad:  # the others are listed; each unreadable run is named, exit 1
            print(f"selfsup: error: {line}", file=sys.stderr)
        return 1 if bad else 0
    if not args.run:
        raise UsageError("runs show needs RUN (a name under --root, or a URI)")
    store = open_store(resolve_run(args.run, args.root))
    summary = read_summary(store)
    if not summary:
        raise UsageError(f"no run at {store.uri} (no summary.json)")
    print(json.dumps(summary, indent=1))
    rows = read_metrics(store)
    for r in rows[-args.tail:] if args.tail else rows:
        print(json.dumps(r))
    return 0


def _eval(args) -> int:
    from selfsup.platform.evaluate import evaluate_run
    from selfsup.platform.runs import resolve_run

    tuning = {k: getattr(args, k) for k in ("fraction", "epochs", "batch_size", "lr", "layer_decay")
              if getattr(args, k) is not None}
    if args.kind != "finetune" and tuning:
        raise UsageError(f"--{next(iter(tuning)).replace('_', '-')} is for `eval finetune`")
    run = resolve_run(args.run, args.root)
    if args.kind == "finetune":
        from selfsup.platform.finetune import FinetuneParams, finetune_run, report

        if args.random_init:
            raise UsageError("--random-init: fine-tuning always scores the random init beside the run")
        try:
            p = FinetuneParams(**tuning)
        except ValueError as e:
            raise UsageError(str(e)) from None
        out = finetune_run(run, p, args.checkpoint, args.teacher, args.train_samples, args.test_samples,
                           log=lambda line: print(line, file=sys.stderr, flush=True), data=args.data)
        print(report(out))
        return 0
    out = evaluate_run(run, args.kind, args.train_samples, args.test_samples, args.checkpoint, args.random_init,
                       args.teacher, data=args.data)
    print(json.dumps(out, indent=1))
    return 0


def _data_preview(args) -> int:
    from selfsup.platform.preview import preview

    _positive("--samples", args.samples)
    n = preview(args.config, args.overrides, args.out, args.samples)
    print(f"wrote {args.out}: {n} views of {args.samples} samples")
    return 0


def _tokenizer_fit(args) -> int:
    from selfsup.platform.tokenizer import fit_command

    fit_command(args.config, args.overrides, args.out)
    return 0


def _export(args) -> int:
    meta = api.export(args.run, args.format, args.out, args.checkpoint, args.teacher, args.overwrite, args.root)
    print(f"exported the {meta['backbone']} backbone of {meta['run']} ({meta['checkpoint']}) as {args.format} to {args.out}")
    return 0


def _embed(args) -> int:
    from selfsup.platform.embed import embed
    from selfsup.platform.runs import resolve_run

    out = embed(resolve_run(args.run, args.root), args.data, args.out, args.split, args.batch_size, args.workers,
                args.gpus_per_worker, args.cpus_per_worker, args.checkpoint, args.teacher, args.overwrite, progress=True)
    rows = ", ".join(f"{split} {n:,}" for split, n in out["rows"].items())
    print(f"embedded {rows} samples ({out['dim']} features, {out['backbone']} backbone) to {out['out']} "
          f"in {out['time_s']:.0f} s")
    return 0


def _dashboard(args) -> int:
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    from selfsup.dashboard.server import DashboardError, serve

    try:
        return serve(args.root, args.port, args.address)
    except DashboardError as e:
        raise UsageError(str(e)) from None


def _demo(args) -> int:
    from selfsup.platform.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised pretraining on Ray from object storage. "
                                "Errors are one line with exit code 2 (bad input) or 1 (a failure); "
                                "--debug (or SELFSUP_DEBUG=1) shows their tracebacks.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("storage", help="run the embedded S3 server (SeaweedFS) under $SELFSUP_HOME",
                       description="Manage the embedded S3 server: bound to 127.0.0.1, data kept under "
                                   "$SELFSUP_HOME/storage (default ~/.selfsup/storage).")
    s.add_argument("action", choices=["up", "down", "status", "env"],
                   help="up: start (idempotent); down: stop, data kept; status: JSON; env: print export lines")
    s.set_defaults(func=_storage)

    data_commands.add_parsers(sub, DEFAULT_DATA)

    s = sub.add_parser("train", help="pretrain on Ray Train (resumes a run of the same storage.name)",
                       description="Train CONFIG (a YAML file or a shipped config name) with key=value overrides, "
                                   "on the Ray cluster RAY_ADDRESS names or on a local one.")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.set_defaults(func=_train)

    s = sub.add_parser("tune", help="a Ray Tune sweep over config keys, ASHA early stopping (resumable)",
                       description="Sweep CONFIG (with KEY=VALUE overrides) over a search space; each trial is a run "
                                   "under <storage.root>/<sweep>/. Rerunning the same command continues the sweep. "
                                   "Writes trials.csv, sweep.json and best.yaml (for `selfsup train`) beside the trials.")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--space", help="a space YAML file or a shipped space (contrastive, clustering, dino, two_views, "
                                   "masked); default: the method's family")
    s.add_argument("--searcher", choices=["grid", "random", "optuna"],
                   help="default: grid when every entry is a grid, else random")
    s.add_argument("--samples", type=int, help="trials to draw (each grid point this many times); default 8 (grid: 1)")
    s.add_argument("--metric", default="knn_top1", help="the evaluation metric ASHA and the best trial go by")
    s.add_argument("--mode", default="max", choices=["max", "min"])
    s.add_argument("--grace-period", type=int, default=1,
                   help="evaluations (eval.every_epochs) a trial gets before ASHA may stop it")
    s.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds now)")
    s.add_argument("--name", help="the sweep's name (default: CONFIG-SPACE, so a rerun continues it)")
    s.set_defaults(func=_tune)

    s = sub.add_parser("sweeps", help="list sweeps or show one sweep's trials",
                       description="Read sweeps (sweep.json and their trials' runs) from S3 or a local root.")
    s.add_argument("action", choices=["list", "show"])
    s.add_argument("sweep", nargs="?", help="for show: a sweep name under --root")
    s.add_argument("--root", default=DEFAULT_RUNS)
    s.set_defaults(func=_sweeps)

    s = sub.add_parser("config", help="show the resolved config", description="Print CONFIG with overrides applied and "
                       "every default filled in.")
    s.add_argument("action", choices=["show"])
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.set_defaults(func=_config_show)

    s = sub.add_parser("methods", help="list the registered SSL methods", description="List the SSL methods.")
    s.add_argument("action", choices=["list"])
    s.set_defaults(func=_methods_list)

    s = sub.add_parser("runs", help="list runs or show one run's summary and metrics",
                       description="Read runs (summary.json, metrics.jsonl) from S3 or a local root.")
    s.add_argument("action", choices=["list", "show"])
    s.add_argument("run", nargs="?", help="for show: a run name under --root (a sweep's trial: SWEEP/TRIAL), or its URI")
    s.add_argument("--root", default=DEFAULT_RUNS)
    s.add_argument("--tail", type=int, default=20, help="metric rows to print (0: all)")
    s.set_defaults(func=_runs)

    s = sub.add_parser("export", help="a run's backbone alone (timm: timm.create_model('local-dir:OUT', pretrained=True)"
                       "; safetensors; torchscript; onnx), with selfsup.json naming its run, checkpoint and input")
    s.add_argument("run")
    s.add_argument("--format", required=True, help="timm, safetensors, torchscript or onnx")
    s.add_argument("--out", required=True, help="a folder or s3://bucket/prefix")
    s.add_argument("--root", default=DEFAULT_RUNS)
    s.add_argument("--checkpoint", help="a checkpoint name (default: the newest that loads)")
    s.add_argument("--teacher", action="store_true", help="the EMA teacher's backbone (DINO)")
    s.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    s.set_defaults(func=_export)

    s = sub.add_parser("embed", help="a data set's embeddings by a run's backbone, as Parquet (Ray Data batch inference)",
                       description="Embed every sample of DATA (or of --split) with RUN's backbone; OUT/<split>/*.parquet "
                       "holds key, label, split and embedding (a fixed-size list of float32).")
    s.add_argument("run")
    s.add_argument("data", help="shards that selfsup reads (the folder or prefix of their manifest.json)")
    s.add_argument("out", help="a folder or s3://bucket/prefix for the Parquet files")
    s.add_argument("--split", action="append", help="a split to embed (repeatable; default: every split)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=1, help="model actors (Ray Data concurrency)")
    s.add_argument("--cpus-per-worker", type=float, default=1, help="each actor's CPUs (its torch threads); "
                   "Ray Data's read tasks need a CPU beside the actors")
    s.add_argument("--gpus-per-worker", type=float, default=0)
    s.add_argument("--root", default=DEFAULT_RUNS)
    s.add_argument("--checkpoint", help="a checkpoint name (default: the newest that loads)")
    s.add_argument("--teacher", action="store_true", help="the EMA teacher's backbone (DINO)")
    s.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    s.set_defaults(func=_embed)

    s = sub.add_parser("eval", help="kNN, linear-probe or fine-tuning accuracy of a run's backbone",
                       description="Evaluate a run's newest good checkpoint (or its random init): knn = weighted kNN "
                                   "on frozen features (k, T from the run's eval config); linear = logistic regression "
                                   "on frozen features with 100%%, 10%% and 1%% of the train labels; finetune = the "
                                   "whole backbone and a linear head trained on --fraction of the labels (class-"
                                   "balanced) for --epochs, beside the random init under the same schedule, the table "
                                   "written to the run's eval/ folder. Defaults use whole splits.")
    s.add_argument("kind", choices=["knn", "linear", "finetune"])
    s.add_argument("run")
    s.add_argument("--root", default=DEFAULT_RUNS)
    s.add_argument("--data", help="the labeled set to score on (s3://... or a directory with a manifest.json; default: "
                                   "the run's eval.data_uri, else its data.uri)")
    s.add_argument("--train-samples", type=int, default=0, help="0: the whole train split")
    s.add_argument("--test-samples", type=int, default=0, help="0: the whole test split")
    s.add_argument("--checkpoint", help="a checkpoint name (default: the newest that loads)")
    s.add_argument("--random-init", action="store_true", help="the same backbone and seed, untrained (the baseline)")
    s.add_argument("--teacher", action="store_true", help="the EMA teacher's backbone (DINO)")
    s.add_argument("--fraction", type=float, help="finetune: share of the train labels, each class alike (default 0.1)")
    s.add_argument("--epochs", type=int, help="finetune: passes over those labels (default 10)")
    s.add_argument("--batch-size", type=int, help="finetune: default 128")
    s.add_argument("--lr", type=float, help="finetune: AdamW lr per 256 images (default 1e-3)")
    s.add_argument("--layer-decay", type=float, help="finetune: layer-wise lr decay for ViTs (default 0.75; 1: none)")
    s.set_defaults(func=_eval)

    s = sub.add_parser("data", help="preview the views a config produces",
                       description="Write a PNG grid: one row per sample, one column per view.")
    s.add_argument("action", choices=["preview"])
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--out", default="views.png")
    s.add_argument("--samples", type=int, default=8)
    s.set_defaults(func=_data_preview)

    s = sub.add_parser("tokenizer", help="fit BEiT's visual tokenizer (k-means visual words) over the shards",
                       description="Fit k-means visual words over per-patch normalised pixels of CONFIG's train split "
                                   "(method.vocab_size words, method.tokenizer_samples images) and write the tokenizer "
                                   "file to --out; point a BEiT run at it with method.tokenizer=URI.")
    s.add_argument("action", choices=["fit"])
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--out", required=True, help="s3://... or a path, e.g. s3://selfsup/tokenizers/fmnist-512.pt")
    s.set_defaults(func=_tokenizer_fit)

    s = sub.add_parser("dashboard", help="the Streamlit dashboard: runs, sweeps, attention maps, embeddings",
                       description="Serve the dashboard of the runs and sweeps under --root (S3 or a local folder) on "
                                   "--address:--port. It prints the one address that opens it: the token in it is "
                                   "needed by every browser session.")
    s.add_argument("--root", default=DEFAULT_RUNS)
    s.add_argument("--port", type=int, default=8501)
    s.add_argument("--address", default="127.0.0.1",
                   help="the interface to listen on (default loopback only; another one serves other machines, "
                        "and the token still applies)")
    s.set_defaults(func=_dashboard)

    s = sub.add_parser("demo", help="the whole job on the embedded defaults (what `make demo` runs)",
                       description="Start the embedded S3 server, shard Fashion-MNIST into it if absent, train the "
                                   "`demo` config on a local Ray cluster, print kNN before and after.")
    s.add_argument("--data", default=DEFAULT_DATA, help=f"where the shards live (default {DEFAULT_DATA})")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo config")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a failure (a run that failed, corrupt data, a crash), 2 bad input or
    unreachable storage, 130 Ctrl-C, 143 SIGTERM. Every error is one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    i = next((n for n, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if argv[i:i + 1] == ["shard"] and argv[i + 1:i + 2] in (["verify"], ["index"]):
        argv = [*argv[:i], f"shard-{argv[i + 1]}", *argv[i + 2:]]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # --help and usage errors end here, before torch is imported
    if extra:  # KEY=VALUE overrides after an option (`tune CONFIG --space S k=v`): argparse leaves them over
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra

    from selfsup.pipelines.sources import SourceError
    from selfsup.pipelines.endpoints import StorageError
    from selfsup.platform.config import ConfigError
    from selfsup.platform.runs import one_line_cause
    debug = args.debug or os.environ.get("SELFSUP_DEBUG", "") not in ("", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return args.func(args)
    except (StorageError, SourceError, UsageError, ConfigError) as e:
        if debug:
            raise
        print(f"selfsup: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        if type(e).__name__ == "Terminated":
            print("selfsup: terminated", file=sys.stderr)
            return 143
        if debug or isinstance(e, SystemExit):
            raise
        print(f"selfsup: error: {one_line_cause(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
