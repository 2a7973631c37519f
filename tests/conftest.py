"""Shared fixtures: the real Caltech-101 archive, shrunk for CPU tests.

Tests that need real images use `real_split` (a train/ and test/ tree cut from the real
archive, images shrunk to 64 px on the long side so decoding is cheap) and skip with a
clear reason when no archive is found. Where the archive is looked for, in order: the file the
environment variable CALTECH101_ARCHIVE names; dataset/caltech-101.zip or
dataset/101_ObjectCategories.tar.gz of this repository (where split_data.py finds it too);
../shared/data/101_ObjectCategories.tar.gz beside the repository.
"""
import atexit
import contextlib
import io
import os
import shutil
import subprocess
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a process or trains more than a few steps "
                                       "(python -m pytest -q -m \"not slow\" tests is the fast tier)")


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


def archive_images():
    """[(class, file name, JPEG bytes)] of the real archive in archive order (sorted), read once per
    test session: every subset below is cut from memory, not by decompressing the archive again."""
    if not _IMAGES:
        with tarfile.open(need_archive()) as tf:
            for m in tf:
                parts = m.name.split("/")
                if m.isfile() and len(parts) == 3 and parts[2].endswith(".jpg"):
                    _IMAGES.append((parts[1], parts[2], tf.extractfile(m).read()))
    return _IMAGES


_IMAGES = []


def extract_subset(dest, per_class, classes=None, max_side=64, test_per_class=2):
    """Write dest/train/<class>/ and dest/test/<class>/ from the real archive.

    Takes the first `per_class` images of each class (archive order, which is sorted),
    the last `test_per_class` of them to test/, shrunk to `max_side` px (long side).
    BACKGROUND_Google is left out, as split_data.py does by default.
    """
    from PIL import Image

    taken = {}
    for cls, name, blob in archive_images():
        if cls == "BACKGROUND_Google" or (classes is not None and cls not in classes):
            continue
        n = taken.get(cls, 0)
        if n >= per_class:
            continue
        taken[cls] = n + 1
        side = "test" if n >= per_class - test_per_class else "train"
        img = Image.open(io.BytesIO(blob))
        img.thumbnail((max_side, max_side))
        out = Path(dest) / side / cls / name
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=90)
    return Path(dest)


@pytest.fixture(scope="session")
def real_split(tmp_path_factory):
    """101 classes, 6 train + 2 test images each, 64 px: a real but tiny split."""
    return extract_subset(tmp_path_factory.mktemp("real_split"), per_class=8)


@contextlib.contextmanager
def tmpfs(mnt, size):
    """A small file system (tmpfs of `size`, e.g. "1M") mounted at mnt for the block, to fill; the test
    is skipped where this process may not mount (it needs root)."""
    Path(mnt).mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs to fill (needs root): {r.stderr.strip()}")
    try:
        yield Path(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def driver(folder, patch="", script="main_ResNet-18.py"):
    """A Python file that runs a main_*.py script (as `python SCRIPT ...` would: sys.argv[0] is the
    script) after `patch`, Python source, ran in its process, with the tiny network registered
    (`--arch tiny`). `rank` is the process's torchrun rank. Tests hook a chosen step this way (fail,
    pause or kill there) instead of racing a timer."""
    path = Path(folder) / "driver.py"
    path.write_text(f"import os, runpy, sys\nsys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
                    f"import conftest\nfrom study import loop, records, steps\nconftest.register_tiny()\n"
                    f"rank = int(os.environ.get('RANK', '0'))\n{patch}\n"
                    f"sys.argv[0] = {str(ROOT / script)!r}\n"
                    f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n")
    return path


def tiny_resnet(num_classes=1000):
    """ResNet-18's layout (conv1, bn1, layer1-4 of BasicBlocks, fc: the names --unfreeze and the frozen
    prefix cut by) at widths 8-64, one block a stage: 0.2 M parameters, a checkpoint of 2 MB instead
    of 134. For tests of mechanisms (identity, resume, grids, failures), where the network is not the
    subject."""
    from torchvision.models.resnet import BasicBlock, ResNet
    from torch import nn

    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    m.conv1, m.bn1, width = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), 8
    for i, out in enumerate((8, 16, 32, 64), 1):
        stride = 1 if i == 1 else 2
        down = nn.Sequential(nn.Conv2d(width, out, 1, stride, bias=False), nn.BatchNorm2d(out)) if stride > 1 else None
        setattr(m, f"layer{i}", nn.Sequential(BasicBlock(width, out, stride, down)))
        width = out
    m.fc = nn.Linear(width, num_classes)
    return m


def register_tiny():
    """--arch tiny: tiny_resnet with ResNet-18's preprocessing and augmentation."""
    from torchvision import models

    from study import nets

    nets.ARCHS["tiny"] = nets.Arch(tiny_resnet, models.ResNet18_Weights.IMAGENET1K_V1, "fc", nets.RESNET_STAGES,
                                   "resnet18")


def at_step(n, action):
    """Patch source for driver(): `action` (Python source) runs in place of the n-th optimizer step
    of the run (counted over its epochs, from 1)."""
    return (f"steps_seen = [0]\nreal_step = loop.backward_and_step\n"
            f"def hooked(*a, **k):\n"
            f"    steps_seen[0] += 1\n"
            f"    if steps_seen[0] == {n}:\n"
            f"        {action}\n"
            f"    return real_step(*a, **k)\n"
            f"loop.backward_and_step = hooked\n")


register_tiny()  # in this process: tests build configs with arch='tiny'
