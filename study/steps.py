"""fit()'s steps, in the order common.fit calls them: start the run (device, data, folder,
checkpoint, network), build its loaders, the frozen part's outputs, the optional linear probe,
the trained module, the optimizer, the records. Each takes values and returns values."""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import augment, features, hardware, identity, loop, nets, pipeline, processes, records
from .data import read_data
from .errors import fail
from .nets import ARCHS, build_model, freeze, make_preprocess, param_groups, parse_unfreeze, preprocess_dict
from .options import RESOLVED, image_options, run_dir_of
from .records import CheckpointError


def loader_options(config, device, rank=0, world=1, on_device=None):
    """The keyword arguments every pipeline.build_loader call of a run shares."""
    return dict(preprocess=make_preprocess(config["arch"], config["img_size"], config["crop_mode"]),
                seed_policy=ARCHS[config["arch"]].seed_policy, workers=config["workers"], device=device,
                seed=config["seed"], cache_dir=config["cache_dir"] or str(Path(config["data"]) / ".cache"),
                rank=rank, world=world, skip_bad=config["skip_bad"], progress=rank == 0,
                on_device=on_device, crop_scale=config.get("crop_scale"))


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
    return "none" if head_on_features(config, world) else config["augment"]


def head_on_features(config, world):
    """--unfreeze head in one process: the head alone trains on the features before it, computed
    once (under torchrun it trains on images, every process alike, as --unfreeze last:0 does)."""
    return config["unfreeze"] == "head" and world == 1


@dataclass
class Step:
    """Which of fit()'s steps runs, for the out-of-memory line (a key of errors.OOM_REMEDIES), and
    the run's loaders, whose decode caches may sit in GPU memory."""
    name: str = "setup"
    loaders: dict = field(default_factory=dict)

    def caches_on_gpu(self):
        return any(loader is not None and loader.resident for loader in self.loaders.values())


@dataclass(frozen=True)
class Run:
    """What start_run sets up once and the later steps read."""
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


@dataclass(frozen=True)
class Training:
    """What the epochs use, built once by common.train_and_test from the steps below."""
    net: nn.Module  # what the loop trains: the model, its trained part on cached inputs, DDP or compiled
    batches: dict  # train, val, test -> loader
    dtype: object  # the loop's autocast dtype
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object  # fp16's GradScaler, or None
    ema: object  # AveragedModel (--ema), what validation and best.pth use, or None
    batch_step: object  # augment.batch_augment's callable, or None


@dataclass
class SoFar:
    """What a checkpoint carries of the run so far."""
    start_epoch: int = 1
    best: dict = None
    train_seconds: float = 0.0
    images_trained: int = 0


def start_run(config, defaults=None):
    """Device and processes, the data, the run folder (locked), the checkpoint to resume and the
    network, in that order. The config it holds records the run's identity. Under torchrun a
    failure here, on any rank, fails on every rank at the same point (they can all go on)."""
    rank, world, local_rank = processes.torchrun_env()
    device = hardware.pick_device(config["device"], local_rank, world)  # current device before the group
    processes.init_distributed(device, world)
    lock = None
    try:
        with processes.on_every_rank(world):
            dtype = hardware.resolve_precision(config["precision"], device)
            speed = hardware.speed_settings(device, dtype, config["deterministic"])
            classes, splits, data_id = read_data(config)
            if len(splits["train"]) < 2 * world:
                fail(f"{len(splits['train'])} training image(s) after the validation carve: too few for one batch "
                     f"of 2 per process (lower --val-fraction, raise --limit-per-class, or add images)")
            config = dict(config, identity=identity.run_identity(config, world, device.type,
                                                                 hardware.precision_name(dtype), data_id))
            run_dir = run_folder(config)
            lock = records.FolderLock(run_dir)
            if rank == 0:  # rank 0 writes for the run
                lock.acquire()
            ckpt = resumed_checkpoint(config, run_dir, classes)
            model = build_network(config, len(classes), ckpt, device, rank, world)
            check_average(config, world, model)
    except BaseException:
        if lock is not None:
            lock.release()  # a run that does not start leaves its folder free
        raise
    return Run(config, rank, world, device, dtype, speed, run_dir, ckpt, classes, splits, model, lock, defaults)


