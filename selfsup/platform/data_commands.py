"""`selfsup shard`, `shard verify` and `shard index`: their arguments and what each runs."""

from __future__ import annotations

import argparse
import sys

from selfsup.platform.usage import UsageError, positive


def add_parsers(sub, default_data: str) -> None:
    s = sub.add_parser("shard", help="write an image set as WebDataset shards (also: shard verify DEST, shard index PATTERN)",
                       description="Write SOURCE as WebDataset shards under DEST with a manifest.json. Re-running "
                                   "resumes. `selfsup shard verify DEST` re-reads and checks every shard; `selfsup "
                                   "shard index PATTERN` indexes shards that other tools wrote, in place.")
    s.add_argument("source", help="`fashion-mnist`; a folder or s3://bucket/prefix of images, in class subfolders "
                                  "(labeled) or flat (unlabeled); an .npz with `images` and `labels`; Parquet (a "
                                  ".parquet file, or a folder or prefix of them with --image-column)")
    s.add_argument("dest", nargs="?", default=default_data, help=f"s3://bucket/prefix or a directory (default {default_data})")
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--format", choices=["png", "jpg"], help="image encoding (default: png for grey, jpg for RGB)")
    s.add_argument("--quality", type=int, default=95, help="JPEG quality")
    s.add_argument("--holdout", type=float, default=0.0,
                   help="fraction held out as the `test` split (folder, Parquet and .npz sources)")
    s.add_argument("--image-column", help="Parquet: the column of image bytes (default `image`)")
    s.add_argument("--label-column", help="Parquet: the column of labels, class indices or names (default: unlabeled)")
    s.add_argument("--workers", type=int, default=4, help="parallel encode/upload threads (without a Ray cluster)")
    s.add_argument("--overwrite", action="store_true", help="replace a different data set already at DEST")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=shard)

    s = sub.add_parser("shard-verify", help=argparse.SUPPRESS,
                       description="Re-read every shard of DEST's manifest; check sha256 and sample counts. "
                                   "Exit 1 when any shard is missing or corrupt.")
    s.add_argument("dest", nargs="?", default=default_data)
    s.add_argument("--decode", action="store_true", help="also decode every image (finds images damaged before "
                                                          "their shard's sha256 was taken)")
    s.set_defaults(func=shard_verify)

    s = sub.add_parser("shard-index", help=argparse.SUPPRESS,
                       description="Write a manifest.json for WebDataset shards that other tools wrote (webdataset's "
                                   "ShardWriter, img2dataset, tar), without rewriting them; on the Ray cluster when "
                                   "RAY_ADDRESS names one. Training, eval and the dashboard then read them.")
    s.add_argument("pattern", help="the shards: s3://bucket/photos/shard-{000000..000999}.tar, or *.tar in a folder")
    s.add_argument("--test", help="a pattern of the test split's shards")
    s.add_argument("--holdout", type=float, default=0.0, help="or: this fraction of the shards as the test split")
    s.add_argument("--labels", default="cls", help="where a sample's label is: cls (a .cls member, an integer or a "
                                                   "class name), json:FIELD (a field of its .json), none (unlabeled)")
    s.add_argument("--out", help="the manifest's folder, one that holds the shards (default: their common folder)")
    s.add_argument("--workers", type=int, default=4, help="shards read at once (without a Ray cluster)")
    s.add_argument("--overwrite", action="store_true", help="replace a manifest of another data set (no shard is touched)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=shard_index)


def shard(args) -> int:
    from selfsup.pipelines.shards import ShardOptions, summary, write_shards
    from selfsup.pipelines.sources import open_source
    from selfsup.platform.trainer import join_cluster

    if not 0 <= args.holdout < 1:
        raise UsageError(f"--holdout must be in [0, 1), got {args.holdout}")
    positive("--samples-per-shard", args.samples_per_shard)
    positive("--workers", args.workers)
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {args.quality}")
    source = open_source(args.source, args.holdout, args.image_column, args.label_column)
    opts = ShardOptions(samples_per_shard=args.samples_per_shard, fmt=args.format, quality=args.quality,
                        workers=args.workers, overwrite=args.overwrite)
    on_ray = join_cluster()
    manifest = write_shards(source, args.dest, opts, progress=not args.quiet, on_ray=on_ray,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary(manifest))
    print(f"manifest: {args.dest.rstrip('/')}/manifest.json")
    return 0


def shard_verify(args) -> int:
    from selfsup.pipelines.shards import verify

    manifest, problems = verify(args.dest, decode=args.decode)
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    for p in problems:
        print(f"BAD {p}")
    what = "shards ok (every image decoded)" if args.decode else "shards ok"
    print(f"{n - len(problems)}/{n} {what}" + (f", {len(problems)} bad" if problems else ""))
    return 1 if problems else 0


def shard_index(args) -> int:
    from selfsup.pipelines.index import IndexOptions, index
    from selfsup.pipelines.shards import summary
    from selfsup.platform.trainer import join_cluster

    positive("--workers", args.workers)
    on_ray = join_cluster()
    opts = IndexOptions(test=args.test, holdout=args.holdout, labels=args.labels, out=args.out, workers=args.workers,
                        overwrite=args.overwrite)
    manifest = index(args.pattern, opts, progress=not args.quiet, on_ray=on_ray,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary(manifest))
    return 0
