"""Training input path: from image files to normalised batches on the device.

The loop only sees batches: `build_loader(...)` returns a `Loader` whose iterator yields
`(x, y)` with `x` float32 [B, 3, crop, crop] normalised and `y` int64 [B], both on the device
(`x` has channels_last strides when normalise_hwc made it: the CPU path and unaugmented batches).
What an augmentation does to one image is augment.py's; this module decides which images, in
which order, from where:
  * each image is decoded once per run into a uint8 cache (a memory-mapped .npy under
    cache_dir, keyed by the file list, sizes, mtimes and the geometry);
  * order and augmentation are a pure function of (seed, epoch, rank): one plan per epoch
    (augment.plan_arrays), DistributedSampler's sharding;
  * CPU path (on_device False): DataLoader workers render with augment.render_pil and hand
    uint8 batches (a quarter of float32's bytes) through shared memory; the consumer
    normalises a whole batch in one pass into channels_last float32;
  * on-device path (on_device True): uint8 batches of the stored images on the device, each
    augmented and normalised by augment.render_torch. Streamed through the workers by default;
    with resident=True the whole cache is one uint8 tensor on the device, indexed per batch.
    The caller decides, knowing Loader.cache_bytes, and can free it with Loader.release();
  * keep_freed_memory(): glibc keeps freed heap memory, so batches and training steps reuse
    pages instead of faulting fresh ones in.

Sections: presets · cache · batches · loader.
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
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .augment import FLIP_P, draw_params, pack_plan, plan_arrays, render_pil, render_torch, train_recipe
from .errors import fail
from .records import commit_file, write_json


# =============================================================================================
# presets
# =============================================================================================
@dataclass(frozen=True)
class Preprocess:
    crop: int                 # output side, px (the --img-size)
    resize: int               # shorter side before the center crop at evaluation, px
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"   # "bilinear" | "bicubic"
    # Evaluation framing. "center": Resize(resize) -> CenterCrop(crop), torchvision's presets.
    # "squash": the whole image resized to crop x crop, aspect ignored (timm's crop_mode="squash"):
    # nothing is cut off, which pays when objects fill the frame, as in Caltech-101.
    crop_mode: str = "center"


CROP_MODES = ("center", "squash")
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class BadImagesError(ValueError):
    """Some image files could not be decoded; `.paths` lists them."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        shown = ", ".join(self.paths[:10]) + (" ..." if len(self.paths) > 10 else "")
        super().__init__(f"{len(self.paths)} image file(s) could not be decoded "
                         f"(use skip_bad to drop them): {shown}")


# =============================================================================================
# cache: every image decoded once, stored as uint8 HWC
# =============================================================================================
# Eval cache: the exact Resize(resize) -> CenterCrop(crop) image, crop x crop (squash: the
# whole image resized to crop x crop).
# Train cache: the Resize(resize) image (shorter side = resize) in a fixed canvas of
# resize x long_side, portrait images stored transposed so that every image is "landscape".
# The long side is capped at TRAIN_LONG_RATIO * resize (1.5 keeps the usual photo aspects,
# 4:3 and 3:2, unscaled); longer images are squashed along the long axis only and the crop
# geometry compensates exactly (the stored size is recorded), at a small loss of detail.
TRAIN_LONG_RATIO = 1.5
CACHE_VERSION = 1


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) after torchvision Resize(size): shorter side = size, long side truncated."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def cache_geometry(pre: Preprocess, augmented: bool) -> dict:
    """What the cache stores: the train canvas (augmented) or the exact eval crop."""
    if augmented:
        return dict(kind="train", resize=pre.resize, interpolation=pre.interpolation,
                    long=int(round(pre.resize * TRAIN_LONG_RATIO)))
    geo = dict(kind="eval", resize=pre.resize, crop=pre.crop, interpolation=pre.interpolation)
    if pre.crop_mode != "center":   # only named when not the default: older caches stay valid
        geo["crop_mode"] = pre.crop_mode
    return geo


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


