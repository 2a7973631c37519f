"""What every main_*.py script runs: the loaders, the loop and fit(config).

A script passes its defaults and grid to main(). One resolved config dict goes everywhere: it is
printed, saved as config.json, stored in every checkpoint and written as TensorBoard hparams.
fit(config) trains one run in its own folder and returns its metrics; the grid, the comparison
and torchrun reuse it. The layers below (DESIGN.md): nets (architectures, freezing), data (the
split and the validation carve), devices (hardware, precision, memory), records (files), pipeline
(decode cache and augmentation), features (the frozen part run once), options (the parser).
"""
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from study import augment
from study import devices
from study import experiments
from study import features
from study import identity
from study import nets
from study import pipeline
from study import records
from study.errors import fail, oom_message
from study.options import RESOLVED, given_options, image_options
from study.records import CheckpointError
# What a script, a notebook or a test reaches through common, the one module they import: the
# data set, the networks and freezing, the options and the device helpers (owned by the modules named).
from study.data import IMG_EXTENSIONS, carve_validation, limit_per_class, read_data, scan_split  # noqa: F401
from study.devices import all_reduce, autocast, pick_device, resolve_precision  # noqa: F401
from study.nets import (ARCHS, build_model, forward_sequence, freeze, make_preprocess, param_groups,  # noqa: F401
                  parse_unfreeze, preprocess_dict, set_train_mode, weights_preprocess)
from study.options import default_run_name, get_args_parser, resolve_config, run_dir_of  # noqa: F401
from study.records import atomic_write, save_checkpoint, write_json  # noqa: F401
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "config", "classes", "best")


# --------------------------------------------------------------------------------------------
# Loaders: every split through pipeline.build_loader, with the run's options.
# --------------------------------------------------------------------------------------------
def prepare_data(config):
    """-> classes, {train, val, test: samples}, after the limit and the validation carve."""
    return read_data(config)[:2]


def loader_options(config, device, rank=0, world=1, on_device=None):
    """The keyword arguments every pipeline.build_loader call of a run shares."""
    return dict(preprocess=make_preprocess(config["arch"], config["img_size"], config["crop_mode"]),
                seed_recipe=ARCHS[config["arch"]].seed_recipe, workers=config["workers"], device=device,
                seed=config["seed"], cache_dir=config["cache_dir"] or str(Path(config["data"]) / ".cache"),
                rank=rank, world_size=world, skip_bad=config["skip_bad"], progress=rank == 0,
                on_device=on_device)


def make_loader(samples, options, *, train, augment, batch_size):
    """A training loader (augmented, shuffled) or an evaluation one (each image once); None for no samples."""
    if not samples:
        return None
    # evaluation keeps no activations for backward, so it affords larger batches
    size = batch_size if train else max(64, batch_size)
    try:
        return pipeline.build_loader(samples, train=train, augment=augment if train else "none",
                                     batch_size=size, **options)
    except pipeline.BadImagesError as e:
        fail(f"{e} (pass --skip-bad to train without them)")


def train_augment(config, world):
    """--unfreeze head trains on cached features of the evaluation framing, whatever --augment says."""
    return "none" if head_only(config, world) else config["augment"]


def head_only(config, world):
    return config["unfreeze"] == "head" and world == 1


# --------------------------------------------------------------------------------------------
# The loop: train_one_epoch and evaluate return plain metric dicts.
# --------------------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    pass


def top5_correct(logits, y):
    """Images whose class is among the 5 highest logits; None with fewer than 5 classes (it would
    be every image, and mean nothing)."""
    if logits.shape[1] < 5:
        return None
    return logits.topk(5, dim=1).indices.eq(y[:, None]).any(dim=1).sum()


