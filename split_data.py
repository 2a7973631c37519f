"""Split Caltech-101 into train/ and test/ folders, once, safely and reproducibly.

    python split_data.py                       # dataset/images/101_ObjectCategories -> dataset/images/{train,test}
    python split_data.py --download            # fetch dataset/caltech-101.zip first (official CaltechDATA zip)
    python split_data.py --source 101_ObjectCategories.tar.gz --out /tmp/images

What it fixes in the original script: the source is never moved or changed (files are
hard-linked when source and output share a file system, copied otherwise); the split does
not depend on listing order (sorted listings, each class shuffled by its own generator,
data.class_seed); BACKGROUND_Google is left out (not an object class; torchvision leaves it
out too); every file is decoded before it is used; a second run is a no-op, not a crash.

The split is built in a hidden temporary folder inside --out and swapped in by renames,
split.json last: a killed run leaves the old split or the new one, never half of one.
split.json records the arguments, the class list in index order, both file lists, the
counts and a fingerprint, so the folders on disk can be checked against it (`study.splitting.disk_diff`).

Measured (2 shared CPU cores, Python 3.11, Pillow 13): the real archive (131 MB tar.gz, 9,144
files) splits in 7.7-8.2 s wall on a quiet machine; 5.5 s CPU (extract ~2 s, decode check ~3.4 s).
"""
import argparse
import os
import time
from pathlib import Path

from study.archive import OFFICIAL_MD5, OFFICIAL_URL, SplitDataError, fetch_official
from study.splitting import BACKGROUND, build_split, existing_split, inside, prepare_default_source, summary

DATASET_DIR = Path("dataset")  # relative to the working directory, like the original
DEFAULT_OUT = DATASET_DIR / "images"
DEFAULT_SOURCE = DEFAULT_OUT / "101_ObjectCategories"
DOWNLOAD_NAME = "caltech-101.zip"
# Archives the default layout extracts when DEFAULT_SOURCE is missing, in this order.
DEFAULT_ARCHIVES = ("caltech-101.zip", "101_ObjectCategories.tar.gz")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        description="Split Caltech-101 (a folder of class folders, or an archive) into train/ and test/ "
                    "folders plus split.json, without touching the source.", add_help=add_help)
    parser.add_argument("--source", default=None, type=str,
                        help=f"folder with one sub-folder per class, or a .zip/.tar/.tar.gz/.tgz archive "
                             f"(the official caltech-101.zip too) (default: {DEFAULT_SOURCE}, extracted first "
                             f"from {DATASET_DIR}/{DEFAULT_ARCHIVES[0]} or {DATASET_DIR}/{DEFAULT_ARCHIVES[1]} "
                             f"when missing)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), type=str,
                        help="folder that receives train/, test/ and split.json (default: %(default)s)")
    parser.add_argument("--train-ratio", default=0.8, type=float,
                        help="fraction of each class sent to train, floor(ratio * n) images; the rest go to "
                             "test (default: %(default)s)")
    parser.add_argument("--seed", default=42, type=int, help="seed of the per-class shuffles (default: %(default)s)")
    parser.add_argument("--keep-background", action="store_true",
                        help=f"keep {BACKGROUND} as a class (default: left out, it is not an object class)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the split even if --out already holds one made with other arguments "
                             "(default: refuse)")
    parser.add_argument("--download", action="store_true",
                        help=f"first fetch the official zip to {DATASET_DIR}/{DOWNLOAD_NAME} and check its MD5 "
                             f"(default: off)")
    parser.add_argument("--url", default=OFFICIAL_URL, type=str,
                        help="address --download fetches, http(s):// or file:// (default: %(default)s)")
    parser.add_argument("--md5", default=OFFICIAL_MD5, type=str,
                        help="expected MD5 of the downloaded file (default: %(default)s)")
    parser.add_argument("--workers", default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else (os.cpu_count() or 1), type=int,
                        help="processes that decode images to check them (default: the usable cores, %(default)s)")
    parser.add_argument("--copy", action="store_true",
                        help="always copy files (default: hard-link when source and --out share a file system; "
                             "a hard-linked file edited in place changes in the source too)")
    return parser


def _check_args(args):
    if not 0 < args.train_ratio < 1:
        raise SystemExit(f"--train-ratio must be between 0 and 1 (exclusive), got {args.train_ratio}")
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {args.workers}")
    if args.download and args.source is not None:
        raise SystemExit(f"--download fetches {DATASET_DIR}/{DOWNLOAD_NAME} for the default layout; "
                         f"drop --source, or drop --download")


def main(argv=None):
    """Run the split; return the split record (split.json's content)."""
    args = get_args_parser().parse_args(argv)
    _check_args(args)
    started = time.perf_counter()
    out = Path(args.out)
    try:
        if args.download:
            fetch_official(args.url, args.md5, DATASET_DIR / DOWNLOAD_NAME)
        source = Path(args.source) if args.source is not None else DEFAULT_SOURCE
        if args.source is not None and not source.exists():
            raise SystemExit(f"--source {source} does not exist")
        if inside(out, source):
            raise SystemExit(f"--out {out} is inside the source {source}; the source must stay untouched")
        if inside(source, out / "train") or inside(source, out / "test"):
            raise SystemExit(f"--source {source} is inside {out}/train or {out}/test, which this run replaces")
        args_record = {"source": str(source.resolve()), "train_ratio": args.train_ratio, "seed": args.seed,
                       "keep_background": args.keep_background}
        record = existing_split(out, args_record, args.force)
        if record is not None:
            c = record["counts"]
            print(f"split already there: {out} holds {c['classes']} classes, {c['train']} train + "
                  f"{c['test']} test images made with the same arguments; nothing to do")
            return record
        if args.source is None:
            prepare_default_source(source, [DATASET_DIR / n for n in DEFAULT_ARCHIVES], args.url)
        record, counts = build_split(source, out, args_record, args.workers, args.copy)
    except SplitDataError as e:
        raise SystemExit(str(e)) from e
    print(summary(record, out, counts, time.perf_counter() - started))
    return record


if __name__ == "__main__":
    main()
