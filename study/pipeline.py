"""Training input path: from image files to normalised batches on the device.

`build_loader(...)` returns a `Loader` whose iterator yields `(x, y)`: x float32 [B, 3, crop, crop]
normalised (channels_last strides when normalise_hwc made it), y int64 [B], both on the device.
augment.py renders an image, decode_cache.py decodes each image once; this module decides which images,
in which order, from where. Order and augmentation are a pure function of (seed, epoch, rank). The CPU
path renders in DataLoader workers (augment.render_pil) and hands uint8 batches through shared memory;
the on-device path augments uint8 batches on the device (augment.render_torch), streamed through the
workers or indexed from a resident copy of the whole cache (Loader.make_resident).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .augment import FLIP_P, draw_params, pack_plan, plan_arrays, render_pil, render_torch, train_policy
from .decode_cache import INTERPOLATIONS, cache_geometry, load_or_build_cache


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


class BadImagesError(ValueError):
    """Some image files could not be decoded; `.paths` lists them."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        shown = ", ".join(self.paths[:10]) + (" ..." if len(self.paths) > 10 else "")
        super().__init__(f"{len(self.paths)} image file(s) could not be decoded "
                         f"(use skip_bad to drop them): {shown}")


# =============================================================================================
# batches: uint8 from the cache or the CPU renderer, normalised once by the consumer
# =============================================================================================
def normalise_constants(pre: Preprocess, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalise_hwc's (scale, shift) for images `width` px wide: float32 [width*3] patterns on `device`,
    made once per width by a Loader (per batch, a blocking host-to-device copy)."""
    std = torch.tensor(pre.std, dtype=torch.float64)
    scale = (1 / (255 * std)).float().repeat(width).to(device)
    shift = (-torch.tensor(pre.mean, dtype=torch.float64) / std).float().repeat(width).to(device)
    return scale, shift


def normalise_hwc(u8: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float32 [B,3,H,W] in channels_last memory (the models' layout, so the loop's
    .to(channels_last) copies nothing), (x / 255 - mean) / std: one in-place multiply and add against
    patterns of length W*3, faster on the CPU than a broadcast over the size-3 channel axis.
    scale_shift: normalise_constants(pre, W, u8.device)."""
    B, H, W, _ = u8.shape
    scale, shift = scale_shift
    out = u8.to(torch.float32, memory_format=torch.contiguous_format)
    out.view(B * H, W * 3).mul_(scale).add_(shift)
    return out.permute(0, 3, 1, 2)


def to_device(t: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """A host tensor or array onto `device` without waiting for it: on CUDA from pinned memory with
    non_blocking=True (the copy queues behind the running kernels); elsewhere as .to(device)."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if torch.device(device).type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to `threshold_bytes` from its heap and never give the heap back, so
    each batch and training step reuse the pages the previous one freed instead of faulting fresh ones in.
    Process-wide, inherited by forked workers; call it once per run. False where not glibc."""
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
    """DataLoader items are whole uint8 batches (a quarter of float's bytes; workers never collate):
    ("hwc", rows) the cached images as stored [b,H,W,3]; ("aug", rows, plan) PIL-augmented [b,crop,crop,3].
    A worker maps the cache file by its path: pickling an np.memmap would copy all its bytes."""

    def __init__(self, images: np.ndarray, pre: Preprocess, path: str):
        self._images, self.pre, self.path = images, pre, path

    def __getstate__(self):
        return dict(self.__dict__, _images=None)   # opened by path on first use, in the worker

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


# =============================================================================================
# loader
# =============================================================================================
class Loader:
    """Batches of one rank for one epoch at a time; see build_loader. images: the uint8 decode cache;
    rows: the cache row of each of `samples` (bad files keep their rows)."""

    def __init__(self, *, images, rows, sizes, samples, train, policy, pre, batch_size,
                 workers, device, seed, rank, world, on_device, cache_path, long_side, flip_p):
        self.images, self.rows, self.sizes, self.samples = images, rows, sizes, samples
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
        self.train, self.policy, self.pre = train, policy, pre
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world, self.on_device = rank, world, on_device
        self.long_side = long_side
        self.flip_p = flip_p    # augment=flip: mirror this share of the eval-framed images
        self._flip = None
        n = len(samples)
        if train:   # DistributedSampler(drop_last=True): equal disjoint shares, no padding
            share = n // world
            self.num_samples = share - (1 if share % batch_size == 1 else 0)
        else:       # every sample exactly once: near-equal contiguous parts
            self.num_samples = len(np.array_split(np.arange(n), world)[rank])
        self._items = []           # the DataLoader's sampler: this epoch's batch items, set in place
        self._device_copy = None   # the whole uint8 cache as one tensor on the device, or None
        # normalisation constants on the device, made once, not per batch (see normalise_constants)
        self._mean = torch.tensor(pre.mean, device=device)
        self._std = torch.tensor(pre.std, device=device)
        self._scale_shift = {}     # image width, px -> normalise_constants(pre, width, device)
        self._loader = torch.utils.data.DataLoader(
            _BatchSource(images, pre, cache_path), batch_size=None, sampler=self._items,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            # its own generator: starting an epoch's iteration then draws nothing from torch's
            # global one, so dropout masks do not depend on how often a loader was iterated
            generator=torch.Generator())
        self.set_epoch(0)

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.samples)
        if not self.train:
            return np.array_split(np.arange(n), self.world)[self.rank]
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)   # same on every rank
        return perm[self.rank:(n // self.world) * self.world:self.world][
            :self.num_samples]

    def set_epoch(self, epoch: int) -> None:
        """Order and augmentation become a pure function of (seed, epoch, rank)."""
        order = self._order(epoch)
        self._plan = None
        if self.policy is not None:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
            sizes = self.sizes[order]
            self._plan = plan_arrays(draw_params(self.policy, sizes, self.pre.crop, rng),
                                     sizes, self.pre.crop, self.long_side)
        if self.flip_p:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 2])
            self._flip = torch.from_numpy(rng.random(len(order)) < self.flip_p)
        self._batches = [np.arange(a, min(a + self.batch_size, len(order)))
                         for a in range(0, len(order), self.batch_size)]
        self._order_idx = order
        if self._plan is None or self.on_device:
            self._items[:] = [("hwc", self.rows[order[b]]) for b in self._batches]
        else:
            self._items[:] = [("aug", self.rows[order[b]], {k: v[b] for k, v in self._plan.items()})
                              for b in self._batches]

    def batch_indices(self) -> list[np.ndarray]:
        """This epoch's batches as indices into `samples`, in the order they are served."""
        return [self._order_idx[b] for b in self._batches]

    @property
    def cache_bytes(self) -> int:
        """Bytes of the whole uint8 decode cache: what make_resident() puts on the device."""
        return int(self.images.nbytes)

    @property
    def resident(self) -> bool:
        """Whether batches are served from a copy of the cache on the device."""
        return self._device_copy is not None

    def make_resident(self) -> None:
        """Copy the whole uint8 cache (cache_bytes) into one tensor on the device; later batches index it
        and are the same as streamed ones. The on-device path only. Idempotent."""
        if self._device_copy is not None:
            return
        if not self.on_device:
            raise ValueError("make_resident() (a copy of the decode cache on the device, indexed per batch) "
                             "needs the on-device path: build the loader with on_device=True")
        copy = torch.empty(self.images.shape, dtype=torch.uint8, device=self.device)
        self._device_copy = copy.copy_(torch.from_numpy(self.images))   # a copy, also on the CPU

    def release(self) -> None:
        """Drop the resident copy of the cache (back to torch's caching allocator on CUDA); later batches
        stream through the DataLoader and are the same. Idempotent."""
        self._device_copy = None

    def _device_batches(self):
        """On-device path: uint8 batches indexed from the resident copy, else streamed (pinned on CUDA)."""
        if self._device_copy is not None:
            for b in self._batches:
                yield b, self._device_copy[to_device(self.rows[self._order_idx[b]], self.device)]
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
        """normalise_hwc with this loader's constants for the batch's width, made at first use."""
        width = u8.shape[2]
        if width not in self._scale_shift:
            self._scale_shift[width] = normalise_constants(self.pre, width, u8.device)
        return normalise_hwc(u8, self._scale_shift[width])

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