def train_one_epoch(model, loader, optimizer, scheduler, criterion, device, dtype, *, epoch, scaler=None,
                    clip=1.0, progress=True, bn_stats="train", batch_augment=None):
    """One pass over the loader (images, or cached outputs of a frozen part).
    batch_augment: (x, y) -> (x, target) on each batch (augment.batch_augment: auto-augment, erasing, MixUp/CutMix,
    whose targets are class probabilities; top-1 then counts the dominant class).
    -> {loss, top1, images, seconds}, summed over processes."""
    from tqdm import tqdm

    set_train_mode(model, bn_stats)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start, step_losses = 0, time.perf_counter(), []
    # disable=None: no bar when stderr is not a terminal (logs, CI), only the per-epoch line
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None if progress else True,
               dynamic_ncols=True)
    for step, (x, y) in enumerate(bar, 1):
        if x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        target = y
        if batch_augment is not None:
            x, target = batch_augment(x, y)
            y = target.argmax(1) if target.ndim == 2 else target
        with autocast(device, dtype):
            logits = model(x)
            loss = criterion(logits.float(), target)
        backward_and_step(loss, optimizer, params, scaler, clip)
        scheduler.step()
        step_losses.append(loss.detach())
        loss_sum += loss.detach().double() * y.shape[0]
        correct += logits.argmax(1).eq(y).sum()
        seen += y.shape[0]
        if step % 10 == 0 or step == len(loader):  # read back rarely: each read waits for the GPU
            check_finite(step_losses, epoch, step - len(step_losses) + 1)
            step_losses = []
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    check_finite(step_losses, epoch, len(loader) - len(step_losses) + 1)
    totals = all_reduce(torch.stack([loss_sum, correct.double(), torch.tensor(seen, device=device).double()]))
    n = max(totals[2].item(), 1)
    return {"loss": totals[0].item() / n, "top1": 100 * totals[1].item() / n, "images": int(totals[2].item()),
            "seconds": time.perf_counter() - start}


def backward_and_step(loss, optimizer, params, scaler=None, clip=1.0):
    """Backward, gradient clipping at norm `clip`, optimizer step; with an fp16 GradScaler if given
    (it skips the step when a gradient is inf or nan, and lowers its scale)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def check_finite(losses, epoch, first_step):
    if losses:
        finite = torch.isfinite(torch.stack(losses)).cpu()
        if not finite.all():
            step = first_step + int((~finite).nonzero()[0])
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {step}; stopping "
                                f"(the last good checkpoint stays; try a lower --lr or --precision fp32)")


@torch.no_grad()
def evaluate(model, loader, criterion, device, dtype, num_classes, mistakes=0, tta="none"):
    """-> {loss, top1, top5, mean_class_acc, per_class, confusion, mistakes} over every sample of
    every process. mistakes: how many of the most confident wrong predictions to keep, as
    (sample index, true class, predicted class, probability), most confident first.
    tta: --tta, for batches of images (nets.evaluation_logits); none on cached features."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long) if num_classes >= 5 else None
    wrong = []
    for idx, (x, y) in zip(loader.batch_indices(), loader):
        if x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = nets.evaluation_logits(model, x, tta)
        loss_sum += criterion(logits, y).double() * y.shape[0]
        if top5 is not None:
            top5 += top5_correct(logits, y)
        confusion.index_put_((y, logits.argmax(1)), torch.ones_like(y), accumulate=True)
        if mistakes:
            wrong += worst_mistakes(logits, y, idx, mistakes)
    all_reduce(confusion)
    totals = all_reduce(torch.stack([loss_sum, top5.double() if top5 is not None else loss_sum * 0]))
    m = metrics_from_confusion(confusion.cpu(), loss_sum=totals[0].item(),
                               top5=None if top5 is None else totals[1].item())
    # every process passes the same `mistakes`, so all or none of them gather
    m["mistakes"] = sorted(devices.gather_lists(wrong), key=lambda t: -t[3])[:mistakes] if mistakes else []
    return m


def worst_mistakes(logits, y, idx, n):
    """The batch's n most confident wrong predictions: [(sample index, true, predicted, probability)]."""
    prob, pred = logits.softmax(1).max(1)
    bad = (pred != y).nonzero().flatten()
    bad = bad[prob[bad].argsort(descending=True)[:n]].cpu()
    return [(int(idx[i]), int(y[i]), int(pred[i]), float(prob[i])) for i in bad]


def metrics_from_confusion(confusion, loss_sum=0.0, top5=None):
    """Rows: true class, columns: predicted. Percentages, like the original table."""
    n = confusion.sum().item()
    per_class_n = confusion.sum(1)
    present = per_class_n > 0
    per_class = torch.where(present, confusion.diag() / per_class_n.clamp(min=1), torch.nan)
    return {"loss": loss_sum / max(n, 1), "top1": 100 * confusion.diag().sum().item() / max(n, 1),
            "top5": None if top5 is None else 100 * top5 / max(n, 1),
            "mean_class_acc": 100 * per_class[present].mean().item() if n else 0.0,
            "per_class": [None if math.isnan(v) else 100 * v for v in per_class.tolist()],
            "images": int(n), "confusion": confusion}


