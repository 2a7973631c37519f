"""The training input path (pipeline.py, augment.py, decode_cache.py): augmentation statistics
recovered from rendered images, evaluation preprocessing against torchvision, determinism, DDP
sharding, the resident copy of the cache, the decode cache, bad files. Small images and
workers=0 keep it to a few seconds of CPU.

Geometry is recovered from "coordinate images": R and G encode each pixel's x and y as a
fraction of the image size, B = 255 marks real content (rotation fills 0). A least-squares
affine fit from output pixels to decoded source pixels gives the crop box, flip and angle.
"""
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from study import augment as A
from study import pipeline as P

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CPU = torch.device("cpu")
PATHS = {"cpu": False, "tensor": True}   # on_device forced: PIL path, batched on-device path


def coord_image(w, h):
    x = (np.arange(w) + 0.5) / w
    y = (np.arange(h) + 0.5) / h
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.rint(255 * x)[None, :]
    img[..., 1] = np.rint(255 * y)[:, None]
    img[..., 2] = 255
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def coord_samples(tmp_path_factory):
    """Landscape, portrait (stored transposed) and very wide (stored squashed) images."""
    root = tmp_path_factory.mktemp("coords")
    sizes = [(120, 80), (80, 120), (96, 96), (200, 70), (150, 100), (90, 130)]
    out = []
    for i, (w, h) in enumerate(sizes):
        path = root / f"c{i}.png"
        coord_image(w, h).save(path)
        out.append((str(path), i))
    return out


@pytest.fixture
def cache(tmp_path):
    """A decode cache folder of the test's own."""
    return str(tmp_path / "cache")


def fit_geometry(x, pre, size_hw):
    """Recover (area fraction, aspect w/h, flip, angle deg) from a rendered coordinate image.

    x: normalised [3, crop, crop]; size_hw: (h0, w0) of the Resize(resize) image.
    """
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    img = (x * std + mean).numpy()
    crop = img.shape[-1]
    valid = img[2] > 0.98
    # drop the border and the pixels next to the fill, where interpolation mixes in black
    inner = valid.copy()
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        inner &= np.roll(valid, (dy, dx), (0, 1))
    inner[:2], inner[-2:], inner[:, :2], inner[:, -2:] = False, False, False, False
    v, u = np.nonzero(inner)
    h0, w0 = size_hw
    sx, sy = img[0][v, u] * w0, img[1][v, u] * h0            # source px, resized frame
    A = np.stack([u + 0.5, v + 0.5, np.ones_like(u, dtype=float)], 1)
    cx, *_ = np.linalg.lstsq(A, sx, rcond=None)
    cy, *_ = np.linalg.lstsq(A, sy, rcond=None)
    lin = np.array([cx[:2], cy[:2]])                          # output px -> source px
    w, h = crop * np.linalg.norm(lin[0]), crop * np.linalg.norm(lin[1])
    rot = np.diag([crop / w, crop / h]) @ lin                 # = Flip @ Rot, flip optional
    flip = np.linalg.det(lin) < 0
    if flip:
        rot = np.diag([-1, 1]) @ rot
    # the map is PIL's inverse rotation: [[cos a, sin a], [-sin a, cos a]], a = -angle
    angle = -math.degrees(math.atan2(rot[0, 1], rot[0, 0]))
    return w * h / (w0 * h0), w / h, flip, angle


# --------------------------------------------------------------------------------------------
# augmentation statistics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_geometry_matches_drawn_parameters(coord_samples, path, monkeypatch, cache):
    """The loader's batches, by either renderer, realise the crop box, flip and rotation drawn
    from (seed, epoch, rank) with the seed resnet18 ranges."""
    pre = P.Preprocess(crop=40, resize=48, **IMAGENET)
    # colour off so R/G still encode coordinates; the geometry of the resnet18 seed policy
    policy = dict(A.SEED_POLICIES["resnet18"], brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale=0.0)
    monkeypatch.setitem(A.SEED_POLICIES, "resnet18", policy)
    samples = [(p, k) for k, (p, _) in enumerate(coord_samples * 16)]   # 96 samples, label = index
    loader = P.build_loader(samples, train=True, preprocess=pre, augment="seed", seed_policy="resnet18",
                            batch_size=32, workers=0, device=CPU, seed=3, cache_dir=cache, progress=False,
                            on_device=PATHS[path])
    x, y = (torch.cat(t) for t in zip(*loader))
    order = np.concatenate(loader.batch_indices())
    assert y.tolist() == order.tolist() and len(order) == 96
    sizes = loader.sizes[order]
    p = A.draw_params(policy, sizes, pre.crop, np.random.default_rng([3, 0, 0, 1]))   # epoch 0, rank 0
    got = np.array([fit_geometry(x[k], pre, sizes[k]) for k in range(len(order))])
    area, aspect, flip, angle = got.T
    i, j, h, w = p["box"].T
    drawn_area = h * w / (sizes[:, 0] * sizes[:, 1])
    assert np.array_equal(flip.astype(bool), p["flip"])
    assert np.abs(angle - p["angle"]).max() < 2.0                      # degrees
    assert np.abs(area / drawn_area - 1).max() < 0.08
    assert np.abs(aspect / (w / h) - 1).max() < 0.08
    # and the drawn parameters follow the policy
    assert 0.35 < p["flip"].mean() < 0.65
    assert np.abs(p["angle"]).max() <= 15 and np.abs(p["angle"]).max() > 12
    aspect0 = sizes[:, 1] / sizes[:, 0]
    fits = aspect0 < 2    # 0.7 of a 200x70 image cannot have an aspect <= 4/3 ...
    assert drawn_area[fits].min() > 0.7 - 0.02 and drawn_area.max() <= 1.0 + 1e-9
    # ... so torchvision falls back to the central 4/3 crop of full height
    assert np.allclose(drawn_area[~fits], (4 / 3) / aspect0[~fits], rtol=0.03)


