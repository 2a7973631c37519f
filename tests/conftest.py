"""Shared fixtures: the real Caltech-101 archive from ../shared, shrunk for CPU tests.

Tests that need real images use `real_split` (a train/ and test/ tree cut from the real
archive, images shrunk to 64 px on the long side so decoding is cheap) and skip with a
clear reason when ../shared is absent.
"""
import io
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHIVE = ROOT.parent / "shared" / "data" / "101_ObjectCategories.tar.gz"
NO_ARCHIVE = f"real Caltech-101 archive not found at {ARCHIVE} (../shared is absent)"


def need_archive():
    if not ARCHIVE.is_file():
        pytest.skip(NO_ARCHIVE)
    return ARCHIVE


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
