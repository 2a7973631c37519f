"""Caches keyed by everything that decides them, and decode caches that fail cleanly on a full disk."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tmpfs

import common
from study import options
from study import pipeline

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"Faces", "beaver", "cup", "ferry", "lotus", "panda"}


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory):
    """6 real classes, 6 train + 2 test images each, 48 px."""
    from conftest import extract_subset

    return extract_subset(tmp_path_factory.mktemp("six"), per_class=8, classes=CLASSES, max_side=48)


def head_config(data, out, seed):
    defaults = dict(arch="efficientnet_lite0", batch_size=8, epochs=2, scratch_epochs=2, lr=1e-3,
                    weight_decay=1e-4, unfreeze="head", augment="none")
    args = options.get_args_parser(defaults).parse_args(
        ["--data", str(data), "--out", str(out), "--weights", "none", "--img-size", "32", "--workers", "0",
         "--precision", "fp32", "--unfreeze", "head", "--seed", str(seed), "--name", f"seed{seed}", "--cache-dir", str(out / "cache")])
    return options.resolve_config(args, defaults, "main_test")


@pytest.mark.slow
def test_random_weights_of_two_seeds_get_two_feature_files_and_two_results(six_classes, tmp_path):
    first = common.fit(head_config(six_classes, tmp_path, 1))
    files_1 = sorted(p.name for p in (tmp_path / "cache").glob("features-*.pt"))
    assert len(files_1) == 3  # train, val, test
    second = common.fit(head_config(six_classes, tmp_path, 2))
    files_2 = sorted(p.name for p in (tmp_path / "cache").glob("features-*.pt"))
    assert len(files_2) == 6 and set(files_1) < set(files_2)
    import torch

    w1 = torch.load(tmp_path / "main_test" / "seed1" / "best.pth", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "main_test" / "seed2" / "best.pth", weights_only=True)["model"]
    assert not torch.equal(w1["features.0.0.weight"], w2["features.0.0.weight"])
    assert (first["test_loss"], first["best_val_top1"]) != (second["test_loss"], second["best_val_top1"])
    # the same seed again reuses its own features, and gives the same result
    again = common.fit(dict(head_config(six_classes, tmp_path, 1), name="seed1-again"))
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 6
    assert again["test_loss"] == first["test_loss"]


# --------------------------------------------------------------------------------------------
# Decode caches: a full disk, a worker that dies
# --------------------------------------------------------------------------------------------
BUILD = """
import json, sys
sys.path.insert(0, {root!r})
from study import decode_cache, pipeline
paths = json.load(open({paths!r}))
decode_cache.load_or_build_cache(paths, decode_cache.cache_geometry(pipeline.Preprocess(crop={side}, resize={side},
    mean=(0.5,) * 3, std=(0.5,) * 3), augmented=False), {cache!r})
print("built", flush=True)
"""


def finish(p, timeout=120):
    """(stdout, stderr) of a process; killed, and the test failed, when it hangs."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in children_of(p.pid) if Path(f"/proc/{p.pid}").exists() else []:
            os.kill(pid, 9)  # the pool's processes first: they outlive their parent
        p.kill()
        p.communicate()
        pytest.fail(f"the cache build still waits after {timeout} s")


