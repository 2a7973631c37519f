"""The data set on disk: image folders -> (path, class index) lists, and the validation carve.

A split is DATA/train/<class>/ and DATA/test/<class>/ (split_data.py writes one; ready
folders work as they are). The class map comes from train/ (and split.json), and test/ is
forced onto it. Plain Python: split_data.py shares the extension list and the per-class seed.
"""
import hashlib
import json
import random
from pathlib import Path

from .errors import fail

# what both split_data.py and the loaders accept as an image (lower-case suffixes)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_name(name):
    return str(name).lower().endswith(IMG_EXTENSIONS)


def class_seed(seed, class_name):
    """A 64-bit seed from (seed, class name) via SHA-256: stable across runs, machines and class
    lists (adding a class changes no other class's draw), unlike Python's salted hash()."""
    digest = hashlib.sha256(f"{seed}/{class_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def list_images(folder):
    return sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and is_image_name(p.name))


def scan_split(data_dir):
    """-> classes, train samples, test samples. The class map comes from train/ (and split.json)."""
    data = Path(data_dir)
    if not data.is_dir():
        fail(f"--data {data_dir}: no such folder (run `python split_data.py` first)")
    train_dir, test_dir = data / "train", data / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            fail(f"--data {data_dir}: missing {d.name}/ "
                 f"(expected {data_dir}/train/<class>/ and {data_dir}/test/<class>/)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    split_json = data / "split.json"
    if split_json.is_file():
        recorded = json.loads(split_json.read_text()).get("classes")
        if recorded and sorted(recorded) != classes:
            fail(f"{split_json} lists {len(recorded)} classes but train/ holds {len(classes)}; rerun split_data.py")
        classes = list(recorded or classes)
    index = {c: i for i, c in enumerate(classes)}
    train = [(f, index[c]) for c in classes for f in list_images(train_dir / c)]
    if not train:
        fail(f"--data {data_dir}: train/ holds no images")
    test_classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    unknown = [c for c in test_classes if c not in index]
    if unknown:
        fail(f"test/ has {len(unknown)} class(es) unknown to train/: {', '.join(unknown[:5])}")
    test = [(f, index[c]) for c in test_classes for f in list_images(test_dir / c)]
    if not test:
        fail(f"--data {data_dir}: test/ holds no images")
    return classes, train, test


def by_class(samples):
    groups = {}
    for s in samples:
        groups.setdefault(s[1], []).append(s)
    return groups


def limit_per_class(samples, n):
    """At most n images of each class (the first n in sorted order): smoke runs and CPU demos."""
    if not n:
        return samples
    return [s for group in by_class(samples).values() for s in group[:n]]


def carve_validation(samples, classes, fraction, split_seed):
    """Stratified: round(fraction * n) of each class (at least 1 when n >= 2) -> (train, val).

    Each class draws from its own generator, seeded by (split_seed, class name): --seed leaves
    the carve alone, and adding or renaming a class moves no other class's images.
    """
    train, val = [], []
    for label, group in sorted(by_class(samples).items()):
        k = 0 if fraction <= 0 or len(group) < 2 else min(len(group) - 1, max(1, round(fraction * len(group))))
        rng = random.Random(class_seed(f"validation/{split_seed}", classes[label]))
        chosen = set(rng.sample(range(len(group)), k))
        for i, s in enumerate(group):
            (val if i in chosen else train).append(s)
    return train, val


# --------------------------------------------------------------------------------------------
# What a run saw: the data's identity (identity.py compares it).
# --------------------------------------------------------------------------------------------
def digest(obj, n=12):
    """A short SHA-256 of a JSON-able object: enough to tell files and splits apart, short to print."""
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode("utf-8")).hexdigest()[:n]


def class_files(samples, classes, data_dir, side):
    """{side/<class>: [image count, digest of (name, bytes) of its files]}: names what changed in a
    class folder. Sizes, not times: a copied folder keeps its identity on another machine."""
    groups = {}
    for path, label in samples:
        groups.setdefault(classes[label], []).append((Path(path).name, Path(path).stat().st_size))
    return {f"{side}/{c}": [len(files), digest(sorted(files))] for c, files in sorted(groups.items())}


def split_fingerprint(classes, train, test):
    """SHA-256 of the class list and both relative file lists: one string that names the split
    (split.json records it; a run records it of the files it found)."""
    blob = json.dumps({"classes": classes, "train": train, "test": test}, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def data_identity(data_dir, classes, train, test, val):
    """The split in data_dir (split_data.py's fingerprint formula over the files on disk, so it
    equals split.json's while nothing was changed by hand), each class folder's files, and the
    validation carve. train, test: every image of the folder (before --limit-per-class); val: the
    carve this run holds out."""
    data_dir = Path(data_dir)
    rel = lambda samples, side: [Path(p).relative_to(data_dir / side).as_posix() for p, _ in samples]  # as split.json
    return {"split": split_fingerprint(classes, rel(train, "train"), rel(test, "test")),
            "carve": digest(sorted(rel(val, "train"))),
            "files": {**class_files(train, classes, data_dir, "train"), **class_files(test, classes, data_dir, "test")}}


def read_data(config):
    """-> classes, {train, val, test: samples} after --limit-per-class and the validation carve, and
    the data's identity."""
    classes, train, test = scan_split(config["data"])
    fitting, val = carve_validation(limit_per_class(train, config["limit_per_class"]), classes,
                                    config["val_fraction"], config["split_seed"])
    ident = data_identity(config["data"], classes, train, test, val)
    return classes, {"train": fitting, "val": val, "test": limit_per_class(test, config["limit_per_class"])}, ident