def lr_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs=1.0):
    """Linear warm-up (1 epoch, at most a tenth of the run), then cosine to 0; stepped every batch."""
    total = max(1, steps_per_epoch * epochs)
    warm = max(1, min(int(warmup_epochs * steps_per_epoch), total // 10))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def improves(m, best):
    """Checkpoint selection on validation: higher top-1; on a tie, lower loss. Ties are common (on a
    few hundred images top-1 moves in coarse steps and stalls as the cosine schedule ends), and the
    loss tells the tied epochs apart. m: metrics with top1 and loss; best: the same keys (older
    checkpoints lack loss: any tie then counts as no better)."""
    return (m["top1"], -m["loss"]) > (best["top1"], -best.get("loss", -math.inf))


def best_record(vm, epoch):
    """What a checkpoint keeps of its best epoch; vm None (no validation part): every epoch is best."""
    if vm is None:
        return {"top1": float("nan"), "epoch": epoch}
    return {"top1": vm["top1"], "loss": vm["loss"], "epoch": epoch}


# --------------------------------------------------------------------------------------------
# fit(config): one run, in its own folder; returns its metrics. It reads top to bottom:
# start_run, build_loaders, frozen_inputs, linear_probe, make_optimizer, train_epochs, test_pass.
# --------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """Where fit() is, for its out-of-memory line: the step's name (a key of errors.OOM_REMEDIES),
    set as each step starts, and the run's loaders, whose decode caches may sit in GPU memory."""
    name: str = "setup"
    loaders: dict = field(default_factory=dict)

    def caches_resident(self):
        return any(loader is not None and loader.resident for loader in self.loaders.values())


@dataclass
class Run:
    """What fit() sets up once and its steps share."""
    config: dict
    rank: int
    world: int
    device: torch.device
    dtype: object  # the autocast dtype; None: fp32
    speed: dict  # cudnn_benchmark, tf32
    run_dir: Path
    ckpt: dict | None  # the checkpoint a resumed run continues from
    classes: list
    splits: dict  # train, val, test -> samples
    model: nn.Module  # the plain network: checkpoints hold its state dict, never a wrapper's
    lock: records.FolderLock  # held by rank 0 while the run writes its folder
    defaults: dict | None  # the script's default config: the header names what differs
    stage: Stage = field(default_factory=Stage)  # fit()'s, for the out-of-memory line
    ema: object = None  # AveragedModel of model (--ema), what validation and best.pth use; set by make_optimizer
    batch_augment: object = None  # augment.batch_augment's callable (--auto-augment, --erasing, --mixup, --cutmix)


@dataclass
class Progress:
    """What a checkpoint carries of the run so far."""
    start_epoch: int = 1
    best: dict = None
    train_seconds: float = 0.0
    images_trained: int = 0


def start_run(config, defaults=None):
    """Device and processes, the data, the run folder (locked), the checkpoint to resume and the
    network, in that order. The config it holds records the run's identity. Under torchrun a
    failure here, on any rank, fails on every rank at the same point (they can all go on)."""
    rank, world, local_rank = devices.torchrun_env()
    device = devices.pick_device(config["device"], local_rank, world)  # current device before the group
    devices.init_distributed(device, world)
    lock = None
    try:
        with devices.on_every_rank(world):
            dtype = devices.resolve_precision(config["precision"], device)
            speed = devices.speed_settings(device, dtype, config["deterministic"])
            classes, splits, data_id = read_data(config)
            if len(splits["train"]) < 2 * world:
                fail(f"{len(splits['train'])} training image(s) after the validation carve: too few for one batch "
                     f"of 2 per process (lower --val-fraction, raise --limit-per-class, or add images)")
            compute_id = identity.compute_identity(world, config["batch_size"], devices.precision_name(dtype),
                                                   device.type)
            config = dict(config, identity={"data": data_id, "compute": compute_id})
            run_dir = run_folder(config)
            lock = records.FolderLock(run_dir)
            if rank == 0:  # rank 0 writes for the run
                take_lock(lock)
            ckpt = resumed_checkpoint(config, run_dir, classes)
            model = build_network(config, len(classes), ckpt, device, rank, world)
    except BaseException:
        if lock is not None:
            lock.release()  # a run that does not start leaves its folder free
        raise
    return Run(config, rank, world, device, dtype, speed, run_dir, ckpt, classes, splits, model, lock, defaults)


def build_network(config, num_classes, ckpt, device, rank, world):
    """The network, frozen as asked, on its device: initialised from --seed (the same on every rank),
    or the checkpoint's weights; then each rank's own generator for dropout."""
    devices.seed_everything(config["seed"])
    model = build_model(config["arch"], num_classes, "none" if ckpt else config["weights"])
    freeze(model, config["arch"], parse_unfreeze(config["unfreeze"], config["arch"]))
    model.to(device=device, memory_format=torch.channels_last)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    devices.seed_rank(config["seed"], rank, world)
    return model


def take_lock(lock):
    """lock.acquire(), or the one line that names the folder and the process holding it."""
    try:
        return lock.acquire()
    except records.FolderBusy as e:
        fail(str(e))


def run_folder(config):
    """The folder a run writes in: its options' folder; with --resume PATH, that checkpoint's own."""
    r = config["resume"]
    if r in (None, "auto"):
        return run_dir_of(config)
    if Path(r).name != "last.pth":
        fail(f"--resume {r}: give a run's last.pth (it continues that run in its own folder), or auto")
    return Path(r).parent


def resumed_checkpoint(config, run_dir, classes):
    """The checkpoint this run continues from (None: a fresh run), refused when its options, its
    data or how it computed differ (identity.check_same_run)."""
    r = config["resume"]
    path = run_dir / "last.pth" if r is not None else None
    if path is None or (r == "auto" and not path.is_file()):
        if r is None and (run_dir / "last.pth").exists():
            fail(f"{run_dir} already holds a run; pass --resume auto to continue it or --name NEW for a new one")
        return None
    try:
        ckpt = records.load_checkpoint(path, CHECKPOINT_KEYS)
    except CheckpointError as e:
        fail(f"--resume {e}")
    identity.check_same_run(ckpt["config"], config, f"--resume {path}: the run was made with other options or data",
                            "give the run's options and data, or --name NEW for a new run")
    if ckpt["classes"] != classes:
        fail(f"--resume: the run's {len(ckpt['classes'])} classes differ from the {len(classes)} in {config['data']}")
    return ckpt


def rank0_first(run, build):
    """build() on rank 0, then on the others (they find the decode caches it wrote)."""
    result = None
    for turn in (True, False):
        with devices.on_every_rank(run.world):
            if (run.rank == 0) == turn:
                result = build()
    return result


def build_loaders(run, budget, resident=None):
    """-> ({train, val, test: loader}, the loader options). Decode caches go to device memory where
    the budget allows (the GPU's on-device path); resident True/False forces it, on any device."""
    c = run.config
    options = loader_options(c, run.device, run.rank, run.world, on_device=True if resident is not None else None)
    aug = train_augment(c, run.world)
    loaders = rank0_first(run, lambda: {
        split: make_loader(samples, options, train=split == "train", augment=aug, batch_size=c["batch_size"])
        for split, samples in run.splits.items()})
    for split, loader in loaders.items():
        if loader is not None and loader.on_device:
            place = (c["gpu_cache"] == "auto" and budget.reserve(f"{split} images", loader.cache_bytes)) \
                if resident is None else resident
            if place:
                loader.make_resident()
    return loaders, options


def release_images(loaders, budget):
    """Cached outputs replace the images: their decode caches leave device memory."""
    for split, loader in loaders.items():
        if loader is not None:
            loader.release()
            budget.release(f"{split} images")


def frozen_wanted(run):
    """--unfreeze head, or --cache-frozen auto under --augment none (and no option that acts on images);
    not under torchrun (each process would hold every split's outputs)."""
    c = run.config
    return run.world == 1 and (head_only(c, run.world) or (c["cache_frozen"] == "auto" and c["augment"] == "none"
                                                           and not image_options(c)))


def frozen_inputs(run, loaders, sources, budget):
    """-> features.Frozen (the frozen part's outputs, computed once, replace the images) or None.
    --unfreeze head: everything before the head; else the longest deterministic frozen prefix."""
    if not frozen_wanted(run):
        return None
    run.stage.name = "features" if head_only(run.config, run.world) else "frozen prefix"
    if head_only(run.config, run.world):
        frozen = features.head_features(run.model, run.config, sources, loaders, run.device, run.dtype, budget)
    else:
        frozen = features.frozen_prefix(run.model, run.config["bn_stats"], sources, loaders, run.config["img_size"],
                                        run.device, run.dtype, budget)
    if frozen is not None:
        release_images(loaders, budget)
    return frozen


def eval_sources(run, loaders, options):
    """Each split's images in evaluation order and framing: what a frozen part's outputs come from."""
    train = make_loader(run.splits["train"], options, train=False, augment="none", batch_size=run.config["batch_size"])
    return {"train": train, "val": loaders["val"], "test": loaders["test"]}


def probe_wanted(run):
    c = run.config
    return bool(c["probe_epochs"]) and run.ckpt is None and c["weights"] != "none" and not head_only(c, run.world)


def linear_probe(run, loaders, sources, frozen, budget):
    """LP-FT (Kumar et al., 2022): before fine-tuning, train the new head alone on the backbone's
    features for --probe-epochs, so the first fine-tuning steps do not push a random head's
    gradients into the pretrained stages. The best head on validation stays in the model."""
    c = run.config
    run.stage.name = "probe"
    served = loaders
    if run.world > 1:  # each process probes alike on every image (one computes the features), so all have one head
        solo = loader_options(c, run.device)
        train, val = run.splits["train"], run.splits["val"]
        sources = {"train": make_loader(train, solo, train=False, augment="none", batch_size=c["batch_size"]),
                   "val": make_loader(val, solo, train=False, augment="none", batch_size=c["batch_size"])}
        served = {"train": make_loader(train, solo, train=True, augment="none", batch_size=c["batch_size"]),
                  "val": sources["val"]}
    sources = {"train": sources["train"], "val": sources["val"]}
    # rank 0 computes the features and writes their file; the other ranks read it
    feats = rank0_first(run, lambda: features.head_features(run.model, c, sources, served, run.device, run.dtype,
                                                            budget, frozen))
    head = feats.rest
    # a fresh linear layer alone takes a head-only rate; --lr is then the fine-tuning rate of a trained head
    optimizer = torch.optim.AdamW(param_groups(run.model, c["arch"], 10 * c["lr"], c["weight_decay"], 1.0,
                                               head_only=True))
    scheduler = lr_schedule(optimizer, len(feats.batches["train"]), c["probe_epochs"])
    criterion = nn.CrossEntropyLoss(label_smoothing=c["label_smoothing"])
    best, best_state = {"top1": -1.0}, None
    for epoch in range(1, c["probe_epochs"] + 1):
        feats.batches["train"].set_epoch(PROBE_EPOCH_BASE + epoch)
        try:
            tm = train_one_epoch(head, feats.batches["train"], optimizer, scheduler, criterion, run.device, None,
                                 epoch=epoch, progress=False)
        except NonFiniteLoss as e:
            fail(f"linear probe: {e}")
        score = evaluate(head, feats.batches["val"], criterion, run.device, None, len(run.classes)) \
            if feats.batches["val"] is not None else tm
        if improves(score, best):
            best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    if run.rank == 0:
        print(f"linear probe: head trained {c['probe_epochs']} epochs on cached features, best val top-1 "
              f"{best['top1']:.2f}%", flush=True)
    return best["top1"]


PROBE_EPOCH_BASE = 1_000_000  # the probe's batch orders: loader epochs no fine-tuning epoch reaches


def trained_net(run, loaders, frozen):
    """-> (the module the loop trains, the batches of each split, the loop's autocast dtype)."""
    if frozen is None:
        net, batches = run.model, loaders
    else:
        net, batches = frozen.rest, frozen.batches
    # the head alone on features is small: low precision would buy nothing there
    dtype = None if head_only(run.config, run.world) else run.dtype
    if devices.distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda"
                                                  else None)
    if run.config["compile"]:
        net = torch.compile(net)
    return net, batches, dtype


def make_optimizer(run, steps_per_epoch, preprocess):
    """AdamW (or Nesterov SGD, --optimizer), the schedule and (fp16) the scaler, restored from the
    checkpoint when resuming -> their tuple and the Progress so far. Also sets run.ema and
    run.batch_augment (normalised with preprocess, the loaders' Preprocess), and zero-initialises
    residual blocks of a fresh random network when asked."""
    c = run.config
    groups = param_groups(run.model, c["arch"], c["lr"], c["weight_decay"], c["backbone_lr_ratio"])
    if c.get("optimizer") == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups)
    scheduler = lr_schedule(optimizer, steps_per_epoch, c["epochs"])
    scaler = devices.grad_scaler(run.device, run.dtype) if not head_only(c, run.world) else None
    progress = Progress(best={"top1": -1.0, "epoch": 0})
    ck = run.ckpt
    if c.get("zero_init_residual") == "on" and c["weights"] == "none" and not ck:
        nets.zero_init_residual(run.model)
    run.ema = averaged_model(run, optimizer)
    run.batch_augment = augment.batch_augment(c.get("erasing") or 0.0, c.get("mixup") or 0.0,
                                              c.get("cutmix") or 0.0, len(run.classes),
                                              c.get("auto_augment") or "none", preprocess.mean, preprocess.std)
    if ck:
        if run.ema is not None and ck.get("online_model") is not None:  # "model" holds the averaged weights
            run.ema.module.load_state_dict(ck["model"])
            run.ema.n_averaged.fill_(ck["ema_steps"])
            run.model.load_state_dict(ck["online_model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        progress = Progress(ck["epoch"] + 1, ck["best"], ck["train_seconds"], ck["images_trained"])
    return (optimizer, scheduler, scaler), progress


def averaged_model(run, optimizer):
    """--ema: an exponential moving average of run.model's weights and BatchNorm statistics, updated
    after every optimizer step (a step the fp16 scaler skips is no step) -> AveragedModel or None."""
    decay = run.config.get("ema") or 0.0
    if not decay:
        return None
    frozen = not all(p.requires_grad for p in run.model.parameters())
    if head_only(run.config, run.world) or (frozen and frozen_wanted(run)):
        fail("--ema averages the whole network: it needs the images path (not --unfreeze head or cached "
             "frozen outputs; pass --cache-frozen off)")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    optimizer.register_step_post_hook(lambda *_: ema.update_parameters(run.model))
    return ema


def checkpoint_state(run, optim, progress, epoch, rng):
    """"model": the weights evaluated (the averaged ones under --ema, "online_model" then holds the
    trained ones, which a resumed run continues); rng: devices.rng_state, taken on every rank."""
    optimizer, scheduler, scaler = optim
    c = run.config
    evaluated = run.ema.module if run.ema is not None else run.model
    online = {"online_model": run.model.state_dict(), "ema_steps": int(run.ema.n_averaged)} if run.ema else {}
    return {"model": evaluated.state_dict(), **online, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None, "epoch": epoch,
            "config": c, "classes": run.classes,
            "arch": c["arch"], "preprocess": preprocess_dict(make_preprocess(c["arch"], c["img_size"], c["crop_mode"])),
            "best": progress.best, "train_seconds": progress.train_seconds,
            "images_trained": progress.images_trained, **rng}


def open_records(run):
    """rank 0: the run folder, config.json, a TensorBoard writer and the header lines. -> writer or None."""
    if run.rank != 0:
        return None
    run.run_dir.mkdir(parents=True, exist_ok=True)
    records.write_json(run.run_dir / "config.json", run.config)
    start = run.ckpt["epoch"] + 1 if run.ckpt else 1
    writer = records.open_writer(run.run_dir, start)
    print_header(run)
    return writer


def print_header(run):
    """A few lines: the run folder, what is trained, on what data, on what hardware and in which
    precision, and the options that differ from the script's defaults (config.json has them all)."""
    c, s = run.config, run.splits
    n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in run.model.parameters())
    on = lambda flag: "on" if flag else "off"
    start = f"resumed at epoch {run.ckpt['epoch'] + 1}" if run.ckpt else "new"
    ident = c["identity"]
    print(f"run {run.run_dir} ({start})\n"
          f"  training {c['unfreeze']}: {n_train / 1e6:.2f} M of {n_all / 1e6:.2f} M parameters of {c['arch']}, "
          f"{c['weights']} weights\n"
          f"  data {c['data']} (split {ident['data']['split'][:12]}): {len(run.classes)} classes, "
          f"{len(s['train'])} train / {len(s['val'])} val / {len(s['test'])} test images\n"
          f"  on {run.device}: {run.world} process(es), {torch.get_num_threads()} thread(s), "
          f"{devices.precision_name(run.dtype)} (cudnn.benchmark {on(run.speed['cudnn_benchmark'])}, "
          f"tf32 {on(run.speed['tf32'])}), global batch {ident['compute']['global_batch']}", flush=True)
    changed = options_changed(c, run.defaults)
    if changed:
        print(f"  options: {changed} (all in config.json)", flush=True)


def options_changed(config, defaults):
    """'--epochs 3 --img-size 64': the options whose value differs from `defaults` (the script's
    defaults resolved as a config); '' without defaults."""
    if not defaults:
        return ""
    skip = set(RESOLVED) | {"script", "name", "resume", "explicit", "scratch_filled"}  # shown above, or bookkeeping
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in config.items()
                    if k not in skip and k in defaults and v != defaults[k] and v is not False)