def build_network(config, num_classes, ckpt, device, rank, world):
    """The network, frozen as asked, on its device: initialised from --seed (the same on every rank,
    residual blocks zeroed with --zero-init-residual on random weights), or the checkpoint's weights;
    then each rank's own generator for dropout."""
    hardware.seed_everything(config["seed"])
    model = build_model(config["arch"], num_classes, "none" if ckpt else config["weights"])
    if not ckpt and config.get("zero_init_residual") == "on" and config["weights"] == "none":
        nets.zero_init_residual(model)
    freeze(model, config["arch"], parse_unfreeze(config["unfreeze"], config["arch"]))
    model.to(device=device, memory_format=torch.channels_last)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    hardware.seed_rank(config["seed"], rank, world)
    return model


def run_folder(config):
    """The folder a run writes in: its options' folder; with --resume PATH, that checkpoint's own."""
    r = config["resume"]
    if r in (None, "auto"):
        return run_dir_of(config)
    if Path(r).name != "last.pth":
        fail(f"--resume {r}: give a run's last.pth (it continues that run in its own folder), or auto")
    return Path(r).parent


RESULTS = ("best.pth", "last.pth", "metrics.json")  # any of them: the folder holds a run's results


def resumed_checkpoint(config, run_dir, classes):
    """The checkpoint this run continues from (None: a fresh run), refused when its options, its
    data or how it computed differ (identity.check_same_run). A folder that holds a run's results
    is never started again: only --resume continues it (a folder with config.json and events
    alone, from a run stopped in its first epoch, starts again)."""
    r, path = config["resume"], run_dir / "last.pth"
    held = [name for name in RESULTS if (run_dir / name).exists()]
    if r is None and held:
        advice = "pass --resume auto to continue it or --name NEW for a new one" if path.exists() else \
            "pass --name NEW for a new run, or move the folder away"
        fail(f"{run_dir} already holds a run ({', '.join(held)}); {advice}")
    if r is None or (r == "auto" and not path.is_file()):
        if held:
            state = "is finished" if "metrics.json" in held else f"kept {', '.join(held)}"
            fail(f"--resume auto: the run in {run_dir} {state} and has no last.pth to continue from; "
                 f"pass --name NEW for a new run")
        return None
    try:
        ckpt = records.load_checkpoint(path, records.CHECKPOINT_KEYS)
    except CheckpointError as e:
        fail(f"--resume {e}")
    identity.check_same_run(ckpt["config"], config, f"--resume {path}: the run was made with other options or data",
                            "give the run's options and data, or --name NEW for a new run")
    if ckpt["classes"] != classes:
        fail(f"--resume: the run's {len(ckpt['classes'])} classes differ from the {len(classes)} in {config['data']}")
    return ckpt


def on_every_rank(run, build):
    """build() on every rank at once, failing on all if it fails on one; each decode cache and feature
    file is built by the first rank to ask (a waited lock per key) and read by the others."""
    with processes.on_every_rank(run.world):
        return build()


def build_loaders(run, budget, resident=None, step=None):
    """-> ({train, val, test: loader}, the loader options). Decode caches go to device memory where
    the budget allows (the GPU's on-device path); resident True/False forces it, on any device."""
    c = run.config
    options = loader_options(c, run.device, run.rank, run.world, on_device=True if resident is not None else None)
    aug = train_augment(c, run.world)
    loaders = on_every_rank(run, lambda: {
        split: make_loader(samples, options, train=split == "train", augment=aug, batch_size=c["batch_size"])
        for split, samples in run.splits.items()})
    for split, loader in loaders.items():
        if loader is not None and loader.on_device:
            place = (c["gpu_cache"] == "auto" and budget.reserve(f"{split} images", loader.cache_bytes)) \
                if resident is None else resident
            if place:
                if step is not None:
                    step.name = "decode caches"
                loader.make_resident()
    return loaders, options


