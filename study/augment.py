"""Training augmentation: the policies, each epoch's random parameters, and their rendering on cached
uint8 images, by PIL per image (render_pil, in the loader workers) or by batched tensor ops on any
device (render_torch). An epoch's parameters are drawn at once with numpy, with torchvision's
distributions, and folded into 3x3 geometric matrices and one colour matrix + offset per image
(plan_arrays). Sources are images of decode_cache.py's train cache (portrait images stored transposed).

Batch augmentation, on normalised batches in the training loop (batch_augment): TrivialAugmentWide or
RandAugment and random erasing per image, torchvision's MixUp / CutMix on the batch and its labels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# =============================================================================================
# policies: an augmentation policy is a dict of _policy's fields; SEED_POLICIES are named by the
# original script they reproduce (nets.ARCHS' seed_policy)
# =============================================================================================
AUGMENTS = ("seed", "light", "flip", "none")
GRAY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601-2 luma, as PIL's convert("L") and torchvision


def _policy(**changes) -> dict:
    """One augmentation policy as plain data; unnamed fields mean 'not applied'."""
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
        raise ValueError(f"unknown policy fields {sorted(unknown)}")
    return {**base, **changes}


# The original scripts' train transforms (verbatim in bench/original.py), each after Resize(resize).
SEED_POLICIES: dict[str, dict] = {
    "resnet18": _policy(scale=(0.7, 1.0), flip=0.5, degrees=15.0, brightness=0.2, contrast=0.2,
                        saturation=0.2, hue=0.1, grayscale=0.1),
    "resnet50": _policy(scale=(0.8, 1.0), flip=0.5, degrees=10.0, brightness=0.05,
                        contrast=0.05, saturation=0.05),
    "resnet101": _policy(scale=(0.08, 1.0), flip=0.5, brightness=0.2, contrast=0.2),
    # scale above 1 is kept: the crop sampler rejects boxes larger than the image, as torchvision
    "efficientnet_b4": _policy(scale=(0.6, 1.4), flip=0.5, degrees=20.0, brightness=0.2,
                               contrast=0.2, saturation=0.2, hue=0.1, blur_sigma=(0.1, 2.0),
                               perspective=0.2, perspective_p=0.5),
}
SEED_POLICIES["efficientnet_lite0"] = dict(SEED_POLICIES["resnet18"])   # no original: resnet18's
LIGHT_POLICY = _policy(scale=(0.08, 1.0), flip=0.5)   # torchvision references' train preset
# --augment flip: the evaluation framing (served from the eval cache), mirrored left-right with
# this probability: the mildest augmentation, framing and scale kept.
FLIP_P = 0.5


def train_policy(augment: str, seed_policy: str, crop_scale: float | None = None) -> dict | None:
    """The augmentation policy (dict) for --augment `augment` of an architecture whose original
    script is `seed_policy` (nets.ARCHS, a SEED_POLICIES name); None for 'none' and 'flip'
    (evaluation preprocessing; 'flip' mirrors it, see FLIP_P). crop_scale: the crop's lower area
    bound in place of the policy's (--crop-scale)."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
    if seed_policy not in SEED_POLICIES:
        raise ValueError(f"unknown seed policy {seed_policy!r}; choose from {', '.join(SEED_POLICIES)}")
    policy = {"seed": SEED_POLICIES[seed_policy], "light": LIGHT_POLICY, "flip": None, "none": None}[augment]
    if policy is not None and crop_scale is not None:
        policy = dict(policy, scale=(crop_scale, policy["scale"][1]))
    return policy


