"""`selfsup` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_DATA = "s3://selfsup/datasets/fashion-mnist"


class UsageError(ValueError):
    """Bad input on the command line or in a config: exit code 2, one line."""


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


def _shard(args) -> int:
    from selfsup.pipelines.shards import ShardOptions, summary, write_shards
    from selfsup.pipelines.sources import open_source

    if not 0 <= args.holdout < 1:
        raise UsageError(f"--holdout must be in [0, 1), got {args.holdout}")
    source = open_source(args.source, holdout=args.holdout)
    opts = ShardOptions(samples_per_shard=args.samples_per_shard, fmt=args.format, quality=args.quality,
                        workers=args.workers, overwrite=args.overwrite)
    manifest = write_shards(source, args.dest, opts, progress=not args.quiet)
    print(summary(manifest))
    print(f"manifest: {args.dest.rstrip('/')}/manifest.json")
    return 0


def _shard_verify(args) -> int:
    from selfsup.pipelines.shards import verify

    manifest, problems = verify(args.dest)
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    for p in problems:
        print(f"BAD {p}")
    print(f"{n - len(problems)}/{n} shards ok" + (f", {len(problems)} bad" if problems else ""))
    return 1 if problems else 0


def _demo(args) -> int:
    from selfsup.platform.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised pretraining on Ray from object storage.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("storage", help="run the embedded S3 server (SeaweedFS) under $SELFSUP_HOME",
                       description="Manage the embedded S3 server: bound to 127.0.0.1, data kept under "
                                   "$SELFSUP_HOME/storage (default ~/.selfsup/storage).")
    s.add_argument("action", choices=["up", "down", "status", "env"],
                   help="up: start (idempotent); down: stop, data kept; status: JSON; env: print export lines")
    s.set_defaults(func=_storage)

    s = sub.add_parser("shard", help="write a labeled image set as WebDataset shards (also: shard verify DEST)",
                       description="Write SOURCE as WebDataset shards under DEST with a manifest.json. "
                                   "Re-running resumes. `selfsup shard verify DEST` re-reads and checks every shard.")
    s.add_argument("source", help="`fashion-mnist`, an ImageFolder directory (one subfolder per class) or an .npz "
                                  "with `images` and `labels`")
    s.add_argument("dest", nargs="?", default=DEFAULT_DATA, help=f"s3://bucket/prefix or a directory (default {DEFAULT_DATA})")
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--format", choices=["png", "jpg"], help="image encoding (default: png for grey, jpg for RGB)")
    s.add_argument("--quality", type=int, default=95, help="JPEG quality")
    s.add_argument("--holdout", type=float, default=0.0,
                   help="fraction held out as the `test` split (ImageFolder and .npz sources)")
    s.add_argument("--workers", type=int, default=4, help="parallel encode/upload threads")
    s.add_argument("--overwrite", action="store_true", help="replace a different data set already at DEST")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_shard)

    s = sub.add_parser("shard-verify", help=argparse.SUPPRESS,
                       description="Re-read every shard of DEST's manifest; check sha256 and sample counts. "
                                   "Exit 1 when any shard is missing or corrupt.")
    s.add_argument("dest", nargs="?", default=DEFAULT_DATA)
    s.set_defaults(func=_shard_verify)
    s = sub.add_parser("demo", help="the whole job on the embedded defaults (what `make demo` runs)",
                       description="Start the embedded S3 server, shard Fashion-MNIST into it if absent, "
                                   "and print the manifest summary.")
    s.add_argument("--data", default=DEFAULT_DATA, help=f"where the shards live (default {DEFAULT_DATA})")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from selfsup.pipelines.sources import SourceError
    from selfsup.pipelines.storage import StorageError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["shard", "verify"]:
        argv = ["shard-verify", *argv[2:]]
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return args.func(args)
    except (StorageError, SourceError, UsageError) as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