def _decode_one(path: str, geo: dict) -> tuple[np.ndarray, list[int]] | None:
    """Decode + resize one file -> (HWC uint8 in the cache layout, [h0, w0]); None if unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")          # also forces the full decode (truncation raises)
    except Exception:                       # any decoder failure means "bad image"
        return None
    interp = INTERPOLATIONS[geo["interpolation"]]
    if geo["kind"] == "eval":
        mode = InterpolationMode(geo["interpolation"])
        if geo.get("crop_mode") == "squash":
            out = TF.resize(im, [geo["crop"], geo["crop"]], interpolation=mode)
        else:
            out = TF.center_crop(TF.resize(im, geo["resize"], interpolation=mode), geo["crop"])
        return np.asarray(out), [geo["crop"], geo["crop"]]
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
    were reserved by _reserve_file, so a write into the map cannot meet a full disk)."""
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


def _reserve_file(path: str, header: bytes, nbytes: int) -> None:
    """Write the header and reserve every block of the file, so that writes through a memory map
    never meet a full disk (that is SIGBUS, which cannot be caught). posix_fallocate where the
    OS has it; elsewhere, zeros written through the file."""
    with open(path, "r+b") as f:
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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    procs = max(1, min(cores or 1, len(chunks)))
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
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=".", suffix=".npy.tmp", delete=False).name
    try:
        try:
            _reserve_file(tmp, header, need)
            sizes = _decode_all(tmp, paths, geo, progress)
            commit_file(tmp, npy_path)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                _no_space(folder, need)
            raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"geometry": geo, "sizes": sizes, "bad": [i for i, s in enumerate(sizes) if s is None]}


def folder_bytes(folder: str) -> int:
    """Bytes of the files directly in `folder` (a cache folder holds no sub-folders)."""
    return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())


def load_or_build_cache(paths: list[str], geo: dict, cache_dir: str | None,
                        progress: bool = True) -> tuple[np.ndarray, dict, str | None, float | None]:
    """(images uint8 [N,H,W,3], meta, cache file or None, build seconds or None if reused)."""
    start = time.perf_counter()
    if cache_dir is None:   # in memory: build in a private temp folder, read it, delete it
        with tempfile.TemporaryDirectory(prefix="imgcache-") as tmpdir:
            npy = os.path.join(tmpdir, "cache.npy")
            meta = _build_cache(npy, paths, geo, progress)
            images = np.load(npy)
        where = None
    else:
        os.makedirs(cache_dir, exist_ok=True)
        stem = os.path.join(cache_dir, f"{geo['kind']}-{_cache_key(paths, geo)}")
        npy, meta_path = stem + ".npy", stem + ".json"
        if os.path.exists(npy) and os.path.exists(meta_path):   # json is written last
            with open(meta_path) as f:
                meta = json.load(f)
            images = np.load(npy, mmap_mode="c")   # copy-on-write: writable view, file untouched
            if progress:
                print(f"{geo['kind']} cache reused: {npy}", flush=True)
            return images, meta, npy, None
        meta = _build_cache(npy, paths, geo, progress)
        try:
            write_json(meta_path, meta)
        except OSError as e:   # the cache without its metadata is never read: remove it
            os.remove(npy)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                _no_space(cache_dir, os.path.getsize(npy) if os.path.exists(npy) else 0)
            raise
        images = np.load(npy, mmap_mode="c")
        where = npy
    seconds = time.perf_counter() - start
    if progress:
        print(f"{geo['kind']} cache built in {seconds:.1f} s: {len(paths)} images, "
              f"{images.nbytes / 2**20:.0f} MiB{' -> ' + where if where else ' in memory'}",
              flush=True)
        if where:   # every geometry adds a file: say what the folder holds (README, "Caches")
            print(f"{cache_dir} now holds {folder_bytes(cache_dir) / 2**20:.0f} MiB of caches", flush=True)
    return images, meta, where, seconds