@pytest.mark.parametrize("path", PATHS)
def test_light_augment_statistics_through_loader(coord_samples, path, cache):
    """Public API, augment=light: flip rate ~0.5, area in [0.08, 1], aspect in [3/4, 4/3]."""
    pre = P.Preprocess(crop=40, resize=48, **IMAGENET)
    loader = P.build_loader(coord_samples, train=True, preprocess=pre, augment="light",
                            seed_policy="resnet18", batch_size=6, workers=0, device=CPU, seed=1,
                            cache_dir=cache, progress=False, on_device=PATHS[path])
    sizes = dict(enumerate(loader.sizes))   # label = sample index
    fits = []
    for epoch in range(30):
        loader.set_epoch(epoch)
        for x, y in loader:
            assert x.shape == (6, 3, 40, 40) and x.dtype == torch.float32
            assert y.dtype == torch.int64
            fits += [fit_geometry(x[k], pre, sizes[int(y[k])]) for k in range(len(y))]
    area, aspect, flip, angle = np.array(fits).T
    assert len(fits) == 180
    assert 0.38 < flip.mean() < 0.62
    assert area.min() > 0.08 * 0.9 and area.max() < 1.05 and area.min() < 0.3
    assert aspect.min() > 0.75 * 0.93 and aspect.max() < 4 / 3 * 1.07
    assert np.abs(angle).max() < 2.0   # light has no rotation


def test_crop_scale_draws_areas_as_torchvisions_random_resized_crop(coord_samples, cache):
    """--crop-scale 0.5 with augment=light: the loader's crops keep 50-100 % of the image's area, drawn as
    torchvision's RandomResizedCrop.get_params(scale=(0.5, 1)) draws them on images of the same sizes."""
    from torchvision import transforms

    pre = P.Preprocess(crop=40, resize=48, **IMAGENET)
    assert A.train_policy("light", "resnet18", 0.5)["scale"] == (0.5, 1.0)
    assert A.train_policy("seed", "efficientnet_b4", 0.3)["scale"] == (0.3, 1.4)  # the upper bound stays
    loader = P.build_loader(coord_samples, train=True, preprocess=pre, augment="light", seed_policy="resnet18",
                            batch_size=6, workers=0, device=CPU, seed=1, cache_dir=cache, progress=False,
                            on_device=False, crop_scale=0.5)
    sizes = dict(enumerate(loader.sizes))
    ours = []
    for epoch in range(40):
        loader.set_epoch(epoch)
        ours += [fit_geometry(x[k], pre, sizes[int(y[k])])[0] for x, y in loader for k in range(len(y))]
    torch.manual_seed(0)
    theirs = []
    for _ in range(40):
        for h, w in loader.sizes:
            i, j, ch, cw = transforms.RandomResizedCrop.get_params(torch.empty(1, int(h), int(w)), [0.5, 1.0],
                                                                   [3 / 4, 4 / 3])
            theirs.append(ch * cw / (h * w))
    ours, theirs = np.array(ours), np.array(theirs)
    assert ours.min() > 0.5 * 0.92 and ours.min() < 0.6 and ours.max() < 1.05
    assert abs(np.median(ours) - np.median(theirs)) < 0.05 and abs(ours.mean() - theirs.mean()) < 0.04