def release_images(loaders, budget):
    """Cached outputs replace the images: their decode caches leave device memory."""
    for split, loader in loaders.items():
        if loader is not None:
            loader.release()
            budget.release(f"{split} images")


def frozen_wanted(config, world):
    """--unfreeze head, or --cache-frozen auto under --augment none (and no option that acts on images);
    not under torchrun (each process would hold every split's outputs)."""
    c = config
    return world == 1 and (head_on_features(c, world) or (c["cache_frozen"] == "auto" and c["augment"] == "none"
                                                          and not image_options(c)))


def check_average(config, world, model):
    """--ema averages the whole network: refused, before any cache is built, where the loop would
    train on a frozen part's cached outputs instead of on images."""
    frozen = not all(p.requires_grad for p in model.parameters())
    if (config.get("ema") or 0) and (head_on_features(config, world) or (frozen and frozen_wanted(config, world))):
        fail("--ema averages the whole network: it needs the images path (not --unfreeze head or cached "
             "frozen outputs; pass --cache-frozen off)")


def frozen_inputs(run, loaders, sources, budget, step):
    """-> features.Frozen (the frozen part's outputs, computed once, replace the images) or None.
    --unfreeze head: everything before the head; else the longest deterministic frozen prefix."""
    if not frozen_wanted(run.config, run.world):
        return None
    step.name = "features" if head_on_features(run.config, run.world) else "frozen prefix"
    if head_on_features(run.config, run.world):
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
    return (bool(c["probe_epochs"]) and run.ckpt is None and c["weights"] != "none"
            and not head_on_features(c, run.world))


def linear_probe(run, loaders, sources, frozen, budget, step):
    """LP-FT (Kumar et al., 2022): before fine-tuning, train the new head alone on the backbone's
    features for --probe-epochs, so the first fine-tuning steps do not push a random head's
    gradients into the pretrained stages. The best head on validation stays in the model."""
    c = run.config
    step.name = "probe"
    served = loaders
    if run.world > 1:  # each process probes alike on every image (one computes the features), so all have one head
        solo = loader_options(c, run.device)
        train, val = run.splits["train"], run.splits["val"]
        sources = {"train": make_loader(train, solo, train=False, augment="none", batch_size=c["batch_size"]),
                   "val": make_loader(val, solo, train=False, augment="none", batch_size=c["batch_size"])}
        served = {"train": make_loader(train, solo, train=True, augment="none", batch_size=c["batch_size"]),
                  "val": sources["val"]}
    sources = {"train": sources["train"], "val": sources["val"]}
    # the first rank to ask computes the features and writes their file; the others wait and read it
    feats = on_every_rank(run, lambda: features.head_features(run.model, c, sources, served, run.device, run.dtype,
                                                            budget, frozen))
    head = feats.rest
    # a fresh linear layer alone takes a head-only rate; --lr is then the fine-tuning rate of a trained head
    optimizer = torch.optim.AdamW(param_groups(run.model, c["arch"], 10 * c["lr"], c["weight_decay"], 1.0,
                                               head_only=True))
    scheduler = loop.lr_schedule(optimizer, len(feats.batches["train"]), c["probe_epochs"])
    criterion = nn.CrossEntropyLoss(label_smoothing=c["label_smoothing"])
    best, best_state = {"top1": -1.0}, None
    for epoch in range(1, c["probe_epochs"] + 1):
        feats.batches["train"].set_epoch(PROBE_EPOCH_BASE + epoch)
        try:
            tm = loop.train_one_epoch(head, feats.batches["train"], optimizer, scheduler, criterion, run.device, None,
                                      epoch=epoch, show_bar=False)
        except loop.NonFiniteLoss as e:  # agreed by every process, as in the epochs
            raise processes.RanksFailed(f"error: linear probe: {e}") from None
        score = loop.evaluate(head, feats.batches["val"], criterion, run.device, None, len(run.classes)) \
            if feats.batches["val"] is not None else tm
        if loop.improves(score, best):
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
    dtype = None if head_on_features(run.config, run.world) else run.dtype
    if processes.distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda"
                                                  else None)
    if run.config["compile"]:
        net = torch.compile(net)
    return net, batches, dtype


