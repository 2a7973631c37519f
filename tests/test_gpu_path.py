"""The GPU path's mechanisms, driven on the CPU: fp16 with a GradScaler through a real fit()
(stop and resume included), resident against streamed decode caches, out of memory in every
phase, the CUDA RNG state in checkpoints, and torch.compile."""
import shutil

import pytest
import torch

import common
from study import loop, nets, pipeline, steps
from study import hardware
from study import experiments
from study import features
from study import options

FP16_ARGS = dict(precision="fp16")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """5 real classes, 6 train + 2 test images each, 64 px."""
    from conftest import extract_subset

    return extract_subset(tmp_path_factory.mktemp("gpu_path"), per_class=8,
                          classes={"accordion", "anchor", "barrel", "bonsai", "brain"})


DEFAULTS = dict(arch="tiny", batch_size=8, epochs=3, scratch_epochs=3, lr=1e-3, weight_decay=1e-4,
                unfreeze="last:1")


def config(data, out, **over):
    defaults = DEFAULTS
    args = options.get_args_parser(defaults).parse_args(
        ["--data", str(data), "--out", str(out), "--weights", "none", "--img-size", "32", "--workers", "0",
         "--cache-dir", str(out / "cache")])
    return dict(options.resolve_config(args, defaults, "main_test"), **over)


def last(c):
    return torch.load(options.run_dir_of(c) / "last.pth", weights_only=True)


def same_weights(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_fp16_with_a_grad_scaler_stops_resumes_and_ends_bit_identical(data, tmp_path, capsys):
    full = common.fit(config(data, tmp_path, name="full", **FP16_ARGS))
    assert "warning: --precision fp16 on the CPU" in capsys.readouterr().err
    cut = config(data, tmp_path, name="cut", **FP16_ARGS)
    assert common.fit(cut, stop_after=1)["stopped_at"] == 1
    mid = last(cut)
    assert mid["epoch"] == 1 and mid["scaler"]["scale"] > 0 and "_growth_tracker" in mid["scaler"]
    resumed = common.fit(dict(cut, resume="auto"))
    a, b = last(config(data, tmp_path, name="full")), last(cut)
    assert same_weights(a, b) and a["scaler"] == b["scaler"]
    assert resumed["test_top1"] == full["test_top1"] and resumed["best_val_top1"] == full["best_val_top1"]


def test_the_scaler_skips_a_step_on_inf_gradients_and_lowers_its_scale():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    params = list(layer.parameters())
    x = torch.randn(5, 4)
    before = [p.detach().clone() for p in params]
    loop.backward_and_step((layer(x) * float("inf")).sum(), opt, params, scaler, clip=1.0)
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # skipped
    assert scaler.get_scale() == 2.0 ** 9
    loop.backward_and_step(layer(x).square().mean(), opt, params, scaler, clip=1.0)
    assert not all(torch.equal(p, q) for p, q in zip(params, before))  # a finite step is taken
    # unscaled before clipping: the clipped norm is the true gradient's (<= 1), not 2^9 times it
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert norm <= 1.0 + 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["seed", "none"])
def test_resident_and_streamed_decode_caches_train_bit_identically(data, tmp_path, augment):
    runs = {}
    for resident in (True, False):
        c = config(data, tmp_path, name=f"resident{resident}", precision="fp32", epochs=2, augment=augment,
                   cache_frozen="off")
        runs[resident] = common.fit(c, resident=resident)
        runs[resident, "ckpt"] = last(c)
    assert same_weights(runs[True, "ckpt"], runs[False, "ckpt"])
    assert runs[True]["test_top1"] == runs[False]["test_top1"]


def test_the_budget_places_decode_caches_and_the_frozen_part_releases_them(data, tmp_path, monkeypatch):
    placed, released = [], []
    real_build = steps.build_loaders

    def spy(run, budget, resident=None, step=None):
        loaders, options = real_build(run, budget, resident, step)
        for split, loader in loaders.items():
            if loader is not None and loader.resident:
                placed.append(split)
                real_release = loader.release
                loader.release = lambda s=split, r=real_release: (released.append(s), r())
        return loaders, options

    monkeypatch.setattr(steps, "build_loaders", spy)
    c = config(data, tmp_path, precision="fp32", epochs=1, augment="none", weights="none", unfreeze="last:1")
    common.fit(c, resident=True)
    assert placed == ["train", "val", "test"]
    assert sorted(set(released)) == ["test", "train", "val"]  # the frozen prefix's outputs replaced them


