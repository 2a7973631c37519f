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
counts and a fingerprint, so the folders on disk can be checked against it (`disk_diff`).

Measured (2 shared CPU cores, Python 3.11, Pillow 13): the real archive (131 MB tar.gz, 9,144
files) splits in 7.7-8.2 s wall on a quiet machine; 5.5 s CPU (extract ~2 s, decode check ~3.4 s).
"""
import argparse
import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

from study import records
from study.data import class_seed, is_image_name, split_fingerprint

# The official CaltechDATA record for Caltech-101 (https://data.caltech.edu/records/mzrjq-6wc02);
# the same address and MD5 as torchvision.datasets.Caltech101.
OFFICIAL_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
OFFICIAL_MD5 = "3138e1922a9193bfa496528edbbc45d0"

DATASET_DIR = Path("dataset")  # relative to the working directory, like the original
DEFAULT_OUT = DATASET_DIR / "images"
DEFAULT_SOURCE = DEFAULT_OUT / "101_ObjectCategories"
DOWNLOAD_NAME = "caltech-101.zip"
# Archives the default layout extracts when DEFAULT_SOURCE is missing, in this order.
DEFAULT_ARCHIVES = ("caltech-101.zip", "101_ObjectCategories.tar.gz")

BACKGROUND = "BACKGROUND_Google"
SPLIT_FILE = "split.json"
SPLIT_FORMAT = "split_data/1"
TMP_PREFIX = ".split_data-"  # hidden temp folders; leftovers of a killed run are removed by the next build
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
POOL_MIN_FILES = 64  # below this, starting worker processes costs more than it saves


class SplitDataError(ValueError):
    """Bad input: main() turns it into a one-line SystemExit."""


class UnsafeArchiveError(SplitDataError):
    """An archive member would write outside the destination, or is a link or a device."""


class DownloadError(SplitDataError):
    """The download failed or its checksum did not match; nothing was kept."""


def _progress(iterable=None, **kwargs):
    # disable=None: bars on a terminal only, so logs and tests stay clean.
    return tqdm(iterable, disable=None, dynamic_ncols=True, **kwargs)


def _is_hidden(name):
    return name.startswith(".") or name == "__MACOSX"


def _is_archive_name(name):
    return name.lower().endswith(ARCHIVE_SUFFIXES)


# ----------------------------------------------------------------------------- archives

def _member_target(dest_real, name, archive, link=False, special=False):
    """Where member `name` lands inside dest_real; refuse a link, a device, or anything that could leave it."""
    parts = name.replace("\\", "/").split("/")
    target = os.path.realpath(os.path.join(dest_real, *[p for p in parts if p not in ("", ".")]))
    why = ("absolute path" if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name)
           else "'..' component" if ".." in parts
           else "it leaves the destination" if target != dest_real and not target.startswith(dest_real + os.sep)
           else "a link" if link else "a device or special file" if special else None)
    if why:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: {why}")
    return target


def _extract_tar(archive, dest_real):
    with tarfile.open(archive) as tf:
        members = tf.getmembers()  # read all headers first: a bad member anywhere stops us before any write
        for m in members:
            _member_target(dest_real, m.name, archive, link=m.issym() or m.islnk(),
                           special=not (m.isfile() or m.isdir() or m.issym() or m.islnk()))
        # filter="data" (Python >= 3.11.4) is a second guard behind the checks above.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for m in _progress(members, desc="extract", unit="file"):
            tf.extract(m, dest_real, **extra)


def _extract_zip(archive, dest_real):
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        kinds = [stat.S_IFMT(i.external_attr >> 16) for i in infos]  # Unix mode, 0 when made elsewhere
        targets = [_member_target(dest_real, i.filename, archive, link=k == stat.S_IFLNK,
                                  special=k not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK))
                   for i, k in zip(infos, kinds)]
        for info, target in _progress(list(zip(infos, targets)), desc="extract", unit="file"):
            os.makedirs(target if info.is_dir() else os.path.dirname(target), exist_ok=True)
            if info.is_dir():
                continue
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            mtime = time.mktime(info.date_time + (0, 0, -1))
            os.utime(target, (mtime, mtime))


def safe_extract(archive, dest):
    """Extract a .zip or tar archive (.tar, .tar.gz, .tgz, ...) into dest; return dest. Every member is
    checked before anything is written: an absolute path, a '..' component, a symlink or hard link, or a
    device raises UnsafeArchiveError."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest_real = os.path.realpath(dest)
    name = archive.name.lower()
    try:
        if name.endswith(".zip") or (not _is_archive_name(name) and zipfile.is_zipfile(archive)):
            _extract_zip(archive, dest_real)
        elif _is_archive_name(name) or tarfile.is_tarfile(archive):
            _extract_tar(archive, dest_real)
        else:
            raise SplitDataError(f"{archive}: not a folder, .zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise SplitDataError(f"{archive}: damaged or unsupported archive ({e})") from e
    return dest


def _find_nested_archive(folder):
    """The archive inside an extracted archive that holds the images, or None: the official zip holds
    caltech-101/101_ObjectCategories.tar.gz beside Annotations.tar; a lone archive without images counts too."""
    archives, has_images = [], False
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        files = [f for f in sorted(filenames) if not _is_hidden(f)]
        archives += [Path(dirpath) / f for f in files if _is_archive_name(f)]
        has_images = has_images or any(is_image_name(f) for f in files)
    named = [a for a in archives if a.name.startswith("101_ObjectCategories")]
    return named[0] if named else archives[0] if len(archives) == 1 and not has_images else None


def extract_source(archive, dest):
    """Safely extract `archive` (and the tar.gz nested in the official zip) under dest; return the class root."""
    dest = Path(dest)
    outer = safe_extract(archive, dest / "outer")
    nested = _find_nested_archive(outer)
    if nested is None:
        return find_class_root(outer)
    inner = safe_extract(nested, dest / "inner")
    shutil.rmtree(outer)  # the nested copy is no longer needed; free the disk early
    return find_class_root(inner)


def find_class_root(folder):
    """The folder whose sub-folders are the classes: descends through lone wrapper folders
    (101_ObjectCategories/, caltech-101/), ignoring hidden entries and __MACOSX."""
    folder = current = Path(folder)
    if not folder.is_dir():
        raise SplitDataError(f"{folder}: not a folder")
    while True:
        entries = [e for e in os.scandir(current) if not _is_hidden(e.name)]
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) == 1 and len(entries) == 1:
            current = Path(dirs[0].path)
            continue
        if not dirs:
            raise SplitDataError(f"{folder}: no class folders found (expected <root>/<class>/<image files>)")
        return current


