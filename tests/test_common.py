"""The fine-tuning core: freezing, BatchNorm, heads, class maps, metrics, schedules, weights files."""
import copy
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from study import data, experiments, loop, nets, options

ARCH_NAMES = [a for a in nets.ARCHS if a != "tiny"]  # the product's (conftest registers a tiny one for tests)


@pytest.fixture(scope="module")
def built():
    """One randomly initialised network per architecture, 7 classes (built once: B4 and R101 are big)."""
    torch.manual_seed(0)
    return {a: nets.build_model(a, 7, "none") for a in ARCH_NAMES}


def trained_modules(model, names):
    return {n.split(".")[0] if not n.startswith("features") else ".".join(n.split(".")[:2]) for n in names}


EXPECTED = {
    ("resnet18", "last:1"): {"layer4", "fc"},
    ("resnet18", "last:2"): {"layer3", "layer4", "fc"},
    ("resnet50", "layer3,layer4"): {"layer3", "layer4", "fc"},
    ("resnet101", "head"): {"fc"},
    ("resnet101", "last:5"): {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"},
    ("efficientnet_b4", "last:6"): {f"features.{i}" for i in range(3, 9)} | {"classifier"},
    ("efficientnet_b4", "head"): {"classifier"},
    ("efficientnet_lite0", "last:3"): {"features.6", "features.7", "features.8", "classifier"},
    ("efficientnet_lite0", "features.8"): {"features.8", "classifier"},
}


@pytest.mark.parametrize("arch,spec", list(EXPECTED))
def test_unfreeze_trains_exactly_the_named_part(built, arch, spec):
    model = copy.deepcopy(built[arch])
    names = nets.freeze(model, arch, nets.parse_unfreeze(spec, arch))
    assert trained_modules(model, names) == EXPECTED[(arch, spec)]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert set(names).isdisjoint(frozen) and len(names) + len(frozen) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_all_trains_everything_and_head_has_class_count_outputs(built, arch):
    model = copy.deepcopy(built[arch])
    names = nets.freeze(model, arch, nets.parse_unfreeze("all", arch))
    assert len(names) == len(list(model.parameters()))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("spec", ["layer5", "last:6", "last:x", "", "fc"])
def test_unknown_unfreeze_lists_valid_choices(spec):
    with pytest.raises(SystemExit) as e:
        nets.parse_unfreeze(spec, "resnet18")
    assert "--unfreeze" in str(e.value)
    if spec in ("layer5", "fc"):
        assert "layer4" in str(e.value) and "last:N" in str(e.value)


@pytest.mark.parametrize("arch,spec", [("resnet18", "last:1"), ("efficientnet_lite0", "last:3")])
def test_frozen_parameters_and_bn_statistics_stay_bit_identical(built, arch, spec):
    torch.manual_seed(1)
    model = copy.deepcopy(built[arch])
    trained = nets.freeze(model, arch, nets.parse_unfreeze(spec, arch))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(nets.param_groups(model, arch, 1e-2, 1e-2, 0.1))
    sched = loop.lr_schedule(opt, 3, 1)
    batches = [(torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4,))) for _ in range(3)]
    loop.train_one_epoch(model, batches, opt, sched, nn.CrossEntropyLoss(), torch.device("cpu"), None,
                         epoch=1, show_bar=False)
    after = model.state_dict()
    trained_prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in trained)
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    frozen_keys = {k for k in after if not k.startswith(trained_prefixes)}
    assert frozen_keys and moved.isdisjoint(frozen_keys), sorted(moved & frozen_keys)[:5]
    # and the trained part really trained, running statistics of its BatchNorms included
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("weight") for k in moved)
    # frozen params have no optimizer state
    state_params = {id(p) for p in opt.state}
    assert all(id(p) not in state_params for p in model.parameters() if not p.requires_grad)


def test_bn_stats_frozen_keeps_every_running_statistic_while_the_trained_part_learns(built):
    torch.manual_seed(2)
    model = copy.deepcopy(built["efficientnet_lite0"])
    nets.freeze(model, "efficientnet_lite0", nets.parse_unfreeze("last:3", "efficientnet_lite0"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(nets.param_groups(model, "efficientnet_lite0", 1e-2, 0.0, 0.1))
    batches = [(torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4,))) for _ in range(2)]
    loop.train_one_epoch(model, batches, opt, loop.lr_schedule(opt, 2, 1), nn.CrossEntropyLoss(),
                         torch.device("cpu"), None, epoch=1, show_bar=False, bn_stats="frozen")
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["features.8.1.weight"], after["features.8.1.weight"])  # BN scale still learns