# =============================================================================================
# batches: uint8 from the cache or the CPU renderer, normalised once by the consumer
# =============================================================================================
def normalise_rows(pre: Preprocess, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalise_hwc's per-row patterns for images `width` px wide: (scale, shift), float32 [width*3]
    on `device`. A Loader makes them once: built per batch, they would be a blocking host-to-device
    copy, a stream synchronisation on CUDA."""
    std = torch.tensor(pre.std, dtype=torch.float64)
    scale = (1 / (255 * std)).float().repeat(width).to(device)
    shift = (-torch.tensor(pre.mean, dtype=torch.float64) / std).float().repeat(width).to(device)
    return scale, shift


def normalise_hwc(u8: torch.Tensor, pre: Preprocess,
                  rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float32 [B,3,H,W] (channels_last strides), (x / 255 - mean) / std.

    ToTensor + Normalize for a whole batch, on the tensor's device: a uint8 -> float copy,
    then one in-place multiply and add against per-row patterns of length W*3 (faster on the
    CPU than a broadcast over the size-3 channel axis). The result is NCHW in
    channels_last memory, the layout the models run in, so the loop's .to(channels_last)
    copies nothing. rows: normalise_rows(pre, W, u8.device), made here when not given.
    """
    B, H, W, _ = u8.shape
    scale, shift = rows if rows is not None else normalise_rows(pre, W, u8.device)
    out = u8.to(torch.float32, memory_format=torch.contiguous_format)
    out.view(B * H, W * 3).mul_(scale).add_(shift)
    return out.permute(0, 3, 1, 2)


def to_device(t: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """A host tensor or array (an index, labels, a plan) onto `device` without waiting for it: on
    CUDA from pinned memory with non_blocking=True (the copy queues behind the running kernels and
    the CPU goes on to the next batch); elsewhere as .to(device)."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if torch.device(device).type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to `threshold_bytes` from its heap and never give
    the heap back, so each batch and each training step reuse the memory the previous one
    freed instead of mapping fresh pages and faulting each 4 KiB of them in. Process-wide and
    inherited by forked loader workers; call it once at the start of a run. Peak resident
    memory stays the peak live set (plus fragmentation). False where not glibc.
    """
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc malloc.h
    # some glibc versions refuse a threshold above 32 MiB (half their heap size)
    mmap_ok = mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))   # 2 GiB: never in practice


