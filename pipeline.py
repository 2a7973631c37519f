"""Training input path: from image files to normalised batches on the device.

The loop only sees batches: `build_loader(...)` returns a `Loader` whose iterator yields
`(x, y)` with `x` float32 [B, 3, crop, crop] normalised and `y` int64 [B], both on the device
(`x` has channels_last strides when the CPU path or the eval cache made it).

Why it is fast:
  * each image is decoded once per run into a uint8 cache (a memory-mapped .npy under
    cache_dir, keyed by the file list, sizes, mtimes and the geometry);
  * the random parameters of an epoch (crop box, flip, angle, jitter, grayscale, blur,
    perspective) are drawn at once with numpy, with torchvision's distributions, and folded
    into 3x3 geometric matrices and one 3x3 colour matrix + offset per image;
  * CPU path (DataLoader workers), uint8 from end to end, in torchvision's order: one
    antialiased resize of the crop box (torch's uint8 AVX2 kernel), one NEAREST affine
    transform (flip + rotation), the whole ColorJitter + RandomGrayscale as one PIL
    convert(matrix), the 3-tap blur in int16 fixed point, the perspective as one NEAREST
    homography; workers hand uint8 batches (a quarter of float32's bytes) through shared
    memory, and the consumer normalises a whole batch in one pass into channels_last float32;
  * GPU path: the uint8 cache lives on the device; per batch one grid_sample for
    crop+flip+rotation+perspective and one batched 3x3 colour matrix that also normalises.
    No per-image Python in the hot path;
  * keep_freed_memory(): glibc keeps freed heap memory, so batches and training steps reuse
    pages instead of faulting fresh ones in (expensive on this VM).

Measured: see README "Performance" (bench/bench_data.py --compare, bench/bench_train.py).
The GPU path is not measured here (no GPU); bench/gpu_check.sh measures it on one.

Sections: presets · cache · random parameters · CPU rendering · GPU rendering · loader.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode


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


AUGMENTS = ("seed", "light", "flip", "none")
CROP_MODES = ("center", "squash")
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601-2 luma, as PIL's convert("L") and torchvision


def _recipe(**changes) -> dict:
    """One augmentation recipe as plain data; unnamed fields mean 'not applied'."""
    base = dict(
        scale=(0.08, 1.0),        # RandomResizedCrop area fraction of the Resize(resize) image
        ratio=(3 / 4, 4 / 3),     # RandomResizedCrop aspect ratio w/h
        flip=0.0,                 # horizontal flip probability
        degrees=0.0,              # rotation uniform in [-degrees, +degrees], zero fill
        brightness=0.0, contrast=0.0, saturation=0.0,   # ColorJitter factors, uniform 1 ± x
        hue=0.0,                  # ColorJitter hue shift, uniform ± x of a full turn
        grayscale=0.0,            # RandomGrayscale probability
        blur_sigma=None,          # GaussianBlur(kernel 3) sigma range, px, applied always
        perspective=0.0,          # RandomPerspective distortion_scale
        perspective_p=0.0,        # RandomPerspective probability
    )
    unknown = set(changes) - set(base)
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)}")
    return {**base, **changes}


# The original scripts' train transforms (ORIGINAL.md); all are preceded by Resize(resize).
SEED_RECIPES: dict[str, dict] = {
    "resnet18": _recipe(scale=(0.7, 1.0), flip=0.5, degrees=15.0, brightness=0.2, contrast=0.2,
                        saturation=0.2, hue=0.1, grayscale=0.1),
    "resnet50": _recipe(scale=(0.8, 1.0), flip=0.5, degrees=10.0, brightness=0.05,
                        contrast=0.05, saturation=0.05),
    "resnet101": _recipe(scale=(0.08, 1.0), flip=0.5, brightness=0.2, contrast=0.2),
    # scale above 1 is kept: the crop sampler rejects boxes larger than the image, as torchvision
    "efficientnet_b4": _recipe(scale=(0.6, 1.4), flip=0.5, degrees=20.0, brightness=0.2,
                               contrast=0.2, saturation=0.2, hue=0.1, blur_sigma=(0.1, 2.0),
                               perspective=0.2, perspective_p=0.5),
}
SEED_RECIPES["efficientnet_lite0"] = dict(SEED_RECIPES["resnet18"])   # no original: resnet18's
LIGHT_RECIPE = _recipe(scale=(0.08, 1.0), flip=0.5)   # torchvision references' train preset
# --augment flip: the evaluation framing (served from the eval cache), mirrored left-right with
# this probability: the mildest augmentation, framing and scale kept. It did not pay on
# Caltech-101, whose objects mostly face one way (README, Results); it may on other folders.
FLIP_P = 0.5


def train_recipe(augment: str, recipe: str) -> dict | None:
    """The augmentation dict for (augment, recipe); None for 'none' and 'flip' (evaluation
    preprocessing; 'flip' mirrors it, see FLIP_P)."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
    if recipe not in SEED_RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(SEED_RECIPES)}")
    return {"seed": SEED_RECIPES[recipe], "light": LIGHT_RECIPE, "flip": None, "none": None}[augment]


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
# The long side is capped at TRAIN_LONG_RATIO * resize (1.5: 75 % of Caltech-101 images fit
# unscaled, median aspect 1.33); longer images are squashed along the long axis only and the
# crop geometry compensates exactly (the stored size is recorded), at a small loss of detail.
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
    """Pool task: decode a chunk straight into the shared memory-mapped cache file."""
    images = np.load(npy_path, mmap_mode="r+")
    sizes = []
    for i, path in chunk:
        got = _decode_one(path, geo)
        if got is not None:
            images[i] = got[0]
        sizes.append((i, None if got is None else got[1]))
    images.flush()
    return sizes