def train_epochs(run, net, batches, optim, progress, dtype, writer, last_epoch):
    """The epoch loop: train, validate, keep best.pth (on validation) and last.pth. -> progress."""
    c = run.config
    optimizer, scheduler, scaler = optim
    criterion = nn.CrossEntropyLoss(label_smoothing=c["label_smoothing"])
    if run.ckpt:  # dropout draws continue as if never interrupted, each rank's its own
        devices.set_rng_state(run.ckpt, run.device, run.rank)
    for epoch in range(progress.start_epoch, last_epoch + 1):
        batches["train"].set_epoch(epoch)
        run.stage.name = "training"
        try:
            tm = train_one_epoch(net, batches["train"], optimizer, scheduler, criterion, run.device, dtype,
                                 epoch=epoch, scaler=scaler, progress=run.rank == 0, bn_stats=c["bn_stats"],
                                 batch_augment=run.batch_augment)
        except NonFiniteLoss as e:
            fail(str(e))
        progress.train_seconds += tm["seconds"]
        progress.images_trained += tm["images"]
        run.stage.name = "evaluation"
        vm = evaluate(run.ema.module if run.ema else net, batches["val"], criterion, run.device, dtype,
                      len(run.classes), tta=c.get("tta") or "none") if batches["val"] is not None else None
        improved = vm is None or improves(vm, progress.best)
        if improved:
            progress.best = best_record(vm, epoch)
        rng = devices.rng_state(run.device, run.world)  # every rank's generators: a collective
        if writer is not None:
            records.log_epoch(writer, epoch, tm, vm, [g["lr"] for g in optimizer.param_groups], c["epochs"])
            state = checkpoint_state(run, optim, progress, epoch, rng)
            if improved:  # best before last: wherever a kill lands, a last.pth has its best.pth
                records.save_checkpoint(run.run_dir / "best.pth", state)
            records.save_checkpoint(run.run_dir / "last.pth", state)
    return progress