class _BatchSource(torch.utils.data.Dataset):
    """DataLoader items are whole batches, so workers never collate; every item is uint8.

    ("hwc", rows): cached images as stored [b,H,W,3] (the eval crops, or the train canvas
    that the on-device path augments);
    ("aug", rows, plan): PIL-augmented [b,crop,crop,3].
    uint8 is a quarter of the float bytes crossing the processes; the consumer normalises.
    With a cache file (path), a worker receives the path and maps the file itself, under any
    start method: pickling an np.memmap would copy all its bytes into every spawned worker.
    """

    def __init__(self, images: np.ndarray, pre: Preprocess, path: str | None = None):
        self._images, self.pre, self.path = images, pre, path

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path is not None:
            state["_images"] = None   # opened by path on first use, in the worker
        return state

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="c")   # copy-on-write, as load_or_build_cache
        return self._images

    def __len__(self):
        return 0   # never indexed by position; the sampler hands out whole batch items

    def __getitem__(self, item):
        rows = item[1]
        shape = (len(rows),) + (self.images.shape[1:] if item[0] == "hwc" else
                                (self.pre.crop, self.pre.crop, 3))
        out = torch.empty(shape, dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            out.share_memory_()   # empty, so free; otherwise the queue copies it into shm
        view = out.numpy()
        if item[0] == "hwc":
            order = np.argsort(rows)          # read the memory map in file order
            view[order] = self.images[rows[order]]
        else:
            for k, i in enumerate(rows):
                view[k] = render_pil(self.images[i], item[2], k, self.pre.crop)
        return out


def augment_batch(images: np.ndarray, rows: np.ndarray, plan: dict, pre: Preprocess,
                  on_device: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Augment cached images `rows` with plan rows 0..len(rows)-1 by either of the loader's
    paths -> normalised float32 [b, 3, crop, crop] (for tests)."""
    if on_device:
        src = torch.from_numpy(np.ascontiguousarray(images[rows])).to(device)
        packed = pack_plan(plan, np.arange(len(rows))).to(device)
        return render_torch(src, packed, crop=pre.crop, mean=pre.mean, std=pre.std)
    u8 = _BatchSource(images, pre)[("aug", np.asarray(rows), plan)]
    return normalise_hwc(u8.to(device), pre)


# =============================================================================================
# loader
# =============================================================================================
class _Items:
    """The DataLoader's sampler: yields the current epoch's batch items, in order."""

    def __init__(self):
        self.items = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


_RESIDENT_NEEDS_ON_DEVICE = ("resident=True (a tensor copy of the decode cache, indexed per batch) "
                               "needs the on-device path: pass on_device=True")


class Loader:
    """Batches of one rank for one epoch at a time; see build_loader.

    cache_bytes: what the resident copy of the cache takes on the device, bytes, known before
    asking for it with make_resident(); resident: whether batches are served from it;
    release(): drop it and stream the same batches.
    """

    def __init__(self, *, images, rows, sizes, samples, skipped, train, recipe, pre, batch_size,
                 workers, device, seed, rank, world_size, on_device, cache_path,
                 cache_build_s, long_side, flip_p=0.0, resident=False, start_method=None):
        self.images, self.sizes, self.samples, self.skipped = images, sizes, samples, skipped
        self.rows = rows        # cache row of each kept sample (bad files keep their rows)
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
        self.train, self.recipe, self.pre = train, recipe, pre
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world_size, self.on_device = rank, world_size, on_device
        self.cache_path, self.cache_build_s, self.long_side = cache_path, cache_build_s, long_side
        self.flip_p = flip_p    # augment=flip: mirror this share of the eval-framed images
        self._flip = None
        n = len(samples)
        if train:   # DistributedSampler(drop_last=True): equal disjoint shares, no padding
            share = n // world_size
            self.num_samples = share - (1 if share % batch_size == 1 else 0)
        else:       # every sample exactly once: near-equal contiguous parts
            self.num_samples = len(np.array_split(np.arange(n), world_size)[rank])
        self._items = _Items()
        self._resident = None   # the whole uint8 cache as one tensor on the device, or None
        # normalisation constants on the device, made once, not per batch (see normalise_rows)
        self._mean = torch.tensor(pre.mean, device=device)
        self._std = torch.tensor(pre.std, device=device)
        self._rows = {}         # image width, px -> normalise_rows(pre, width, device)
        self._loader = torch.utils.data.DataLoader(
            _BatchSource(images, pre, cache_path), batch_size=None, sampler=self._items,
            num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            # None: Python's default (fork on Linux before 3.14; spawn on macOS); batches are the same under each
            multiprocessing_context=start_method if workers > 0 else None,
            # its own generator: starting an epoch's iteration then draws nothing from torch's
            # global one, so dropout masks do not depend on how often a loader was iterated
            generator=torch.Generator())
        self.set_epoch(0)
        if resident:
            self.make_resident()

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.samples)
        if not self.train:
            return np.array_split(np.arange(n), self.world_size)[self.rank]
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)   # same on every rank
        return perm[self.rank:(n // self.world_size) * self.world_size:self.world_size][
            :self.num_samples]

    def set_epoch(self, epoch: int) -> None:
        """Order and augmentation become a pure function of (seed, epoch, rank)."""
        self.epoch = epoch
        order = self._order(epoch)
        self._plan = None
        if self.recipe is not None:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
            sizes = self.sizes[order]
            self._plan = plan_arrays(draw_params(self.recipe, sizes, self.pre.crop, rng),
                                     sizes, self.pre.crop, self.long_side)
        if self.flip_p:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 2])
            self._flip = torch.from_numpy(rng.random(len(order)) < self.flip_p)
        self._batches = [np.arange(a, min(a + self.batch_size, len(order)))
                         for a in range(0, len(order), self.batch_size)]
        self._order_idx = order
        if self._plan is None or self.on_device:
            self._items.items = [("hwc", self.rows[order[b]]) for b in self._batches]
        else:
            self._items.items = [("aug", self.rows[order[b]],
                                  {k: v[b] for k, v in self._plan.items()})
                                 for b in self._batches]

    def batch_indices(self) -> list[np.ndarray]:
        """This epoch's batches as indices into `samples`, in the order they are served."""
        return [self._order_idx[b] for b in self._batches]

    @property
    def cache_bytes(self) -> int:
        """Bytes of the whole uint8 decode cache: what resident=True puts on the device."""
        return int(self.images.nbytes)

    @property
    def resident(self) -> bool:
        """Whether batches are served from a copy of the cache on the device."""
        return self._resident is not None

    def make_resident(self) -> None:
        """Copy the whole uint8 cache (cache_bytes) into one tensor on the device, now; later
        batches index it and are the same as streamed ones. The on-device path only. Idempotent."""
        if self._resident is not None:
            return
        if not self.on_device:
            raise ValueError(_RESIDENT_NEEDS_ON_DEVICE + " (this loader has on_device=False)")
        resident = torch.empty(self.images.shape, dtype=torch.uint8, device=self.device)
        self._resident = resident.copy_(torch.from_numpy(self.images))   # a copy, also on the CPU

    def release(self) -> None:
        """Drop the resident copy of the cache; later batches stream through the DataLoader and
        are the same. Idempotent. On CUDA the memory goes back to torch's caching allocator,
        for this process's next allocations."""
        self._resident = None

    def _device_batches(self):
        """On-device path: uint8 batches on the device, indexed from the resident cache, else
        streamed through the DataLoader (pinned on CUDA)."""
        if self._resident is not None:
            for b in self._batches:
                yield b, self._resident[to_device(self.rows[self._order_idx[b]], self.device)]
        else:
            for b, u8 in zip(self._batches, self._loader):
                yield b, u8.to(self.device, non_blocking=True)

    def _flipped(self, u8: torch.Tensor, b: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] with the rows drawn for flipping mirrored (augment=flip)."""
        if self._flip is None:
            return u8
        mask = to_device(self._flip[b], u8.device).view(-1, 1, 1, 1)
        return torch.where(mask, u8.flip(2), u8)

    def _normalised(self, u8: torch.Tensor) -> torch.Tensor:
        """normalise_hwc with this loader's rows for the batch's width, made at first use."""
        width = u8.shape[2]
        if width not in self._rows:
            self._rows[width] = normalise_rows(self.pre, width, u8.device)
        return normalise_hwc(u8, self.pre, self._rows[width])

    def __iter__(self):
        dev = self.device
        if self.on_device:
            for b, u8 in self._device_batches():
                y = to_device(self.labels[self._order_idx[b]], dev)
                if self._plan is None:
                    yield self._normalised(self._flipped(u8, b)), y
                else:
                    packed = to_device(pack_plan(self._plan, b), dev)
                    blur = not np.isnan(self._plan["sigma"][b]).all()
                    yield render_torch(u8, packed, crop=self.pre.crop, mean=self._mean,
                                       std=self._std, blur=blur), y
        else:
            for b, u8 in zip(self._batches, self._loader):   # uint8 from the workers
                y = to_device(self.labels[self._order_idx[b]], dev)
                yield self._normalised(self._flipped(u8.to(dev, non_blocking=True), b)), y


def build_loader(samples: list[tuple[str, int]], *, train: bool, preprocess: Preprocess,
                 augment: str, seed_recipe: str, batch_size: int, workers: int,
                 device: torch.device, seed: int, cache_dir: str | None, rank: int = 0,
                 world_size: int = 1, skip_bad: bool = False, progress: bool = True,
                 on_device: bool | None = None, resident: bool = False,
                 start_method: str | None = None) -> Loader:
    """A Loader over (path, label) samples; decodes every image once (the cache).

    train=True: a fresh permutation per epoch (same on every rank, rank r takes every
    world_size-th sample), augmentation `augment` for `seed_recipe` (augment.train_recipe), a last batch of 1 dropped;
    `none` and `flip` train on the evaluation framing (flip: mirrored with probability FLIP_P).
    train=False: evaluation preprocessing, every sample exactly once across the ranks.
    on_device: None = batched tensor augmentation when device is CUDA, PIL on the CPU
    otherwise; True/False force a path (tests run the on-device path on the CPU).
    resident: copy the whole uint8 cache (Loader.cache_bytes) into one tensor on `device` now
    and serve batches by indexing it, no workers (the on-device path only: a ValueError
    otherwise); False streams batches through the DataLoader workers. The caller weighs it
    against its memory budget, here or later with Loader.make_resident(); Loader.release()
    gives it back. start_method: how the workers start ("fork", "forkserver", "spawn"; None:
    Python's default); each opens the cache file by its path.
    """
    device = torch.device(device)
    given, on_device = on_device, device.type == "cuda" if on_device is None else on_device
    if resident and not on_device:
        raise ValueError(_RESIDENT_NEEDS_ON_DEVICE + f" (got on_device={given} on device "
                         f"{device}; None picks the on-device path on CUDA only)")
    if not samples:
        raise ValueError("no samples to load")
    if batch_size < 1 or workers < 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader sizes: batch_size={batch_size}, workers={workers}, "
                         f"rank={rank}, world_size={world_size}")
    if preprocess.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {preprocess.interpolation!r}; choose from "
                         f"{', '.join(INTERPOLATIONS)}")
    if preprocess.crop_mode not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {preprocess.crop_mode!r}; choose from {', '.join(CROP_MODES)}")
    aug = train_recipe(augment, seed_recipe) if train else None
    if train and batch_size < 2:
        raise ValueError("batch_size must be at least 2 for training (BatchNorm)")
    geo = cache_geometry(preprocess, augmented=aug is not None)
    paths = [p for p, _ in samples]
    images, meta, cache_path, build_s = load_or_build_cache(paths, geo, cache_dir, progress)
    bad = meta["bad"]
    if bad and not skip_bad:
        raise BadImagesError([paths[i] for i in bad])
    good = np.setdiff1d(np.arange(len(samples)), bad)
    skipped = [paths[i] for i in bad]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:10])}",
                      stacklevel=2)
    if len(good) == 0:
        raise BadImagesError(skipped)
    kept = [samples[i] for i in good]
    sizes = np.array([meta["sizes"][i] for i in good], dtype=np.int64).reshape(-1, 2)
    if train and len(kept) // world_size < 2:
        raise ValueError(f"too few training samples ({len(kept)}) for {world_size} rank(s)")
    return Loader(images=images, rows=good, sizes=sizes, samples=kept, skipped=skipped, train=train,
                  recipe=aug, pre=preprocess, batch_size=batch_size, workers=workers,
                  device=device, seed=seed, rank=rank, world_size=world_size,
                  on_device=on_device, cache_path=cache_path, cache_build_s=build_s,
                  long_side=geo.get("long", 0), flip_p=FLIP_P if train and augment == "flip" else 0.0,
                  resident=resident, start_method=start_method)