# =============================================================================================
# random parameters of an epoch (numpy, vectorised; shared by both renderers)
# =============================================================================================
def draw_params(policy: dict, sizes: np.ndarray, crop: int, rng: np.random.Generator) -> dict:
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
    target = area * rng.uniform(*policy["scale"], (n, 10))
    aspect = np.exp(rng.uniform(*np.log(policy["ratio"]), (n, 10)))
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = ok.argmax(1)
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], ok.any(1)
    lo, hi = min(policy["ratio"]), max(policy["ratio"])
    in_ratio = W / H
    fw = np.where(in_ratio < lo, W, np.where(in_ratio > hi, np.rint(H * hi), W))
    fh = np.where(in_ratio < lo, np.rint(W / lo), H)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    u, v = rng.random(n), rng.random(n)
    i = np.where(found, np.floor(u * (H - h + 1)), (H - h) // 2)
    j = np.where(found, np.floor(v * (W - w + 1)), (W - w) // 2)
    p = dict(box=np.stack([i, j, h, w], 1))
    p["flip"] = rng.random(n) < policy["flip"]
    p["angle"] = rng.uniform(-policy["degrees"], policy["degrees"], n)
    for name in ("brightness", "contrast", "saturation"):
        x = policy[name]
        p[name] = rng.uniform(max(0.0, 1 - x), 1 + x, n) if x else np.ones(n)
    p["hue"] = rng.uniform(-policy["hue"], policy["hue"], n) if policy["hue"] else np.zeros(n)
    p["order"] = np.argsort(rng.random((n, 4)), 1)          # a random permutation per sample
    p["gray"] = rng.random(n) < policy["grayscale"]
    sig = policy["blur_sigma"]
    p["sigma"] = rng.uniform(*sig, n) if sig else np.full(n, np.nan)
    # RandomPerspective.get_params on the crop x crop image
    p["persp"] = rng.random(n) < policy["perspective_p"]
    half = crop // 2
    b = int(policy["perspective"] * half) + 1
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
# CPU rendering: one image at a time on uint8, as torchvision's PIL transforms
# =============================================================================================
def blur_u8(img: np.ndarray, sigma: float) -> np.ndarray:
    """torchvision GaussianBlur(kernel_size=3, sigma) on a uint8 HWC image -> a new uint8 image: the
    3-tap [e, 1, e] / (1 + 2e), e = exp(-1 / (2 sigma^2)), as two separable passes in int16 fixed point
    (weights in 1/128, reflect padding), cheaper than PIL's BoxBlur or a float conv2d and within 1
    level of torchvision's float result. Below e ~ 1/255 the image comes back unchanged."""
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
    """Per-channel mean of an RGB image, 0..255, from the histogram of its 4x4 block means (PIL reduce(4):
    within ~0.5 level of the exact mean, and torchvision's PIL contrast rounds its mean to a whole level)."""
    small = im.reduce(4) if min(im.size) >= 8 else im
    hist = np.asarray(small.histogram(), np.float64).reshape(3, 256)
    return hist @ np.arange(256) / (small.size[0] * small.size[1])


def _resize_box(src: np.ndarray, box: tuple, crop: int) -> Image.Image:
    """The box (x0, y0, x1, y1), storage px, of a cached HWC uint8 image, resized to crop x crop, antialiased
    bilinear (RandomResizedCrop's resized_crop). Whole-pixel boxes take torch's uint8 AVX2 kernel (within 1
    level of PIL's resize, and faster); fractional ones (images squashed into the canvas) PIL's resize."""
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
    """One augmented image on uint8, in torchvision's order -> HWC uint8 crop x crop: the crop box resized
    (_resize_box); flip + rotation as one NEAREST affine transform, zero fill; ColorJitter + RandomGrayscale
    as one PIL convert(matrix), M x + K mean(x), which rounds and clips as each PIL jitter op does; the
    3-tap blur; RandomPerspective as a NEAREST homography (the original's BILINEAR costs far more in PIL)."""
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


# =============================================================================================
# tensor rendering: batched tensor ops on any device, the same parameters
# =============================================================================================
def _pixel_grid(crop: int, device: torch.device) -> torch.Tensor:
    """[crop*crop, 3] homogeneous output pixel centres (x + 0.5, y + 0.5, 1)."""
    r = torch.arange(crop, device=device, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), torch.ones_like(x).reshape(-1)], 1)


def pack_plan(plan: dict, idx: np.ndarray) -> torch.Tensor:
    """The plan's entries idx (a batch) as one float32 [b, 47] tensor: a single host->device copy."""
    parts = [plan[k][idx].reshape(-1, 9) for k in ("P", "R", "S", "M", "K")] + \
            [plan["sigma"][idx, None], plan["persp"][idx, None]]
    return torch.from_numpy(np.concatenate(parts, 1).astype(np.float32))


def render_torch(src: torch.Tensor, packed: torch.Tensor, *, crop: int, mean: torch.Tensor, std: torch.Tensor,
                 blur: bool) -> torch.Tensor:
    """Augment a uint8 [B,H,W,3] batch on its device with its plan entries `packed` (pack_plan) -> float32
    [B,3,crop,crop], (x / 255 - mean) / std. No per-image Python and no host sync: `blur` (any sample
    blurred) comes from the caller, and mean, std are float32 tensors already on the device."""
    B, Hs, Ws, _ = src.shape
    dev = src.device
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
    x_mean = x.mean((2, 3))                                         # [B, 3] for contrast
    if blur:   # GaussianBlur(3): separable, reflect padding as torchvision, per sample
        t = torch.arange(-1, 2, device=dev, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma.nan_to_num(0.1)[:, None]) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)    # [B*3, 3]
        y = F.pad(x.reshape(1, B * 3, crop, crop), (1, 1, 1, 1), mode="reflect")
        y = F.conv2d(y, k.view(B * 3, 1, 1, 3), groups=B * 3)
        y = F.conv2d(y, k.view(B * 3, 1, 3, 1), groups=B * 3).view(B, 3, crop, crop)
        x = torch.where(torch.isnan(sigma).view(B, 1, 1, 1), x, y)
    # colour matrix, offset and normalisation folded: out = D (M x + K mean) / 255 - D mu
    inv = 1 / torch.as_tensor(std, device=dev)
    mu = torch.as_tensor(mean, device=dev)
    A = inv[None, :, None] * M / 255
    bias = inv * ((x_mean[:, None, :] * K).sum(-1) / 255 - mu)     # [B, 3]
    out = torch.baddbmm(bias[:, :, None], A, x.reshape(B, 3, -1)).view(B, 3, crop, crop)
    lo, hi = (-mu * inv).view(1, 3, 1, 1), ((1 - mu) * inv).view(1, 3, 1, 1)
    out = torch.maximum(torch.minimum(out, hi), lo)               # ToTensor's [0, 1] range
    return torch.where(keep | ~persp.view(B, 1, 1, 1), out, lo)


