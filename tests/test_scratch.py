"""The random-init recipes (--scratch-recipe): the original one still builds today's optimiser,
schedule and augmentation; the tuned one's parts (SGD, zero-init residual, TrivialAugment/RandAugment,
erasing, MixUp/CutMix, the weights' moving average, flip test-time augmentation) do what they say, and
the average is what best.pth and predict.py hold."""
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from study import augment as A
import common
from study import data, loop, nets, steps
from study import options
from study import prediction
from study import records

ROOT = Path(__file__).resolve().parents[1]
R18 = dict(arch="resnet18", batch_size=64, epochs=30, scratch_epochs=50, lr=3e-4, weight_decay=1e-5,
           unfreeze="last:1")


def config(argv, defaults=R18):
    return options.resolve_config(options.get_args_parser(defaults).parse_args(argv), defaults, "main_test")


def test_original_recipe_is_todays_scratch_config():
    """--scratch-recipe original: the script's lr, weight decay and --augment seed with AdamW, nothing added."""
    c = config(["--weights", "none", "--scratch-recipe", "original"])
    assert (c["optimizer"], c["lr"], c["weight_decay"], c["augment"], c["label_smoothing"]) == \
        ("adamw", 3e-4, 1e-5, "seed", 0.1)
    assert (c["zero_init_residual"], c["mixup"], c["cutmix"], c["erasing"], c["ema"]) == ("off", 0.0, 0.0, 0.0, 0.0)
    assert (c["auto_augment"], c["tta"]) == ("none", "none")
    assert (c["unfreeze"], c["backbone_lr_ratio"], c["bn_stats"], c["probe_epochs"]) == ("all", 1.0, "train", 0)


def test_tuned_recipe_is_the_default_and_the_command_line_wins():
    c = config(["--weights", "none"])
    tuned = options.SCRATCH_RECIPES["tuned"]
    assert {k: c[k] for k in tuned} == tuned
    c = config(["--weights", "none", "--lr", "0.05", "--augment", "seed", "--ema", "0"])
    assert (c["lr"], c["augment"], c["ema"], c["optimizer"]) == (0.05, "seed", 0.0, tuned["optimizer"])
    c = config(["--weights", "none", "--optimizer", "sgd"])
    assert (c["optimizer"], c["lr"], c["augment"]) == ("sgd", tuned["lr"], tuned["augment"])
    # pretrained: today's defaults, whatever --scratch-recipe says
    p = config([])
    assert (p["optimizer"], p["lr"], p["augment"], p["zero_init_residual"], p["ema"], p["mixup"]) == \
        (None, 3e-4, "seed", "off", 0.0, 0.0)


def test_comparison_random_side_gets_the_recipe_and_grid_trials_keep_their_axes():
    """The comparison makes its random side from the pretrained config; a grid trial varies a resolved one."""
    pre = config([])
    random_side = options.scratch_rules(dict(pre, weights="none"))
    tuned = options.SCRATCH_RECIPES["tuned"]
    assert {k: random_side[k] for k in tuned} == tuned
    base = config(["--weights", "none"])
    trial = options.scratch_rules(dict(base, lr=0.01))
    assert trial["lr"] == 0.01


def built_optimizer(argv, tmp_path):
    """What a fresh run builds for its epochs on a real (tiny) network: -> (optimizer, scheduler, run,
    weights' average, batch step)."""
    c = config(argv + ["--img-size", "32", "--workers", "0", "--out", str(tmp_path)])
    run = steps.Run(c, 0, 1, torch.device("cpu"), None, {}, tmp_path, None, [str(i) for i in range(5)], {},
                    steps.build_network(c, 5, None, torch.device("cpu"), 0, 1), records.FolderLock(tmp_path), None)
    opt, sched, scaler = steps.make_optimizer(c, run.model, 20, run.device, None, False)
    ema = steps.averaged_model(c, run.model, opt)
    batch_step = steps.batch_step(c, 5, nets.make_preprocess("resnet18", 32, c["crop_mode"]))
    steps.restore(run, steps.Training(run.model, {}, None, opt, sched, scaler, ema, batch_step))
    return opt, sched, run, ema, batch_step


