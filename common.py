"""What every main_*.py script imports: fit(config), one run read top to bottom, and main().

A script passes its defaults and grid to main(). One resolved config dict goes everywhere: it is
printed, saved as config.json, stored in every checkpoint and written as TensorBoard hparams.
fit(config) trains one run in its own folder and returns its metrics; the grid, the comparison
and torchrun reuse it. Its steps live in study/steps.py, the loop in study/loop.py (DESIGN.md).
"""
import functools
import sys
from pathlib import Path

import torch
import torch.nn as nn

from study import experiments, hardware, loop, pipeline, processes, records, steps
from study.errors import fail, oom_message
from study.options import get_args_parser, resolve_config


# --------------------------------------------------------------------------------------------
# fit(config): one run, in its own folder; returns its metrics.
# --------------------------------------------------------------------------------------------
def fit(config, stop_after=None, *, resident=None, defaults=None):
    """Train one run; write config.json, events, last.pth, best.pth, metrics.json; return the metrics.

    stop_after: stop after this epoch without the test evaluation (successive halving); a later
    call with resume continues the same schedule. resident: None lets the run's memory budget
    decide which decode caches live in device memory; True/False forces it (tests, on the CPU).
    defaults: the script's default config, for the header's list of changed options.
    Out of memory anywhere in the run ends in one line that names the step and what to try.
    """
    rank, world, _ = processes.torchrun_env()
    step = steps.Step()
    with processes.one_fails_all(world, rank):
        try:
            run = steps.start_run(config, defaults)
            try:
                return train_and_test(run, step, stop_after, resident)
            finally:
                run.lock.release()
        except torch.OutOfMemoryError as e:
            msg = failure_line(config, step, e)
            hardware.free_cached_memory()
            fail(msg)
        except OSError as e:  # a write outside records.atomic_write (TensorBoard's events) met a full disk
            if not records.disk_full(e):
                raise
            where = e.filename or steps.run_folder(config) / "events"
            raise records.DiskFull(records.disk_full_line(where, kept="the run's saved epochs are kept")) from None


def failure_line(config, step, error):
    """The one line a run ends with: out of memory names the step and what to try."""
    if isinstance(error, torch.OutOfMemoryError):
        return oom_message(config["batch_size"], step.name, step.caches_on_gpu())
    return processes.error_line(error)


def train_and_test(run, step, stop_after, resident):
    """The loaders, the frozen part's outputs, the probe, the optimizer, the epochs, the test."""
    config = run.config
    budget = hardware.MemoryBudget(hardware.memory_limit(run.device))
    loaders, options = steps.build_loaders(run, budget, resident, step)
    step.loaders = loaders
    wants_sources = steps.frozen_wanted(run.config, run.world) or (steps.probe_wanted(run) and run.world == 1)
    sources = steps.eval_sources(run, loaders, options) if wants_sources else {}
    frozen = steps.frozen_inputs(run, loaders, sources, budget, step)
    if steps.probe_wanted(run):  # every rank alike: same features, same seed
        steps.linear_probe(run, loaders, sources, frozen, budget, step)
    step.name = "setup"
    training = make_training(run, loaders, frozen, options["preprocess"])
    so_far = steps.restore(run, training)
    writer = steps.open_records(run)
    last_epoch = config["epochs"] if stop_after is None else min(stop_after, config["epochs"])
    so_far = train_epochs(run, training, so_far, writer, last_epoch, step)
    if last_epoch < config["epochs"]:
        if writer is not None:
            writer.close()
        return {"stopped_at": last_epoch, "best_val_top1": so_far.best["top1"],
                "best_epoch": so_far.best["epoch"], "train_seconds": round(so_far.train_seconds, 2),
                "processes": run.world}
    return test_pass(run, training, loaders, so_far, writer, step)


def make_training(run, loaders, frozen, preprocess):
    """-> steps.Training: the trained module and its batches, the optimizer, the weights' average and
    the batch step."""
    net, batches, dtype = steps.trained_net(run, loaders, frozen)
    optimizer, scheduler, scaler = steps.make_optimizer(run.config, run.model, len(batches["train"]), run.device,
                                                        run.dtype, steps.head_on_features(run.config, run.world))
    ema = steps.averaged_model(run.config, run.model, optimizer)
    return steps.Training(net, batches, dtype, optimizer, scheduler, scaler, ema,
                          steps.batch_step(run.config, len(run.classes), preprocess))