# =============================================================================================
# batch augmentation: normalised [B,3,H,W] batches in the training loop
# =============================================================================================
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)   # RandomErasing's defaults: area share, aspect h/w


def erase_params(n: int, h: int, w: int, p: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """RandomErasing.make_params for n images at once -> long [n, 4] = (i, j, eh, ew) boxes, px;
    eh = 0 where an image is not erased (probability 1 - p, or no box fitted in 10 attempts, as
    torchvision)."""
    g = dict(generator=generator, device=device)
    target = h * w * torch.empty(n, 10, device=device).uniform_(*ERASE_SCALE, generator=generator)
    log_r = torch.log(torch.tensor(ERASE_RATIO))
    aspect = torch.exp(torch.empty(n, 10, device=device).uniform_(float(log_r[0]), float(log_r[1]),
                                                                  generator=generator))
    eh = torch.round(torch.sqrt(target * aspect)).long()
    ew = torch.round(torch.sqrt(target / aspect)).long()
    ok = (eh < h) & (ew < w)
    first = ok.int().argmax(1)
    rows = torch.arange(n, device=device)
    eh, ew = eh[rows, first], ew[rows, first]
    u, v = torch.rand(n, **g), torch.rand(n, **g)
    i = torch.floor(u * (h - eh + 1)).long()
    j = torch.floor(v * (w - ew + 1)).long()
    on = (torch.rand(n, **g) < p) & ok.any(1)
    return torch.stack([i, j, eh * on, ew * on], 1)


def erase_batch(x: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """torchvision's erase(img, i, j, h, w, v=value) on every image of [B,C,H,W] x at once, each with
    its own box (erase_params) -> a new tensor. 0 on a normalised batch is the data set's mean colour."""
    B, _, H, W = x.shape
    i, j, eh, ew = (boxes[:, k].view(B, 1, 1) for k in range(4))
    r = torch.arange(H, device=x.device).view(1, H, 1)
    c = torch.arange(W, device=x.device).view(1, 1, W)
    inside = (r >= i) & (r < i + eh) & (c >= j) & (c < j + ew)     # [B, H, W]
    return x.masked_fill(inside[:, None], value)


AUTO_AUGMENTS = ("none", "trivial", "rand")   # --auto-augment


def auto_augment_batch(x: torch.Tensor, op, mean, std) -> torch.Tensor:
    """op (a transform of one [3,H,W] image in [0, 1]) on each image of the normalised [B,3,H,W] x:
    normalisation undone, one call per image (each draws its own op and magnitude from torch's
    global generator, in batch order), normalisation redone. -> a new tensor in x's memory format."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)   # no copy when already there
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    u = (x * s + m).clamp_(0, 1)   # [0, 1] as the library expects; undoes only float rounding
    out = torch.empty_like(x)
    for k in range(len(x)):
        out[k] = op(u[k])
    return out.sub_(m).div_(s)


def batch_augment(erasing: float, mixup: float, cutmix: float, num_classes: int, auto_augment: str = "none",
                  mean=None, std=None):
    """The training loop's batch step for --auto-augment, --erasing p, --mixup alpha, --cutmix alpha (0/none
    = off), in that order (torchvision's reference scripts) -> callable (x, y) -> (x, target), or None when
    all are off. target: y, or class probabilities [B, num_classes] under MixUp/CutMix (with both, one of
    the two per batch). mean, std: the batches' normalisation. Draws from torch's global generator."""
    from torchvision.transforms import v2

    if auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"unknown auto augment {auto_augment!r}; choose from {', '.join(AUTO_AUGMENTS)}")
    # the library's transforms at their default magnitudes: TrivialAugmentWide (one op, random magnitude),
    # RandAugment (2 ops, magnitude 9)
    op = {"trivial": v2.TrivialAugmentWide, "rand": v2.RandAugment}[auto_augment]() if auto_augment != "none" else None
    mixes = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
            ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
    mix = None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
    if not (op or erasing or mix):
        return None

    consts = {}   # the normalisation on each (device, dtype), copied there once: no host copy per batch

    def step(x, y):
        if op is not None:
            key = (x.device, x.dtype)
            if key not in consts:
                consts[key] = tuple(torch.tensor(v, dtype=x.dtype, device=x.device) for v in (mean, std))
            x = auto_augment_batch(x, op, *consts[key])
        if erasing:
            x = erase_batch(x, erase_params(len(x), x.shape[2], x.shape[3], erasing, device=x.device))
        if mix is not None:
            x, y = mix(x, y)
        return x, y

    return step
