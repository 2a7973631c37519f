"""Shared fixtures: the real Caltech-101 archive, shrunk for CPU tests.

Tests that need real images use `real_split` (a train/ and test/ tree cut from the real
archive, images shrunk to 64 px on the long side so decoding is cheap) and skip with a
clear reason when no archive is found. Where the archive is looked for, in order: the file the
environment variable CALTECH101_ARCHIVE names; dataset/caltech-101.zip or
dataset/101_ObjectCategories.tar.gz of this repository (where split_data.py finds it too);
../shared/data/101_ObjectCategories.tar.gz beside the repository.
"""
import atexit
import io
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENV_VAR = "CALTECH101_ARCHIVE"
INNER = "101_ObjectCategories.tar.gz"  # the official caltech-101.zip holds it beside Annotations.tar


def archive_candidates():
    named = os.environ.get(ENV_VAR)
    return ([Path(named).expanduser()] if named else []) + [
        ROOT / "dataset" / "caltech-101.zip", ROOT / "dataset" / INNER, ROOT.parent / "shared" / "data" / INNER]


NO_ARCHIVE = (f"real Caltech-101 archive not found: put caltech-101.zip or {INNER} in {ROOT / 'dataset'} "
              f"(`python split_data.py --download` fetches the zip there), or set {ENV_VAR}=/path/to/it")


def tar_of(archive):
    """The archive as a tar.gz: itself, or (the official zip) its inner tar.gz, extracted once per
    test session into a temporary folder."""
    if not zipfile.is_zipfile(archive):
        return archive
    key = str(archive.resolve())
    if key not in _EXTRACTED:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(INNER)]
            if not names:
                pytest.skip(f"{archive}: a zip without {INNER} inside (expected the official caltech-101.zip). "
                            + NO_ARCHIVE)
            folder = Path(tempfile.mkdtemp(prefix="caltech101-"))
            atexit.register(shutil.rmtree, folder, True)
            with zf.open(names[0]) as src, open(folder / INNER, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        _EXTRACTED[key] = folder / INNER
    return _EXTRACTED[key]


_EXTRACTED = {}


def need_archive():
    """The real archive as a tar.gz, found where a user keeps it (archive_candidates), or skip."""
    named = os.environ.get(ENV_VAR)
    if named and not Path(named).expanduser().is_file():
        pytest.skip(f"{ENV_VAR}={named}: no such file. " + NO_ARCHIVE)
    for path in archive_candidates():
        if path.is_file():
            return tar_of(path)
    pytest.skip(NO_ARCHIVE)


@pytest.fixture(scope="session")
def caltech_archive():
    """Path of the real 101_ObjectCategories.tar.gz, or skip."""
    return need_archive()


def extract_subset(dest, per_class, classes=None, max_side=64, test_per_class=2):
    """Write dest/train/<class>/ and dest/test/<class>/ from the real archive.

    Takes the first `per_class` images of each class (archive order, which is sorted),
    the last `test_per_class` of them to test/, shrunk to `max_side` px (long side).
    BACKGROUND_Google is left out, as split_data.py does by default.
    """
    from PIL import Image

    taken = {}
    with tarfile.open(need_archive()) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            cls = parts[1]
            if cls == "BACKGROUND_Google" or (classes is not None and cls not in classes):
                continue
            n = taken.get(cls, 0)
            if n >= per_class:
                continue
            taken[cls] = n + 1
            side = "test" if n >= per_class - test_per_class else "train"
            img = Image.open(io.BytesIO(tf.extractfile(m).read()))
            img.thumbnail((max_side, max_side))
            out = Path(dest) / side / cls / parts[2]
            out.parent.mkdir(parents=True, exist_ok=True)
            img.save(out, quality=90)
    return Path(dest)


@pytest.fixture(scope="session")
def real_split(tmp_path_factory):
    """101 classes, 6 train + 2 test images each, 64 px: a real but tiny split."""
    return extract_subset(tmp_path_factory.mktemp("real_split"), per_class=8)