@pytest.mark.slow
def test_gpu_cache_off_keeps_every_decode_cache_in_host_memory_with_the_same_results(data, tmp_path, monkeypatch):
    """The tensor path forced on the CPU, as on a GPU: --gpu-cache auto puts each decode cache the budget
    allows in device memory, off none of them; the weights are the same, and a resume may change it."""
    real_options, real_build, placed, ckpt = steps.loader_options, steps.build_loaders, {}, {}

    def spy(run, budget, resident=None, step=None):
        loaders, options = real_build(run, budget, resident, step)
        placed[run.config["gpu_cache"]] = sorted(s for s, loader in loaders.items() if loader and loader.resident)
        return loaders, options

    monkeypatch.setattr(steps, "loader_options", lambda *a, **k: dict(real_options(*a, **k), on_device=True))
    monkeypatch.setattr(steps, "build_loaders", spy)
    for mode in ("auto", "off"):
        c = config(data, tmp_path, name=f"gpu-cache-{mode}", precision="fp32", epochs=1, cache_frozen="off")
        assert c["gpu_cache"] == "auto"  # the default
        c["gpu_cache"] = options.get_args_parser(DEFAULTS).parse_args(["--gpu-cache", mode]).gpu_cache
        common.fit(c)
        ckpt[mode] = last(c)
    assert placed == {"auto": ["test", "train", "val"], "off": []}
    assert same_weights(ckpt["auto"], ckpt["off"])
    assert options.differing_options(ckpt["auto"]["config"], dict(ckpt["auto"]["config"], gpu_cache="off")) == []


def oom(*a, **k):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


GPU_CACHE_OFF = "--gpu-cache off (decode caches in host memory, same results)"
NOTHING_TO_TURN_OFF = "the decode caches are in host memory already: free the GPU of other work or use a larger one"
OOM_LINES = {  # (stage, decode caches resident) -> the line
    ("training", True): f"out of GPU memory in the training stage with --batch-size 8; try {GPU_CACHE_OFF}, "
                        f"then --batch-size 4",
    ("training", False): "out of GPU memory in the training stage with --batch-size 8; try --batch-size 4",
    ("frozen prefix", True): f"out of GPU memory in the frozen prefix stage; try {GPU_CACHE_OFF}, then --cache-frozen off",
    ("frozen prefix", False): "out of GPU memory in the frozen prefix stage; try --cache-frozen off",
    **{(stage, True): f"out of GPU memory in the {stage} stage; try {GPU_CACHE_OFF}"
       for stage in ("evaluation", "probe", "features", "test")},
    **{(stage, False): f"out of GPU memory in the {stage} stage; {NOTHING_TO_TURN_OFF}"
       for stage in ("evaluation", "probe", "features", "test")},
}


@pytest.mark.slow
@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("stage", ["training", "evaluation", "frozen prefix", "probe", "features", "test"])
def test_out_of_memory_anywhere_ends_in_one_line_naming_the_stage(data, tmp_path, monkeypatch, stage, resident):
    """The line names the stage; --gpu-cache off comes first where decode caches are resident (forced
    here on the CPU), and half the batch size only in training, where the batch is what grew."""
    c = config(data, tmp_path, precision="fp32", epochs=1)
    if stage == "training":
        monkeypatch.setattr(loop, "train_one_epoch", oom)
    elif stage == "evaluation":
        monkeypatch.setattr(loop, "evaluate", oom)
    elif stage == "test":  # only the test pass keeps its worst mistakes
        real = loop.evaluate
        monkeypatch.setattr(loop, "evaluate", lambda *a, mistakes=0, **k: oom() if mistakes else
                            real(*a, mistakes=mistakes, **k))
    elif stage == "frozen prefix":
        monkeypatch.setattr(features, "outputs_of", oom)
        c.update(augment="none", unfreeze="last:1")
    elif stage == "probe":  # the probe's first step computes the features its head trains on
        monkeypatch.setattr(features, "features_before_head", oom)
        c.update(probe_epochs=2, weights=str(lite_like_weights(tmp_path)))
    else:
        monkeypatch.setattr(features, "features_before_head", oom)
        c.update(unfreeze="head")
    with pytest.raises(SystemExit) as e:
        common.fit(c, resident=resident)
    assert str(e.value) == "error: " + OOM_LINES[stage, resident]
    run_dir = options.run_dir_of(c)
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "last.pth").exists() == (stage == "test")  # the epochs before it are kept