def test_pass(run, net, batches, loaders, progress, dtype, writer):
    """The test set is seen once, with the best-on-validation weights: it decides nothing."""
    c = run.config
    run.stage.name = "test"
    devices.barrier()  # every rank reads best.pth once rank 0 has written it
    best = records.load_checkpoint(run.run_dir / "best.pth", CHECKPOINT_KEYS)
    run.model.load_state_dict(best["model"])
    criterion = nn.CrossEntropyLoss(label_smoothing=c["label_smoothing"])
    test_m = evaluate(net, batches["test"], criterion, run.device, dtype, len(run.classes),
                      mistakes=records.MISTAKES_SHOWN, tta=c.get("tta") or "none")
    metrics = final_metrics(test_m, progress, c, run.world)
    if writer is not None:
        images = [evaluated_image(loaders["test"], i) for i, *_ in test_m["mistakes"]]
        records.finish_run(writer, run.run_dir, c, run.classes, test_m, metrics, images)
    return metrics


def evaluated_image(loader, i):
    """Sample i of an evaluation loader as the network saw it, before normalisation: HxWx3 uint8."""
    import numpy as np

    return np.asarray(loader.images[loader.rows[i]])


def final_metrics(test_m, progress, config, world):
    best, secs = progress.best, progress.train_seconds
    return {"test_top1": test_m["top1"], "test_top5": test_m["top5"], "test_mean_class_acc": test_m["mean_class_acc"],
            "test_loss": test_m["loss"], "test_images": test_m["images"], "best_val_top1": best["top1"],
            "best_epoch": best["epoch"], "epochs": config["epochs"], "train_seconds": round(secs, 2),
            "train_images_per_s": round(progress.images_trained / max(secs, 1e-9), 1), "processes": world}


