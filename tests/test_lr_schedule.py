"""--lr-schedule: loop.lr_schedule against torch's own schedulers, step by step."""
import pytest
import torch

from study import loop, nets, options, steps


def _optimizer(lr=1e-3):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _rates(scheduler, optimizer, steps):
    """The rate each of `steps` optimizer steps uses, then the rate after the last scheduler step."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out + [optimizer.param_groups[0]["lr"]]


@pytest.mark.parametrize("steps_per_epoch,epochs", [(10, 10), (97, 10), (7, 3), (3, 40)])
def test_linear_matches_torch_linear_lr_after_linear_warmup(steps_per_epoch, epochs):
    total = steps_per_epoch * epochs
    warm = max(1, min(steps_per_epoch, total // 10))
    assert warm >= 2  # LinearLR over warm - 1 steps
    ours_opt = _optimizer()
    ours = _rates(loop.lr_schedule(ours_opt, steps_per_epoch, epochs, shape="linear"), ours_opt, total)
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.SequentialLR(ref_opt, [
        torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1),
        torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1.0, end_factor=0.0, total_iters=total - warm),
    ], milestones=[warm])
    theirs = _rates(ref, ref_opt, total)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)
    assert ours[-1] == 0.0  # exactly zero once the run's last step is taken
    assert ours[warm] == pytest.approx(1e-3) and max(ours) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(ours[warm:], ours[warm + 1:]))  # falls at every step after the warm-up


@pytest.mark.parametrize("steps_per_epoch,epochs", [(10, 10), (97, 10)])
def test_cosine_unchanged_and_matches_torch_cosine_annealing(steps_per_epoch, epochs):
    total = steps_per_epoch * epochs
    warm = steps_per_epoch
    ours_opt = _optimizer()
    ours = _rates(loop.lr_schedule(ours_opt, steps_per_epoch, epochs), ours_opt, total)
    named_opt = _optimizer()
    named = _rates(loop.lr_schedule(named_opt, steps_per_epoch, epochs, shape="cosine"), named_opt, total)
    assert ours == named  # the default is the cosine
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.SequentialLR(ref_opt, [
        torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total - warm, eta_min=0.0),
    ], milestones=[warm])
    theirs = _rates(ref, ref_opt, total)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-12)


def test_linear_lies_below_cosine_in_the_first_half_and_above_in_the_second():
    lin_opt, cos_opt = _optimizer(), _optimizer()
    lin = _rates(loop.lr_schedule(lin_opt, 10, 10, shape="linear"), lin_opt, 100)
    cos = _rates(loop.lr_schedule(cos_opt, 10, 10), cos_opt, 100)
    assert lin[:11] == cos[:11]  # the same warm-up
    mid = 10 + 45
    assert all(lin_v < cos_v for lin_v, cos_v in zip(lin[11:mid], cos[11:mid]))
    assert all(lin_v > cos_v for lin_v, cos_v in zip(lin[mid + 1:100], cos[mid + 1:100]))


def test_unknown_shape_refused():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        loop.lr_schedule(_optimizer(), 10, 10, shape="step")


DEFAULTS = dict(arch="tiny", batch_size=64, epochs=30, scratch_epochs=50, scratch_recipe="tuned", lr=3e-4,
                weight_decay=1e-5, unfreeze="last:1")


def _config(argv):
    args = options.get_args_parser(DEFAULTS).parse_args(argv)
    return options.resolve_config(args, DEFAULTS, "main_ResNet-18")


def test_option_default_cosine_and_the_run_name():
    c = _config(["--weights", "none", "--img-size", "112", "--epochs", "10"])
    assert c["lr_schedule"] == "cosine"
    assert "linear" not in options.default_run_name(c)
    lin = _config(["--weights", "none", "--img-size", "112", "--epochs", "10", "--lr-schedule", "linear"])
    assert lin["lr_schedule"] == "linear"
    assert options.default_run_name(lin) == options.default_run_name(c) + "-linear"
    # a run recorded before the option trained with the cosine: no difference to resume across
    old = {k: v for k, v in c.items() if k != "lr_schedule"}
    assert options.differing_options(old, c) == []
    assert [k for k, *_ in options.differing_options(old, lin)] == ["lr_schedule"]


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_make_optimizer_uses_the_option(shape):
    c = _config(["--weights", "none", "--img-size", "32", "--epochs", "3", "--lr-schedule", shape])
    optimizer, scheduler, _ = steps.make_optimizer(c, nets.build_model("tiny", 3, "none"), 10, torch.device("cpu"),
                                                   None, False)
    rates = _rates(scheduler, optimizer, 30)
    ref_opt = _optimizer(c["lr"])
    assert rates == _rates(loop.lr_schedule(ref_opt, 10, 3, shape=shape), ref_opt, 30)