def list_class_images(root, keep_background):
    """Candidate images per class under root -> (images, skipped, excluded).

    images maps class -> sorted relative paths ('accordion/image_0001.jpg'); skipped lists {'path',
    'reason'} for non-candidates (wrong extension, hidden, outside a class folder, sub-folders);
    excluded lists class folders left out (BACKGROUND_Google unless keep_background)."""
    images, skipped, excluded = {}, [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            skipped.append({"path": entry.name, "reason": "not inside a class folder"})
            continue
        if _is_hidden(entry.name):
            skipped.append({"path": entry.name + "/", "reason": "hidden folder, not a class"})
            continue
        if entry.name == BACKGROUND and not keep_background:
            excluded.append(entry.name)
            continue
        files = []
        for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
            rel = f"{entry.name}/{f.name}"
            if f.is_dir():
                skipped.append({"path": rel + "/", "reason": "sub-folder inside a class folder (not searched)"})
            elif _is_hidden(f.name):
                skipped.append({"path": rel, "reason": "hidden file"})
            elif not is_image_name(f.name):
                skipped.append({"path": rel, "reason": "not an image file extension"})
            else:
                files.append(rel)
        images[entry.name] = files
    return images, skipped, excluded


# ----------------------------------------------------------------------------- checking

def check_image(path):
    """None when PIL can open and fully decode `path`, else a one-line reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF chatter; a real defect raises below
            with Image.open(path) as im:
                im.load()
        return None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...: all mean "unusable"
        msg = str(e).replace(str(path), "<file>")  # no machine-specific paths in split.json
        return f"not a decodable image ({type(e).__name__}: {msg})"


def check_images(paths, workers):
    """Decode every path; return the reasons (None = good image) in input order. A pool of `workers`
    processes beyond a handful of files: the 9,144 Caltech JPEGs take about 3.4 s on one core."""
    paths = [str(p) for p in paths]
    bar = dict(total=len(paths), desc="check", unit="img")
    if workers <= 1 or len(paths) < POOL_MIN_FILES:
        return [check_image(p) for p in _progress(paths, **bar)]
    with multiprocessing.Pool(min(workers, len(paths))) as pool:
        return list(_progress(pool.imap(check_image, paths, chunksize=16), **bar))


# ----------------------------------------------------------------------------- splitting

def split_class(files, ratio, seed, class_name):
    """Shuffle one class with its own generator; floor(ratio * n) files to train, the rest to test.

    Returns (train, test), each sorted; a class too small for both sides (floor(ratio * n) == 0)
    keeps all in train, and the caller warns. CPython's int-seeded Mersenne Twister and
    random.shuffle are the same on every platform, so the split is too.
    """
    order = sorted(files)  # listing order must not matter
    random.Random(class_seed(seed, class_name)).shuffle(order)
    k = int(Fraction(str(ratio)) * len(order)) or len(order)  # exact floor: float 0.29 * 100 would give 28
    return sorted(order[:k]), sorted(order[k:])


def plan_split(images, train_ratio, seed):
    """Split every class of `images` (class -> relative paths) -> {'classes', 'train', 'test', 'per_class',
    'empty_classes', 'warnings'}: classes sorted (the class index), file lists by class then name."""
    classes = sorted(c for c, files in images.items() if files)
    empty = sorted(c for c, files in images.items() if not files)
    plan = {"classes": classes, "train": [], "test": [], "per_class": {},
            "empty_classes": empty, "warnings": [f"class {c!r} has no usable image; left out" for c in empty]}
    for c in classes:
        train, test = split_class(images[c], train_ratio, seed, c)
        if not test:
            plan["warnings"].append(
                f"class {c!r} has only {len(train)} image(s), too few for both train and test at "
                f"--train-ratio {train_ratio}; all kept in train")
        plan["train"] += train
        plan["test"] += test
        plan["per_class"][c] = {"train": len(train), "test": len(test)}
    return plan


def build_record(args_record, plan, skipped, excluded):
    """The split.json content."""
    return {"format": SPLIT_FORMAT, "args": args_record, "classes": plan["classes"],
            "counts": {"classes": len(plan["classes"]), "train": len(plan["train"]), "test": len(plan["test"]),
                       "skipped": len(skipped), "per_class": plan["per_class"]},
            "fingerprint": split_fingerprint(plan["classes"], plan["train"], plan["test"]),
            "excluded_classes": excluded, "empty_classes": plan["empty_classes"], "warnings": plan["warnings"],
            "skipped": skipped, "train": plan["train"], "test": plan["test"]}


# ----------------------------------------------------------------------------- writing

def read_split(out):
    """split.json of `out` as a dict; SplitDataError when unreadable."""
    path = Path(out) / SPLIT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SplitDataError(f"{path}: cannot read it ({e}); pass --force to rebuild the split") from e
    if not isinstance(record, dict) or record.get("format") != SPLIT_FORMAT:
        raise SplitDataError(f"{path}: not written by this split_data.py; pass --force to rebuild the split")
    return record


def disk_diff(out, record):
    """(missing, extra): files split.json lists that are not on disk under out/train|test, and the reverse."""
    missing, extra = [], []
    for side in ("train", "test"):
        base = Path(out) / side
        on_disk = {os.path.relpath(os.path.join(d, f), base).replace(os.sep, "/")
                   for d, _, files in os.walk(base) for f in files}
        listed = set(record[side])
        missing += [f"{side}/{f}" for f in sorted(listed - on_disk)]
        extra += [f"{side}/{f}" for f in sorted(on_disk - listed)]
    return missing, extra


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(paths):
    """fsync many files from 32 threads: concurrent fsyncs share journal commits
    (8,677 small files: ~10 s one by one, under 1 s this way)."""
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(_fsync_file, paths))


def _place(src, dst, link):
    """Hard-link src to dst when `link`, else copy; return True when linked."""
    if link:
        with contextlib.suppress(OSError):  # other file system, no link support, link limit: copy instead
            os.link(src, dst)
            return True
    shutil.copy2(src, dst)
    return False


def _swap_in(build, out, trash):
    """Replace out/{split.json,train,test} by build's, by renames only: split.json leaves first and
    comes back last, so its presence always means a complete split."""
    trash.mkdir()
    for name in (SPLIT_FILE, "train", "test"):
        if os.path.lexists(out / name):
            os.rename(out / name, trash / name)
    for name in ("train", "test", SPLIT_FILE):
        os.rename(build / name, out / name)
    records.fsync_dir(out)


def write_split(root, record, out, work, copy=False):
    """Build train/, test/ and split.json in work/build from the files under root, then swap them into out.

    Files are hard-linked when root and out share a file system (copied otherwise, or always with
    copy=True); the source is only read. Returns {'linked': n, 'copied': n}."""
    root, out, work = Path(root), Path(out), Path(work)
    build = work / "build"
    link = not copy and os.stat(root).st_dev == os.stat(work).st_dev
    jobs = [(side, rel) for side in ("train", "test") for rel in record[side]]
    for side in ("train", "test"):
        (build / side).mkdir(parents=True)
        for c in record["classes"]:
            (build / side / c).mkdir()
    counts = {"linked": 0, "copied": 0}
    for side, rel in _progress(jobs, desc="link" if link else "copy", unit="file"):
        linked = _place(root / rel, build / side / rel, link)
        counts["linked" if linked else "copied"] += 1
    # Data this run wrote (copies, or our own extraction of an archive) must be on disk
    # before the swap makes it the split; links to a user's folder point at settled data.
    if counts["copied"] or _inside(root, work):
        _fsync_files([build / side / rel for side, rel in jobs])
    # An empty test/<class>/ (a class too small for both sides) would look like a class
    # with no images to a loader; leave it out.
    for c in record["classes"]:
        if not any((build / "test" / c).iterdir()):
            (build / "test" / c).rmdir()
    records.atomic_write(build / SPLIT_FILE, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    _swap_in(build, out, work / "old")
    return counts


@contextlib.contextmanager
def _work_dir(parent):
    """A hidden temp folder in `parent` (same file system, so renames and hard links work), always removed."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_leftovers(folder):
    for p in sorted(Path(folder).glob(TMP_PREFIX + "*")):
        if p.is_dir():
            print(f"removing {p}, left by an interrupted run")
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- download

def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, md5, timeout=60.0):
    """Fetch url to dest via dest.part, check its MD5, rename into place; return dest. Any failure raises
    DownloadError with a one-line message saying where to put the file by hand, leaving no file behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    by_hand = f"download {url} by hand and save it as {dest}, then rerun"
    try:
        h = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with _progress(total=total, desc="download", unit="B", unit_scale=True) as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        f.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DownloadError(f"could not download {url} ({reason}); {by_hand}") from e
        if h.hexdigest() != md5.lower():
            raise DownloadError(f"{url}: MD5 {h.hexdigest()} does not match the expected {md5}; "
                                f"the file was not kept; {by_hand}")
        os.replace(part, dest)
    except BaseException:  # no .part file left behind, whatever stopped us
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    records.fsync_dir(dest.parent)
    return dest


def fetch_official(url, md5, dataset_dir=DATASET_DIR):
    """dataset_dir/caltech-101.zip, downloaded unless already there with the right MD5."""
    dest = Path(dataset_dir) / DOWNLOAD_NAME
    if dest.exists():
        got = file_md5(dest)
        if got != md5.lower():
            raise DownloadError(f"{dest} exists but its MD5 is {got}, not {md5}; delete or replace it by hand")
        print(f"{dest} already downloaded (MD5 ok)")
        return dest
    print(f"downloading {url} -> {dest}")
    return download(url, dest, md5)


def prepare_default_source(source=DEFAULT_SOURCE, dataset_dir=DATASET_DIR, url=OFFICIAL_URL):
    """Make sure the default source folder exists, extracting dataset_dir's archive into it if needed."""
    source = Path(source)
    if source.exists():
        return source
    archives = [Path(dataset_dir) / n for n in DEFAULT_ARCHIVES if (Path(dataset_dir) / n).is_file()]
    if not archives:
        raise SplitDataError(
            f"no data: {source} is missing and {dataset_dir}/ holds neither "
            f"{' nor '.join(DEFAULT_ARCHIVES)}; run with --download, or download {url} by hand "
            f"into {dataset_dir}/, or pass --source")
    print(f"extracting {archives[0]} -> {source}")
    source.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(source.parent)
    with _work_dir(source.parent) as work:
        root = extract_source(archives[0], work)
        _fsync_files([Path(d) / f for d, _, files in os.walk(root) for f in files])
        os.rename(root, source)  # in place only once complete and on disk
        records.fsync_dir(source.parent)
    return source