def colour_samples(real_split):
    """real_split train images that are in colour (gray sources stay gray under jitter)."""
    out = []
    for path in sorted((real_split / "train").glob("*/*.jpg")):
        a = np.asarray(Image.open(path).convert("RGB"), np.int16)
        if np.abs(a[..., 0] - a[..., 1]).max() > 8:
            out.append((str(path), len(out)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_grayscale_rate_and_normalisation(real_split, path, cache):
    """resnet18 seed: ~10 % of outputs have equal channels; values inside Normalize's range."""
    samples = colour_samples(real_split)
    pre = P.Preprocess(crop=24, resize=28, **IMAGENET)
    loader = P.build_loader(samples, train=True, preprocess=pre, augment="seed",
                            seed_policy="resnet18", batch_size=64, workers=0, device=CPU, seed=0,
                            cache_dir=cache, progress=False, on_device=PATHS[path])
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    gray, n = 0, 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, _ in loader:
            rgb = x * std + mean
            assert rgb.min() > -1e-5 and rgb.max() < 1 + 1e-5     # clipped like ToTensor
            spread = (rgb.amax(1) - rgb.amin(1)).flatten(1).amax(1)
            gray += int((spread < 1e-4).sum())
            n += len(x)
    assert n > 900
    assert 0.06 < gray / n < 0.14, gray / n


def test_on_device_agrees_with_pil_path(real_split, tmp_path):
    """One seed, the loader's two paths: the same images up to interpolation (B4 policy incl.
    blur, perspective and hue)."""
    samples = colour_samples(real_split)[:32]
    pre = P.Preprocess(crop=32, resize=36, **IMAGENET)
    for name in ("resnet18", "efficientnet_b4"):
        a, b = (torch.cat([x for x, _ in P.build_loader(
            samples, train=True, preprocess=pre, augment="seed", seed_policy=name, batch_size=32, workers=0,
            device=CPU, seed=5, cache_dir=str(tmp_path), progress=False, on_device=on_device)])
            for on_device in (False, True))
        per_image = (a - b).abs().mean((1, 2, 3))
        # what the two renderers agree on (no antialiasing on the GPU, bilinear against nearest, blur
        # order): a mean of 0.08-0.10 and a worst image under 0.2 over seeds; a wrong crop or flip is far above
        assert per_image.max() < 0.21 and per_image.mean() < 0.10, (name, per_image.max(), per_image.mean())


def test_seed_policys_are_the_original_transforms():
    """augment.SEED_POLICIES names the same ranges and probabilities as the original scripts'
    torchvision transforms that the benches run (bench/original.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import original
    for name, r in A.SEED_POLICIES.items():
        steps = {type(t).__name__: t for t in original.train_transform(name).transforms}
        crop = steps["RandomResizedCrop"]
        assert (tuple(crop.scale), tuple(crop.ratio)) == (r["scale"], r["ratio"]), name
        assert steps["RandomHorizontalFlip"].p == r["flip"]
        rot = steps.get("RandomRotation")
        assert (list(rot.degrees) if rot else [0.0, 0.0]) == [-r["degrees"], r["degrees"]], name
        jitter = steps["ColorJitter"]
        for k in ("brightness", "contrast", "saturation"):
            x = r[k]
            assert getattr(jitter, k) == ((max(0.0, 1 - x), 1 + x) if x else None), (name, k)
        assert jitter.hue == ((-r["hue"], r["hue"]) if r["hue"] else None), name
        gray = steps.get("RandomGrayscale")
        assert (gray.p if gray else 0.0) == r["grayscale"], name
        blur = steps.get("GaussianBlur")
        assert (tuple(blur.sigma) if blur else None) == r["blur_sigma"], name
        persp = steps.get("RandomPerspective")
        assert ((persp.distortion_scale, persp.p) if persp else (0.0, 0.0)) == \
            (r["perspective"], r["perspective_p"]), name


def test_colour_matrices_follow_jitter_semantics():
    n = 4
    p = dict(brightness=np.array([1.2, 1.0, 1.0, 1.0]), contrast=np.array([1.0, 0.5, 1.0, 1.0]),
             saturation=np.array([1.0, 1.0, 0.0, 1.0]), hue=np.array([0, 0, 0, 0.25]),
             order=np.tile(np.arange(4), (n, 1)), gray=np.zeros(n, bool))
    M, K = A.colour_matrices(p)
    x, mu = np.array([200.0, 100.0, 50.0]), np.array([80.0, 60.0, 40.0])
    out = M @ x + K @ mu
    w = np.array(A.GRAY_WEIGHTS)
    assert np.allclose(out[0], 1.2 * x)                                   # brightness
    assert np.allclose(out[1], 0.5 * x + 0.5 * (w @ mu))                  # contrast to mean gray
    assert np.allclose(out[2], w @ x)                                     # saturation 0 = gray
    assert np.allclose(out[3].sum(), x.sum()) and out[3][1] > x[1]       # hue turns red to green
    assert np.allclose(M[3] @ np.ones(3), np.ones(3))                     # gray axis is fixed


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0, 2.0])
def test_uint8_blur_matches_torchvision_gaussian_blur(real_split, sigma):
    """The CPU path's int16 fixed-point blur: within 1 level of torchvision's GaussianBlur(3)
    (reflect padding, float, one rounding), borders included; sigma 0.2 leaves the image."""
    import torchvision.transforms.functional as TF
    path = sorted((real_split / "train").glob("*/*.jpg"))[3]
    img = Image.open(path).convert("RGB")
    a = np.asarray(img)
    ref = np.asarray(TF.gaussian_blur(img, 3, [sigma, sigma])).astype(int)
    got = A.blur_u8(a, sigma).astype(int)
    assert got.shape == a.shape
    assert np.abs(got - ref).max() <= 1, (sigma, np.abs(got - ref).max())
    if sigma < 0.25:
        assert np.array_equal(got, a)
    else:
        assert np.abs(got - a).mean() > 1.0          # it does blur


def test_pil_path_colour_matches_torchvision_jitter(real_split):
    """Identity geometry, brightness/contrast/saturation in drawn orders and grayscale: the
    uint8 colour matrix reproduces torchvision's sequential PIL ops up to their roundings
    (torchvision truncates and clips after every op, we round and clip once)."""
    import torchvision.transforms.functional as TF
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    paths = [p for p, _ in colour_samples(real_split)[:12]]
    srcs = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:40, :40]) for p in paths]
    n, crop = len(srcs), 40
    sizes = np.full((n, 2), crop)
    policy = A._policy(scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.3, contrast=0.3,
                       saturation=0.3, grayscale=0.3)
    p = A.draw_params(policy, sizes, crop, np.random.default_rng(11))
    assert p["gray"].any() and not p["gray"].all()
    assert (p["box"] == [0, 0, crop, crop]).all() and not p["flip"].any()
    plan = A.plan_arrays(p, sizes, crop, crop)
    diffs = []
    for k in range(n):
        got = A.render_pil(srcs[k], plan, k, crop).astype(int)
        ref = Image.fromarray(srcs[k])
        for op in p["order"][k]:
            if op < 3:   # hue (3) is 0 in this policy
                ref = ops[op](ref, float(p[("brightness", "contrast", "saturation")[op]][k]))
        if p["gray"][k]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        diff = np.abs(got - np.asarray(ref).astype(int))
        assert np.median(diff) <= 2, (k, np.median(diff))    # a level or two of rounding
        diffs.append(diff.mean())
        if p["gray"][k]:
            assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
    # PIL's blends truncate (about -0.5 level per op) and clip between ops, which we do not
    assert np.mean(diffs) < 2.5, diffs


def test_cpu_batches_are_channels_last_float32():
    """The consumer's normalisation hands NCHW float32 in channels_last memory (no copy in
    the loop's .to(channels_last)), equal to a plain per-channel (x / 255 - mean) / std."""
    u8 = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    pre = P.Preprocess(crop=5, resize=5, **IMAGENET)
    x = P.normalise_hwc(u8, P.normalise_constants(pre, 7, CPU))
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    ref = (u8.permute(0, 3, 1, 2).double() / 255 - mean.double()) / std.double()
    assert (x.double() - ref).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------
# evaluation preprocessing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_matches_torchvision(real_split, path, interpolation, cache):
    """Resize -> CenterCrop -> ToTensor -> Normalize: max abs diff <= 1e-4 (float rounding)."""
    files = sorted((real_split / "test").glob("*/*.jpg"))
    samples = [(str(f), i) for i, f in enumerate(files)]
    pre = P.Preprocess(crop=56, resize=64, interpolation=interpolation, **IMAGENET)
    mode = T.InterpolationMode(interpolation)
    ref_tf = T.Compose([T.Resize(64, interpolation=mode), T.CenterCrop(56), T.ToTensor(),
                        T.Normalize(**IMAGENET)])
    loader = P.build_loader(samples, train=False, preprocess=pre, augment="seed",
                            seed_policy="resnet18", batch_size=50, workers=0, device=CPU, seed=0,
                            cache_dir=cache, progress=False, on_device=PATHS[path])
    got = torch.cat([x for x, _ in loader])
    ys = torch.cat([y for _, y in loader])
    assert torch.equal(ys, torch.arange(len(files)))                      # given order
    ref = torch.stack([ref_tf(Image.open(f).convert("RGB")) for f in files])
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_squash_eval_is_the_whole_image_resized(real_split, path, tmp_path):
    """crop_mode squash: Resize((crop, crop)) -> ToTensor -> Normalize, within 1e-4; it shares the
    cache folder with center mode and never reads center's cache."""
    files = sorted((real_split / "test").glob("*/*.jpg"))[:30]
    samples = [(str(f), i) for i, f in enumerate(files)]
    got = {}
    for mode in ("center", "squash"):
        pre = P.Preprocess(crop=56, resize=64, crop_mode=mode, **IMAGENET)
        loader = P.build_loader(samples, train=False, preprocess=pre, augment="none", seed_policy="resnet18",
                                batch_size=50, workers=0, device=CPU, seed=0, cache_dir=str(tmp_path),
                                progress=False, on_device=PATHS[path])
        got[mode] = torch.cat([x for x, _ in loader])
    ref = torch.stack([T.Compose([T.Resize((56, 56)), T.ToTensor(), T.Normalize(**IMAGENET)])(
        Image.open(f).convert("RGB")) for f in files])
    assert (got["squash"] - ref).abs().max() <= 1e-4
    assert (got["center"] - ref).abs().amax(dim=(1, 2, 3)).min() > 0.5   # every image framed differently
    train = P.build_loader(samples, train=True, preprocess=P.Preprocess(crop=56, resize=64, crop_mode="squash",
                                                                        **IMAGENET),
                           augment="none", seed_policy="resnet18", batch_size=10, workers=0, device=CPU, seed=0,
                           cache_dir=str(tmp_path), progress=False, on_device=PATHS[path])
    for x, y in train:   # --augment none trains on the same framing
        assert (x - ref[y]).abs().max() <= 1e-4
    assert len(list(tmp_path.glob("eval-*.npy"))) == 2
    with pytest.raises(ValueError, match="unknown crop_mode 'border'; choose from center, squash"):
        P.build_loader(samples, train=False, preprocess=P.Preprocess(crop=56, resize=64, crop_mode="border",
                                                                     **IMAGENET),
                       augment="none", seed_policy="resnet18", batch_size=50, workers=0, device=CPU, seed=0,
                       cache_dir=str(tmp_path), progress=False)


def test_augment_none_is_eval_preprocessing_shuffled(real_split, cache):
    files = sorted((real_split / "test").glob("*/*.jpg"))[:40]
    samples = [(str(f), i) for i, f in enumerate(files)]
    pre = P.Preprocess(crop=56, resize=64, **IMAGENET)
    ref_tf = T.Compose([T.Resize(64), T.CenterCrop(56), T.ToTensor(), T.Normalize(**IMAGENET)])
    loader = P.build_loader(samples, train=True, preprocess=pre, augment="none",
                            seed_policy="resnet18", batch_size=16, workers=0, device=CPU, seed=0,
                            cache_dir=cache, progress=False)
    ys = []
    for x, y in loader:
        for k in range(len(y)):
            ref = ref_tf(Image.open(files[int(y[k])]).convert("RGB"))
            assert (x[k] - ref).abs().max() <= 1e-4
        ys += y.tolist()
    assert sorted(ys) == list(range(40)) and ys != list(range(40))


@pytest.mark.parametrize("path", PATHS)
def test_augment_flip_mirrors_the_eval_framing(real_split, path, tmp_path):
    """augment=flip: each training image is the eval crop or its left-right mirror, about half
    mirrored, drawn afresh each epoch and the same on a rebuilt loader; evaluation never flips."""
    files = sorted((real_split / "test").glob("*/*.jpg"))[:48]
    samples = [(str(f), i) for i, f in enumerate(files)]
    pre = P.Preprocess(crop=48, resize=56, crop_mode="squash", **IMAGENET)
    kw = dict(preprocess=pre, seed_policy="efficientnet_lite0", batch_size=16, workers=0, device=CPU,
              seed=3, cache_dir=str(tmp_path), progress=False, on_device=PATHS[path])
    ref = torch.cat([x for x, _ in P.build_loader(samples, train=False, augment="flip", **kw)])
    assert torch.equal(ref, torch.cat([x for x, _ in P.build_loader(samples, train=False, augment="none", **kw)]))
    assert ref.shape == (48, 3, 48, 48)

    def mirrored(loader, epoch):
        loader.set_epoch(epoch)
        out = {}
        for x, y in loader:
            for k, label in enumerate(y.tolist()):
                same, flip = torch.equal(x[k], ref[label]), torch.equal(x[k], ref[label].flip(2))
                assert same != flip   # exactly one: these photos are not mirror-symmetric
                out[label] = flip
        return out

    loader = P.build_loader(samples, train=True, augment="flip", **kw)
    e1, e2 = mirrored(loader, 1), mirrored(loader, 2)
    assert sorted(e1) == list(range(48))
    assert 12 <= sum(e1.values()) <= 36 and 12 <= sum(e2.values()) <= 36
    assert e1 != e2
    assert mirrored(P.build_loader(samples, train=True, augment="flip", **kw), 1) == e1
    assert len(list(tmp_path.glob("*.npy"))) == 1   # trains from the eval cache: no second decode


def test_grayscale_and_palette_files_become_rgb(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((30, 40), 100, np.uint8)).save(gray)
    pal = tmp_path / "p.png"
    Image.fromarray(np.full((30, 40, 3), (200, 10, 10), np.uint8)).convert(
        "P", palette=Image.ADAPTIVE).save(pal)
    pre = P.Preprocess(crop=16, resize=20, mean=(0, 0, 0), std=(1, 1, 1))
    loader = P.build_loader([(str(gray), 0), (str(pal), 1)], train=False, preprocess=pre,
                            augment="seed", seed_policy="resnet18", batch_size=2, workers=0,
                            device=CPU, seed=0, cache_dir=str(tmp_path), progress=False)
    x, _ = next(iter(loader))
    assert torch.allclose(x[0], torch.full((3, 16, 16), 100 / 255))
    assert torch.allclose(x[1, :, 8, 8], torch.tensor([200, 10, 10]) / 255, atol=0.02)


# --------------------------------------------------------------------------------------------
# determinism and sharding
# --------------------------------------------------------------------------------------------
def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("path", PATHS)
def test_same_seed_and_epoch_give_identical_batches(real_split, path, cache):
    samples = colour_samples(real_split)[:40]
    pre = P.Preprocess(crop=24, resize=28, **IMAGENET)

    def make(workers):
        return P.build_loader(samples, train=True, preprocess=pre, augment="seed",
                              seed_policy="efficientnet_b4", batch_size=8, workers=workers,
                              device=CPU, seed=7, cache_dir=cache, progress=False,
                              on_device=PATHS[path])
    a, b = make(0), make(2 if path == "cpu" else 0)   # worker processes change nothing
    first, again, other = epoch_batches(a, 3), epoch_batches(b, 3), epoch_batches(a, 4)
    assert len(first) == 5
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in other]))
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other]))


