"""Every image decoded once per run: a uint8 cache, one memory-mapped .npy file per geometry.

Eval cache: the exact Resize(resize) -> CenterCrop(crop) image, crop x crop (squash: the whole
image resized to crop x crop).
Train cache: the Resize(resize) image (shorter side = resize) in a fixed canvas of
resize x long_side, portrait images stored transposed so that every image is "landscape".
The long side is capped at TRAIN_LONG_RATIO * resize (1.5 keeps the usual photo aspects, 4:3 and
3:2, unscaled); longer images are squashed along the long axis only and the crop geometry
compensates exactly (the stored size is recorded), at a small loss of detail.

A cache is keyed by the file list, sizes, mtimes and the geometry, decoded by a pool of processes
straight into the file (records.atomic_write's temporary file: whole or nothing), and its blocks
are reserved first: a full disk ends in one line, never in SIGBUS.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .errors import fail
from .processes import machine_cores
from .records import FolderLock, atomic_write, write_json

TRAIN_LONG_RATIO = 1.5
CACHE_VERSION = 1
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def cache_geometry(pre, augmented: bool) -> dict:
    """What the cache of a pipeline.Preprocess stores: the train canvas (augmented) or the exact eval crop."""
    if augmented:
        return dict(kind="train", resize=pre.resize, interpolation=pre.interpolation,
                    long=int(round(pre.resize * TRAIN_LONG_RATIO)))
    geo = dict(kind="eval", resize=pre.resize, crop=pre.crop, interpolation=pre.interpolation)
    if pre.crop_mode != "center":   # only named when not the default: older caches stay valid
        geo["crop_mode"] = pre.crop_mode
    return geo


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) after torchvision Resize(size): shorter side = size, long side truncated."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def _cache_shape(geo: dict) -> tuple[int, int, int]:
    if geo["kind"] == "eval":
        return geo["crop"], geo["crop"], 3
    return geo["resize"], geo["long"], 3


def _cache_key(paths: list[str], geo: dict) -> str:
    """Hash of the geometry and every file's path, size and mtime: any change -> new cache."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **geo}, sort_keys=True).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:20]


def evaluation_frame(img, p):
    """The evaluation framing of a PIL image (p: a preprocess dict): the shorter side resized to
    p["resize"] px and the centre p["crop"] px cut out, or (crop_mode squash) the whole image resized
    to crop x crop. The one definition: the decode cache and predict.py frame through it."""
    mode = InterpolationMode(p["interpolation"])
    if p.get("crop_mode") == "squash":
        return TF.resize(img, [p["crop"], p["crop"]], interpolation=mode)
    return TF.center_crop(TF.resize(img, p["resize"], interpolation=mode), p["crop"])


def _decode_one(path: str, geo: dict) -> tuple[np.ndarray, list[int]] | None:
    """Decode + resize one file -> (HWC uint8 in the cache layout, [h0, w0]); None if unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")          # also forces the full decode (truncation raises)
    except Exception:                       # any decoder failure means "bad image"
        return None
    interp = INTERPOLATIONS[geo["interpolation"]]
    if geo["kind"] == "eval":
        return np.asarray(evaluation_frame(im, geo)), [geo["crop"], geo["crop"]]
    w0, h0 = _resized_size(*im.size, geo["resize"])
    stored_long = min(max(w0, h0), geo["long"])
    canvas = np.zeros(_cache_shape(geo), np.uint8)
    if h0 > w0:   # portrait: stored transposed (rows = original columns)
        arr = np.asarray(im.resize((geo["resize"], stored_long), interp)).transpose(1, 0, 2)
    else:
        arr = np.asarray(im.resize((stored_long, geo["resize"]), interp))
    canvas[:, :stored_long] = arr
    return canvas, [h0, w0]


def _decode_chunk(npy_path: str, geo: dict, chunk: list[tuple[int, str]]) -> list:
    """Pool task: decode a chunk straight into the shared memory-mapped cache file (its blocks
    were reserved by _reserve, so a write into the map cannot meet a full disk)."""
    images = np.load(npy_path, mmap_mode="r+")
    sizes = []
    for i, path in chunk:
        got = _decode_one(path, geo)
        if got is not None:
            images[i] = got[0]
        sizes.append((i, None if got is None else got[1]))
    images.flush()
    return sizes


def _quiet_worker() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group; the parent reports it, once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _npy_header(shape: tuple) -> bytes:
    """The .npy header of a C-ordered uint8 array of this shape (what open_memmap writes)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _no_space(folder: str, need: int, free: int | None = None) -> None:
    have = "" if free is None else f", {free:,} free"
    fail(f"not enough disk space for a decode cache in {folder}: {need:,} bytes needed{have} "
         f"(free some space, or pass --cache-dir on another disk)")