def fit(config, stop_after=None, *, resident=None, defaults=None):
    """Train one run; write config.json, events, last.pth, best.pth, metrics.json; return the metrics.

    stop_after: stop after this epoch without the test evaluation (successive halving); a later
    call with resume continues the same schedule. resident: None lets the run's memory budget
    decide which decode caches live in device memory; True/False forces it (tests, on the CPU).
    defaults: the script's default config, for the header's list of changed options.
    Out of memory anywhere in the run ends in one line that names the stage and what to try.
    """
    rank, world, _ = devices.torchrun_env()
    stage = Stage()
    with devices.one_fails_all(world, rank):
        try:
            return _fit(config, stop_after, resident, defaults, stage)
        except torch.OutOfMemoryError:
            msg = oom_message(config["batch_size"], stage.name, stage.caches_resident())
            devices.free_cached_memory()
            fail(msg)


def _fit(config, stop_after, resident, defaults, stage):
    run = start_run(config, defaults)
    run.stage = stage
    try:
        return train_and_test(run, stop_after, resident)
    finally:
        run.lock.release()


def train_and_test(run, stop_after, resident):
    config = run.config
    budget = devices.MemoryBudget(devices.memory_limit(run.device))
    loaders, options = build_loaders(run, budget, resident)
    run.stage.loaders = loaders
    sources = eval_sources(run, loaders, options) if frozen_wanted(run) or (probe_wanted(run) and run.world == 1) \
        else {}
    frozen = frozen_inputs(run, loaders, sources, budget)
    if probe_wanted(run):  # every rank alike: same features, same seed
        linear_probe(run, loaders, sources, frozen, budget)
    run.stage.name = "setup"
    net, batches, dtype = trained_net(run, loaders, frozen)
    optim, progress = make_optimizer(run, len(batches["train"]), options["preprocess"])
    writer = open_records(run)
    last_epoch = config["epochs"] if stop_after is None else min(stop_after, config["epochs"])
    progress = train_epochs(run, net, batches, optim, progress, dtype, writer, last_epoch)
    if last_epoch < config["epochs"]:
        if writer is not None:
            writer.close()
        return {"stopped_at": last_epoch, "best_val_top1": progress.best["top1"],
                "best_epoch": progress.best["epoch"], "train_seconds": round(progress.train_seconds, 2),
                "processes": run.world}
    return test_pass(run, net, batches, loaders, progress, dtype, writer)


