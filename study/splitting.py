"""split_data.py's machinery: class folders -> decoded, checked images -> a seeded per-class split
on disk, built in a hidden folder and swapped in by renames (split_data.py's docstring says why)."""
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path

from . import records
from .archive import SplitDataError, extract_source, is_hidden, progress
from .data import class_seed, is_image_name, split_fingerprint

BACKGROUND = "BACKGROUND_Google"
SPLIT_FILE = "split.json"
SPLIT_FORMAT = "split_data/1"
TMP_PREFIX = ".split_data-"  # hidden temp folders; leftovers of a killed run are removed by the next build
POOL_MIN_FILES = 64  # below this, starting worker processes costs more than it saves
SUMMARY_SKIPPED = 20  # skipped files listed in the printed summary; split.json lists them all


# ----------------------------------------------------------------------------- the source

def find_class_root(folder):
    """The folder whose sub-folders are the classes: descends through lone wrapper folders
    (101_ObjectCategories/, caltech-101/), ignoring hidden entries and __MACOSX."""
    folder = current = Path(folder)
    if not folder.is_dir():
        raise SplitDataError(f"{folder}: not a folder")
    while True:
        entries = [e for e in os.scandir(current) if not is_hidden(e.name)]
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
        elif is_hidden(entry.name):
            skipped.append({"path": entry.name + "/", "reason": "hidden folder, not a class"})
        elif entry.name == BACKGROUND and not keep_background:
            excluded.append(entry.name)
        else:
            images[entry.name] = []
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                rel = f"{entry.name}/{f.name}"
                if f.is_dir():
                    skipped.append({"path": rel + "/", "reason": "sub-folder inside a class folder (not searched)"})
                elif is_hidden(f.name):
                    skipped.append({"path": rel, "reason": "hidden file"})
                elif not is_image_name(f.name):
                    skipped.append({"path": rel, "reason": "not an image file extension"})
                else:
                    images[entry.name].append(rel)
    return images, skipped, excluded


def check_image(path):
    """None when PIL can open and fully decode `path`, else a one-line reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF chatter; a real defect raises below
            with Image.open(path) as im:
                im.load()
        return None
    except Exception as e:  # OSError, SyntaxError, ValueError, DecompressionBombError...: all mean "unusable"
        msg = str(e).replace(str(path), "<file>")  # no machine-specific paths in split.json
        return f"not a decodable image ({type(e).__name__}: {msg})"


def check_images(paths, workers):
    """Decode every path; return the reasons (None = good image) in input order. A pool of `workers`
    processes beyond a handful of files: the 9,144 Caltech JPEGs take about 3.4 s on one core."""
    paths = [str(p) for p in paths]
    bar = dict(total=len(paths), desc="check", unit="img")
    if workers <= 1 or len(paths) < POOL_MIN_FILES:
        return [check_image(p) for p in progress(paths, **bar)]
    with multiprocessing.Pool(min(workers, len(paths))) as pool:
        return list(progress(pool.imap(check_image, paths, chunksize=16), **bar))


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


def split_record(root, args_record, workers):
    """Every image under the class root decoded, the unusable ones skipped, the rest split -> split.json's content."""
    images, skipped, excluded = list_class_images(root, args_record["keep_background"])
    candidates = [p for c in sorted(images) for p in images[c]]
    reasons = check_images([root / p for p in candidates], workers)
    bad = {p: r for p, r in zip(candidates, reasons) if r is not None}
    skipped = sorted(skipped + [{"path": p, "reason": r} for p, r in bad.items()], key=lambda s: s["path"])
    images = {c: [p for p in files if p not in bad] for c, files in images.items()}
    plan = plan_split(images, args_record["train_ratio"], args_record["seed"])
    for w in plan["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return {"format": SPLIT_FORMAT, "args": args_record, "classes": plan["classes"],
            "counts": {"classes": len(plan["classes"]), "train": len(plan["train"]), "test": len(plan["test"]),
                       "skipped": len(skipped), "per_class": plan["per_class"]},
            "fingerprint": split_fingerprint(plan["classes"], plan["train"], plan["test"]),
            "excluded_classes": excluded, "empty_classes": plan["empty_classes"], "warnings": plan["warnings"],
            "skipped": skipped, "train": plan["train"], "test": plan["test"]}


# ----------------------------------------------------------------------------- what is on disk

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


def existing_split(out, args_record, force):
    """out's split.json record when out already holds this split intact, None when a (re)build is due;
    SplitDataError when out holds something else."""
    out = Path(out)
    if force:
        return None
    if not (out / SPLIT_FILE).exists():
        for side in ("train", "test"):
            if os.path.lexists(out / side):
                raise SplitDataError(f"{out / side} exists but {out / SPLIT_FILE} does not (an older or interrupted "
                                     f"split); move it away or pass --force to replace it")
        return None
    record = read_split(out)
    old = record.get("args", {})
    if old != args_record:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {args_record.get(k)!r}"
                         for k in sorted(set(old) | set(args_record)) if old.get(k) != args_record.get(k))
        raise SplitDataError(f"{out} already holds a split made with other arguments ({diff}); "
                             f"pass --force to rebuild it")
    missing, extra = disk_diff(out, record)
    if missing or extra:
        raise SplitDataError(f"{out}: train/ and test/ no longer match {SPLIT_FILE} ({len(missing)} missing, "
                             f"{len(extra)} extra files, e.g. {(missing + extra)[0]}); pass --force to rebuild it")
    return record