def test_train_shards_are_disjoint_equal_and_share_one_permutation(coord_samples, cache):
    samples = [(p, i) for i, (p, _) in enumerate(coord_samples * 4)]   # 24 samples
    pre = P.Preprocess(crop=16, resize=20, **IMAGENET)
    world = 3
    loaders = [P.build_loader(samples, train=True, preprocess=pre, augment="light",
                              seed_policy="resnet18", batch_size=4, workers=0, device=CPU, seed=2,
                              cache_dir=cache, rank=r, world=world, progress=False)
               for r in range(world)]
    shards = {}
    for epoch in (0, 1):
        seen = []
        for loader in loaders:
            ys = torch.cat([y for _, y in epoch_batches(loader, epoch)]).tolist()
            assert len(ys) == loader.num_samples == 8 and len(loader) == 2
            seen.append(ys)
        assert sorted(sum(seen, [])) == list(range(24))                 # disjoint, covering
        perm = np.random.default_rng([2, epoch]).permutation(24)
        assert seen == [perm[r::3].tolist() for r in range(3)]          # DistributedSampler
        shards[epoch] = seen
    assert shards[0] != shards[1]


def test_last_batch_of_one_is_dropped_in_training(coord_samples, cache):
    samples = [(p, i) for i, (p, _) in enumerate(coord_samples + coord_samples[:3])]   # 9
    pre = P.Preprocess(crop=16, resize=20, **IMAGENET)
    loader = P.build_loader(samples, train=True, preprocess=pre, augment="light",
                            seed_policy="resnet18", batch_size=4, workers=0, device=CPU, seed=0,
                            cache_dir=cache, progress=False)
    sizes = [len(y) for _, y in loader]
    assert sizes == [4, 4] and loader.num_samples == 8 and len(loader) == 2