def test_out_of_memory_while_placing_the_decode_caches_names_gpu_cache_off(data, tmp_path, monkeypatch):
    """Placing the decode caches in GPU memory is what ran out: --gpu-cache off is the remedy."""
    c = config(data, tmp_path, precision="fp32", epochs=1)
    monkeypatch.setattr(pipeline.Loader, "make_resident", oom)
    with pytest.raises(SystemExit) as e:
        common.fit(c, resident=True)
    assert str(e.value) == f"error: out of GPU memory while placing the decode caches on the GPU; try {GPU_CACHE_OFF}"


def lite_like_weights(tmp_path):
    """A tiny network's state dict saved in the test: a 'pretrained' file for the probe."""
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(nets.build_model("tiny", 1000, "none").state_dict(), path)
    return path


@pytest.mark.slow
def test_a_grid_trial_out_of_memory_is_recorded_and_the_grid_goes_on(data, tmp_path, monkeypatch):
    def fit(c, stop_after=None):
        """common.fit, out of memory in training for the batch-16 trial only."""
        with monkeypatch.context() as m:
            if c["batch_size"] == 16:
                m.setattr(loop, "train_one_epoch", oom)
            return common.fit(c, stop_after)

    c = config(data, tmp_path, epochs=1, grid_spec="batch_size=16,8")
    ranked = experiments.run(c, {}, fit)
    by = {r["batch_size"]: r for r in ranked}  # the global batch, as the table shows it
    assert by["16"]["status"] == "failed"
    assert by["16"]["error"] == "out of GPU memory in the training stage with --batch-size 16; try --batch-size 8"
    assert by["8"]["status"] == "done"


def test_checkpoints_carry_the_cuda_rng_state_and_a_resume_restores_it(monkeypatch):
    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.append(s))
    gpu = torch.device("cuda", 0)
    state = hardware.rng_state(gpu)
    assert state["cuda_rng"] is states and torch.equal(state["rng"], torch.get_rng_state())
    assert "cuda_rng" not in hardware.rng_state(torch.device("cpu"))
    hardware.set_rng_state(state, gpu)
    assert restored == [states]
    hardware.set_rng_state({"rng": state["rng"]}, gpu)  # a checkpoint from the CPU: nothing to restore
    assert restored == [states]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler, and none is installed")
@pytest.mark.slow
def test_compile_is_close_to_eager_and_keeps_plain_checkpoint_keys(data, tmp_path):
    from study import prediction

    out = {}
    for compiled in (False, True):
        c = config(data, tmp_path, name=f"compile{compiled}", precision="fp32", epochs=2, compile=compiled,
                   augment="none", cache_frozen="off")
        out[compiled] = (common.fit(c), last(c), options.run_dir_of(c))
    from test_run import tb_scalars

    (me, ce), (le, lc) = (out[False][0], out[True][0]), (out[False][1], out[True][1])
    n = me["test_images"]
    assert abs(me["test_top1"] - ce["test_top1"]) * n / 100 <= 1 + 1e-9  # within one image
    first = [tb_scalars(out[k][2]).Scalars("Loss/train")[0].value for k in (False, True)]
    assert abs(first[0] - first[1]) < 1e-3  # the first epoch's mean training loss
    assert list(lc["model"]) == list(le["model"])  # plain keys: no "_orig_mod." prefix
    model, classes, _ = prediction.load_model(out[True][2] / "last.pth")
    assert len(classes) == 5