def test_set_train_mode_keeps_frozen_batchnorm_in_eval(built):
    model = copy.deepcopy(built["resnet18"])
    nets.freeze(model, "resnet18", ["layer4"])
    nets.set_train_mode(model)
    assert not model.bn1.training and not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training and model.training


def test_param_groups_head_lr_backbone_ratio_and_no_decay_on_norms(built):
    model = copy.deepcopy(built["resnet18"])
    nets.freeze(model, "resnet18", ["layer4"])
    groups = nets.param_groups(model, "resnet18", 1e-3, 0.05, 0.1)
    by = {(g["name"], g["weight_decay"] > 0): g for g in groups}
    assert by[("head", True)]["lr"] == 1e-3 and math.isclose(by[("backbone", True)]["lr"], 1e-4)
    assert by[("backbone", False)]["weight_decay"] == 0  # BN weights and biases
    n = sum(len(g["params"]) for g in groups)
    assert n == sum(1 for p in model.parameters() if p.requires_grad)


def test_metrics_on_a_hand_made_case():
    # 3 classes; true class per row, predicted per column
    confusion = torch.tensor([[2, 0, 0],
                              [1, 1, 0],
                              [0, 0, 0]])
    m = loop.metrics_from_confusion(confusion, loss_sum=4.0, top5=4)
    assert m["top1"] == pytest.approx(75.0)
    assert m["mean_class_acc"] == pytest.approx(75.0)  # (100 + 50) / 2: class 2 has no images
    assert m["per_class"] == [100.0, 50.0, None]
    assert m["loss"] == 1.0 and m["top5"] == 100.0
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    y = torch.tensor([0, 0])
    assert loop.top5_correct(logits, y) is None  # fewer than 5 classes: top-5 means nothing
    logits6 = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]])
    assert int(loop.top5_correct(logits6, torch.tensor([4, 0]))) == 1  # class 0 ranks 6th in row 2