def test_eval_shards_cover_every_sample_once(coord_samples, cache):
    samples = [(p, i) for i, (p, _) in enumerate(coord_samples + coord_samples[:1])]   # 7
    pre = P.Preprocess(crop=16, resize=20, **IMAGENET)
    seen = []
    for r in range(3):
        loader = P.build_loader(samples, train=False, preprocess=pre, augment="seed",
                                seed_policy="resnet18", batch_size=2, workers=0, device=CPU,
                                seed=0, cache_dir=cache, rank=r, world=3, progress=False)
        ys = [int(v) for _, y in loader for v in y]
        assert len(ys) == loader.num_samples
        seen += ys
    assert sorted(seen) == list(range(7))


# --------------------------------------------------------------------------------------------
# resident cache: the same batches as streaming
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train,augment,seed_policy", [(True, "light", "resnet18"),
                                                       (True, "seed", "efficientnet_b4"),
                                                       (True, "flip", "resnet18"),
                                                       (False, "none", "resnet18")])
def test_resident_cache_gives_the_streamed_batches(real_split, tmp_path, train, augment, seed_policy):
    """make_resident() (the whole uint8 cache one tensor on the device, here the CPU) serves
    bit-identical fp32 batches to the streamed on-device path, epoch after epoch, and so does the
    same loader after release() and after make_resident() again, both idempotent. A bad first
    file shifts every sample's cache row."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    samples = [(str(bad), 0)] + colour_samples(real_split)[:20]
    pre = P.Preprocess(crop=24, resize=28, **IMAGENET)
    kw = dict(train=train, preprocess=pre, augment=augment, seed_policy=seed_policy, batch_size=8, workers=0,
              device=CPU, seed=5, cache_dir=str(tmp_path / "cache"), progress=False, skip_bad=True,
              on_device=True)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        streamed = P.build_loader(samples, **kw)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        resident = P.build_loader(samples, **kw)
    assert not resident.resident
    resident.make_resident()
    assert resident.resident and not streamed.resident
    stored = (28, 42) if train and augment in ("light", "seed") else (24, 24)   # train canvas, eval crop
    assert resident.cache_bytes == streamed.cache_bytes == len(samples) * stored[0] * stored[1] * 3

    def same(epochs):
        for epoch in epochs:
            a, b = epoch_batches(streamed, epoch), epoch_batches(resident, epoch)
            assert len(a) == len(b) == len(streamed)
            for (x1, y1), (x2, y2) in zip(a, b):
                assert x1.dtype == x2.dtype == torch.float32
                assert torch.equal(x1, x2) and torch.equal(y1, y2)
    same((0, 1))
    resident.release()
    assert not resident.resident
    resident.release()                               # idempotent
    assert not resident.resident
    same((1, 0))
    resident.make_resident()
    resident.make_resident()                         # idempotent
    assert resident.resident
    same((2,))


def test_resident_needs_the_on_device_path(coord_samples, cache):
    pre = P.Preprocess(crop=16, resize=20, **IMAGENET)
    kw = dict(train=True, preprocess=pre, augment="light", seed_policy="resnet18", batch_size=4, workers=0,
              device=CPU, seed=0, cache_dir=cache, progress=False)
    for on_device in (False, None):                # None: the on-device path on CUDA only
        streamed = P.build_loader(coord_samples, on_device=on_device, **kw)
        with pytest.raises(ValueError, match=r"make_resident\(\) \(.*\) needs the on-device path: "
                                             r"build the loader with on_device=True"):
            streamed.make_resident()
        assert not streamed.resident and streamed.cache_bytes > 0


# --------------------------------------------------------------------------------------------
# cache and bad files
# --------------------------------------------------------------------------------------------
def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(3):
        path = folder / f"{i}.png"
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    samples = [(p, i) for i, p in enumerate(paths)]
    pre = P.Preprocess(crop=16, resize=20, mean=(0, 0, 0), std=(1, 1, 1))
    cache = tmp_path / "cache"

    def make():
        return P.build_loader(samples, train=False, preprocess=pre, augment="seed",
                              seed_policy="resnet18", batch_size=3, workers=0, device=CPU, seed=0,
                              cache_dir=str(cache), progress=True)
    make()
    assert "cache built in" in capsys.readouterr().out
    (first_file,) = cache.glob("*.npy")
    second = make()
    out = capsys.readouterr().out
    assert "cache built" not in out and f"cache reused: {first_file}" in out
    assert [x for x, _ in second][0][2].mean().item() == pytest.approx(80 / 255, abs=1e-6)
    Image.fromarray(np.full((20, 30, 3), 250, np.uint8)).save(paths[2])   # rewrite one image
    os.utime(paths[2], ns=(os.stat(paths[2]).st_atime_ns, os.stat(paths[2]).st_mtime_ns + 10**9))
    third = make()
    assert "cache built in" in capsys.readouterr().out
    x = next(iter(third))[0]
    assert x[2].mean().item() == pytest.approx(250 / 255, abs=1e-6)      # new content
    assert x[0].mean().item() == pytest.approx(0.0, abs=1e-6)
    # a new file, the old one kept (caches coexist), each with its metadata, and no temporary file
    # (and each cache key's lock file, which the next process that builds or reads the key takes)
    kept = sorted(f.suffix for f in cache.iterdir())
    assert first_file.exists() and kept == [".json", ".json", ".lock", ".lock", ".npy", ".npy"], kept


@pytest.mark.parametrize("train", [False, True])
def test_truncated_jpeg_raises_or_is_skipped(real_split, tmp_path, train):
    files = sorted((real_split / "train").glob("*/*.jpg"))[:6]
    bad = tmp_path / "bad.jpg"
    data = Path(files[0]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    samples = [(str(f), i) for i, f in enumerate(files)] + [(str(bad), 6)]
    pre = P.Preprocess(crop=16, resize=20, **IMAGENET)
    kwargs = dict(train=train, preprocess=pre, augment="seed", seed_policy="resnet18", batch_size=4,
                  workers=0, device=CPU, seed=0, cache_dir=str(tmp_path / "cache"),
                  progress=False)
    with pytest.raises(P.BadImagesError) as err:
        P.build_loader(samples, **kwargs)
    assert err.value.paths == [str(bad)]
    assert str(bad) in str(err.value) and "1 image file" in str(err.value)
    with pytest.warns(UserWarning, match=re.escape(f"skipped 1 unreadable image(s): {bad}")):
        loader = P.build_loader(samples, skip_bad=True, **kwargs)
    assert len(loader.samples) == 6
    assert sorted(int(v) for _, y in loader for v in y) == list(range(6))


def test_unknown_choices_list_the_allowed_values(coord_samples, cache):
    pre = P.Preprocess(crop=16, resize=20, **IMAGENET)
    with pytest.raises(ValueError, match="seed, light, flip, none"):
        P.build_loader(coord_samples, train=True, preprocess=pre, augment="heavy",
                       seed_policy="resnet18", batch_size=4, workers=0, device=CPU, seed=0,
                       cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="resnet18, resnet50"):
        P.build_loader(coord_samples, train=True, preprocess=pre, augment="seed",
                       seed_policy="vgg", batch_size=4, workers=0, device=CPU, seed=0,
                       cache_dir=cache, progress=False)


# --------------------------------------------------------------------------------------------
# no stream synchronisation per batch
# --------------------------------------------------------------------------------------------
def host_copies():
    """bench/sync_check.py's recorder of the calls that wait for a CUDA stream."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import sync_check
    return sync_check