def _fsync_replace(tmp: str, final: str) -> None:
    """Make a finished temp file durable and move it into place (mode as a plain open())."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # NamedTemporaryFile creates 0600
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _build_cache(npy_path: str, paths: list[str], geo: dict, progress: bool) -> dict:
    """Decode all files into npy_path (written whole or not at all); returns the metadata."""
    folder = os.path.dirname(npy_path)
    tmp = tempfile.NamedTemporaryFile(dir=folder, suffix=".npy.tmp", delete=False).name
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                  shape=(len(paths),) + _cache_shape(geo)).flush()
        chunk = 32   # images per pool task: large enough to amortise the task overhead
        chunks = [list(enumerate(paths))[i:i + chunk] for i in range(0, len(paths), chunk)]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        procs = max(1, min(cores or 1, len(chunks)))
        sizes = [None] * len(paths)
        if progress:
            print(f"building {geo['kind']} cache: {len(paths)} images, {procs} process(es)",
                  flush=True)
        if procs == 1:
            results = (_decode_chunk(tmp, geo, c) for c in chunks)
            for res in results:
                for i, s in res:
                    sizes[i] = s
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(procs) as pool:
                jobs = [pool.apply_async(_decode_chunk, (tmp, geo, c)) for c in chunks]
                for job in jobs:
                    for i, s in job.get():
                        sizes[i] = s
        _fsync_replace(tmp, npy_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"geometry": geo, "sizes": sizes, "bad": [i for i, s in enumerate(sizes) if s is None]}


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
        tmp = tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".json.tmp", delete=False)
        with tmp:
            json.dump(meta, tmp)
        _fsync_replace(tmp.name, meta_path)
        images = np.load(npy, mmap_mode="c")
        where = npy
    seconds = time.perf_counter() - start
    if progress:
        print(f"{geo['kind']} cache built in {seconds:.1f} s: {len(paths)} images, "
              f"{images.nbytes / 2**20:.0f} MiB{' -> ' + where if where else ' in memory'}",
              flush=True)
    return images, meta, where, seconds


# =============================================================================================
# random parameters of an epoch (numpy, vectorised; shared by both rendering paths)
# =============================================================================================
def draw_params(recipe: dict, sizes: np.ndarray, crop: int, rng: np.random.Generator) -> dict:
    """Per-sample augmentation parameters with torchvision's distributions.

    sizes: int [n, 2] = (h0, w0) of each Resize(resize) image, px.
    Returns arrays: box [n,4] = (i, j, h, w) crop box px, flip bool, angle deg, jitter
    factors, hue, order [n,4] (jitter op order), gray bool, sigma px or nan, persp bool,
    ends [n,4,2] (perspective end points, px in the crop x crop frame).
    """
    n = len(sizes)
    H, W = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    # RandomResizedCrop.get_params: 10 attempts, then a central fallback
    area = (H * W)[:, None]
    target = area * rng.uniform(*recipe["scale"], (n, 10))
    aspect = np.exp(rng.uniform(*np.log(recipe["ratio"]), (n, 10)))
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = ok.argmax(1)
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], ok.any(1)
    lo, hi = min(recipe["ratio"]), max(recipe["ratio"])
    in_ratio = W / H
    fw = np.where(in_ratio < lo, W, np.where(in_ratio > hi, np.rint(H * hi), W))
    fh = np.where(in_ratio < lo, np.rint(W / lo), H)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    u, v = rng.random(n), rng.random(n)
    i = np.where(found, np.floor(u * (H - h + 1)), (H - h) // 2)
    j = np.where(found, np.floor(v * (W - w + 1)), (W - w) // 2)
    p = dict(box=np.stack([i, j, h, w], 1))
    p["flip"] = rng.random(n) < recipe["flip"]
    p["angle"] = rng.uniform(-recipe["degrees"], recipe["degrees"], n)
    for name in ("brightness", "contrast", "saturation"):
        x = recipe[name]
        p[name] = rng.uniform(max(0.0, 1 - x), 1 + x, n) if x else np.ones(n)
    p["hue"] = rng.uniform(-recipe["hue"], recipe["hue"], n) if recipe["hue"] else np.zeros(n)
    p["order"] = np.argsort(rng.random((n, 4)), 1)          # a random permutation per sample
    p["gray"] = rng.random(n) < recipe["grayscale"]
    sig = recipe["blur_sigma"]
    p["sigma"] = rng.uniform(*sig, n) if sig else np.full(n, np.nan)
    # RandomPerspective.get_params on the crop x crop image
    p["persp"] = rng.random(n) < recipe["perspective_p"]
    half = crop // 2
    b = int(recipe["perspective"] * half) + 1
    a0, a1 = rng.integers(0, b, (n, 4, 2)), rng.integers(crop - b, crop, (n, 4, 2))
    # corners top-left, top-right, bottom-right, bottom-left; (x, y)
    p["ends"] = np.stack([np.stack([a0[:, 0, 0], a0[:, 0, 1]], 1),
                          np.stack([a1[:, 1, 0], a0[:, 1, 1]], 1),
                          np.stack([a1[:, 2, 0], a1[:, 2, 1]], 1),
                          np.stack([a0[:, 3, 0], a1[:, 3, 1]], 1)], 1).astype(np.float64)
    return p


def _homographies(ends: np.ndarray, persp: np.ndarray, crop: int) -> np.ndarray:
    """[n,3,3] output px -> pre-perspective px (torchvision maps end points to the corners)."""
    n = len(ends)
    starts = np.array([[0, 0], [crop - 1, 0], [crop - 1, crop - 1], [0, crop - 1]], np.float64)
    A = np.zeros((n, 8, 8))
    rhs = np.tile(starts.reshape(8), (n, 1))
    for k in range(4):
        x, y = ends[:, k, 0], ends[:, k, 1]
        X, Y = starts[k]
        A[:, 2 * k, 0], A[:, 2 * k, 1], A[:, 2 * k, 2] = x, y, 1
        A[:, 2 * k, 6], A[:, 2 * k, 7] = -X * x, -X * y
        A[:, 2 * k + 1, 3], A[:, 2 * k + 1, 4], A[:, 2 * k + 1, 5] = x, y, 1
        A[:, 2 * k + 1, 6], A[:, 2 * k + 1, 7] = -Y * x, -Y * y
    out = np.tile(np.eye(3), (n, 1, 1))
    if persp.any():
        c = np.linalg.solve(A[persp], rhs[persp][..., None])[..., 0]
        out[persp] = np.concatenate([c, np.ones((len(c), 1))], 1).reshape(-1, 3, 3)
    return out


def geometry(p: dict, sizes: np.ndarray, crop: int, long_side: int) -> dict:
    """Matrices in continuous px (pixel k spans [k, k+1)), all mapping output -> source.

    P [n,3,3]: output -> rotated frame (perspective inverse, identity when not applied);
    R [n,3,3]: rotated frame -> crop frame (rotation about the centre, then flip);
    S [n,3,3]: crop frame -> cache storage frame (crop box scale, long-side cap, transpose).
    """
    n = len(sizes)
    h0, w0 = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    P = _homographies(p["ends"], p["persp"], crop)
    a = -np.radians(p["angle"])          # PIL's rotate(): positive angle = counter-clockwise
    cos, sin, c = np.cos(a), np.sin(a), crop / 2
    R = np.zeros((n, 3, 3))
    R[:, 0, 0], R[:, 0, 1], R[:, 0, 2] = cos, sin, c - cos * c - sin * c
    R[:, 1, 0], R[:, 1, 1], R[:, 1, 2] = -sin, cos, c + sin * c - cos * c
    R[:, 2, 2] = 1
    flip = np.tile(np.eye(3), (n, 1, 1))
    flip[p["flip"], 0, 0], flip[p["flip"], 0, 2] = -1, crop
    R = flip @ R
    i, j, h, w = p["box"].T
    C = np.zeros((n, 3, 3))                # crop frame -> resized-image frame
    C[:, 0, 0], C[:, 0, 2], C[:, 1, 1], C[:, 1, 2], C[:, 2, 2] = w / crop, j, h / crop, i, 1
    portrait = h0 > w0
    stored_long = np.minimum(np.maximum(h0, w0), long_side)
    T = np.zeros((n, 3, 3))                # resized-image frame -> storage frame
    T[:, 2, 2] = 1
    T[~portrait, 0, 0] = (stored_long / w0)[~portrait]
    T[~portrait, 1, 1] = 1
    T[portrait, 0, 1] = (stored_long / h0)[portrait]
    T[portrait, 1, 0] = 1
    return dict(P=P, R=R, S=T @ C)


def colour_matrices(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """ColorJitter (random op order) + RandomGrayscale as out = M x + K mean(x), per sample.

    Brightness, saturation and hue are linear maps; contrast blends toward the mean gray of
    the image at that point of the chain, which is w^T (M + K) mean(x) because the mean
    commutes with affine maps. Hue is a rotation about the gray axis (red -> green for +).
    Intermediate clipping to [0, 1] is not modelled (only the end result is clipped).
    """
    n = len(p["gray"])
    eye = np.eye(3)
    wt = np.array(GRAY_WEIGHTS)
    to_gray = np.outer(np.ones(3), wt)        # x -> (w . x) on every channel
    th = 2 * np.pi * p["hue"]
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)
    hue = (np.cos(th)[:, None, None] * eye + (1 - np.cos(th))[:, None, None] * np.ones((3, 3)) / 3
           + np.sin(th)[:, None, None] * cross)
    b, c, s = (p[k][:, None, None] for k in ("brightness", "contrast", "saturation"))
    linear = [b * eye, c * eye, s * eye + (1 - s) * to_gray, hue]   # fn_idx 0..3 as torchvision
    M = np.tile(eye, (n, 1, 1))
    K = np.zeros((n, 3, 3))
    for pos in range(4):
        op = p["order"][:, pos]
        L = np.select([(op == k)[:, None, None] for k in range(4)], linear)
        offset = np.where((op == 1)[:, None, None], (1 - c) * (to_gray @ (M + K)), 0.0)
        M, K = L @ M, L @ K + offset
    g = p["gray"][:, None, None]
    return np.where(g, to_gray @ M, M), np.where(g, to_gray @ K, K)


def plan_arrays(p: dict, sizes: np.ndarray, crop: int, long_side: int) -> dict:
    """Everything the renderers need, as arrays aligned with the samples."""
    g = geometry(p, sizes, crop, long_side)
    M, K = colour_matrices(p)
    return dict(g, M=M, K=K, sigma=p["sigma"], persp=p["persp"])


# =============================================================================================
# CPU rendering: uint8 all the way in the workers, normalised once per batch in the consumer
# =============================================================================================
def blur_u8(img: np.ndarray, sigma: float) -> np.ndarray:
    """torchvision GaussianBlur(kernel_size=3, sigma) on a uint8 HWC image -> a new uint8 image.

    The 3-tap Gaussian is [e, 1, e] / (1 + 2e) with e = exp(-1 / (2 sigma^2)), applied as
    two separable passes in int16 fixed point (weights in 1/128, reflect padding as
    torchvision): 0.44 ms at 380 px against 1.7 ms for PIL's BoxBlur(e) and 3.7 ms for a
    float conv2d. Within 1 level of torchvision's float result, which rounds once at the end.
    Below e ~ 1/255 the weights round to [0, 1, 0] and the image comes back unchanged.
    """
    e = math.exp(-0.5 / sigma ** 2)
    w1 = round(128 * e / (1 + 2 * e))
    if w1 == 0:
        return img
    w0 = 128 - 2 * w1

    def one_pass(x: torch.Tensor, dim: int) -> torch.Tensor:
        out = torch.empty_like(x)
        n = x.shape[dim]
        mid, lo, hi = (out.narrow(dim, 1, n - 2), x.narrow(dim, 0, n - 2), x.narrow(dim, 2, n - 2))
        torch.add(lo, hi, out=mid).mul_(w1).add_(x.narrow(dim, 1, n - 2) * w0)
        for edge, inner in ((0, 1), (n - 1, n - 2)):      # reflect: the outer tap is the inner one
            out.select(dim, edge).copy_(x.select(dim, edge) * w0 + x.select(dim, inner) * (2 * w1))
        return out.add_(64).bitwise_right_shift_(7)       # / 128, rounded
    x = torch.from_numpy(img if img.flags.writeable else img.copy()).to(torch.int16)   # [H,W,3]
    return one_pass(one_pass(x, 1), 0).to(torch.uint8).numpy()


def _image_mean(im: Image.Image) -> np.ndarray:
    """Per-channel mean of an RGB image, 0..255: the histogram of its 4x4 block means
    (PIL reduce(4), each block rounded to uint8, so within ~0.5 level of the exact mean;
    torchvision's PIL contrast rounds its mean to a whole level) at 0.11 ms at 380 px
    against 0.25 ms for the full histogram."""
    small = im.reduce(4) if min(im.size) >= 8 else im
    hist = np.asarray(small.histogram(), np.float64).reshape(3, 256)
    return hist @ np.arange(256) / (small.size[0] * small.size[1])


def _resize_box(src: np.ndarray, box: tuple, crop: int) -> Image.Image:
    """The box (x0, y0, x1, y1), storage px, of a cached HWC uint8 image, resized to crop x
    crop with an antialiased bilinear filter (RandomResizedCrop's resized_crop).

    Whole-pixel boxes (every image stored unsquashed) go through torch's uint8 antialiased
    interpolate, the AVX2 kernel torchvision v2 uses: within 1 level of PIL's resize and
    3x faster (0.45 against 1.5 ms at 380 px). Fractional boxes (images squashed into the
    canvas) take PIL's resize, which accepts them.
    """
    x0, y0, x1, y1 = box
    r = [round(v) for v in box]
    if all(abs(v - q) < 1e-6 for v, q in zip(box, r)) and r[2] > r[0] and r[3] > r[1]:
        part = torch.from_numpy(src[r[1]:r[3], r[0]:r[2]]).permute(2, 0, 1)[None]
        out = F.interpolate(part, size=(crop, crop), mode="bilinear", antialias=True,
                            align_corners=False)
        return Image.fromarray(out[0].permute(1, 2, 0).contiguous().numpy())
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(src.shape[1], math.ceil(x1)), min(src.shape[0], math.ceil(y1))
    im = Image.fromarray(np.ascontiguousarray(src[iy0:iy1, ix0:ix1]))
    return im.resize((crop, crop), Image.BILINEAR, box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0))


def render_pil(src: np.ndarray, plan: dict, k: int, crop: int) -> np.ndarray:
    """One augmented image on uint8, in torchvision's order -> HWC uint8 crop x crop.

    RandomResizedCrop: the crop box resized to crop x crop (antialiased bilinear, as
    torchvision's PIL resize; see _resize_box). Flip + RandomRotation: one NEAREST affine
    transform (RandomRotation's default), zero fill. ColorJitter + RandomGrayscale: one 3x3
    matrix + offset, M x + K mean(x) with the mean of the rotated image as ColorJitter's
    contrast sees it, by PIL's convert(matrix), which rounds and clips to uint8 as each PIL
    jitter op does. Then the 3-tap GaussianBlur, then RandomPerspective as a NEAREST
    homography with its zero fill (the original resamples it BILINEAR: 3.6 ms at 380 px
    against 0.2 ms).
    """
    S = plan["S"][k]
    corners = S @ np.array([[0, crop, 0, crop], [0, 0, crop, crop], [1, 1, 1, 1.]])
    x0, x1, y0, y1 = corners[0].min(), corners[0].max(), corners[1].min(), corners[1].max()
    im = _resize_box(src, (x0, y0, x1, y1), crop)
    # the resized box (storage orientation) -> crop frame: identity, or a swap if transposed
    to_box = np.array([[crop / (x1 - x0), 0, -x0 * crop / (x1 - x0)],
                       [0, crop / (y1 - y0), -y0 * crop / (y1 - y0)], [0, 0, 1]])
    m = to_box @ S @ plan["R"][k]                          # rotated frame -> resized box
    if not np.allclose(m, np.eye(3), atol=1e-9):
        im = im.transform((crop, crop), Image.AFFINE, m[:2].ravel().tolist(), Image.NEAREST)
    M, K = plan["M"][k], plan["K"][k]
    if not (np.array_equal(M, np.eye(3)) and not K.any()):
        offset = K @ _image_mean(im) if K.any() else np.zeros(3)
        im = im.convert("RGB", np.concatenate([M, offset[:, None]], 1).ravel().tolist())
    out = np.asarray(im)
    if not np.isnan(plan["sigma"][k]):
        out = blur_u8(out, plan["sigma"][k])
    if plan["persp"][k]:                                   # output -> rotated frame
        h = plan["P"][k] / plan["P"][k][2, 2]
        out = np.asarray(Image.fromarray(out).transform(
            (crop, crop), Image.PERSPECTIVE, h.ravel()[:8].tolist(), Image.NEAREST))
    return out


def normalise_hwc(u8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float32 [B,3,H,W] (channels_last strides), (x / 255 - mean) / std.

    ToTensor + Normalize for a whole batch, on the tensor's device: a uint8 -> float copy,
    then one in-place multiply and add against per-row patterns of length W*3 (a broadcast
    over the size-3 channel axis runs 2.5x slower on the CPU). The result is NCHW in
    channels_last memory, the layout the models run in, so the loop's .to(channels_last)
    copies nothing.
    """
    B, H, W, _ = u8.shape
    std = torch.tensor(pre.std, dtype=torch.float64)
    scale = (1 / (255 * std)).float().repeat(W).to(u8.device)                  # [W*3]
    shift = (-torch.tensor(pre.mean, dtype=torch.float64) / std).float().repeat(W).to(u8.device)
    out = u8.to(torch.float32, memory_format=torch.contiguous_format)
    out.view(B * H, W * 3).mul_(scale).add_(shift)
    return out.permute(0, 3, 1, 2)


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to `threshold_bytes` from its heap and never give
    the heap back, so each batch and each training step reuse the memory the previous one
    freed instead of mapping fresh pages (on this VM a 4 KiB page fault costs ~1-5 us:
    normalising a 64 x 380 px batch drops from 0.84 to 0.25 ms/image). Process-wide and
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
    that the tensor path augments);
    ("aug", rows, plan): PIL-augmented [b,crop,crop,3].
    uint8 is a quarter of the float bytes crossing the processes; the consumer normalises.
    """

    def __init__(self, images: np.ndarray, pre: Preprocess):
        self.images, self.pre = images, pre

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
# GPU rendering: batched tensor ops, the same parameters
# =============================================================================================
def _pixel_grid(crop: int, device: torch.device) -> torch.Tensor:
    """[crop*crop, 3] homogeneous output pixel centres (x + 0.5, y + 0.5, 1)."""
    r = torch.arange(crop, device=device, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), torch.ones_like(x).reshape(-1)], 1)


def pack_plan(plan: dict, rows: np.ndarray) -> torch.Tensor:
    """Plan rows as one float32 [b, 47] tensor, so a batch needs a single host->device copy."""
    parts = [plan["P"][rows].reshape(-1, 9), plan["R"][rows].reshape(-1, 9),
             plan["S"][rows].reshape(-1, 9), plan["M"][rows].reshape(-1, 9),
             plan["K"][rows].reshape(-1, 9),
             plan["sigma"][rows, None], plan["persp"][rows, None]]
    return torch.from_numpy(np.concatenate(parts, 1).astype(np.float32))


def render_torch(src: torch.Tensor, packed: torch.Tensor, pre: Preprocess,
                 blur: bool | None = None) -> torch.Tensor:
    """Augment a uint8 [B,H,W,3] batch on its device -> normalised float32 [B,3,crop,crop].

    About 20 kernel launches per batch whatever its size, no per-image Python, no host sync
    when `blur` (any sample blurred) is given by the caller.
    """
    B, Hs, Ws, _ = src.shape
    crop, dev = pre.crop, src.device
    P, R, S = (packed[:, 9 * k:9 * k + 9].reshape(B, 3, 3) for k in range(3))
    M = packed[:, 27:36].reshape(B, 3, 3)
    K = packed[:, 36:45].reshape(B, 3, 3)
    sigma, persp = packed[:, 45], packed[:, 46] > 0.5
    base = _pixel_grid(crop, dev)                                   # [N, 3]
    q = base @ P.transpose(1, 2)                                    # [B, N, 3] rotated frame
    q = q / q[..., 2:]
    r = q @ R.transpose(1, 2)                                       # crop frame
    s = r @ S.transpose(1, 2)                                       # storage frame, px
    grid = torch.stack([2 * s[..., 0] / Ws - 1, 2 * s[..., 1] / Hs - 1], -1).view(B, crop, crop, 2)
    x = F.grid_sample(src.permute(0, 3, 1, 2).float(), grid, mode="bilinear",
                      padding_mode="zeros", align_corners=False)   # [B,3,crop,crop], 0..255
    inside = lambda t: ((t[..., :2] >= 0) & (t[..., :2] <= crop)).all(-1).view(B, 1, crop, crop)
    x = x * inside(r)                                               # rotation's zero fill
    keep = inside(q)                                                # perspective's zero fill
    mean = x.mean((2, 3))                                           # [B, 3] for contrast
    if blur is None:
        blur = not bool(torch.isnan(sigma).all())
    if blur:   # GaussianBlur(3): separable, reflect padding as torchvision, per sample
        t = torch.arange(-1, 2, device=dev, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma.nan_to_num(0.1)[:, None]) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)    # [B*3, 3]
        y = F.pad(x.reshape(1, B * 3, crop, crop), (1, 1, 1, 1), mode="reflect")
        y = F.conv2d(y, k.view(B * 3, 1, 1, 3), groups=B * 3)
        y = F.conv2d(y, k.view(B * 3, 1, 3, 1), groups=B * 3).view(B, 3, crop, crop)
        x = torch.where(torch.isnan(sigma).view(B, 1, 1, 1), x, y)
    # colour matrix, offset and normalisation folded: out = D (M x + K mean) / 255 - D mu
    inv = 1 / torch.tensor(pre.std, device=dev)
    mu = torch.tensor(pre.mean, device=dev)
    A = inv[None, :, None] * M / 255
    bias = inv * ((mean[:, None, :] * K).sum(-1) / 255 - mu)       # [B, 3]
    out = torch.baddbmm(bias[:, :, None], A, x.reshape(B, 3, -1)).view(B, 3, crop, crop)
    lo, hi = (-mu * inv).view(1, 3, 1, 1), ((1 - mu) * inv).view(1, 3, 1, 1)
    out = torch.maximum(torch.minimum(out, hi), lo)               # ToTensor's [0, 1] range
    return torch.where(keep | ~persp.view(B, 1, 1, 1), out, lo)


def augment_batch(images: np.ndarray, rows: np.ndarray, plan: dict, pre: Preprocess,
                  tensor_path: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Augment cached images `rows` with plan rows 0..len(rows)-1 by either path (for tests)."""
    if tensor_path:
        src = torch.from_numpy(np.ascontiguousarray(images[rows])).to(device)
        packed = pack_plan(plan, np.arange(len(rows))).to(device)
        return render_torch(src, packed, pre)
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


class Loader:
    """Batches of one rank for one epoch at a time; see build_loader."""

    def __init__(self, *, images, rows, sizes, samples, skipped, train, recipe, pre, batch_size,
                 workers, device, seed, rank, world_size, gpu_augment, cache_path,
                 cache_build_s, long_side, flip_p=0.0):
        self.images, self.sizes, self.samples, self.skipped = images, sizes, samples, skipped
        self.rows = rows        # cache row of each kept sample (bad files keep their rows)
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
        self.train, self.recipe, self.pre = train, recipe, pre
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world_size, self.gpu_augment = rank, world_size, gpu_augment
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
        self._resident = None   # the whole cache as a device tensor (GPU path, when it fits)
        self._loader = torch.utils.data.DataLoader(
            _BatchSource(images, pre), batch_size=None, sampler=self._items,
            num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            # its own generator: starting an epoch's iteration then draws nothing from torch's
            # global one, so dropout masks do not depend on how often a loader was iterated
            generator=torch.Generator())
        self.set_epoch(0)

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
        if self._plan is None or self.gpu_augment:
            self._items.items = [("hwc", self.rows[order[b]]) for b in self._batches]
        else:
            self._items.items = [("aug", self.rows[order[b]],
                                  {k: v[b] for k, v in self._plan.items()})
                                 for b in self._batches]

    def batch_indices(self) -> list[np.ndarray]:
        """This epoch's batches as indices into `samples`, in the order they are served."""
        return [self._order_idx[b] for b in self._batches]

    def _device_batches(self):
        """GPU path: uint8 batches on the device (resident cache, else streamed, pinned)."""
        if self._resident is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.images.nbytes <= free // 4:   # keep 3/4 of the memory for training
                self._resident = torch.from_numpy(self.images).to(self.device)
        if self._resident is not None:
            for b in self._batches:
                idx = torch.from_numpy(self.rows[self._order_idx[b]]).to(self.device,
                                                                         non_blocking=True)
                yield b, self._resident[idx]
        else:
            for b, u8 in zip(self._batches, self._loader):
                yield b, u8.to(self.device, non_blocking=True)

    def _flipped(self, u8: torch.Tensor, b: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] with the rows drawn for flipping mirrored (augment=flip)."""
        if self._flip is None:
            return u8
        mask = self._flip[b].to(u8.device, non_blocking=True).view(-1, 1, 1, 1)
        return torch.where(mask, u8.flip(2), u8)

    def __iter__(self):
        dev = self.device
        if self.gpu_augment:
            for b, u8 in self._device_batches():
                y = self.labels[self._order_idx[b]].to(dev, non_blocking=True)
                if self._plan is None:
                    yield normalise_hwc(self._flipped(u8, b), self.pre), y
                else:
                    packed = pack_plan(self._plan, b).to(dev, non_blocking=True)
                    blur = not np.isnan(self._plan["sigma"][b]).all()
                    yield render_torch(u8, packed, self.pre, blur), y
        else:
            for b, u8 in zip(self._batches, self._loader):   # uint8 from the workers
                y = self.labels[self._order_idx[b]].to(dev, non_blocking=True)
                yield normalise_hwc(self._flipped(u8.to(dev, non_blocking=True), b), self.pre), y


def build_loader(samples: list[tuple[str, int]], *, train: bool, preprocess: Preprocess,
                 augment: str, recipe: str, batch_size: int, workers: int,
                 device: torch.device, seed: int, cache_dir: str | None, rank: int = 0,
                 world_size: int = 1, skip_bad: bool = False, progress: bool = True,
                 gpu_augment: bool | None = None) -> Loader:
    """A Loader over (path, label) samples; decodes every image once (the cache).

    train=True: a fresh permutation per epoch (same on every rank, rank r takes every
    world_size-th sample), augmentation `augment` for `recipe`, a last batch of 1 dropped;
    `none` and `flip` train on the evaluation framing (flip: mirrored with probability FLIP_P).
    train=False: evaluation preprocessing, every sample exactly once across the ranks.
    gpu_augment: None = batched tensor augmentation when device is CUDA, PIL on the CPU
    otherwise; True/False force a path (tests run the tensor path on the CPU).
    """
    device = torch.device(device)
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
    aug = train_recipe(augment, recipe) if train else None
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
                  gpu_augment=device.type == "cuda" if gpu_augment is None else gpu_augment,
                  cache_path=cache_path, cache_build_s=build_s, long_side=geo.get("long", 0),
                  flip_p=FLIP_P if train and augment == "flip" else 0.0)