# ----------------------------------------------------------------------------- command line

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


def _inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def existing_split(out, args_record, force):
    """out's split.json record when out already holds this split intact, None when a (re)build is due;
    SystemExit otherwise."""
    out = Path(out)
    if force:
        return None
    if not (out / SPLIT_FILE).exists():
        for side in ("train", "test"):
            if os.path.lexists(out / side):
                raise SystemExit(f"{out / side} exists but {out / SPLIT_FILE} does not (an older or interrupted "
                                 f"split); move it away or pass --force to replace it")
        return None
    record = read_split(out)
    old = record.get("args", {})
    if old != args_record:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {args_record.get(k)!r}"
                         for k in sorted(set(old) | set(args_record)) if old.get(k) != args_record.get(k))
        raise SystemExit(f"{out} already holds a split made with other arguments ({diff}); "
                         f"pass --force to rebuild it")
    missing, extra = disk_diff(out, record)
    if missing or extra:
        raise SystemExit(f"{out}: train/ and test/ no longer match {SPLIT_FILE} ({len(missing)} missing, "
                         f"{len(extra)} extra files, e.g. {(missing + extra)[0]}); pass --force to rebuild it")
    return record


def _summary(record, out, counts, seconds):
    c = record["counts"]
    lines = [f"split {c['classes']} classes into {out}: {c['train']} train + {c['test']} test images "
             f"({counts['linked']} hard-linked, {counts['copied']} copied) in {seconds:.1f} s"]
    if record["excluded_classes"]:
        lines.append(f"left out: {', '.join(record['excluded_classes'])} (--keep-background keeps it)")
    lines.append(f"skipped {len(record['skipped'])} file(s)" + (":" if record["skipped"] else ""))
    shown = 20
    lines += [f"  {s['path']}: {s['reason']}" for s in record["skipped"][:shown]]
    if len(record["skipped"]) > shown:
        lines.append(f"  ... and {len(record['skipped']) - shown} more, listed in {Path(out) / SPLIT_FILE}")
    return "\n".join(lines)