@pytest.mark.parametrize("path,augment,train,resident", [
    ("tensor", "seed", True, True), ("tensor", "seed", True, False), ("tensor", "none", True, True),
    ("tensor", "flip", True, False), ("cpu", "seed", True, False), ("cpu", "flip", True, False),
    ("tensor", "none", False, True), ("cpu", "none", False, False)])
def test_batches_make_no_device_constant_and_copy_nothing_blocking(real_split, path, augment, train, resident,
                                                                   cache):
    """After a loader's first batch (which may make its normalisation constants), no batch builds a
    tensor from Python numbers, copies to the device without non_blocking or reads a value back: on
    CUDA each is a stream synchronisation. The constants are the same tensors in every batch and
    epoch, and the batches are those of constants made afresh for the batch."""
    sync_check = host_copies()
    samples = colour_samples(real_split)[:20]
    pre = P.Preprocess(crop=24, resize=28, **IMAGENET)
    loader = P.build_loader(samples, train=train, preprocess=pre, augment=augment, seed_policy="resnet18", batch_size=4,
                            workers=0, device=CPU, seed=3, cache_dir=cache, progress=False,
                            on_device=PATHS[path])
    if resident:
        loader.make_resident()
    constants = None
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        made = sync_check.blocking_calls(loader)
        assert len(made) == len(loader) == 5
        calls = [c for i, (c, _) in enumerate(made) if epoch or i]
        assert calls == [[]] * len(calls), calls
        now = [loader._mean, loader._std] + [t for pair in loader._scale_shift.values() for t in pair]
        assert constants is None or all(a is b for a, b in zip(now, constants)) and len(now) == len(constants)
        constants = now
    if augment == "none" and path == "cpu":   # the loader's constants give what fresh ones give
        u8 = loader._loader.dataset[("hwc", loader.rows[:4])]   # what a worker hands over
        assert torch.equal(loader._normalised(u8), P.normalise_hwc(u8, P.normalise_constants(pre, 24, CPU)))


def test_cached_outputs_are_indexed_without_a_blocking_copy(real_split, cache):
    """features.CachedBatches: each batch's index reaches the outputs' device non_blocking (from
    pinned memory on CUDA), not by a blocking copy."""
    from study import features

    sync_check = host_copies()
    samples = colour_samples(real_split)[:12]
    pre = P.Preprocess(crop=16, resize=20, **IMAGENET)
    loader = P.build_loader(samples, train=True, preprocess=pre, augment="none", seed_policy="resnet18", batch_size=4,
                            workers=0, device=CPU, seed=0, cache_dir=cache, progress=False)
    outputs = torch.arange(len(samples) * 2, dtype=torch.float32).view(-1, 2)
    cached = features.CachedBatches(loader, outputs)
    made = sync_check.blocking_calls(cached)
    assert [c for c, _ in made] == [[], [], []]
    for idx, (_, (x, y)) in zip(cached.batch_indices(), made):
        assert torch.equal(x, outputs[torch.from_numpy(idx)]) and torch.equal(y, loader.labels[idx])
