"""predict.py --explain: Grad-CAM heat maps of the top class, checked against their definition."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from study import nets
from study.prediction import grad_cam

ROOT = Path(__file__).resolve().parents[1]


def test_grad_cam_of_a_head_reading_one_channel_is_that_channels_map():
    """fc reads only channel 7 of layer4 (through the average pool), so Grad-CAM's channel weights
    are zero but for channel 7: the map must be ReLU(layer4[7]) upsampled and scaled to max 1."""
    torch.manual_seed(0)
    model = nets.build_model("resnet18", 3, "none").eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[1, 7] = 1.0
    x = torch.randn(2, 3, 64, 64)
    cam = grad_cam(model, x, torch.tensor([1, 1]))
    seen = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        model(x)
    h.remove()
    ref = torch.nn.functional.interpolate(seen["a"][:, 7:8].relu(), size=(64, 64), mode="bilinear",
                                          align_corners=False)[:, 0]
    ref = ref / ref.amax((1, 2), keepdim=True)
    assert cam.shape == (2, 64, 64) and torch.allclose(cam, ref, atol=1e-5)
    assert float(cam.min()) >= 0 and torch.allclose(cam.amax((1, 2)), torch.ones(2))


@pytest.mark.slow
def test_explain_writes_one_png_per_image_at_the_crop_size(tmp_path):
    torch.manual_seed(0)
    model = nets.build_model("resnet18", 3, "none")
    ckpt = {"model": model.state_dict(), "classes": ["a", "b", "c"], "arch": "resnet18",
            "preprocess": {"crop": 48, "resize": 55, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                           "interpolation": "bilinear"}}
    torch.save(ckpt, tmp_path / "best.pth")
    imgs = tmp_path / "imgs"
    for sub in ("x", "y"):  # two images with the same stem in two folders
        (imgs / sub).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(
            imgs / sub / "photo.jpg")
    out = tmp_path / "cams"
    r = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(tmp_path / "best.pth"), str(imgs), "--json",
                        "--explain", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [Path(x["gradcam"]).name for x in results] == ["photo.png", "photo-2.png"]
    for x in results:
        with Image.open(x["gradcam"]) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