def main(argv=None):
    """Run the split; return the split record (split.json's content)."""
    args = get_args_parser().parse_args(argv)
    _check_args(args)
    started = time.perf_counter()
    out = Path(args.out)
    try:
        if args.download:
            fetch_official(args.url, args.md5)
        source = Path(args.source) if args.source is not None else DEFAULT_SOURCE
        if args.source is not None and not source.exists():
            raise SystemExit(f"--source {source} does not exist")
        if _inside(out, source):
            raise SystemExit(f"--out {out} is inside the source {source}; the source must stay untouched")
        if _inside(source, out / "train") or _inside(source, out / "test"):
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
            prepare_default_source(source, url=args.url)
        out.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        with _work_dir(out) as work:
            root = extract_source(source, work / "source") if source.is_file() else find_class_root(source)
            images, skipped, excluded = list_class_images(root, args.keep_background)
            candidates = [p for c in sorted(images) for p in images[c]]
            reasons = check_images([root / p for p in candidates], args.workers)
            bad = {p: r for p, r in zip(candidates, reasons) if r is not None}
            skipped = sorted(skipped + [{"path": p, "reason": r} for p, r in bad.items()], key=lambda s: s["path"])
            images = {c: [p for p in files if p not in bad] for c, files in images.items()}
            plan = plan_split(images, args.train_ratio, args.seed)
            for w in plan["warnings"]:
                print(f"warning: {w}", file=sys.stderr)
            record = build_record(args_record, plan, skipped, excluded)
            counts = write_split(root, record, out, work, copy=args.copy)
    except SplitDataError as e:
        raise SystemExit(str(e)) from e
    print(_summary(record, out, counts, time.perf_counter() - started))
    return record


if __name__ == "__main__":
    main()
