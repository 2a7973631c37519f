"""predict.py (checkpoint + images -> top-5) and report.py (runs -> the study's results table)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import models, transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

import predict
import report
from study import nets, prediction
from study.figures import fmt_value
from study.results import OWN_IMG_SIZE
from study.tables import trained_part

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["wasp", "ant", "zebra", "bee", "cat", "dog", "eel"]  # 7 > 5, and not in sorted order
SMALL = dict(crop=32, resize=37, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bilinear")


def run_script(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def save_ckpt(path, arch, classes, preprocess, model):
    torch.save({"model": model.state_dict(), "classes": list(classes), "arch": arch, "preprocess": preprocess,
                "config": {"arch": arch}, "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random ResNet-18 with 7 classes at 32 px, and a folder of images: two good ones (one of
    them grayscale, in a subfolder), a truncated JPEG and a text file."""
    d = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = nets.build_model("resnet18", len(CLASSES), "none").eval()
    with torch.no_grad():
        model.fc.weight.mul_(0.05)  # keep the softmax spread out, so the ordering check means something
    ckpt = save_ckpt(d / "best.pth", "resnet18", CLASSES, SMALL, model)
    imgs = d / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.effect_mandelbrot((90, 60), (-2, -1, 1, 1), 60).convert("RGB").save(imgs / "b_mandel.jpg")
    Image.linear_gradient("L").resize((40, 70)).save(imgs / "sub" / "a_gray.png")
    good = (imgs / "b_mandel.jpg").read_bytes()
    (imgs / "c_corrupt.jpg").write_bytes(good[: len(good) // 3])  # a truncated JPEG
    (imgs / "notes.txt").write_text("not an image")
    return {"model": model, "ckpt": ckpt, "imgs": imgs,
            "good": [str(imgs / "b_mandel.jpg"), str(imgs / "sub" / "a_gray.png")]}


def reference_probs(model, path, preprocess):
    """softmax(model(x)) with x from torchvision's own evaluation preset, one image at a time."""
    ref = ImageClassification(crop_size=preprocess["crop"], resize_size=preprocess["resize"], mean=preprocess["mean"],
                              std=preprocess["std"], interpolation=InterpolationMode(preprocess["interpolation"]))
    x = ref(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0]


# --------------------------------------------------------------------------------------------
# predict.py
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_json_walks_folder_skips_corrupt_and_matches_the_reference(tiny):
    r = run_script(ROOT / "predict.py", tiny["ckpt"], tiny["imgs"], "--json", "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # folder walked recursively in sorted path order; the .txt is not even tried, the corrupt one is skipped
    assert [o["image"] for o in out] == sorted(tiny["good"])
    assert "c_corrupt.jpg" in r.stderr and "skipped" in r.stderr and "notes.txt" not in r.stderr
    for o in out:
        assert set(o) == {"image", "top5"}
        assert len(o["top5"]) == 5 and all(set(c) == {"class", "prob"} for c in o["top5"])
        probs = [c["prob"] for c in o["top5"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(c["class"] in CLASSES for c in o["top5"])
        ref = reference_probs(tiny["model"], o["image"], SMALL)
        want = ref.topk(5)
        assert [c["class"] for c in o["top5"]] == [CLASSES[i] for i in want.indices.tolist()]
        assert probs == pytest.approx(want.values.tolist(), abs=1e-5)
        assert sum(probs) < ref.sum().item() - 1e-4  # 2 of the 7 classes were left out


@pytest.mark.slow
def test_predict_plain_output_top_k_and_explicit_bad_file(tiny):
    files = [tiny["good"][1], tiny["imgs"] / "notes.txt", tiny["good"][0]]
    r = run_script(ROOT / "predict.py", tiny["ckpt"], *files, "--top", "3")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [tiny["good"][1], tiny["good"][0]]  # command-line order
    for b in blocks:
        lines = b.splitlines()[1:]
        assert len(lines) == 3 and all(re.fullmatch(r"  [01]\.\d{3}  \S+", ln) for ln in lines)
        ref = reference_probs(tiny["model"], b.splitlines()[0], SMALL).topk(3)
        assert [ln.split()[1] for ln in lines] == [CLASSES[i] for i in ref.indices.tolist()]
        assert [float(ln.split()[0]) for ln in lines] == pytest.approx(ref.values.tolist(), abs=6e-4)
    assert "notes.txt" in r.stderr  # named explicitly: tried, reported, skipped


def test_predict_batches_give_the_same_answer_as_single_images(tiny):
    model, classes, pre = prediction.load_model(tiny["ckpt"])
    paths = tiny["good"] * 3
    one = list(prediction.predict_paths(model, classes, pre, paths, device=torch.device("cpu"), batch_size=1))
    many = list(prediction.predict_paths(model, classes, pre, paths, device=torch.device("cpu"), batch_size=4))
    assert [o["image"] for o in many] == paths
    for a, b in zip(one, many):
        assert [c["class"] for c in a["top5"]] == [c["class"] for c in b["top5"]]
        assert [c["prob"] for c in a["top5"]] == pytest.approx([c["prob"] for c in b["top5"]], abs=1e-6)


@pytest.mark.parametrize("weights,pre", [
    (models.ResNet18_Weights.IMAGENET1K_V1, None),
    (models.EfficientNet_B4_Weights.IMAGENET1K_V1, None),
    (None, SMALL),
    (None, dict(SMALL, crop_mode="squash")),
])
def test_load_image_equals_torchvision_preprocessing_bit_for_bit(tiny, weights, pre):
    if weights is not None:
        t = weights.transforms()
        ref = t
        pre = dict(crop=t.crop_size[0], resize=t.resize_size[0], mean=t.mean, std=t.std,
                   interpolation=t.interpolation.value)
    elif pre.get("crop_mode") == "squash":
        ref = transforms.Compose([transforms.Resize((pre["crop"], pre["crop"])), transforms.ToTensor(),
                                  transforms.Normalize(pre["mean"], pre["std"])])
    else:
        ref = ImageClassification(crop_size=pre["crop"], resize_size=pre["resize"], mean=pre["mean"],
                                  std=pre["std"])
    for path in tiny["good"]:
        x = prediction.load_image(path, pre)
        assert x.shape == (3, pre["crop"], pre["crop"])
        assert torch.equal(x, ref(Image.open(path).convert("RGB")))


def test_check_preprocess_reads_older_checkpoints_and_rejects_unknown_framing():
    assert prediction.check_preprocess(dict(SMALL))["crop_mode"] == "center"   # written before --crop-mode
    assert prediction.check_preprocess(dict(SMALL, crop_mode="squash"))["crop_mode"] == "squash"
    with pytest.raises(prediction.PredictError, match="best.pth: unknown crop_mode 'border'; valid: center, squash"):
        prediction.check_preprocess(dict(SMALL, crop_mode="border"), "best.pth")


def test_predict_on_a_real_image_with_a_101_class_checkpoint(real_split, tmp_path, capsys):
    classes = sorted(p.name for p in (real_split / "train").iterdir() if p.is_dir())
    assert len(classes) == 101
    image = sorted((real_split / "test" / classes[40]).iterdir())[0]
    torch.manual_seed(1)
    model = nets.build_model("resnet18", 101, "none")
    with torch.no_grad():  # a head that answers classes[40] whatever it sees: the index -> name map is tested
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[40] = 10.0
    pre = dict(SMALL, crop=56, resize=64)
    ckpt = save_ckpt(tmp_path / "best.pth", "resnet18", classes, pre, model)
    predict.main([str(ckpt), str(image), "--json"])
    (o,) = json.loads(capsys.readouterr().out)
    assert o["image"] == str(image) and len(o["top5"]) == 5
    assert {c["class"] for c in o["top5"]} <= set(classes)
    assert o["top5"][0]["class"] == classes[40] == image.parent.name
    assert o["top5"][0]["prob"] == pytest.approx(math.exp(10) / (math.exp(10) + 100), rel=1e-5)


def test_predict_errors_are_one_line(tiny, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*nope\.pth: no such file$"):
        predict.main([str(tmp_path / "nope.pth"), tiny["good"][0]])
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*: not a PyTorch checkpoint"):
        predict.main([tiny["good"][0], tiny["good"][0]])  # an image given as the checkpoint
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match=r"not a checkpoint of this project \(missing classes, arch, preprocess\)"):
        predict.main([str(tmp_path / "other.pth"), tiny["good"][0]])
    wrong = torch.load(tiny["ckpt"], weights_only=True)
    wrong["classes"] = CLASSES[:3]
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(SystemExit, match=r"do not fit resnet18 with 3 classes"):
        predict.main([str(tmp_path / "wrong.pth"), tiny["good"][0]])
    with pytest.raises(SystemExit) as e:
        predict.main([str(tiny["ckpt"]), str(tiny["imgs"] / "c_corrupt.jpg"), str(tmp_path / "missing.jpg")])
    assert e.value.code == "error: no image could be predicted (1 found, 2 skipped)"


# --------------------------------------------------------------------------------------------
# report.py
# --------------------------------------------------------------------------------------------
def write_run(root, rel, arch, weights, unfreeze, val, test, lr=3e-4, wd=1e-5, batch=64, epochs=30):
    d = root / rel
    d.mkdir(parents=True)
    config = {"arch": arch, "weights": weights, "unfreeze": unfreeze, "batch_size": batch, "epochs": epochs,
              "lr": lr, "weight_decay": wd, "img_size": OWN_IMG_SIZE[arch], "script": rel.split("/")[0]}
    metrics = {"test_top1": test, "test_top5": test + 5, "test_mean_class_acc": test - 1, "best_val_top1": val,
               "best_epoch": 7, "epochs": epochs, "train_seconds": 60.0}
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.json").write_text(json.dumps(metrics))  # NaN is written as NaN, as records.write_json does


def parse_table(text):
    """The first markdown table of text (the main setting's)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    lines = lines[start:]
    lines = lines[:next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


@pytest.mark.slow
def test_report_picks_by_validation_never_by_test(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "main_ResNet-18/imagenet-last1", "resnet18", "imagenet", "last:1", val=90.0, test=88.0)
    write_run(runs, "main_ResNet-18/grid/lr=5e-05", "resnet18", "imagenet", "last:2", val=85.0, test=93.0, lr=5e-5)
    write_run(runs, "main_ResNet-18/none-all", "resnet18", "none", "all", val=60.0, test=70.0, epochs=50)
    write_run(runs, "main_ResNet-18/compare/random_init", "resnet18", "none", "all", val=65.0, test=66.0, epochs=50)
    write_run(runs, "main_ResNet-50/a", "resnet50", "imagenet", "last:2", val=float("nan"), test=99.0, lr=1e-3)
    write_run(runs, "main_ResNet-50/b", "resnet50", "imagenet", "layer2,layer4", val=80.0, test=81.0, lr=1e-3)
    write_run(runs, "main_Efficient_B4/x", "efficientnet_b4", "imagenet", "last:6", val=92.0, test=94.0, batch=32,
              wd=1e-4)
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text("{")
    (runs / "broken" / "metrics.json").write_text("{}")
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "config.json").write_text("{}")  # no metrics.json: still training, silently left out

    r = run_script(ROOT / "report.py", runs)
    assert r.returncode == 0, r.stderr
    assert "broken" in r.stderr and "unfinished" not in r.stderr
    written = (runs / "results.md").read_text()
    assert r.stdout == written + f"wrote {runs / 'results.md'} and 1 figure(s) under {runs / 'figures'}\n"
    header, rows = parse_table(written)
    assert header == ["model", "batch", "epochs", "lr", "weight decay", "trained part", "Top@1", "val Top@1",
                      "Top@5", "mean per-class", "run"]
    assert [row["model"] for row in rows] == ["ResNet-18", "ResNet-50", "EfficientNet-B4",
                                              "ResNet-18 from random weights"]
    r18, r50, b4, scratch = rows
    assert r18 == {"model": "ResNet-18", "batch": "64", "epochs": "30", "lr": "3e-4", "weight decay": "1e-5",
                   "trained part": "layer4", "Top@1": "88.00", "val Top@1": "90.00", "Top@5": "93.00",
                   "mean per-class": "87.00", "run": "main_ResNet-18/imagenet-last1"}
    assert (r50["run"], r50["Top@1"], r50["trained part"], r50["lr"]) == ("main_ResNet-50/b", "81.00",
                                                                          "layer2, layer4", "1e-3")
    assert (b4["trained part"], b4["batch"], b4["weight decay"]) == ("last 6 blocks", "32", "1e-4")
    assert (scratch["run"], scratch["Top@1"], scratch["epochs"], scratch["trained part"]) == (
        "main_ResNet-18/compare/random_init", "66.00", "50", "all")
    assert "7 finished run(s) of this setting" in written
    assert sorted(p.name for p in runs.iterdir()) == ["broken", "figures", "main_Efficient_B4", "main_ResNet-18",
                                                      "main_ResNet-50", "results.md", "unfinished"]  # no temp file
    # these runs have no event files and no confusion matrix: only the summary is drawn, the rest said
    assert sorted(p.name for p in (runs / "figures").iterdir()) == ["summary.png", "summary.svg"]
    assert "- left out figures/curves-resnet18.png: no run of this network has per-epoch TensorBoard scalars" in written


@pytest.mark.slow
def test_report_on_an_empty_folder_fails_and_writes_nothing(tmp_path):
    r = run_script(ROOT / "report.py", tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: no finished run under {tmp_path} "
                                             f"(a run folder holds config.json and metrics.json)"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit, match="no such folder"):
        report.main([str(tmp_path / "absent")])


@pytest.mark.parametrize("spec,arch,words", [
    ("last:1", "resnet18", "layer4"),
    ("last:2", "resnet101", "layer3, layer4"),
    ("last:5", "resnet50", "all"),
    ("all", "efficientnet_b4", "all"),
    ("head", "resnet18", "head only"),
    ("last:0", "efficientnet_lite0", "head only"),
    ("last:6", "efficientnet_b4", "last 6 blocks"),
    ("last:1", "efficientnet_lite0", "last 1 block"),
    ("layer3,layer4", "resnet50", "layer3, layer4"),
    ("features.7,features.8", "efficientnet_b4", "features.7, features.8"),
])
def test_trained_part_in_words(spec, arch, words):
    assert trained_part(spec, arch) == words


def test_rates_are_written_like_the_paper():
    assert [fmt_value(v) for v in (3e-4, 1e-5, 5e-5, 2.5e-4, 1e-3, 0.01, 0.1, 0)] == [
        "3e-4", "1e-5", "5e-5", "2.5e-4", "1e-3", "0.01", "0.1", "0"]
