"""Whole runs of the main_*.py scripts on the real (shrunk) split: outputs, resume, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from study import loop, nets, options, steps
from study import hardware

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--limit-per-class", "8", "--img-size", "64", "--workers", "0"]


def run_script(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    """12 real classes, 6 train + 2 test images each: for runs that repeat."""
    from conftest import extract_subset

    classes = {"accordion", "airplanes", "anchor", "ant", "barrel", "bass", "beaver", "binocular", "bonsai",
               "brain", "brontosaurus", "buddha"}
    return extract_subset(tmp_path_factory.mktemp("tiny"), per_class=8, classes=classes)


@pytest.fixture(scope="module")
def smoke_run(real_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = run_script("main_ResNet-18.py", "--data", real_split, *SMOKE, "--epochs", "2", "--weights", "none",
                   "--out", out, "--cache-dir", out / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((out / "main_ResNet-18").iterdir())
    assert len(runs) == 1
    return runs[0], r


@pytest.mark.slow
def test_a_run_leaves_every_output(smoke_run):
    run_dir, r = smoke_run
    assert run_dir.name == "none-all-b64-lr0.001-wd1e-05-e2-64px-lim8"  # the tuned scratch recipe's lr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == 2 and config["unfreeze"] == "all" and config["arch"] == "resnet18"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for k in ("test_top1", "test_top5", "test_mean_class_acc", "best_val_top1", "best_epoch", "epochs",
              "train_seconds", "train_images_per_s"):
        assert k in metrics, k
    assert metrics["test_images"] == 202  # 101 classes x 2 test images
    assert 0 <= metrics["test_top1"] <= metrics["test_top5"] <= 100 and metrics["best_epoch"] in (1, 2)
    assert "test top-1" in r.stdout and "epoch 2/2" in r.stdout
    last = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    best = torch.load(run_dir / "best.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == metrics["best_epoch"]
    assert len(last["classes"]) == 101 and last["config"]["arch"] == "resnet18"
    assert {"model", "optimizer", "scheduler"} <= set(last)
    assert last["preprocess"]["crop"] == 64
    acc = tb_scalars(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"Loss/train", "Loss/val", "Accuracy/train", "Accuracy/val", "LR"} <= tags
    assert [e.step for e in acc.Scalars("Loss/train")] == [1, 2]
    assert "Test/confusion_matrix" in acc.Tags()["images"]


@pytest.mark.slow
def test_rerun_without_resume_refuses_and_loses_nothing(smoke_run, real_split):
    run_dir, _ = smoke_run
    before = (run_dir / "metrics.json").read_bytes()
    r = run_script("main_ResNet-18.py", "--data", real_split, *SMOKE, "--epochs", "2", "--weights", "none",
                   "--out", run_dir.parent.parent)
    assert r.returncode != 0 and "--resume auto" in r.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


def config_for(data, out, **over):
    parser = options.get_args_parser(dict(arch="tiny", batch_size=16, epochs=3, scratch_epochs=3, lr=1e-3,
                                          weight_decay=1e-4, unfreeze="last:1"))
    args = parser.parse_args(["--data", str(data), "--out", str(out), "--weights", "none", "--img-size", "32",
                              "--limit-per-class", "4", "--workers", "0", "--cache-dir", str(out / "cache")])
    c = options.resolve_config(args, dict(epochs=3, scratch_epochs=3, unfreeze="last:1"), "main_test")
    c.update(over)
    return c


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_with_the_same_lr_and_the_same_result(tiny_split, tmp_path):
    full = common.fit(config_for(tiny_split, tmp_path, name="full"))
    part = config_for(tiny_split, tmp_path, name="cut")
    stopped = common.fit(part, stop_after=1)
    assert stopped["stopped_at"] == 1 and not (tmp_path / "main_test" / "cut" / "metrics.json").exists()
    ck = torch.load(tmp_path / "main_test" / "cut" / "last.pth", weights_only=True)
    assert ck["epoch"] == 1
    resumed = common.fit(dict(part, resume="auto"))
    assert resumed["test_top1"] == full["test_top1"] and resumed["best_val_top1"] == full["best_val_top1"]
    a = torch.load(tmp_path / "main_test" / "full" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "main_test" / "cut" / "last.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    lrs = lambda d: [round(e.value, 12) for e in tb_scalars(d).Scalars("LR")]
    steps = lambda d: [e.step for e in tb_scalars(d).Scalars("Loss/train")]
    assert steps(tmp_path / "main_test" / "cut") == [1, 2, 3]
    assert lrs(tmp_path / "main_test" / "cut") == lrs(tmp_path / "main_test" / "full")


def folder_bytes(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def test_a_finished_run_without_last_pth_is_never_overwritten(tiny_split, tmp_path):
    """A user deletes last.pth to save disk and keeps best.pth: the same command, and --resume auto,
    refuse in one line naming the folder, and no file in it changes."""
    c = config_for(tiny_split, tmp_path, name="kept", epochs=1)
    common.fit(c)
    run_dir = tmp_path / "main_test" / "kept"
    (run_dir / "last.pth").unlink()
    before = folder_bytes(run_dir)
    assert {"best.pth", "metrics.json", "config.json"} <= set(before)
    with pytest.raises(SystemExit, match=f"^error: {run_dir} already holds a run \\(best.pth, metrics.json\\)"):
        common.fit(c)
    with pytest.raises(SystemExit, match=f"^error: --resume auto: the run in {run_dir} is finished"):
        common.fit(dict(c, resume="auto"))
    assert folder_bytes(run_dir) == before


def test_class_balance_trains_on_the_weighted_loss_and_validates_on_the_plain_one(tiny_split, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_split, data)
    for f in sorted((data / "train" / "accordion").iterdir())[:4]:  # 2 accordions against 4 (the limit) of the others
        f.unlink()
    plain = config_for(data, tmp_path, epochs=1, precision="fp32")  # bit-reproducible: only the weights differ
    balanced = dict(plain, class_balance="loss")
    runs = [common.fit(c) and options.run_dir_of(c) for c in (plain, balanced)]
    assert "-balanced" in runs[1].name
    loss = lambda d, tag: [e.value for e in tb_scalars(d).Scalars(tag)]
    assert loss(runs[0], "Loss/train") != loss(runs[1], "Loss/train")  # the same steps, weighted otherwise
    # validation's loss is every image alike: only the weights the training reached differ
    assert json.loads((runs[1] / "config.json").read_text())["class_balance"] == "loss"


def test_eval_framing_reproduces_the_best_epoch_then_tries_other_framings(tiny_split, tmp_path):
    """bench/eval_framing.py on a run's best.pth: its own framing gives the recorded validation top-1
    exactly; each other framing and size, with and without BatchNorm re-estimated (update_bn)."""
    import importlib.util

    c = config_for(tiny_split, tmp_path, epochs=1, precision="fp32")
    common.fit(c)
    spec = importlib.util.spec_from_file_location("eval_framing", ROOT / "bench" / "eval_framing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (out,) = bench.main([str(options.run_dir_of(c)), "--sizes", "32", "40", "--bn-stride", "2",
                         "--tta", "none", "flip"])
    assert out["reproduced"] and out["own_framing"]["top1"] == out["best"]["top1"]
    assert [(r["mode"], r["size"], r["bn"], r["tta"]) for r in out["rows"]] == [
        (m, s, bn, t) for m in ("center", "squash") for s in (32, 40) for bn in ("trained", "re-estimated")
        for t in ("none", "flip")]
    assert out["rows"][0]["top1"] == out["best"]["top1"]  # centre, 32 px, as trained, no tta: the run's own
    assert (options.run_dir_of(c) / "framing.json").is_file()


R50_DEFAULTS = dict(arch="resnet50", batch_size=32, epochs=30, scratch_epochs=50, lr=1e-3, weight_decay=1e-5,
                    unfreeze="last:1")
BAD = [
    (["--data", "/nonexistent/place"], "no such folder"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr=-1e-3"], "--lr must be > 0"),
    (["--epochs", "two"], "argument --epochs: invalid int value"),
    (["--batch-size", "0"], "--batch-size must be at least 2"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--val-fraction", "0.6"], "--val-fraction must be within [0, 0.5]"),
    (["--unfreeze", "layer9"], "unknown module layer9"),
    (["--weights", "missing.pth"], "not imagenet, none, or an existing file"),
    (["--device", "tpu"], "valid values are auto, cpu, cuda, cuda:N"),
    (["--crop-mode", "border"], "argument --crop-mode: invalid choice: 'border'"),
    (["--crop-scale", "0"], "--crop-scale must be within (0, 1] (got 0.0)"),
    (["--augment", "flip", "--crop-scale", "0.5"], "--crop-scale sets the crop of --augment seed or light, not of "
                                                    "--augment flip"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(tiny_split, tmp_path, capsys, extra, message):
    args = ["--data", tiny_split, "--out", tmp_path / "runs", "--weights", "none", *SMOKE, *extra]
    with pytest.raises(SystemExit) as e:
        common.main(R50_DEFAULTS, {}, argv=[str(a) for a in args], script="main_ResNet-50")
    text = str(e.value.code) if e.value.code not in (1, 2) else capsys.readouterr().err
    lines = text.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error: "), text
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_bad_input_from_the_shell_is_one_line_on_stderr(tiny_split, tmp_path):
    r = run_script("main_ResNet-50.py", "--data", tiny_split, "--out", tmp_path / "runs", "--epochs", "0")
    assert r.returncode != 0 and r.stderr.strip() == "error: --epochs must be at least 1 (got 0)"
    assert not (tmp_path / "runs").exists()


def test_missing_or_empty_train_is_a_clear_error(tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    for data, message in ((tmp_path / "d", "train/ holds no images"), (tmp_path, "missing train/")):
        with pytest.raises(SystemExit, match=message):
            common.main(R50_DEFAULTS, {}, argv=["--data", str(data), "--out", str(tmp_path / "runs"), "--weights",
                                                "none"], script="main_ResNet-50")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_head_only_caches_features_once_and_leaves_the_backbone_bit_identical(tiny_split, tmp_path):
    from study import efficientnet_lite

    weights = tmp_path / "lite0_imagenet.pth"  # the genuine ImageNet weights, saved by the test
    torch.save(efficientnet_lite.imagenet_state_dict(), weights)
    args = ["--data", tiny_split, "--out", tmp_path / "runs", "--weights", weights, "--unfreeze", "head",
            "--epochs", "3", "--img-size", "64", "--workers", "0", "--cache-dir", tmp_path / "cache"]
    first = run_script("main_EfficientNet_Lite0.py", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("features of") == 3  # train, val, test: one backbone pass each
    assert len(list((tmp_path / "cache").glob("features-efficientnet_lite0-*.pt"))) == 3
    again = run_script("main_EfficientNet_Lite0.py", *args, "--name", "again", "--lr", "3e-3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "features of" not in again.stdout  # the cached features were reused
    run_dir = next(d for d in (tmp_path / "runs" / "main_EfficientNet_Lite0").iterdir() if d.name != "again")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 24 and metrics["epochs"] == 3
    src = torch.load(weights, weights_only=True)
    best = torch.load(run_dir / "best.pth", weights_only=True)["model"]
    assert all(torch.equal(src[k], best[k]) for k in best if not k.startswith("classifier.1."))
    assert best["classifier.1.weight"].shape == (12, 1280)


@pytest.mark.parametrize("script,arch", [("main_ResNet-18.py", "resnet18"), ("main_ResNet-50.py", "resnet50"),
                                         ("main_ResNet-101.py", "resnet101"), ("main_Efficient_B4.py", "efficientnet_b4")])
@pytest.mark.slow
def test_each_script_runs_from_a_local_state_dict(tiny_split, tmp_path, script, arch):
    weights = tmp_path / f"{arch}.pth"  # stands in for the ImageNet file: torchvision's layout, 1000 classes
    torch.save(nets.build_model(arch, 1000, "none").state_dict(), weights)
    r = run_script(script, "--data", tiny_split, "--out", tmp_path / "runs", "--weights", weights, "--epochs", "1",
                   "--img-size", "32", "--workers", "0", "--batch-size", "16", "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = next((tmp_path / "runs" / Path(script).stem).iterdir())
    assert json.loads((run_dir / "metrics.json").read_text())["test_images"] == 24
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert best["arch"] == arch and len(best["classes"]) == 12
    src = torch.load(weights, weights_only=True)
    stage0 = "conv1.weight" if arch.startswith("resnet") else "features.0.0.weight"
    assert torch.equal(best["model"][stage0], src[stage0])  # outside the default trained part: untouched


@pytest.mark.slow
def test_linear_probe_trains_the_head_alone_before_fine_tuning(tiny_split, tmp_path):
    from study import efficientnet_lite

    weights = tmp_path / "lite0.pth"
    torch.save(efficientnet_lite.imagenet_state_dict(), weights)
    parser = options.get_args_parser(dict(arch="efficientnet_lite0", batch_size=16, epochs=1, scratch_epochs=1,
                                          lr=1e-3, weight_decay=1e-4, unfreeze="last:1"))
    args = parser.parse_args(["--data", str(tiny_split), "--out", str(tmp_path), "--weights", str(weights),
                              "--img-size", "64", "--workers", "0", "--probe-epochs", "15", "--precision", "fp32",
                              "--cache-dir", str(tmp_path / "cache")])
    config = options.resolve_config(args, dict(epochs=1, scratch_epochs=1, unfreeze="last:1"), "main_test")
    run = steps.start_run(config)  # seeds the new head's initialisation from --seed, then trains features.8
    budget = hardware.MemoryBudget(hardware.memory_limit(run.device))
    loaders, loader_opts = steps.build_loaders(run, budget)
    model = run.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best = steps.linear_probe(run, loaders, steps.eval_sources(run, loaders, loader_opts), None, budget, steps.Step())
    assert budget.held["features"] > 0  # the features the head trained on are counted
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert moved == {"classifier.1.weight", "classifier.1.bias"}  # the head alone, BN statistics included
    # 12 classes (chance 8%), 12 validation images of 64 px: ImageNet features separate them after a
    # probe. Over seeds 0-5 of the head's initialisation it scored 42-67%; 4 of 12 is 4x chance
    assert best >= 100 * 4 / 12
    r = run_script("main_EfficientNet_Lite0.py", "--data", tiny_split, "--out", tmp_path / "runs", "--weights",
                   weights, "--img-size", "64", "--workers", "0", "--epochs", "1", "--probe-epochs", "3",
                   "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0 and "linear probe: head trained 3 epochs" in r.stdout, r.stderr[-2000:]


def test_a_validation_tie_goes_to_the_lower_loss():
    assert loop.improves({"top1": 97.1, "loss": 0.94}, {"top1": 97.1, "loss": 0.95})
    assert not loop.improves({"top1": 97.1, "loss": 0.96}, {"top1": 97.1, "loss": 0.95})
    assert loop.improves({"top1": 97.2, "loss": 2.0}, {"top1": 97.1, "loss": 0.95})   # top-1 first
    assert not loop.improves({"top1": 97.0, "loss": 0.1}, {"top1": 97.1, "loss": 0.95})
    assert not loop.improves({"top1": 97.1, "loss": 0.1}, {"top1": 97.1})   # an older checkpoint's best


@pytest.mark.slow
def test_fit_keeps_the_tied_epoch_with_the_lower_validation_loss(tiny_split, tmp_path, monkeypatch):
    """Validation top-1 ties at epochs 2 and 3, loss falls: best.pth is epoch 3, its weights the last's."""
    real, calls = loop.evaluate, []
    scripted = [(50.0, 2.0), (60.0, 1.5), (60.0, 1.2)]

    def evaluate(*args, **kw):
        m = real(*args, **kw)
        if len(calls) < len(scripted):
            m = dict(m, top1=scripted[len(calls)][0], loss=scripted[len(calls)][1])
        calls.append(m)
        return m

    monkeypatch.setattr(loop, "evaluate", evaluate)
    metrics = common.fit(config_for(tiny_split, tmp_path, name="tie"))
    assert (metrics["best_epoch"], metrics["best_val_top1"]) == (3, 60.0)
    run = tmp_path / "main_test" / "tie"
    best, last = (torch.load(run / f, weights_only=True) for f in ("best.pth", "last.pth"))
    assert best["epoch"] == 3 and best["best"] == {"top1": 60.0, "loss": 1.2, "epoch": 3}
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