def train_epochs(run, training, so_far, writer, last_epoch, step):
    """The epoch loop: train, validate, keep best.pth (on validation) and last.pth. -> so_far."""
    c, t = run.config, training
    criterion = nn.CrossEntropyLoss(label_smoothing=c["label_smoothing"])  # validation's: every image alike
    weight = loop.class_weights(run.splits["train"], len(run.classes)).to(run.device) \
        if c.get("class_balance", "none") == "loss" else None
    train_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=c["label_smoothing"])
    if run.ckpt:  # dropout draws continue as if never interrupted, each rank's its own
        hardware.set_rng_state(run.ckpt, run.device, run.rank)
    for epoch in range(so_far.start_epoch, last_epoch + 1):
        t.batches["train"].set_epoch(epoch)
        step.name = "training"
        try:
            tm = loop.train_one_epoch(t.net, t.batches["train"], t.optimizer, t.scheduler, train_loss, run.device,
                                      t.dtype, epoch=epoch, scaler=t.scaler, show_bar=run.rank == 0,
                                      bn_stats=c["bn_stats"], batch_step=t.batch_step,
                                      describe=functools.partial(failure_line, c, step))
        except loop.NonFiniteLoss as e:  # every process raised it at the same step: agreed, not fatal
            raise processes.RanksFailed(f"error: {e}") from None
        so_far.train_seconds += tm["seconds"]
        so_far.images_trained += tm["images"]
        step.name = "evaluation"
        vm = loop.evaluate(t.ema.module if t.ema else t.net, t.batches["val"], criterion, run.device, t.dtype,
                           len(run.classes), tta=c.get("tta") or "none") if t.batches["val"] is not None else None
        improved = vm is None or loop.improves(vm, so_far.best)
        if improved:
            so_far.best = loop.best_record(vm, epoch)
        rng = hardware.rng_state(run.device, run.world)  # every rank's generators: a collective
        if writer is not None:
            records.log_epoch(writer, epoch, tm, vm, [g["lr"] for g in t.optimizer.param_groups], c["epochs"])
            state = steps.checkpoint_state(run, t, so_far, epoch, rng)
            if improved:  # best before last: wherever a kill lands, a last.pth has its best.pth
                records.save_checkpoint(run.run_dir / "best.pth", state)
            records.save_checkpoint(run.run_dir / "last.pth", state)
    return so_far


def test_pass(run, training, loaders, so_far, writer, step):
    """The test set is seen once, with the best-on-validation weights: it decides nothing."""
    c = run.config
    step.name = "test"
    with processes.on_every_rank(run.world):  # the ranks meet: every rank reads best.pth once rank 0 wrote it
        pass
    best = records.load_checkpoint(run.run_dir / "best.pth", records.CHECKPOINT_KEYS)
    run.model.load_state_dict(best["model"])
    criterion = nn.CrossEntropyLoss(label_smoothing=c["label_smoothing"])
    test_m = loop.evaluate(training.net, training.batches["test"], criterion, run.device, training.dtype,
                           len(run.classes), mistakes=records.MISTAKES_SHOWN, tta=c.get("tta") or "none")
    metrics = final_metrics(test_m, so_far, c, run.world)
    if writer is not None:
        images = [evaluated_image(loaders["test"], i) for i, *_ in test_m["mistakes"]]
        records.finish_run(writer, run.run_dir, c, run.classes, test_m, metrics, images)
    return metrics


def evaluated_image(loader, i):
    """Sample i of an evaluation loader as the network saw it, before normalisation: HxWx3 uint8."""
    import numpy as np

    return np.asarray(loader.images[loader.rows[i]])


def final_metrics(test_m, so_far, config, world):
    best, secs = so_far.best, so_far.train_seconds
    return {"test_top1": test_m["top1"], "test_top5": test_m["top5"], "test_mean_class_acc": test_m["mean_class_acc"],
            "test_loss": test_m["loss"], "test_images": test_m["images"], "best_val_top1": best["top1"],
            "best_epoch": best["epoch"], "epochs": config["epochs"], "train_seconds": round(secs, 2),
            "train_images_per_s": round(so_far.images_trained / max(secs, 1e-9), 1), "processes": world}


# --------------------------------------------------------------------------------------------
# Entry point of every main_*.py script.
# --------------------------------------------------------------------------------------------
def main(defaults, grid, argv=None, script=None):
    script = script or Path(sys.argv[0]).stem
    processes.whole_lines(sys.stdout, sys.stderr)
    pipeline.keep_freed_memory()  # batches and activations reuse freed heap pages instead of faulting new ones
    args = get_args_parser(defaults).parse_args(argv)
    config = resolve_config(args, defaults, script)
    # the header names the options that differ from these
    run_fit = functools.partial(fit, defaults=resolve_config(get_args_parser(defaults).parse_args([]), defaults,
                                                             script))
    try:
        if config["grid"] or config["grid_spec"] or config["compare"] or config["halving"]:
            return experiments.run(config, grid, run_fit)
        if config["parallel"]:
            fail("--parallel applies to --grid, --grid-spec and --compare; a single run under torchrun is DDP")
        return run_fit(config)
    except BaseException as e:
        if not interrupted(e):
            raise
        raise SystemExit(interrupted_line(config, sys.argv[1:] if argv is None else list(argv))) from None
    finally:
        processes.close_distributed()


def interrupted(e):
    """Whether Ctrl-C caused e: a KeyboardInterrupt, or an error raised while one unwound (torch.save's
    zip writer, interrupted, fails again in its cleanup)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def interrupted_line(config, argv):
    """Ctrl-C: the one line that names the run (or grid) folder and the command that resumes it;
    printed by rank 0 only, exit status 130 (128 + SIGINT) as a shell reports it."""
    import os
    import shlex

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) != 0:
        return 130
    single = not (config["grid"] or config["grid_spec"] or config["compare"] or config["halving"])
    if single:
        folder = steps.run_folder(config)
        resume = [] if "resume" in config["explicit"] else ["--resume", "auto"]  # a grid resumes by rerunning it
    else:  # a grid's own folder; a comparison's depends on an earlier grid: its script's folder
        is_grid = config["grid"] or config["grid_spec"]
        folder = Path(config["out"]) / config["script"] / (config["name"] or "grid" if is_grid else "")
        resume = []
    launcher = ["torchrun", f"--nproc-per-node={world}"] if world > 1 else [Path(sys.executable).name]
    command = shlex.join([*launcher, sys.argv[0], *argv, *resume])
    print(f"interrupted: {folder} keeps what was saved; resume with: {command}", file=sys.stderr, flush=True)
    return 130