# --------------------------------------------------------------------------------------------
# Entry point of every main_*.py script.
# --------------------------------------------------------------------------------------------
def main(defaults, grid, argv=None, script=None):
    script = script or Path(sys.argv[0]).stem
    devices.whole_lines(sys.stdout, sys.stderr)
    pipeline.keep_freed_memory()  # batches and activations reuse freed heap pages instead of faulting new ones
    args = get_args_parser(defaults).parse_args(argv)
    config = resolve_config(args, defaults, script)
    # the header names the options that differ from these
    run_fit = functools.partial(fit, defaults=resolve_config(get_args_parser(defaults).parse_args([]), defaults,
                                                             script))
    try:
        if config["grid"] or config["grid_spec"] or config["compare"] or config["halving"]:
            return experiments.run(config, grid, given_options(defaults, argv), run_fit)
        if config["parallel"]:
            fail("--parallel applies to --grid, --grid-spec and --compare; a single run under torchrun is DDP")
        return run_fit(config)
    except BaseException as e:
        if not interrupted(e):
            raise
        raise SystemExit(interrupted_line(config, sys.argv[1:] if argv is None else list(argv))) from None
    finally:
        devices.close_distributed()


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
        folder = run_folder(config)
        given = any(a == "--resume" or a.startswith("--resume=") for a in argv)
        resume = [] if given else ["--resume", "auto"]  # a grid resumes by rerunning it
    else:  # a grid's own folder; a comparison's depends on an earlier grid: its script's folder
        is_grid = config["grid"] or config["grid_spec"]
        folder = Path(config["out"]) / config["script"] / (config["name"] or "grid" if is_grid else "")
        resume = []
    launcher = ["torchrun", f"--nproc-per-node={world}"] if world > 1 else [Path(sys.executable).name]
    command = shlex.join([*launcher, sys.argv[0], *argv, *resume])
    print(f"interrupted: {folder} keeps what was saved; resume with: {command}", file=sys.stderr, flush=True)
    return 130