def make_optimizer(config, model, steps_per_epoch, device, dtype, head_alone):
    """AdamW (or Nesterov SGD, --optimizer) over the trained parameters, the per-step schedule and
    (fp16) the loss scaler -> (optimizer, scheduler, scaler)."""
    c = config
    groups = param_groups(model, c["arch"], c["lr"], c["weight_decay"], c["backbone_lr_ratio"])
    if c.get("optimizer") == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups)
    scheduler = loop.lr_schedule(optimizer, steps_per_epoch, c["epochs"], shape=c.get("lr_schedule") or "cosine")
    scaler = hardware.grad_scaler(device, dtype) if not head_alone else None
    return optimizer, scheduler, scaler


def averaged_model(config, model, optimizer):
    """--ema: loop.WeightAverage of the model, updated after every optimizer step -> it, or None."""
    decay = config.get("ema") or 0.0
    if not decay:
        return None
    ema = loop.WeightAverage(model, decay)
    optimizer.register_step_post_hook(lambda *_: ema.update())
    return ema


def batch_step(config, num_classes, preprocess):
    """The batch step of --auto-augment, --erasing, --mixup, --cutmix (augment.batch_augment), or None."""
    c = config
    return augment.batch_augment(c.get("erasing") or 0.0, c.get("mixup") or 0.0, c.get("cutmix") or 0.0, num_classes,
                                 c.get("auto_augment") or "none", preprocess.mean, preprocess.std)


def restore(run, training):
    """A resumed run: the averaged and trained weights, optimizer, schedule and scaler from its
    checkpoint (a fresh run: nothing to restore). -> the run SoFar."""
    ck = run.ckpt
    if not ck:
        return SoFar(best={"top1": -1.0, "epoch": 0})
    if training.ema is not None and ck.get("online_model") is not None:  # "model" holds the averaged weights
        training.ema.module.load_state_dict(ck["model"])
        training.ema.steps = ck["ema_steps"]
        run.model.load_state_dict(ck["online_model"])
    training.optimizer.load_state_dict(ck["optimizer"])
    training.scheduler.load_state_dict(ck["scheduler"])
    if training.scaler is not None and ck.get("scaler"):
        training.scaler.load_state_dict(ck["scaler"])
    return SoFar(ck["epoch"] + 1, ck["best"], ck["train_seconds"], ck["images_trained"])


def checkpoint_state(run, training, so_far, epoch, rng):
    """"model": the weights evaluated (the averaged ones under --ema, "online_model" then holds the
    trained ones, which a resumed run continues); rng: hardware.rng_state, taken on every rank."""
    c, ema = run.config, training.ema
    evaluated = ema.module if ema is not None else run.model
    online = {"online_model": run.model.state_dict(), "ema_steps": ema.steps} if ema else {}
    scaler = training.scaler
    return {"model": evaluated.state_dict(), **online, "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "epoch": epoch, "config": c, "classes": run.classes,
            "arch": c["arch"], "preprocess": preprocess_dict(make_preprocess(c["arch"], c["img_size"], c["crop_mode"])),
            "best": so_far.best, "train_seconds": so_far.train_seconds,
            "images_trained": so_far.images_trained, **rng}


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
          f"{hardware.precision_name(run.dtype)} (cudnn.benchmark {on(run.speed['cudnn_benchmark'])}, "
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
