"""--cache-frozen: the frozen leading stages run once per image, and training is unchanged by it."""
import pytest
import torch

import common
from study import data, nets, options

from study import features, hardware

TINY = {"accordion", "airplanes", "anchor", "ant", "barrel", "bass", "beaver", "binocular", "bonsai", "brain",
        "brontosaurus", "buddha"}


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    """12 real classes, 6 train + 2 test images each."""
    from conftest import extract_subset

    return extract_subset(tmp_path_factory.mktemp("tiny"), per_class=8, classes=TINY)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Genuine ImageNet weights of EfficientNet-Lite0, saved by the test (nothing is downloaded)."""
    from study import efficientnet_lite

    path = tmp_path_factory.mktemp("weights") / "lite0_imagenet.pth"
    torch.save(efficientnet_lite.imagenet_state_dict(), path)
    return path


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "efficientnet_b4", "efficientnet_lite0"])
def test_the_forward_sequence_computes_the_model(arch):
    torch.manual_seed(0)
    model = nets.build_model(arch, 7, "none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torch.nn.Sequential(*nets.forward_sequence(model))(x), model(x))


@pytest.mark.parametrize("arch,unfreeze,bn_stats,prefix", [
    ("efficientnet_lite0", "last:5", "frozen", ["features.0", "features.1", "features.2", "features.3"]),
    ("efficientnet_lite0", "last:5", "train", ["features.0", "features.1", "features.2", "features.3"]),
    ("efficientnet_lite0", "all", "frozen", []),
    ("resnet18", "last:1", "train", ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]),
    ("resnet18", "layer1,layer4", "train", ["conv1", "bn1", "relu", "maxpool"]),
    # torchvision's B4 drops residual branches at random (stochastic depth) from its second block
    # on, frozen or not: only the stem computes the same every epoch
    ("efficientnet_b4", "last:3", "frozen", ["features.0"]),
])
def test_the_prefix_ends_where_training_or_randomness_begins(arch, unfreeze, bn_stats, prefix):
    model = nets.build_model(arch, 7, "none")
    nets.freeze(model, arch, nets.parse_unfreeze(unfreeze, arch))
    head, rest = features.split_frozen_prefix(model, bn_stats)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in head] == prefix
    assert len(head) + len(rest) == len(nets.forward_sequence(model))


def lite0_config(data, out, weights, **over):
    parser = options.get_args_parser(dict(arch="efficientnet_lite0", batch_size=16, epochs=2, scratch_epochs=2,
                                          lr=1e-3, weight_decay=1e-4, unfreeze="last:5", augment="none"))
    args = parser.parse_args(["--data", str(data), "--out", str(out), "--weights", str(weights), "--img-size",
                              "64", "--workers", "0", "--precision", "fp32", "--probe-epochs", "2",
                              "--cache-dir", str(out / "cache")])
    c = options.resolve_config(args, dict(epochs=2, scratch_epochs=2, unfreeze="last:5"), "main_test")
    c.update(over)
    return c


def run_weights(out, name):
    return torch.load(out / "main_test" / name / "last.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_training_on_cached_prefix_outputs_gives_bit_identical_weights(tiny_split, weights_file, tmp_path,
                                                                       capsys):
    # separate caches: the linear probe's features come from the full network (off) and from the
    # cached prefix outputs through the rest of it (auto)
    off = common.fit(lite0_config(tiny_split, tmp_path, weights_file, name="off", cache_frozen="off",
                                  cache_dir=str(tmp_path / "cache_off")))
    assert "frozen features.0" not in capsys.readouterr().out
    auto = common.fit(lite0_config(tiny_split, tmp_path, weights_file, name="auto",
                                   cache_dir=str(tmp_path / "cache_auto")))
    printed = capsys.readouterr().out
    # 60 train + 12 val + 24 test images; stage 3 leaves 40 channels at 64 / 8 = 8 px
    assert "frozen features.0 to features.3: outputs of 96 images (40x8x8, float32, 1 MiB)" in printed
    assert printed.index("frozen features.0") < printed.index("train: features of 60 images computed")
    for split in ("train", "val"):
        f_off, f_auto = (torch.load(next((tmp_path / c).glob(f"features-*-{split}-*.pt")), weights_only=True)
                         for c in ("cache_off", "cache_auto"))
        assert torch.equal(f_off["features"], f_auto["features"]) and torch.equal(f_off["labels"], f_auto["labels"])
    a, b = run_weights(tmp_path, "off"), run_weights(tmp_path, "auto")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: off[k] for k in ("test_top1", "test_loss", "best_val_top1", "best_epoch")} == \
           {k: auto[k] for k in ("test_top1", "test_loss", "best_val_top1", "best_epoch")}
    src = torch.load(weights_file, weights_only=True)
    assert all(torch.equal(src[k], b[k]) for k in src if k.startswith(("features.0.", "features.3.")))
    assert not torch.equal(src["features.4.0.block.0.0.weight"], b["features.4.0.block.0.0.weight"])


@pytest.mark.slow
def test_augmented_training_or_a_tight_memory_runs_every_stage_each_step(tiny_split, weights_file, tmp_path,
                                                                         capsys, monkeypatch):
    common.fit(lite0_config(tiny_split, tmp_path, weights_file, name="flip", augment="flip", epochs=1))
    assert "frozen features.0" not in capsys.readouterr().out  # each epoch shows other pixels
    monkeypatch.setattr(hardware, "memory_limit", lambda device: 1000)
    common.fit(lite0_config(tiny_split, tmp_path, weights_file, name="tight", epochs=1))
    printed = capsys.readouterr().out
    assert "frozen features.0 to features.3: outputs of 96 images would take 1 MiB, over the memory budget " \
           "(a quarter of the memory, less what is already resident); running them every step" in printed
    assert (tmp_path / "main_test" / "tight" / "metrics.json").is_file()


def test_prefix_batches_serve_the_loaders_order_and_labels(tiny_split, tmp_path):
    from study import pipeline

    classes, splits = data.read_data(lite0_config(tiny_split, tmp_path, "none"))[:2]
    train = splits["train"]
    pre = nets.make_preprocess("efficientnet_lite0", 32, "squash")
    loader = pipeline.build_loader(train, train=True, preprocess=pre, augment="none", seed_policy="efficientnet_lite0",
                                   batch_size=16, workers=0, device=torch.device("cpu"), seed=3,
                                   cache_dir=str(tmp_path / "cache"))
    outputs = torch.arange(len(loader.samples), dtype=torch.float32).view(-1, 1) * 10  # row i: sample i
    served = features.CachedBatches(loader, outputs)
    for epoch in (1, 2):
        served.set_epoch(epoch)
        got = [(x[:, 0] / 10).long() for x, _ in served]
        loader.set_epoch(epoch)
        assert [y.tolist() for _, y in served] == [y.tolist() for _, y in loader]
        assert [g.tolist() for g in got] == [i.tolist() for i in loader.batch_indices()]
    assert len(served) == len(loader) and sum(len(g) for g in got) == loader.num_samples
    with pytest.raises(ValueError, match="3 cached outputs for 60 samples"):
        features.CachedBatches(loader, outputs[:3])


@pytest.mark.slow
def test_a_resumed_run_recomputes_the_prefix_and_ends_bit_identical(tiny_split, weights_file, tmp_path, capsys):
    full = common.fit(lite0_config(tiny_split, tmp_path, weights_file, name="full"))
    part = lite0_config(tiny_split, tmp_path, weights_file, name="cut")
    assert common.fit(part, stop_after=1)["stopped_at"] == 1
    capsys.readouterr()
    resumed = common.fit(dict(part, resume="auto"))
    printed = capsys.readouterr().out
    assert "frozen features.0 to features.3: outputs of 96 images" in printed
    assert "linear probe" not in printed  # the checkpoint's head goes on training
    assert resumed["test_top1"] == full["test_top1"] and resumed["best_epoch"] == full["best_epoch"]
    a, b = run_weights(tmp_path, "full"), run_weights(tmp_path, "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