# ----------------------------------------------------------------------------- writing

def inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _fsync_files(paths):
    """fsync many files from 32 threads: concurrent fsyncs share journal commits
    (8,677 small files: ~10 s one by one, under 1 s this way)."""
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(records.fsync_dir, paths))  # open read-only and fsync: the same for a file as for a folder


def _place(src, dst, link):
    """Hard-link src to dst when `link`, else copy; return True when linked."""
    if link:
        with contextlib.suppress(OSError):  # other file system, no link support, link limit: copy instead
            os.link(src, dst)
            return True
    shutil.copy2(src, dst)
    return False


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
    for side, rel in progress(jobs, desc="link" if link else "copy", unit="file"):
        linked = _place(root / rel, build / side / rel, link)
        counts["linked" if linked else "copied"] += 1
    # Data this run wrote (copies, or our own extraction of an archive) must be on disk
    # before the swap makes it the split; links to a user's folder point at settled data.
    if counts["copied"] or inside(root, work):
        _fsync_files([build / side / rel for side, rel in jobs])
    # An empty test/<class>/ (a class too small for both sides) would look like a class
    # with no images to a loader; leave it out.
    for c in record["classes"]:
        if not any((build / "test" / c).iterdir()):
            (build / "test" / c).rmdir()
    records.atomic_write(build / SPLIT_FILE, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    # Swap build's split.json, train/ and test/ into out by renames only: split.json leaves first and
    # comes back last, so its presence always means a complete split.
    (work / "old").mkdir()
    for name in (SPLIT_FILE, "train", "test"):
        if os.path.lexists(out / name):
            os.rename(out / name, work / "old" / name)
    for name in ("train", "test", SPLIT_FILE):
        os.rename(build / name, out / name)
    records.fsync_dir(out)
    return counts


@contextlib.contextmanager
def _work_dir(parent):
    """A hidden temp folder in `parent` (same file system, so renames and hard links work), always removed.
    Leftovers of a killed run are removed first."""
    for p in sorted(Path(parent).glob(TMP_PREFIX + "*")):
        if p.is_dir():
            print(f"removing {p}, left by an interrupted run")
            shutil.rmtree(p, ignore_errors=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_split(source, out, args_record, workers, copy):
    """Split the folder or archive `source` into out/{train,test,split.json} -> (record, counts)."""
    out.mkdir(parents=True, exist_ok=True)
    with _work_dir(out) as work:
        root = find_class_root(extract_source(source, work / "source") if source.is_file() else source)
        record = split_record(root, args_record, workers)
        return record, write_split(root, record, out, work, copy=copy)


def prepare_default_source(source, archives, url):
    """Make sure the default source folder exists, extracting the first of `archives` found into it if needed."""
    if source.exists():
        return source
    found = [a for a in archives if a.is_file()]
    if not found:
        folder = archives[0].parent
        raise SplitDataError(
            f"no data: {source} is missing and {folder}/ holds neither "
            f"{' nor '.join(a.name for a in archives)}; run with --download, or download {url} by hand "
            f"into {folder}/, or pass --source")
    print(f"extracting {found[0]} -> {source}")
    source.parent.mkdir(parents=True, exist_ok=True)
    with _work_dir(source.parent) as work:
        root = find_class_root(extract_source(found[0], work))
        _fsync_files([Path(d) / f for d, _, files in os.walk(root) for f in files])
        os.rename(root, source)  # in place only once complete and on disk
        records.fsync_dir(source.parent)
    return source


def summary(record, out, counts, seconds):
    """The lines printed at the end of a split."""
    c = record["counts"]
    lines = [f"split {c['classes']} classes into {out}: {c['train']} train + {c['test']} test images "
             f"({counts['linked']} hard-linked, {counts['copied']} copied) in {seconds:.1f} s"]
    if record["excluded_classes"]:
        lines.append(f"left out: {', '.join(record['excluded_classes'])} (--keep-background keeps it)")
    lines.append(f"skipped {len(record['skipped'])} file(s)" + (":" if record["skipped"] else ""))
    lines += [f"  {s['path']}: {s['reason']}" for s in record["skipped"][:SUMMARY_SKIPPED]]
    if len(record["skipped"]) > SUMMARY_SKIPPED:
        lines.append(f"  ... and {len(record['skipped']) - SUMMARY_SKIPPED} more, listed in {Path(out) / SPLIT_FILE}")
    return "\n".join(lines)