def _reserve(f, header: bytes, nbytes: int) -> None:
    """Write the header and reserve every block of the open file f, so that writes through a memory
    map never meet a full disk (that is SIGBUS, which cannot be caught). posix_fallocate where the
    OS has it; elsewhere, zeros written through the file."""
    f.write(header)
    f.flush()
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise   # ENOSPC: the caller reports it
    block = bytes(64 << 20)
    left = nbytes - len(header)
    while left > 0:
        left -= f.write(block[:min(left, len(block))])
    f.flush()
    os.fsync(f.fileno())


def _decode_all(tmp: str, paths: list[str], geo: dict, progress: bool) -> list:
    """Decode every file into the reserved file tmp, in pool processes -> each image's size."""
    chunk = 32   # images per pool task: large enough to amortise the task overhead
    chunks = [list(enumerate(paths))[i:i + chunk] for i in range(0, len(paths), chunk)]
    procs = max(1, min(machine_cores(), len(chunks)))
    sizes = [None] * len(paths)
    if progress:
        print(f"building {geo['kind']} cache: {len(paths)} images, {procs} process(es)", flush=True)
    if procs == 1:
        for c in chunks:
            for i, s in _decode_chunk(tmp, geo, c):
                sizes[i] = s
        return sizes
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed, out of memory)
    # raises BrokenProcessPool here instead of leaving its task waiting forever
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context(method), initializer=_quiet_worker)
    try:
        for job in [pool.submit(_decode_chunk, tmp, geo, c) for c in chunks]:
            for i, s in job.result():
                sizes[i] = s
    except BrokenProcessPool:
        fail(f"a process decoding images into {os.path.dirname(tmp)} died (killed, or out of memory); "
             f"nothing was kept, run the command again")
    finally:   # on Ctrl-C or an error: drop the queued chunks, wait only for the running ones
        pool.shutdown(wait=True, cancel_futures=True)
    return sizes


def _build_cache(npy_path: str, paths: list[str], geo: dict, progress: bool) -> dict:
    """Decode all files into npy_path (written whole or not at all); returns the metadata.
    A full disk ends in one line naming the folder and the bytes needed, with nothing left."""
    folder = os.path.dirname(npy_path)
    shape = (len(paths),) + _cache_shape(geo)
    header = _npy_header(shape)
    need = len(header) + math.prod(shape)
    free = shutil.disk_usage(folder).free
    if free < need:
        _no_space(folder, need, free)
    sizes = []

    def fill(f):   # the pool writes into the temporary file by its name, through memory maps
        _reserve(f, header, need)
        sizes.extend(_decode_all(os.fspath(f.name), paths, geo, progress))
    atomic_write(npy_path, fill)  # a full disk despite the reservation: its one line (records.DiskFull)
    return {"geometry": geo, "sizes": sizes, "bad": [i for i, s in enumerate(sizes) if s is None]}


def folder_bytes(folder: str) -> int:
    """Bytes of the files directly in `folder` (a cache folder holds no sub-folders)."""
    return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())


def load_or_build_cache(paths: list[str], geo: dict, cache_dir: str,
                        progress: bool = True) -> tuple[np.ndarray, dict, str]:
    """(images uint8 [N,H,W,3], meta, cache file) of these files in this geometry: the file in
    cache_dir when one was built before, else decoded into it now."""
    name = f"{geo['kind']}-{_cache_key(paths, geo)}"
    # processes side by side asking for one cache: the first builds it, the others wait and reuse it
    with FolderLock(cache_dir, f".{name}.lock", wait=True):
        return _load_or_build(paths, geo, cache_dir, os.path.join(cache_dir, name), progress)


def _load_or_build(paths, geo, cache_dir, stem, progress):
    start = time.perf_counter()
    npy, meta_path = stem + ".npy", stem + ".json"
    if os.path.exists(npy) and os.path.exists(meta_path):   # json is written last
        with open(meta_path) as f:
            meta = json.load(f)
        if progress:
            print(f"{geo['kind']} cache reused: {npy}", flush=True)
        return np.load(npy, mmap_mode="c"), meta, npy   # copy-on-write: a writable view, the file untouched
    meta = _build_cache(npy, paths, geo, progress)
    try:
        write_json(meta_path, meta)
    except BaseException:   # a full disk (records.DiskFull) or a kill: a cache without metadata is never read
        os.remove(npy)
        raise
    images = np.load(npy, mmap_mode="c")
    if progress:
        print(f"{geo['kind']} cache built in {time.perf_counter() - start:.1f} s: {len(paths)} images, "
              f"{images.nbytes / 2**20:.0f} MiB -> {npy}", flush=True)
        # every geometry adds a file: say what the folder holds (README, "Caches")
        print(f"{cache_dir} now holds {folder_bytes(cache_dir) / 2**20:.0f} MiB of caches", flush=True)
    return images, meta, npy