def test_original_recipe_builds_todays_optimizer_schedule_and_augmentation(tmp_path):
    """As the code before --scratch-recipe: AdamW over param_groups at lr 3e-4, warm-up + cosine,
    the ResNet-18 script's augmentation, no batch step."""
    opt, sched, run, ema, batch_step = built_optimizer(["--weights", "none", "--scratch-recipe", "original"], tmp_path)
    ref = torch.optim.AdamW(nets.param_groups(run.model, "resnet18", 3e-4, 1e-5, 1.0))
    assert type(opt) is torch.optim.AdamW and opt.defaults == ref.defaults
    ref_sched = loop.lr_schedule(ref, 20, 50)
    assert [(g["initial_lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == \
        [(g["initial_lr"], g["weight_decay"], len(g["params"])) for g in ref.param_groups]
    assert {g["initial_lr"] for g in opt.param_groups} == {3e-4}
    lrs, ref_lrs = [], []
    for _ in range(1000):
        opt.step(), sched.step(), ref.step(), ref_sched.step()
        lrs.append(opt.param_groups[0]["lr"]), ref_lrs.append(ref.param_groups[0]["lr"])
    assert lrs == ref_lrs
    assert A.train_policy(run.config["augment"], "resnet18") == A.SEED_POLICIES["resnet18"]
    assert batch_step is None and ema is None
    assert all(m.weight.abs().sum() > 0 for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_sgd_and_zero_init_residual_options(tmp_path):
    opt, _, run, _, _ = built_optimizer(["--weights", "none", "--optimizer", "sgd", "--lr", "0.1",
                                         "--zero-init-residual", "on"], tmp_path)
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert {g["initial_lr"] for g in opt.param_groups} == {0.1}
    blocks = [b for layer in (run.model.layer1, run.model.layer2, run.model.layer3, run.model.layer4) for b in layer]
    assert len(blocks) == 8 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert torch.count_nonzero(run.model.bn1.weight) > 0


@pytest.mark.parametrize("bn_stats", ["train", "frozen"])
def test_the_weights_average_is_torchs_averaged_model_on_what_trains(bn_stats):
    """loop.WeightAverage against torch.optim.swa_utils.AveragedModel(get_ema_multi_avg_fn, use_buffers):
    the same numbers for every trained parameter and trained-part buffer; frozen ones are not touched."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nets.build_model("resnet18", 5, "none")
    nets.freeze(model, "resnet18", ["layer4"])
    ours, ref = loop.WeightAverage(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
                                                              use_buffers=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        nets.set_train_mode(model, bn_stats)
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
        ours.update(), ref.update_parameters(model)
    assert ours.steps == 4
    mine, theirs = ours.module.state_dict(), ref.module.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if mine[k].is_floating_point())
    # BatchNorm's step counter is copied (AveragedModel "averages" it in integers, truncating)
    counts = [k for k in mine if k.endswith("num_batches_tracked") and k.startswith("layer4")]
    assert all(torch.equal(mine[k], model.state_dict()[k]) for k in counts) and len(counts) == 5
    # averaged: layer4's and fc's 17 parameters and the running mean and variance of layer4's 5 BatchNorms
    assert len(ours.floats) == 17 + 5 * 2


def test_batched_erasing_is_torchvisions_erase():
    """Each image of the batch erased with its own box, exactly as torchvision's erase with that box;
    the boxes follow RandomErasing's distribution (area 2-33 %, aspect 0.3-3.3, rate p)."""
    x = torch.randn(400, 3, 24, 32)
    boxes = A.erase_params(len(x), 24, 32, 0.5, torch.Generator().manual_seed(0))
    out = A.erase_batch(x, boxes)
    for k in range(len(x)):
        i, j, h, w = boxes[k].tolist()
        want = TF.erase(x[k], i, j, h, w, torch.tensor(0.0)) if h else x[k]
        assert torch.equal(out[k], want)
    on = boxes[:, 2] > 0
    assert 0.4 < on.float().mean() < 0.6
    area = (boxes[on, 2] * boxes[on, 3]).float() / (24 * 32)
    assert area.min() > 0.015 and area.max() < 0.34
    assert torch.all(boxes[on, 0] + boxes[on, 2] <= 24) and torch.all(boxes[on, 1] + boxes[on, 3] <= 32)


def test_mixup_cutmix_batch_step_gives_probabilities_and_top1_counts_the_dominant_class():
    step = A.batch_augment(0.0, 0.2, 1.0, num_classes=7)
    x, y = torch.randn(6, 3, 16, 16), torch.arange(6)
    torch.manual_seed(0)
    xm, t = step(x, y)
    assert t.shape == (6, 7) and torch.allclose(t.sum(1), torch.ones(6))
    assert not torch.equal(xm, x)
    # one library transform per batch: the same draw from torchvision's own MixUp/CutMix
    torch.manual_seed(0)
    xr, tr = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=7), v2.CutMix(alpha=1.0, num_classes=7)])(x, y)
    assert torch.equal(xm, xr) and torch.equal(t, tr)
    assert A.batch_augment(0.0, 0.0, 0.0, 7) is None


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name, op", [("trivial", v2.TrivialAugmentWide), ("rand", v2.RandAugment)])
def test_batched_auto_augment_is_torchvisions_op_per_image(name, op):
    """--auto-augment on a normalised batch: torchvision's op called on each un-normalised image in turn
    (each its own op and magnitude), from the same torch RNG state. Equal to float rounding, not bit for
    bit: un-normalising gives the images back within ~1e-7. Pixels sit at (k + 0.5) / 256, away from
    posterize's, solarize's and equalize's steps, so no rounding crosses one."""
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    u = (torch.randint(0, 256, (16, 3, 24, 32), generator=torch.Generator().manual_seed(0)) + 0.5) / 256
    x = ((u - m) / s).contiguous(memory_format=torch.channels_last)
    step = A.batch_augment(0.0, 0.0, 0.0, 7, name, IMAGENET_MEAN, IMAGENET_STD)
    y = torch.arange(16)
    torch.manual_seed(1)
    out, target = step(x, y)
    torch.manual_seed(1)
    ref = op()
    want = (torch.stack([ref(img) for img in u]) - m) / s
    assert torch.allclose(out, want, rtol=0, atol=1e-5) and torch.equal(target, y)
    assert out.is_contiguous(memory_format=torch.channels_last)
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.sum() >= 12
    # one op for the whole batch (the library's call on a batch) is not what the batch step does
    torch.manual_seed(1)
    assert not torch.allclose(out, (ref(u) - m) / s, atol=1e-3)


def test_auto_augment_and_tta_are_recorded_recipe_options():
    pre, scratch = config([]), config(["--weights", "none"])
    assert (pre["auto_augment"], pre["tta"], scratch["auto_augment"], scratch["tta"]) == ("none",) * 4
    c = config(["--auto-augment", "trivial", "--tta", "flip"])
    diff = options.describe_differences(options.differing_options(pre, c))
    assert diff == "--auto-augment none there, trivial now; --tta none there, flip now"


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    from conftest import extract_subset

    classes = {"accordion", "airplanes", "anchor", "ant", "barrel", "bass"}
    return extract_subset(tmp_path_factory.mktemp("tiny"), per_class=8, classes=classes)


@pytest.mark.slow
def test_ema_checkpoint_holds_the_averaged_weights_and_predict_uses_them(tiny_split, tmp_path):
    """--ema: best.pth's "model" is the average (validation's and the test's weights), "online_model" the
    trained ones; predict.py loads the average; a resumed run continues both."""
    argv = ["--weights", "none", "--img-size", "32", "--workers", "0", "--epochs", "2", "--batch-size", "8",
            "--ema", "0.9", "--auto-augment", "trivial", "--erasing", "0.25", "--mixup", "0.2", "--cutmix", "1.0",
            "--data", str(tiny_split), "--out", str(tmp_path)]
    c = config(argv)
    common.fit(c, stop_after=1)
    run_dir = options.run_dir_of(c)
    first = records.load_checkpoint(run_dir / "last.pth")
    # resuming: the trained weights continue training, the average continues averaging
    m = common.fit(config(argv + ["--resume", "auto"]))
    best = records.load_checkpoint(run_dir / "best.pth")
    last = records.load_checkpoint(run_dir / "last.pth")
    assert last["epoch"] == 2 and last["ema_steps"] == 2 * first["ema_steps"] > 0
    key = "layer4.1.conv2.weight"
    assert not torch.equal(last["model"][key], last["online_model"][key])
    model = prediction.load_model(run_dir / "best.pth")[0]
    assert torch.equal(model.state_dict()[key], best["model"][key])
    # the best epoch's validation top-1 is the averaged weights' own
    assert m["best_val_top1"] == best["best"]["top1"]


@pytest.mark.parametrize("part", [["--unfreeze", "head"], ["--unfreeze", "last:1", "--augment", "none"]])
def test_ema_is_refused_before_any_cache_is_built_where_the_frozen_part_runs_once(tiny_split, tmp_path, part):
    c = config(["--data", str(tiny_split), "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                "--img-size", "32", "--workers", "0", "--epochs", "1", "--weights", "none", "--ema", "0.99", *part])
    with pytest.raises(SystemExit, match="--ema averages the whole network"):
        common.fit(c)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "main_test").exists()


def test_configs_written_before_the_scratch_options_still_match():
    """A pretrained run's config.json from before these options: resuming it finds no difference."""
    now = config([])
    old = {k: v for k, v in now.items() if k not in list(options.RECIPE_OPTIONS) + ["scratch_recipe", "explicit"]}
    assert options.differing_options(old, now) == []
    # a random-init run of then differs from today's tuned default, and says so
    then = {k: v for k, v in config(["--weights", "none", "--scratch-recipe", "original"]).items()
            if k not in list(options.RECIPE_OPTIONS) + ["scratch_recipe", "explicit", "scratch_filled"]}
    diff = options.describe_differences(options.differing_options(then, config(["--weights", "none"])))
    assert "--lr 0.0003 there, 0.001 now" in diff


def tiny_run(split, out, *extra):
    """A real one-epoch run from random weights on the tiny split, 32 px, fp32 -> (config, metrics, run dir)."""
    c = config(["--weights", "none", "--img-size", "32", "--workers", "0", "--epochs", "1", "--batch-size", "8",
                "--precision", "fp32", "--data", str(split), "--out", str(out), *extra])
    return c, common.fit(c), options.run_dir_of(c)


def by_hand(c, run_dir, split, tta):
    """best.pth's network on the split's images as the run's loader serves them: softmax probabilities
    (averaged with the mirror's when tta), the cross-entropy with the run's label smoothing, the labels."""
    model = prediction.load_model(run_dir / "best.pth")[0]
    loader = steps.make_loader(data.read_data(c)[1][split], steps.loader_options(c, torch.device("cpu")),
                               train=False, augment="none", batch_size=8)
    x, y = (torch.cat(t) for t in zip(*loader))
    with torch.no_grad():
        p = model(x).softmax(1)
        if tta:
            p = (p + model(x.flip(3)).softmax(1)) / 2
    return p, torch.nn.functional.cross_entropy(p.log(), y, label_smoothing=c["label_smoothing"]).item(), y


@pytest.mark.slow
def test_tta_flip_averages_the_mirrors_probabilities_in_validation_the_test_and_predict(tiny_split, tmp_path):
    c, m, run_dir = tiny_run(tiny_split, tmp_path, "--tta", "flip")
    p, loss, y = by_hand(c, run_dir, "test", tta=True)
    plain_loss = by_hand(c, run_dir, "test", tta=False)[1]
    assert abs(loss - plain_loss) > 1e-3   # the mirror changes what is measured
    confusion = torch.zeros(6, 6, dtype=torch.long).index_put_((y, p.argmax(1)), torch.ones_like(y), accumulate=True)
    saved = records.load_json(run_dir / "metrics.json")
    assert saved["test_confusion"] == confusion.tolist()
    assert m["test_loss"] == pytest.approx(loss, abs=1e-5)
    # validation selected on the averaged probabilities too
    best = records.load_checkpoint(run_dir / "best.pth")["best"]
    p_val, val_loss, y_val = by_hand(c, run_dir, "val", tta=True)
    assert best["top1"] == pytest.approx(100 * (p_val.argmax(1) == y_val).double().mean().item())
    assert best["loss"] == pytest.approx(val_loss, abs=1e-5)
    # predict.py on the run's checkpoint: the same averaging, on its own preprocessing of the files
    model, classes, pre = prediction.load_model(run_dir / "best.pth")
    paths = [str(s) for s in sorted((tiny_split / "test").rglob("*.jpg"))[:4]]
    got = list(prediction.predict_paths(model, classes, pre, paths, device=torch.device("cpu"), k=3))
    batch = torch.stack([prediction.load_image(f, pre) for f in paths])
    with torch.no_grad():
        want = ((model(batch).softmax(1) + model(batch.flip(3)).softmax(1)) / 2).topk(3)
    assert pre["tta"] == "flip"
    for r, probs, idx in zip(got, want.values.tolist(), want.indices.tolist()):
        assert [t["class"] for t in r["top5"]] == [classes[i] for i in idx]
        assert [t["prob"] for t in r["top5"]] == pytest.approx(probs, abs=1e-5)


@pytest.mark.slow
def test_without_tta_the_test_pass_reads_the_plain_softmax(tiny_split, tmp_path):
    c, m, run_dir = tiny_run(tiny_split, tmp_path)
    assert c["tta"] == "none" and prediction.load_model(run_dir / "best.pth")[2]["tta"] == "none"
    assert m["test_loss"] == pytest.approx(by_hand(c, run_dir, "test", tta=False)[1], abs=1e-5)


def test_options_on_images_are_refused_on_cached_features():
    with pytest.raises(SystemExit, match="--auto-augment rand and --tta flip act on images: not with --unfreeze head"):
        config(["--unfreeze", "head", "--tta", "flip", "--auto-augment", "rand"])
    assert config(["--unfreeze", "last:0", "--tta", "flip"])["tta"] == "flip"
    # erasing boxes and mixed images mean nothing on a feature vector
    with pytest.raises(SystemExit, match="--erasing 0.25 and --mixup 0.2 act on images: not with --unfreeze head"):
        config(["--unfreeze", "head", "--erasing", "0.25", "--mixup", "0.2"])
    assert steps.frozen_wanted(config(["--unfreeze", "last:1", "--augment", "none", "--cutmix", "1.0"]), 1) is False
    assert steps.frozen_wanted(config(["--unfreeze", "last:1", "--augment", "none"]), 1) is True