def build_cache_process(paths, cache, side):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix="-paths.json", delete=False) as f:  # too long for argv
        json.dump([str(p) for p in paths], f)
    listing = f.name
    code = BUILD.format(root=str(ROOT), paths=str(listing), side=side, cache=str(cache))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB file system (tmpfs), 900 KiB of it already taken."""
    with tmpfs(tmp_path / "disk", "1M") as mnt:
        (mnt / "filler").write_bytes(bytes(900 * 1024))
        yield mnt


@pytest.mark.slow
def test_a_decode_cache_on_a_full_disk_fails_in_one_line_and_leaves_nothing(six_classes, tiny_disk):
    paths = sorted(six_classes.glob("train/*/*.jpg"))  # 36 images: two chunks, two processes
    cache = tiny_disk / "cache"
    p = build_cache_process(paths, cache, 64)  # 36 x 64 x 64 x 3 = 442,368 bytes and a header
    out, err = finish(p)
    assert p.returncode == 1, (out, err)
    need = 442_368 + 128
    assert err.strip().splitlines() == [
        f"error: not enough disk space for a decode cache in {cache}: {need:,} bytes needed, "
        f"{shutil_free(tiny_disk):,} free (free some space, or pass --cache-dir on another disk)"]
    assert "built" not in out
    assert sorted(p.name for p in tiny_disk.rglob("*")) == ["filler"]  # the cache folder it made went too


def shutil_free(folder):
    import shutil

    return shutil.disk_usage(folder).free


@pytest.mark.slow
def test_a_decode_cache_that_fits_reserves_its_blocks_and_says_what_the_folder_holds(six_classes, tiny_disk):
    paths = sorted(six_classes.glob("train/*/*.jpg"))[:4]
    cache = tiny_disk / "cache"
    p = build_cache_process(paths, cache, 32)
    out, err = finish(p)
    assert p.returncode == 0, err
    assert f"{cache} now holds 0 MiB of caches" in out
    (npy,) = cache.glob("eval-*.npy")
    assert npy.stat().st_size == 4 * 32 * 32 * 3 + 128
    assert os.stat(npy).st_blocks * 512 >= npy.stat().st_size  # every block reserved: no sparse file
    # the cache, its metadata, and its key's lock (empty: taken by whoever builds or reads the key next)
    assert sorted(p.name for p in cache.iterdir()) == sorted([npy.name, npy.with_suffix(".json").name,
                                                              f".{npy.stem}.lock"])


def children_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the pool's processes through /proc (Linux)")
def test_a_decoding_process_that_dies_ends_the_build_in_one_line(six_classes, tmp_path):
    paths = sorted(six_classes.glob("*/*/*.jpg")) * 60  # 2,880 decodes: long enough to kill one process
    p = build_cache_process(paths, tmp_path / "cache", 128)
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and p.poll() is None:
        kids = [c for c in children_of(p.pid)]
        # the pool's processes: the parent's children besides a resource tracker, once decoding
        workers = [c for c in kids if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()]
        if len(workers) >= 2:
            time.sleep(0.3)
            os.kill(workers[0], 9)
            killed = workers[0]
        time.sleep(0.05)
    out, err = finish(p)
    assert killed is not None, "the pool never started"
    assert p.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: a process decoding images into {tmp_path / 'cache'} died")
    assert not (tmp_path / "cache").exists()  # nothing left: not even the folder it made


# --------------------------------------------------------------------------------------------
# Loader workers under every start method Python may default to
# --------------------------------------------------------------------------------------------
def real_loader(data, cache, workers=2):
    import torch

    samples = [(str(p), i // 6) for i, p in enumerate(sorted(data.glob("train/*/*.jpg")))]
    pre = pipeline.Preprocess(crop=48, resize=55, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return pipeline.build_loader(samples, train=True, preprocess=pre, augment="seed", seed_policy="resnet18",
                                 batch_size=8, workers=workers, device=torch.device("cpu"), seed=3,
                                 cache_dir=str(cache), progress=False, on_device=False)


def all_batches(loader, epochs=(0, 1)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out


@pytest.mark.slow
def test_a_loader_under_spawn_gives_the_batches_of_fork(six_classes, tmp_path):
    """The loader's workers start by Python's default method: fork on Linux before 3.14, forkserver
    from 3.14, spawn on macOS. spawn stands for forkserver too: both pickle what a worker receives
    (each spawned worker imports torch, seconds on a small shared CPU, so one of the two is tested)."""
    import multiprocessing

    import torch

    was = multiprocessing.get_start_method(allow_none=True)
    got = {}
    try:
        for method in ("fork", "spawn"):
            multiprocessing.set_start_method(method, force=True)
            got[method] = all_batches(real_loader(six_classes, tmp_path / "cache"))
    finally:
        multiprocessing.set_start_method(was, force=True)
    assert len(got["fork"]) == len(got["spawn"]) == 2 * 5  # 36 images per epoch, batch 8
    for (x, y), (x2, y2) in zip(got["fork"], got["spawn"]):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_worker_receives_the_cache_path_not_its_bytes(six_classes, tmp_path):
    from multiprocessing.reduction import ForkingPickler

    loader = real_loader(six_classes, tmp_path / "cache", workers=0)
    assert loader.images.nbytes > 300_000 and isinstance(loader.images, np.memmap)
    sent = bytes(ForkingPickler.dumps(loader._loader.dataset))  # what DataLoader hands each worker
    assert len(sent) < 2_000
    (cache_file,) = (tmp_path / "cache").glob("*.npy")
    assert str(cache_file).encode() in sent


# --------------------------------------------------------------------------------------------
# Where the tests find the archive (tests/conftest.py)
# --------------------------------------------------------------------------------------------
FIND = ("import sys, tarfile; sys.path.insert(0, {tests!r}); import conftest; a = conftest.need_archive(); "
        "print(a); print(tarfile.open(a).next().name)")


def find_archive(env):
    r = subprocess.run([sys.executable, "-c", FIND.format(tests=str(ROOT / "tests"))], capture_output=True, text=True,
                       env=dict(os.environ, **env), timeout=120)
    return r.returncode, r.stdout.strip(), r.stderr.strip()


def test_the_tests_find_the_official_zip_named_by_the_environment_and_say_where_to_put_it(tmp_path):
    import zipfile
    from conftest import need_archive

    tar = need_archive()
    official = tmp_path / "caltech-101.zip"  # as CaltechDATA ships it: the tar.gz inside a folder
    with zipfile.ZipFile(official, "w", zipfile.ZIP_STORED) as zf:
        zf.write(tar, "caltech-101/101_ObjectCategories.tar.gz")
    rc, out, err = find_archive({"CALTECH101_ARCHIVE": str(official)})
    assert rc == 0, err
    found, first = out.splitlines()
    found = Path(found)
    assert first.startswith("101_ObjectCategories")  # a readable tar
    assert found.name == "101_ObjectCategories.tar.gz" and found.parent != tar.parent
    assert not found.exists()  # extracted for the session, removed at its end
    rc, out, err = find_archive({"CALTECH101_ARCHIVE": str(tmp_path / "missing.zip")})
    assert rc != 0 and f"CALTECH101_ARCHIVE={tmp_path / 'missing.zip'}: no such file." in err
    assert f"put caltech-101.zip or 101_ObjectCategories.tar.gz in {ROOT / 'dataset'}" in err