def _check_arguments(preprocess: Preprocess, batch_size: int, workers: int, rank: int, world: int) -> None:
    if batch_size < 1 or workers < 0 or not 0 <= rank < world:
        raise ValueError(f"bad loader sizes: batch_size={batch_size}, workers={workers}, "
                         f"rank={rank}, world={world}")
    if preprocess.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {preprocess.interpolation!r}; choose from "
                         f"{', '.join(INTERPOLATIONS)}")
    if preprocess.crop_mode not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {preprocess.crop_mode!r}; choose from {', '.join(CROP_MODES)}")


def _readable(paths: list[str], bad: list[int], skip_bad: bool) -> np.ndarray:
    """Indices of the files that decoded: BadImagesError for the others, or with skip_bad a warning."""
    skipped = [paths[i] for i in bad]
    if skipped and not skip_bad:
        raise BadImagesError(skipped)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:10])}", stacklevel=3)
    good = np.setdiff1d(np.arange(len(paths)), bad)
    if len(good) == 0:
        raise BadImagesError(skipped)
    return good


def build_loader(samples: list[tuple[str, int]], *, train: bool, preprocess: Preprocess,
                 augment: str, seed_policy: str, batch_size: int, workers: int,
                 device: torch.device, seed: int, cache_dir: str, rank: int = 0,
                 world: int = 1, skip_bad: bool = False, progress: bool = True,
                 on_device: bool | None = None, crop_scale: float | None = None) -> Loader:
    """A Loader over (path, label) samples, each image decoded once into a file in cache_dir (or reused).

    train=True: a fresh permutation per epoch (same on every rank, rank r takes every world-th
    sample), augmentation `augment` for `seed_policy` (augment.train_policy), a last batch of 1 dropped.
    train=False: evaluation preprocessing, every sample exactly once across the ranks.
    on_device: None = batched tensor augmentation on CUDA, PIL on the CPU; True/False force a path.
    crop_scale: the training crop's lower area bound in place of the policy's (train_policy)."""
    device = torch.device(device)
    on_device = device.type == "cuda" if on_device is None else on_device
    if not samples:
        raise ValueError("no samples to load")
    _check_arguments(preprocess, batch_size, workers, rank, world)
    aug = train_policy(augment, seed_policy, crop_scale) if train else None
    if train and batch_size < 2:
        raise ValueError("batch_size must be at least 2 for training (BatchNorm)")
    geo = cache_geometry(preprocess, augmented=aug is not None)
    paths = [p for p, _ in samples]
    images, meta, cache_path = load_or_build_cache(paths, geo, cache_dir, progress)
    good = _readable(paths, meta["bad"], skip_bad)
    kept = [samples[i] for i in good]
    sizes = np.array([meta["sizes"][i] for i in good], dtype=np.int64).reshape(-1, 2)
    if train and len(kept) // world < 2:
        raise ValueError(f"too few training samples ({len(kept)}) for {world} rank(s)")
    return Loader(images=images, rows=good, sizes=sizes, samples=kept, train=train, policy=aug,
                  pre=preprocess, batch_size=batch_size, workers=workers, device=device, seed=seed,
                  rank=rank, world=world, on_device=on_device, cache_path=cache_path,
                  long_side=geo.get("long", 0), flip_p=FLIP_P if train and augment == "flip" else 0.0)