def test_lr_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = loop.lr_schedule(opt, steps_per_epoch=10, epochs=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def make_tree(root, train, test):
    for side, classes in (("train", train), ("test", test)):
        for c, n in classes.items():
            d = Path(root) / side / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(d / f"{i}.png")
    return Path(root)


def test_class_map_comes_from_train_and_is_forced_on_test(tmp_path):
    root = make_tree(tmp_path, {"b": 2, "a": 3, "c": 1}, {"c": 1, "a": 2})  # test lacks b: fine
    classes, train, test = data.scan_split(root)
    assert classes == ["a", "b", "c"]
    assert sorted({y for _, y in test}) == [0, 2]
    assert all(Path(p).parent.name == classes[y] for p, y in train + test)


def test_test_class_unknown_to_train_is_a_clear_error(tmp_path):
    root = make_tree(tmp_path, {"a": 2}, {"a": 1, "zebra": 1})
    with pytest.raises(SystemExit, match="unknown to train/: zebra"):
        data.scan_split(root)


def test_validation_carve_is_stratified_seeded_and_keeps_one_per_class():
    samples = [(f"{c}/{i}", c) for c in range(4) for i in range([2, 3, 10, 1][c])]
    classes = ["a", "b", "c", "d"]
    train, val = data.carve_validation(samples, classes, 0.1, split_seed=3)
    counts = {c: sum(1 for _, y in val if y == c) for c in range(4)}
    assert counts == {0: 1, 1: 1, 2: 1, 3: 0}
    assert sorted(train + val) == sorted(samples)
    assert data.carve_validation(samples, classes, 0.1, split_seed=3) == (train, val)
    assert data.carve_validation(samples, classes, 0.1, split_seed=4)[1] != val
    limited = data.limit_per_class(samples, 2)
    assert {c: sum(1 for _, y in limited if y == c) for c in range(4)} == {0: 2, 1: 2, 2: 2, 3: 1}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_weights_path_loads_the_backbone_bit_identical_and_reinitialises_the_head(built, arch, tmp_path):
    src = nets.build_model(arch, 1000, "none")  # a torchvision-layout ImageNet state dict
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    model = nets.build_model(arch, 7, str(path))
    s, m = src.state_dict(), model.state_dict()
    head = nets.ARCHS[arch].head
    assert all(torch.equal(s[k], m[k]) for k in m if not k.startswith(head + "."))
    assert m[head + ".weight"].shape[0] == 7


def test_weights_for_another_architecture_fail_clearly(built, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(built["resnet18"].state_dict(), path)
    with pytest.raises(SystemExit, match="does not fit resnet50"):
        nets.build_model("resnet50", 7, str(path))
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"--weights .*junk.pth: not a PyTorch checkpoint"):
        nets.build_model("resnet18", 7, str(bad))


def test_own_checkpoint_keeps_its_head_when_classes_match(built, tmp_path):
    path = tmp_path / "ck.pth"
    torch.save({"model": built["resnet18"].state_dict(), "classes": list("abcdefg")}, path)
    model = nets.build_model("resnet18", 7, str(path))
    assert torch.equal(model.fc.weight, built["resnet18"].fc.weight)


def test_imagenet_download_failure_names_the_file_and_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as e:
        nets.build_model("resnet18", 7, "imagenet")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg


def test_preprocess_follows_the_weights():
    b4 = nets.make_preprocess("efficientnet_b4", None)
    assert (b4.crop, b4.resize, b4.interpolation) == (380, 384, "bicubic")
    r = nets.make_preprocess("resnet50", 64)
    assert (r.crop, r.resize, r.interpolation) == (64, 73, "bilinear")  # 64 * 256 / 224
    lite = nets.make_preprocess("efficientnet_lite0", None)
    assert lite.mean == (0.498,) * 3 and lite.crop == 224 and lite.crop_mode == "center"
    assert nets.make_preprocess("resnet18", 64, "squash").crop_mode == "squash"

    # the framing is part of a run's identity: its name, its checkpoint's preprocess dict
    base = dict(weights="imagenet", unfreeze="head", batch_size=64, lr=1e-3, weight_decay=1e-4, epochs=30,
                img_size=256, limit_per_class=None)
    assert options.default_run_name(dict(base, crop_mode="center")) == "imagenet-head-b64-lr0.001-wd0.0001-e30-256px"
    assert options.default_run_name(dict(base, crop_mode="squash")).endswith("-256px-squash")
    assert options.default_run_name(dict(base, crop_mode="squash", seed=1)).endswith("-256px-squash-seed1")
    assert nets.preprocess_dict(nets.make_preprocess("efficientnet_lite0", 256, "squash"))["crop_mode"] == "squash"


def test_grid_spec_parses_and_rejects_bad_axes():
    g = experiments.parse_grid_spec("lr=1e-3,3e-4;batch_size=32,64;unfreeze=last:1,all")
    assert g == {"lr": [1e-3, 3e-4], "batch_size": [32, 64], "unfreeze": ["last:1", "all"]}
    with pytest.raises(SystemExit, match="bad axis"):
        experiments.parse_grid_spec("colour=red")
    with pytest.raises(SystemExit, match="not a number"):
        experiments.parse_grid_spec("lr=fast")


def test_class_balance_weights_each_class_by_one_over_its_images_in_torchs_cross_entropy():
    """--class-balance loss: weights N / (C n_c) over the C classes with images, mean 1 over the images;
    in nn.CrossEntropyLoss(weight=) a class of 1 image then counts as much as one of 6."""
    samples = [("a", 0)] * 6 + [("b", 1)] * 3 + [("c", 2)]
    w = loop.class_weights(samples, 4)  # class 3 has no training image
    assert torch.allclose(w, torch.tensor([10 / 18, 10 / 9, 10 / 3, 10 / 3]))
    assert torch.isclose(w[torch.tensor([y for _, y in samples])].mean(), torch.tensor(1.0))
    logits, y = torch.randn(10, 4), torch.tensor([y for _, y in samples])
    per_image = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    per_class = torch.stack([per_image[y == c].mean() for c in range(3)])
    assert torch.isclose(torch.nn.CrossEntropyLoss(weight=w)(logits, y), per_class.mean())  # classes alike


def test_class_balance_is_a_recorded_recipe_option_with_its_own_run_name(tmp_path):
    defaults = dict(arch="tiny", batch_size=8, epochs=1, scratch_epochs=1, lr=1e-3, weight_decay=1e-4,
                    unfreeze="last:1")
    c = options.resolve_config(options.get_args_parser(defaults).parse_args(["--class-balance", "loss"]), defaults,
                               "t")
    assert c["class_balance"] == "loss" and options.default_run_name(c).endswith("-balanced")
    old = {k: v for k, v in c.items() if k != "class_balance"}  # a config.json from before the option
    assert options.differing_options(old, dict(c, class_balance="none")) == []
    assert options.differing_options(old, c) == [("class_balance", "none", "loss")]
