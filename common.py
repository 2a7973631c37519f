"""Everything the main_*.py scripts share: options, data, model, freezing, the loop, records.

One resolved config dict goes everywhere: it is printed, saved as config.json, stored in
every checkpoint and written as TensorBoard hparams. `fit(config)` trains one run inside
its own folder and returns its metrics; the grid, the comparison and torchrun reuse it.
The input path (decode cache, augmentation on the device) lives in pipeline.py.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision import models
from torchvision.ops import StochasticDepth

import pipeline

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def fail(msg):
    """A clear one-line error for the user: no traceback, exit status 1."""
    raise SystemExit(f"error: {msg}")


# --------------------------------------------------------------------------------------------
# Architectures: every difference between the networks lives in this table.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    builder: object  # callable(num_classes=...) -> nn.Module with random weights
    weights: object  # torchvision weights enum member used by --weights imagenet (None: see lite0)
    head: str  # dotted name of the final Linear, replaced by a new one for our classes
    stages: tuple  # backbone stages in input order; `last:N` trains the last N; each is a tuple of module names
    recipe: str  # the original script whose augmentation `--augment seed` reproduces


RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
EFFNET_STAGES = tuple((f"features.{i}",) for i in range(9))


def _lite0(num_classes=1000):
    import efficientnet_lite  # imported on use: only this architecture needs it

    return efficientnet_lite.efficientnet_lite0(num_classes=num_classes)


ARCHS = {
    "resnet18": Arch(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "fc", RESNET_STAGES, "resnet18"),
    "resnet50": Arch(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, "fc", RESNET_STAGES, "resnet50"),
    "resnet101": Arch(models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1, "fc", RESNET_STAGES, "resnet101"),
    "efficientnet_b4": Arch(models.efficientnet_b4, models.EfficientNet_B4_Weights.IMAGENET1K_V1, "classifier.1",
                            EFFNET_STAGES, "efficientnet_b4"),
    "efficientnet_lite0": Arch(_lite0, None, "classifier.1", EFFNET_STAGES, "efficientnet_lite0"),
}


def weights_preprocess(arch_name):
    """The evaluation preprocessing of the architecture's ImageNet weights, as a plain dict."""
    arch = ARCHS[arch_name]
    if arch.weights is None:
        import efficientnet_lite

        return dict(efficientnet_lite.PREPROCESS)
    t = arch.weights.transforms()
    return dict(crop=t.crop_size[0], resize=t.resize_size[0], mean=tuple(t.mean), std=tuple(t.std),
                interpolation=t.interpolation.value)


def make_preprocess(arch_name, img_size, crop_mode="center"):
    """Scale the weights' resize/crop pair to --img-size, keeping their ratio (256/224 for ResNets)."""
    p = weights_preprocess(arch_name)
    img_size = img_size or p["crop"]
    resize = max(img_size, round(img_size * p["resize"] / p["crop"]))
    return pipeline.Preprocess(crop=img_size, resize=resize, mean=tuple(p["mean"]), std=tuple(p["std"]),
                               interpolation=p["interpolation"], crop_mode=crop_mode)


def get_submodule_parent(model, dotted):
    parent_name, _, child = dotted.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_head(model, arch_name, num_classes):
    """Swap the ImageNet classifier for a fresh Linear with `num_classes` outputs."""
    parent, child = get_submodule_parent(model, ARCHS[arch_name].head)
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes))
    return model


def imagenet_state_dict(arch_name):
    """ImageNet weights: torchvision's download, or the pip package for Lite0; clear error offline."""
    arch = ARCHS[arch_name]
    if arch.weights is None:
        import efficientnet_lite

        return efficientnet_lite.imagenet_state_dict()
    w = arch.weights
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, HTTPError, hash mismatch ...
        fname = os.path.basename(w.url)
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        fail(f"could not download the ImageNet weights {fname} for {arch_name} ({type(e).__name__}: {e}); "
             f"without network, place {fname} from {w.url} in {folder} (set TORCH_HOME to move it), "
             f"or pass --weights PATH to a local file")


def load_weights_file(path):
    """A local torchvision state dict or one of our checkpoints -> (state_dict, class list or None)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"--weights {path}: no such file")
    except Exception as e:
        fail(f"--weights {path}: not a loadable PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0]})")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], obj.get("classes")
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        fail(f"--weights {path}: expected a state dict (parameter name -> tensor) or a checkpoint of this project")
    return obj, None


def load_backbone(model, state, arch_name, source):
    """Load every backbone tensor strictly; the head is taken only if its shape fits."""
    head = ARCHS[arch_name].head
    own = model.state_dict()
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    missing = [k for k in own if k not in state and not k.startswith(head + ".")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape and not k.startswith(head + ".")]
    if missing or unexpected or wrong:
        bad = (missing + unexpected + wrong)[:3]
        fail(f"{source} does not fit {arch_name}: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(wrong)} mis-shaped tensors (e.g. {', '.join(bad)}); is it for another architecture?")
    keep = {k: v for k, v in state.items() if own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    return all(k in keep for k in own if k.startswith(head + "."))  # True when the head came along


def build_model(arch_name, num_classes, weights="none"):
    """The network with a `num_classes` head; weights: 'imagenet', 'none' or a file path."""
    if arch_name not in ARCHS:
        fail(f"unknown architecture {arch_name!r}; valid: {', '.join(ARCHS)}")
    model = ARCHS[arch_name].builder(num_classes=num_classes if weights == "none" else 1000)
    if weights == "none":
        return model
    if weights == "imagenet":
        load_backbone(model, imagenet_state_dict(arch_name), arch_name, "the ImageNet weights")
        return replace_head(model, arch_name, num_classes)
    state, _ = load_weights_file(weights)
    head_name = ARCHS[arch_name].head
    head_out = state.get(head_name + ".weight", torch.empty(0)).shape[:1]
    if head_out == (num_classes,):  # our own checkpoint for the same classes: keep its head
        replace_head(model, arch_name, num_classes)
        load_backbone(model, state, arch_name, weights)
        return model
    load_backbone(model, state, arch_name, weights)
    return replace_head(model, arch_name, num_classes)


# --------------------------------------------------------------------------------------------
# Freezing: which parameters train, and BatchNorm statistics that do not drift when frozen.
# --------------------------------------------------------------------------------------------
def module_names(arch_name):
    return [n for stage in ARCHS[arch_name].stages for n in stage]


def parse_unfreeze(spec, arch_name):
    """--unfreeze -> the list of backbone module names that train ('head' trains none of them)."""
    stages = ARCHS[arch_name].stages
    names = module_names(arch_name)
    spec = spec.strip()
    if spec == "all":
        return names
    if spec == "head":
        return []
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = -1
        if not 0 <= n <= len(stages):
            fail(f"--unfreeze {spec}: N must be a whole number from 0 to {len(stages)} for {arch_name}")
        return [m for stage in stages[len(stages) - n:] for m in stage]
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown or not chosen:
        what = ", ".join(unknown) or repr(spec)
        fail(f"--unfreeze {spec}: unknown module {what} for {arch_name}; valid: "
             f"all, head, last:N (N=0..{len(stages)}), or a comma list of {', '.join(names)}")
    return [n for n in names if n in chosen]  # network order


def freeze(model, arch_name, trained):
    """requires_grad only for the `trained` modules and the head; returns the trained parameter names."""
    prefixes = tuple(n + "." for n in trained) + (ARCHS[arch_name].head + ".",)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def set_train_mode(model, bn_stats="train"):
    """model.train(), but BatchNorm layers whose parameters are frozen stay in eval mode,
    so their running statistics do not move (the original let them drift).

    bn_stats="frozen": every BatchNorm normalises with its running statistics and keeps them,
    trained parts included (their scale and shift still learn), as detectron's FrozenBN.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if bn_stats == "frozen" or (params and not any(p.requires_grad for p in params)):
                m.eval()
    return model


def param_groups(model, arch_name, lr, weight_decay, backbone_lr_ratio):
    """Head at lr, pretrained backbone at lr * ratio; no weight decay on biases and norm weights."""
    head = ARCHS[arch_name].head + "."
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen: no gradient and no optimizer state
        is_head = name.startswith(head)
        decay = p.ndim > 1
        key = ("head" if is_head else "backbone", decay)
        g = groups.setdefault(key, {"params": [], "lr": lr if is_head else lr * backbone_lr_ratio,
                                    "weight_decay": weight_decay if decay else 0.0, "name": f"{key[0]}"})
        g["params"].append(p)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Data: folders -> (path, class index) lists; class map from train/, forced on test/.
# --------------------------------------------------------------------------------------------
def list_images(folder):
    return sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def scan_split(data_dir):
    """-> classes, train samples, test samples. The class map comes from train/ (and split.json)."""
    data = Path(data_dir)
    if not data.is_dir():
        fail(f"--data {data_dir}: no such folder (run `python split_data.py` first)")
    train_dir, test_dir = data / "train", data / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            fail(f"--data {data_dir}: missing {d.name}/ "
                 f"(expected {data_dir}/train/<class>/ and {data_dir}/test/<class>/)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    split_json = data / "split.json"
    if split_json.is_file():
        recorded = json.loads(split_json.read_text()).get("classes")
        if recorded and sorted(recorded) != classes:
            fail(f"{split_json} lists {len(recorded)} classes but train/ holds {len(classes)}; rerun split_data.py")
        classes = list(recorded or classes)
    index = {c: i for i, c in enumerate(classes)}
    train = [(f, index[c]) for c in classes for f in list_images(train_dir / c)]
    if not train:
        fail(f"--data {data_dir}: train/ holds no images")
    test_classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    unknown = [c for c in test_classes if c not in index]
    if unknown:
        fail(f"test/ has {len(unknown)} class(es) unknown to train/: {', '.join(unknown[:5])}")
    test = [(f, index[c]) for c in test_classes for f in list_images(test_dir / c)]
    if not test:
        fail(f"--data {data_dir}: test/ holds no images")
    return classes, train, test


def by_class(samples):
    groups = {}
    for s in samples:
        groups.setdefault(s[1], []).append(s)
    return groups


def limit_per_class(samples, n):
    """At most n images of each class (the first n in sorted order): smoke runs and CPU demos."""
    if not n:
        return samples
    return [s for group in by_class(samples).values() for s in group[:n]]


def carve_validation(samples, fraction, seed):
    """Stratified, seeded: round(fraction * n) of each class (at least 1 when n >= 2) -> (train, val)."""
    train, val = [], []
    for label, group in sorted(by_class(samples).items()):
        k = 0 if fraction <= 0 or len(group) < 2 else min(len(group) - 1, max(1, round(fraction * len(group))))
        order = random.Random(f"{seed}-{label}").sample(range(len(group)), len(group))
        chosen = set(order[:k])
        for i, s in enumerate(group):
            (val if i in chosen else train).append(s)
    return train, val


# --------------------------------------------------------------------------------------------
# Options: one parser; a script changes only the defaults.
# --------------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the script's docstring as written; appends a default that the help does not name."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in h:
            h += " (default: %(default)s)"
        return h


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of argparse's usage block."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def get_args_parser(defaults):
    d = defaults
    p = Parser(description=d.get("description"),
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", default="dataset/images", help="folder holding train/ and test/ (from split_data.py)")
    a("--out", default="runs", help="runs are written to OUT/<script name>/<run name>/")
    a("--name", default=None,
      help="run name (default: built from the options, e.g. imagenet-last1-b64-lr0.0003-...); "
           "with --grid/--compare: the folder of the grid or comparison (default grid, compare)")
    a("--epochs", type=int, default=None,
      help=f"epochs (default {d['epochs']} pretrained, {d['scratch_epochs']} with --weights none)")
    a("--batch-size", type=int, default=d["batch_size"], help="images per optimizer step, per process")
    a("--lr", type=float, default=d["lr"],
      help="learning rate of the new head; the pretrained backbone gets lr * --backbone-lr-ratio")
    a("--backbone-lr-ratio", type=float, default=d.get("backbone_lr_ratio", 0.1),
      help="backbone lr / head lr for pretrained weights (1 with --weights none)")
    a("--weight-decay", type=float, default=d["weight_decay"],
      help="AdamW weight decay (not applied to biases and norm weights)")
    a("--img-size", type=int, default=d.get("img_size"),
      help="training and test crop, px (default: " + (f"{d['img_size']}" if d.get("img_size") else
                                                     "the weights' own, e.g. 224 or 380") + ")")
    a("--crop-mode", default=d.get("crop_mode", "center"), choices=pipeline.CROP_MODES,
      help="evaluation framing: center (resize the shorter side, centre crop: the weights' own) or "
           "squash (the whole image resized to --img-size square, nothing cut off)")
    a("--unfreeze", default=None,
      help=f"trained part: all, head, last:N, or module names like layer3,layer4 "
           f"(default {d['unfreeze']} pretrained, all with --weights none)")
    a("--weights", default="imagenet", help="imagenet, none (random init) or PATH to a state dict / checkpoint")
    a("--val-fraction", type=float, default=0.1,
      help="share of each train/ class held out for checkpoint selection (0 to 0.5)")
    a("--seed", type=int, default=0, help="seeds the validation carve, init, order and augmentation")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes (0: in the main process)")
    a("--resume", default=None, help="PATH to a last.pth, or auto (this run's own last.pth if there is one)")
    a("--limit-per-class", type=int, default=None, help="use at most N images per class of each split (smoke runs)")
    a("--augment", default=d.get("augment", "seed"), choices=pipeline.AUGMENTS,
      help="seed: the original script's augmentation; light: random resized crop + flip; flip: the "
           "evaluation framing mirrored left-right half the time; none: the evaluation framing")
    a("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
      help="auto: bf16 autocast where the device has native bf16, fp16 on older GPUs, else fp32")
    a("--compile", action="store_true", help="torch.compile the model (pays on GPUs for long runs)")
    a("--bn-stats", default=d.get("bn_stats", "train"), choices=("train", "frozen"),
      help="BatchNorm in the trained part: train (batch statistics, running averages updated) or frozen "
           "(running statistics kept, as in the frozen part); frozen parts are always frozen")
    a("--probe-epochs", type=int, default=d.get("probe_epochs", 0),
      help="pretrained weights: first train the new head alone this many epochs on cached features at "
           "10 x --lr (linear probe, then fine-tune: LP-FT); 0 = off")
    a("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (the original used 0.1)")
    a("--skip-bad", action="store_true", help="train without images that cannot be decoded instead of stopping")
    a("--cache-dir", default=None, help="decoded-image and feature caches (default DATA/.cache)")
    a("--cache-frozen", default="auto", choices=("auto", "off"),
      help="auto: when the leading stages are frozen and training sees the evaluation framing "
           "(--augment none), compute their outputs once and train the rest on them; off: run them every step")
    a("--grid", action="store_true", help="run this script's hyper-parameter grid (ranked on validation)")
    a("--grid-spec", default=None, help='replace the grid: "lr=1e-3,3e-4;batch_size=32,64;unfreeze=last:1,all"')
    a("--halving", type=int, default=0,
      help="grid: successive halving from this many epochs (keep the better half on validation, double, "
           "repeat); 0 = off")
    a("--compare", action="store_true", help="train the pretrained and the randomly initialised network and compare")
    a("--arch", default=d["arch"], choices=list(ARCHS), help=argparse.SUPPRESS)
    return p


def resolve_config(args, defaults, script):
    """argparse namespace -> the one config dict; checks ranges before anything is written."""
    c = dict(vars(args))
    c["script"] = script
    scratch = c["weights"] == "none"
    if c["epochs"] is None:
        c["epochs"] = defaults["scratch_epochs"] if scratch else defaults["epochs"]
    if c["unfreeze"] is None:
        c["unfreeze"] = "all" if scratch else defaults["unfreeze"]
    scratch_rules(c)
    c["img_size"] = c["img_size"] or weights_preprocess(c["arch"])["crop"]
    check_config(c)
    parse_unfreeze(c["unfreeze"], c["arch"])  # fails early on an unknown module name
    return c


def scratch_rules(c):
    """--weights none: the settings a random network needs whatever else was asked (single runs,
    grid trials, the comparison's random side). -> c, changed in place."""
    if c["weights"] == "none":
        c["backbone_lr_ratio"] = 1.0  # nothing pretrained to protect: one lr for every layer
        c["bn_stats"] = "train"  # a random network's running statistics mean nothing yet
        c["probe_epochs"] = 0  # no features worth probing
    return c


def check_config(c):
    if c["epochs"] < 1:
        fail(f"--epochs must be at least 1 (got {c['epochs']})")
    if c["batch_size"] < 1:
        fail(f"--batch-size must be at least 1 (got {c['batch_size']})")
    if not c["lr"] > 0:
        fail(f"--lr must be > 0 (got {c['lr']})")
    if c["weight_decay"] < 0:
        fail(f"--weight-decay must be >= 0 (got {c['weight_decay']})")
    if not 0 <= c["val_fraction"] <= 0.5:
        fail(f"--val-fraction must be within [0, 0.5] (got {c['val_fraction']})")
    if c["img_size"] < 16:
        fail(f"--img-size must be at least 16 px (got {c['img_size']})")
    if c["probe_epochs"] < 0:
        fail(f"--probe-epochs must be >= 0 (got {c['probe_epochs']})")
    if c["workers"] < 0:
        fail(f"--workers must be >= 0 (got {c['workers']})")
    if c["limit_per_class"] is not None and c["limit_per_class"] < 1:
        fail(f"--limit-per-class must be at least 1 (got {c['limit_per_class']})")
    if not 0 <= c["label_smoothing"] < 1:
        fail(f"--label-smoothing must be within [0, 1) (got {c['label_smoothing']})")
    w = c["weights"]
    if w not in ("imagenet", "none") and not Path(w).is_file():
        fail(f"--weights {w}: not imagenet, none, or an existing file")


def default_run_name(c):
    """Deterministic, so that the same command finds its own run again (--resume auto, the grid)."""
    w = c["weights"] if c["weights"] in ("imagenet", "none") else Path(c["weights"]).stem
    u = c["unfreeze"].replace(":", "").replace(",", "+")
    name = f"{w}-{u}-b{c['batch_size']}-lr{c['lr']:g}-wd{c['weight_decay']:g}-e{c['epochs']}-{c['img_size']}px"
    if c.get("crop_mode", "center") != "center":
        name += f"-{c['crop_mode']}"
    if c.get("seed", 0):
        name += f"-seed{c['seed']}"
    if c["limit_per_class"]:
        name += f"-lim{c['limit_per_class']}"
    return name


# --------------------------------------------------------------------------------------------
# Devices, precision, distributed.
# --------------------------------------------------------------------------------------------
def init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; -> (rank, world_size, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def pick_device(spec, local_rank=0):
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        fail(f"--device {spec}: valid values are auto, cpu, cuda, cuda:N")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {spec}: valid values are auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {spec}: no CUDA GPU is available here (use --device cpu)")
    return device


def cpu_has_native_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision, device):
    """-> the autocast dtype or None (fp32)."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        fail("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def all_reduce(tensor):
    """Sum across torchrun processes (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def seed_everything(seed, rank=0):
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


# --------------------------------------------------------------------------------------------
# The loop: train_one_epoch and evaluate return plain metric dicts.
# --------------------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    pass


def topk_correct(logits, y, ks=(1, 5)):
    k = min(max(ks), logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(y[:, None])
    return [hit[:, :min(kk, k)].any(dim=1).sum() for kk in ks]


def train_one_epoch(model, loader, optimizer, scheduler, criterion, device, dtype, *, epoch, scaler=None,
                    clip=1.0, progress=True, memory_format=torch.contiguous_format, bn_stats="train"):
    """One pass over the loader. -> {loss, top1, images, seconds} (summed over processes)."""
    from tqdm import tqdm

    set_train_mode(model, bn_stats)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    step_losses = []
    # disable=None: no bar when stderr is not a terminal (logs, CI), only the per-epoch line
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None if progress else True,
               dynamic_ncols=True)
    for step, (x, y) in enumerate(bar, 1):
        x = x.to(memory_format=memory_format)
        with autocast(device, dtype):
            logits = model(x)
            loss = criterion(logits.float(), y)
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
    seen_t = torch.tensor(seen, device=device, dtype=torch.float64)
    totals = all_reduce(torch.stack([loss_sum, correct.double(), seen_t]))
    n = max(totals[2].item(), 1)
    return {"loss": totals[0].item() / n, "top1": 100 * totals[1].item() / n, "images": int(totals[2].item()),
            "seconds": time.perf_counter() - start}


def backward_and_step(loss, optimizer, params, scaler=None, clip=1.0):
    """Backward, gradient clipping at norm `clip`, optimizer step; with an fp16 GradScaler if given."""
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
def evaluate(model, loader, criterion, device, dtype, num_classes, memory_format=torch.contiguous_format):
    """-> {loss, top1, top5, mean_class_acc, per_class, confusion} over every sample, all processes."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    for x, y in loader:
        x = x.to(memory_format=memory_format)
        with autocast(device, dtype):
            logits = model(x).float()
        loss_sum += criterion(logits, y).double() * y.shape[0]
        top5 += topk_correct(logits, y, (5,))[0]
        confusion.index_put_((y, logits.argmax(1)), torch.ones_like(y), accumulate=True)
    all_reduce(confusion)
    totals = all_reduce(torch.stack([loss_sum, top5.double()]))
    return metrics_from_confusion(confusion.cpu(), loss_sum=totals[0].item(), top5=totals[1].item())


def metrics_from_confusion(confusion, loss_sum=0.0, top5=0.0):
    """Rows: true class, columns: predicted. Percentages, like the original table."""
    n = confusion.sum().item()
    per_class_n = confusion.sum(1)
    present = per_class_n > 0
    per_class = torch.where(present, confusion.diag() / per_class_n.clamp(min=1), torch.nan)
    return {"loss": loss_sum / max(n, 1), "top1": 100 * confusion.diag().sum().item() / max(n, 1),
            "top5": 100 * top5 / max(n, 1), "mean_class_acc": 100 * per_class[present].mean().item() if n else 0.0,
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


# --------------------------------------------------------------------------------------------
# Records: atomic writes, checkpoints, TensorBoard.
# --------------------------------------------------------------------------------------------
def atomic_write(path, write):
    """write(file object) into path.tmp, fsync, rename: a kill never leaves a half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def save_checkpoint(path, state):
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"--resume {path}: no such file")
    except Exception as e:
        fail(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")


def unwrap(model):
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def open_writer(run_dir, start_epoch):
    """A TensorBoard writer for epochs from start_epoch on, in a new event file of the run folder.

    purge_step: TensorBoard drops the steps >= start_epoch that a killed run had logged. It
    reads a folder's event files in name order, and a name starts with the creation second and
    ends with a per-process counter, so a writer opened in the same second as an earlier one
    (a resume in the same process: successive halving, tests) waits for the next second,
    or its file could sort first (".10" < ".9") and be purged by the older one.
    """
    from torch.utils.tensorboard import SummaryWriter

    newest = max((int(f.name.split(".")[3]) for f in Path(run_dir).glob("events.out.tfevents.*")
                  if f.name.split(".")[3].isdigit()), default=0)
    while int(time.time()) <= newest:
        time.sleep(0.05)
    return SummaryWriter(str(run_dir), purge_step=start_epoch)


def confusion_image(confusion):
    """[3, C, C] uint8 heat map (rows: true class, normalised per row) for TensorBoard."""
    c = confusion.double()
    rows = c / c.sum(1, keepdim=True).clamp(min=1)
    v = (rows * 255).round().to(torch.uint8)
    return torch.stack([v, torch.zeros_like(v), 255 - v]) if v.numel() else v


def hparams_summaries(config, metrics):
    """TensorBoard HParams records, written into the run's own event file (no stray sub-folder)."""
    from torch.utils.tensorboard.summary import hparams

    keys = ("arch", "weights", "unfreeze", "batch_size", "epochs", "lr", "weight_decay", "img_size", "crop_mode",
            "augment", "backbone_lr_ratio", "bn_stats", "probe_epochs", "seed")
    h = {k: (config[k] if isinstance(config[k], (int, float, str, bool)) else str(config[k])) for k in keys}
    return hparams(h, metrics)


def per_class_text(classes, per_class):
    lines = ["| class | test accuracy % |", "|---|---|"]
    lines += [f"| {c} | {'-' if a is None else f'{a:.1f}'} |" for c, a in zip(classes, per_class)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# fit(config): one run, in its own folder; returns its metrics.
# --------------------------------------------------------------------------------------------
def prepare_data(config):
    """-> classes, train, val, test sample lists, after the limit and the validation carve."""
    classes, train, test = scan_split(config["data"])
    train = limit_per_class(train, config["limit_per_class"])
    test = limit_per_class(test, config["limit_per_class"])
    train, val = carve_validation(train, config["val_fraction"], config["seed"])
    return classes, train, val, test


def cache_dir_of(config):
    return config["cache_dir"] or str(Path(config["data"]) / ".cache")


def loader_options(config, device, rank=0, world=1):
    """The keyword arguments every pipeline.build_loader call of a run shares."""
    return dict(preprocess=make_preprocess(config["arch"], config["img_size"], config["crop_mode"]),
                recipe=ARCHS[config["arch"]].recipe, workers=config["workers"], device=device,
                seed=config["seed"], cache_dir=cache_dir_of(config), rank=rank, world_size=world,
                skip_bad=config["skip_bad"], progress=rank == 0)


def make_loader(samples, config, options, train):
    """A training loader (augmented, shuffled) or an evaluation one (each image once); None for no samples."""
    if not samples:
        return None
    try:
        if train:
            return pipeline.build_loader(samples, train=True, augment=config["augment"],
                                         batch_size=config["batch_size"], **options)
        # evaluation keeps no activations for backward, so it affords larger batches
        return pipeline.build_loader(samples, train=False, augment="none", batch_size=max(64, config["batch_size"]),
                                     **options)
    except pipeline.BadImagesError as e:
        fail(f"{e} (pass --skip-bad to train without them)")


def run_dir_of(config):
    return Path(config["out"]) / config["script"] / (config["name"] or default_run_name(config))


def resume_path(config, run_dir):
    r = config["resume"]
    if r == "auto":
        p = run_dir / "last.pth"
        return p if p.is_file() else None
    return Path(r) if r else None


def improves(m, best):
    """Checkpoint selection on validation: higher top-1; on a tie, lower loss. Ties are common
    (on 689 images top-1 moves in 0.15-point steps, and it often stalls while the cosine schedule
    ends), and the loss tells the tied epochs apart. m: metrics with top1 and loss; best: the
    same keys (older checkpoints lack loss: any tie then counts as no better)."""
    return (m["top1"], -m["loss"]) > (best["top1"], -best.get("loss", -math.inf))


def best_record(vm, epoch):
    """What a checkpoint keeps of its best epoch; vm None (no validation part): every epoch is best."""
    if vm is None:
        return {"top1": float("nan"), "epoch": epoch}
    return {"top1": vm["top1"], "loss": vm["loss"], "epoch": epoch}


def fit(config, stop_after=None):
    """Train one run; write config.json, events, last.pth, best.pth, metrics.json; return the metrics.

    stop_after: stop after this epoch without the test evaluation (successive halving); a later
    call with resume continues the same schedule.
    """
    rank, world, local_rank = init_distributed()
    device = pick_device(config["device"], local_rank)
    dtype = resolve_precision(config["precision"], device)
    writer_rank = rank == 0
    run_dir = run_dir_of(config)
    ckpt_path = resume_path(config, run_dir)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is None and (run_dir / "last.pth").exists() and config["resume"] is None:
        fail(f"{run_dir} already holds a run; pass --resume auto to continue it or --name NEW for a new one")

    classes, train, val, test = prepare_data(config)
    if ckpt is not None and ckpt["classes"] != classes:
        fail(f"--resume {ckpt_path}: its {len(ckpt['classes'])} classes differ "
             f"from the {len(classes)} in {config['data']}")
    seed_everything(config["seed"])
    model = build_model(config["arch"], len(classes), "none" if ckpt else config["weights"])
    trained = freeze(model, config["arch"], parse_unfreeze(config["unfreeze"], config["arch"]))
    memory_format = torch.channels_last
    model.to(device=device, memory_format=memory_format)
    if ckpt:
        model.load_state_dict(ckpt["model"])

    if config["unfreeze"] == "head" and world == 1:
        return fit_head_only(config, model, classes, train, val, test, device, dtype, run_dir, ckpt, stop_after)

    options = loader_options(config, device, rank, world)
    pre = options["preprocess"]
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 builds the decode caches first; the others then find them
    train_loader = make_loader(train, config, options, train=True)
    val_loader, test_loader = make_loader(val, config, options, False), make_loader(test, config, options, False)
    if world > 1 and rank == 0:
        dist.barrier()
    optimizer = torch.optim.AdamW(param_groups(model, config["arch"], config["lr"], config["weight_decay"],
                                               config["backbone_lr_ratio"]))
    scheduler = lr_schedule(optimizer, len(train_loader), config["epochs"])
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    start_epoch, best, train_seconds, images_trained = 1, {"top1": -1.0, "epoch": 0}, 0.0, 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"] + 1
        best, train_seconds, images_trained = ckpt["best"], ckpt["train_seconds"], ckpt["images_trained"]

    net, (train_loader, val_loader, test_loader), frozen = cache_frozen_prefix(
        config, model, (train_loader, val_loader, test_loader), options, device, dtype, world)
    if config["probe_epochs"] and ckpt is None and config["weights"] != "none":
        # every rank alike: same features, same seed
        linear_probe(config, model, train, val, device, dtype, frozen)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config["compile"]:
        net = torch.compile(net)

    writer = None
    if writer_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config)
        writer = open_writer(run_dir, start_epoch)
        print_config(config, run_dir, classes, train, val, test, trained, model, device, dtype)

    last_epoch = config["epochs"] if stop_after is None else min(stop_after, config["epochs"])
    state = lambda epoch: {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                           "epoch": epoch, "config": config, "classes": classes, "arch": config["arch"],
                           "preprocess": preprocess_dict(pre), "best": best, "train_seconds": train_seconds,
                           "images_trained": images_trained, "rng": torch.get_rng_state()}
    if ckpt and ckpt.get("rng") is not None:
        torch.set_rng_state(ckpt["rng"])  # dropout draws continue as if never interrupted
    for epoch in range(start_epoch, last_epoch + 1):
        train_loader.set_epoch(epoch)
        try:
            tm = train_one_epoch(net, train_loader, optimizer, scheduler, criterion, device, dtype, epoch=epoch,
                                 scaler=scaler, progress=writer_rank, memory_format=memory_format,
                                 bn_stats=config["bn_stats"])
        except NonFiniteLoss as e:
            fail(str(e))
        except torch.cuda.OutOfMemoryError:
            fail(f"out of GPU memory with --batch-size {config['batch_size']}; "
                 f"try --batch-size {max(1, config['batch_size'] // 2)}")
        train_seconds += tm["seconds"]
        images_trained += tm["images"]
        vm = evaluate(net, val_loader, criterion, device, dtype, len(classes), memory_format) if val_loader else None
        improved = vm is None or improves(vm, best)
        if improved:
            best = best_record(vm, epoch)
        if writer_rank:
            log_epoch(writer, epoch, tm, vm, optimizer, config["epochs"])
            if improved:  # best before last: wherever a kill lands, a last.pth has its best.pth
                save_checkpoint(run_dir / "best.pth", state(epoch))
            save_checkpoint(run_dir / "last.pth", state(epoch))
        if world > 1:
            dist.barrier()
    if last_epoch < config["epochs"]:
        if writer:
            writer.close()
        return {"stopped_at": last_epoch, "best_val_top1": best["top1"], "best_epoch": best["epoch"],
                "train_seconds": round(train_seconds, 2)}

    # The test set is seen once, with the best-on-validation weights: it decides nothing.
    best_state = load_checkpoint(run_dir / "best.pth") if writer_rank or world == 1 else None
    if world > 1:
        obj = [best_state["model"] if best_state else None]
        dist.broadcast_object_list(obj, src=0)
        unwrap(model).load_state_dict(obj[0])
    else:
        unwrap(model).load_state_dict(best_state["model"])
    test_m = evaluate(net, test_loader, criterion, device, dtype, len(classes), memory_format)
    metrics = dict(final_metrics(test_m, best, config, train_seconds, images_trained), processes=world)
    if writer_rank:
        finish_run(writer, run_dir, config, classes, test_m, metrics)
    return metrics


def preprocess_dict(pre):
    return {"crop": pre.crop, "resize": pre.resize, "mean": list(pre.mean), "std": list(pre.std),
            "interpolation": pre.interpolation, "crop_mode": pre.crop_mode}


def final_metrics(test_m, best, config, train_seconds, images_trained):
    return {"test_top1": test_m["top1"], "test_top5": test_m["top5"], "test_mean_class_acc": test_m["mean_class_acc"],
            "test_loss": test_m["loss"], "test_images": test_m["images"], "best_val_top1": best["top1"],
            "best_epoch": best["epoch"], "epochs": config["epochs"], "train_seconds": round(train_seconds, 2),
            "train_images_per_s": round(images_trained / max(train_seconds, 1e-9), 1)}


def finish_run(writer, run_dir, config, classes, test_m, metrics):
    writer.add_image("Test/confusion_matrix", confusion_image(test_m["confusion"]), 0)
    writer.add_text("Test/per_class_accuracy", per_class_text(classes, test_m["per_class"]), 0)
    for k in ("test_top1", "test_top5", "test_mean_class_acc"):
        writer.add_scalar(f"Test/{k[5:]}", metrics[k], 0)
    for s in hparams_summaries(config, {"hparam/test_top1": metrics["test_top1"],
                                        "hparam/best_val_top1": metrics["best_val_top1"]}):
        writer.file_writer.add_summary(s)
    writer.add_scalar("hparam/test_top1", metrics["test_top1"], 0)
    writer.add_scalar("hparam/best_val_top1", metrics["best_val_top1"], 0)
    writer.close()
    out = dict(metrics, test_per_class_acc=dict(zip(classes, test_m["per_class"])))
    write_json(run_dir / "metrics.json", out)
    print(f"test top-1 {metrics['test_top1']:.2f}%  top-5 {metrics['test_top5']:.2f}%  mean per-class "
          f"{metrics['test_mean_class_acc']:.2f}%  (best val top-1 {metrics['best_val_top1']:.2f}% at epoch "
          f"{metrics['best_epoch']})  -> {run_dir}/metrics.json", flush=True)


def log_epoch(writer, epoch, tm, vm, optimizer, epochs):
    lr = optimizer.param_groups[-1]["lr"]
    writer.add_scalar("Loss/train", tm["loss"], epoch)
    writer.add_scalar("Accuracy/train", tm["top1"], epoch)
    writer.add_scalar("LR", max(g["lr"] for g in optimizer.param_groups), epoch)
    writer.add_scalar("Speed/train_images_per_s", tm["images"] / max(tm["seconds"], 1e-9), epoch)
    line = f"epoch {epoch}/{epochs}  train loss {tm['loss']:.4f} top-1 {tm['top1']:.2f}%"
    if vm:
        writer.add_scalar("Loss/val", vm["loss"], epoch)
        writer.add_scalar("Accuracy/val", vm["top1"], epoch)
        writer.add_scalar("Accuracy/val_top5", vm["top5"], epoch)
        writer.add_scalar("Accuracy/val_mean_class", vm["mean_class_acc"], epoch)
        line += f"  val loss {vm['loss']:.4f} top-1 {vm['top1']:.2f}%"
    writer.flush()
    print(line + f"  {tm['images'] / max(tm['seconds'], 1e-9):.0f} img/s  lr {lr:.2e}", flush=True)


def print_config(config, run_dir, classes, train, val, test, trained, model, device, dtype):
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(json.dumps(config, indent=1, default=str), flush=True)
    print(f"run {run_dir}: {len(classes)} classes, {len(train)} train / {len(val)} val / {len(test)} test images; "
          f"training {n_train / 1e6:.2f} M of {n_all / 1e6:.2f} M parameters on {device} "
          f"({'fp32' if dtype is None else str(dtype).replace('torch.', '')})", flush=True)


# --------------------------------------------------------------------------------------------
# Frozen prefix: when the leading stages are frozen and training sees the evaluation framing,
# their outputs never change. They are computed once per image, and the rest trains on them.
# --------------------------------------------------------------------------------------------
def forward_sequence(model):
    """The network's modules in forward order (torchvision's ResNet and EfficientNet forwards, and
    Lite0's), so that it can be cut where its frozen part ends: nn.Sequential(*seq)(x) == model(x)."""
    if isinstance(model, models.ResNet):
        m = model
        return [m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4, m.avgpool,
                nn.Flatten(1), m.fc]
    return [*model.features, model.avgpool, nn.Flatten(1), model.classifier]


def _deterministic_frozen(module):
    """True when the module trains nothing and computes the same in training as in evaluation, under
    set_train_mode: no trained parameter, every BatchNorm in eval mode, no dropout or stochastic depth."""
    if any(p.requires_grad for p in module.parameters()):
        return False
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return False
        if isinstance(m, (nn.modules.dropout._DropoutNd, StochasticDepth)) and m.p > 0:
            return False
    return True


def split_frozen_prefix(model, bn_stats):
    """-> (prefix, rest): nn.Sequentials sharing the model's modules; prefix is the longest run of
    leading feature modules that _deterministic_frozen holds for (empty when there is none)."""
    seq = forward_sequence(model)
    n_features = len(seq) - 3  # then avgpool, flatten, head
    set_train_mode(model, bn_stats)
    k = 0
    while k < n_features and _deterministic_frozen(seq[k]):
        k += 1
    model.eval()
    return nn.Sequential(*seq[:k]), nn.Sequential(*seq[k:])


def memory_budget(device):
    """Bytes that cached activations may take: a quarter of the GPU's free memory, or of the RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume a 16 GB machine
        return 4 << 30


@torch.no_grad()
def prefix_outputs(prefix, loader, device, dtype):
    """The prefix's outputs for every sample of an evaluation loader, in its sample order."""
    prefix.eval()
    out = []
    for x, _ in loader:
        with autocast(device, dtype):
            out.append(prefix(x.to(memory_format=torch.channels_last)))
    return torch.cat(out)


class PrefixBatches:
    """A pipeline.Loader's batches, same order and labels, with the frozen prefix's cached outputs
    in place of the images (outputs[i] belongs to loader.samples[i])."""

    def __init__(self, loader, outputs):
        if len(outputs) != len(loader.samples):
            raise ValueError(f"{len(outputs)} cached outputs for {len(loader.samples)} samples")
        self.loader, self.outputs = loader, outputs
        self.labels = loader.labels.to(outputs.device)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for idx in self.loader.batch_indices():
            i = torch.from_numpy(idx).to(self.outputs.device)
            yield self.outputs[i], self.labels[i]


@dataclass
class FrozenPrefix:
    """What cache_frozen_prefix computed: the head's input from the cached outputs (body: the
    network after the prefix, up to the head), and each split's outputs in evaluation order."""
    body: nn.Module
    batches: dict  # split name -> PrefixBatches (None for an empty split)


def cache_frozen_prefix(config, model, loaders, options, device, dtype, world):
    """--cache-frozen auto: -> (the network after the frozen prefix, loaders serving the prefix's
    outputs, FrozenPrefix), computed once. (model, loaders, None) when training is augmented (each
    epoch shows other pixels), runs on several processes, nothing leading is frozen, or the outputs
    would take more than memory_budget(). loaders: train, val, test (val may be None)."""
    if config["cache_frozen"] != "auto" or config["augment"] != "none" or world > 1:
        return model, loaders, None
    prefix, rest = split_frozen_prefix(model, config["bn_stats"])
    if not len(prefix):
        return model, loaders, None
    n = sum(len(loader.samples) for loader in loaders if loader is not None)
    side = options["preprocess"].crop
    with torch.no_grad(), autocast(device, dtype):  # one blank image: the size of each output
        one = prefix.eval()(torch.zeros(1, 3, side, side, device=device))
    need = n * one.numel() * one.element_size()
    names = {id(m): name for name, m in model.named_modules()}
    what = names[id(prefix[0])] + (f" to {names[id(prefix[-1])]}" if len(prefix) > 1 else "")
    if need > memory_budget(device):
        print(f"frozen {what}: outputs of {n} images would take {need / 2**20:.0f} MiB, over a quarter of "
              f"the memory; running them every step", flush=True)
        return model, loaders, None
    t = time.perf_counter()
    # the training images in evaluation order (same pixels: --augment none), then val and test
    sources = [make_loader(loaders[0].samples, config, options, train=False)] + list(loaders[1:])
    outs = [prefix_outputs(prefix, s, device, dtype) if s is not None else None for s in sources]
    served = [PrefixBatches(loader, o) if loader is not None else None
              for loader, o in zip(loaders, outs)]
    print(f"frozen {what}: outputs of {n} images ({'x'.join(map(str, one.shape[1:]))}, "
          f"{str(one.dtype).replace('torch.', '')}, {need / 2**20:.0f} MiB) computed once in "
          f"{time.perf_counter() - t:.1f} s; training runs the rest on them", flush=True)
    by_split = {"train": PrefixBatches(sources[0], outs[0]), "val": served[1], "test": served[2]}
    return rest, served, FrozenPrefix(body=nn.Sequential(*rest[:-1]), batches=by_split)


# --------------------------------------------------------------------------------------------
# Head only: the frozen backbone runs once per split; the head trains on cached features.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def net_outputs(net, batches, device, dtype):
    """net's outputs (float32) and the labels, for every batch, in evaluation mode."""
    net.eval()
    outs, labels = [], []
    for x, y in batches:
        with autocast(device, dtype):
            outs.append(net(x.to(memory_format=torch.channels_last)).float())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def extract_features(model, arch_name, loader, device, dtype):
    """Backbone outputs (the head's inputs) and labels for every sample of an eval loader."""
    parent, child = get_submodule_parent(model, ARCHS[arch_name].head)
    head = getattr(parent, child)
    setattr(parent, child, nn.Identity())
    try:
        return net_outputs(model, loader, device, dtype)
    finally:
        setattr(parent, child, head)


def cached_features(config, model, split, samples, loader, device, dtype, frozen=None):
    """Features of one split, cached on disk by (architecture, weights, files, preprocessing).
    frozen: a FrozenPrefix; on a cache miss the features then come from its cached outputs."""
    cache = Path(cache_dir_of(config))
    w = config["weights"]
    weights_id = [w, os.path.getsize(w), os.path.getmtime(w)] if Path(w).is_file() else w
    pre = preprocess_dict(make_preprocess(config["arch"], config["img_size"], config["crop_mode"]))
    files = [(s[0], s[1], os.path.getsize(s[0]), os.path.getmtime(s[0])) for s in samples]
    key = hashlib.sha256(json.dumps([config["arch"], weights_id, pre, str(dtype), files], default=str).encode())
    key = key.hexdigest()[:16]
    path = cache / f"features-{config['arch']}-{split}-{key}.pt"
    if path.is_file():
        obj = torch.load(path, map_location=device, weights_only=True)
        return obj["features"], obj["labels"]
    t = time.perf_counter()
    if frozen is not None and frozen.batches.get(split) is not None:
        f, y = net_outputs(frozen.body, frozen.batches[split], device, dtype)  # the rest of the backbone only
    else:
        f, y = extract_features(model, config["arch"], loader, device, dtype)
    cache.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"features": f.cpu(), "labels": y.cpu()})
    print(f"{split}: features of {len(y)} images computed in {time.perf_counter() - t:.1f} s (cached in {path})",
          flush=True)
    return f, y


def fit_head_only(config, model, classes, train, val, test, device, dtype, run_dir, ckpt, stop_after=None):
    """--unfreeze head: the same outputs as fit(), with the backbone run once per split.

    Augmentation is off for the cached features (each image is seen through the evaluation
    preprocessing), which is what makes a head train in seconds.
    """
    config = dict(config, augment="none")
    pre = make_preprocess(config["arch"], config["img_size"], config["crop_mode"])
    feats = split_features(config, model, (("train", train), ("val", val), ("test", test)), device, dtype)

    parent, child = get_submodule_parent(model, ARCHS[config["arch"]].head)
    head = getattr(parent, child)
    head.float()
    optimizer = torch.optim.AdamW(param_groups(head_as_model(head, config["arch"]), config["arch"], config["lr"],
                                               config["weight_decay"], 1.0))
    fx, fy = feats["train"]
    scheduler = lr_schedule(optimizer, head_steps(len(fy), config["batch_size"]), config["epochs"])
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    start_epoch, best, train_seconds, images_trained = 1, {"top1": -1.0, "epoch": 0}, 0.0, 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best"]
        train_seconds, images_trained = ckpt["train_seconds"], ckpt["images_trained"]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config)
    writer = open_writer(run_dir, start_epoch)
    print_config(config, run_dir, classes, train, val, test, [], model, device, dtype)
    state = lambda epoch: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "scaler": None, "epoch": epoch, "config": config,
                           "classes": classes, "arch": config["arch"], "preprocess": preprocess_dict(pre),
                           "best": best, "train_seconds": train_seconds, "images_trained": images_trained}
    last_epoch = config["epochs"] if stop_after is None else min(stop_after, config["epochs"])
    for epoch in range(start_epoch, last_epoch + 1):
        try:
            tm = train_head_epoch(head, fx, fy, optimizer, scheduler, criterion, config["batch_size"],
                                  seed=config["seed"] * 1000 + epoch, epoch=epoch)
        except NonFiniteLoss as e:
            fail(str(e))
        train_seconds += tm["seconds"]
        images_trained += tm["images"]
        vm = head_metrics(head, *feats["val"], criterion, len(classes)) if "val" in feats else None
        improved = vm is None or improves(vm, best)
        if improved:
            best = best_record(vm, epoch)
        log_epoch(writer, epoch, tm, vm, optimizer, config["epochs"])
        if improved:
            save_checkpoint(run_dir / "best.pth", state(epoch))
        save_checkpoint(run_dir / "last.pth", state(epoch))
    if last_epoch < config["epochs"]:
        writer.close()
        return {"stopped_at": last_epoch, "best_val_top1": best["top1"], "best_epoch": best["epoch"],
                "train_seconds": round(train_seconds, 2)}
    model.load_state_dict(load_checkpoint(run_dir / "best.pth")["model"])
    test_m = head_metrics(head, *feats["test"], criterion, len(classes))
    metrics = dict(final_metrics(test_m, best, config, train_seconds, images_trained), processes=1)
    finish_run(writer, run_dir, config, classes, test_m, metrics)
    return metrics


def split_features(config, model, splits, device, dtype, frozen=None):
    """{name: (features, labels)} of the frozen backbone for each (name, samples) with samples,
    through the evaluation preprocessing; cached on disk (cached_features)."""
    options = loader_options(config, device)
    loaders = [(name, make_loader(samples, config, options, train=False)) for name, samples in splits]
    return {name: cached_features(config, model, name, loader.samples, loader, device, dtype, frozen)
            for name, loader in loaders if loader is not None}


def head_steps(n, batch_size):
    """Batches per epoch on cached features: the last partial batch is dropped, as in training."""
    return max(1, n // batch_size)


def train_head_epoch(head, fx, fy, optimizer, scheduler, criterion, batch_size, *, seed, epoch):
    """One epoch of the head alone on cached features (a seeded order). -> {loss, top1, images, seconds}"""
    t = time.perf_counter()
    order = torch.randperm(len(fy), generator=torch.Generator().manual_seed(seed)).to(fy.device)
    steps = head_steps(len(fy), batch_size)
    head.train()
    loss_sum, correct, n = 0.0, 0, 0
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size] if steps > 1 else order
        logits = head(fx[idx])
        loss = criterion(logits, fy[idx])
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {i + 1}; stopping "
                                f"(the last good checkpoint stays; try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(idx)
        correct += logits.argmax(1).eq(fy[idx]).sum().item()
        n += len(idx)
    return {"loss": loss_sum / n, "top1": 100 * correct / n, "images": n, "seconds": time.perf_counter() - t}


def linear_probe(config, model, train, val, device, dtype, frozen=None):
    """LP-FT (Kumar et al., 2022): before fine-tuning, train the new head alone on cached features
    for --probe-epochs, so the first fine-tuning steps do not push a random head's gradients into
    the pretrained stages. The best head on validation is kept in `model`. frozen: a FrozenPrefix,
    whose cached outputs then give the features (only the rest of the backbone runs)."""
    feats = split_features(config, model, (("train", train), ("val", val)), device, dtype, frozen)
    parent, child = get_submodule_parent(model, ARCHS[config["arch"]].head)
    head = getattr(parent, child)
    # A fresh linear layer alone takes a head-only rate; --lr is then the fine-tuning rate of a trained head.
    optimizer = torch.optim.AdamW(param_groups(head_as_model(head, config["arch"]), config["arch"], 10 * config["lr"],
                                               config["weight_decay"], 1.0))
    fx, fy = feats["train"]
    scheduler = lr_schedule(optimizer, head_steps(len(fy), config["batch_size"]), config["probe_epochs"])
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    best, best_state = {"top1": -1.0}, None
    for epoch in range(1, config["probe_epochs"] + 1):
        try:
            tm = train_head_epoch(head, fx, fy, optimizer, scheduler, criterion, config["batch_size"],
                                  seed=config["seed"] * 1000 - epoch, epoch=epoch)
        except NonFiniteLoss as e:
            fail(f"linear probe: {e}")
        score = head_metrics(head, *feats["val"], criterion, head.out_features) if "val" in feats else tm
        if improves(score, best):
            best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    print(f"linear probe: head trained {config['probe_epochs']} epochs on cached features, best val top-1 "
          f"{best['top1']:.2f}%", flush=True)
    return best["top1"]


def head_as_model(head, arch_name):
    """Wrap the head so param_groups() sees it under its own dotted name (all 'head' params)."""
    root = nn.Module()
    parent = root
    parts = ARCHS[arch_name].head.split(".")
    for p in parts[:-1]:
        child = nn.Module()
        parent.add_module(p, child)
        parent = child
    parent.add_module(parts[-1], head)
    return root


@torch.no_grad()
def head_metrics(head, feats, labels, criterion, num_classes):
    head.eval()
    logits = head(feats)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels.cpu(), logits.argmax(1).cpu()), torch.ones(len(labels), dtype=torch.long),
                         accumulate=True)
    return metrics_from_confusion(confusion, loss_sum=criterion(logits, labels).item() * len(labels),
                                  top5=topk_correct(logits, labels, (5,))[0].item())


# --------------------------------------------------------------------------------------------
# Entry point of every main_*.py script.
# --------------------------------------------------------------------------------------------
def given_options(defaults, argv=None):
    """The dests of the options on the command line, however spelled (--epochs=1, --epoch 1)."""
    probe = get_args_parser(defaults)
    for a in probe._actions:
        a.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def main(defaults, grid, argv=None, script=None):
    script = script or Path(sys.argv[0]).stem
    pipeline.keep_freed_memory()  # batches and activations reuse freed heap pages instead of faulting new ones
    parser = get_args_parser(defaults)
    args = parser.parse_args(argv)
    config = resolve_config(args, defaults, script)
    explicit = given_options(defaults, argv)
    if config["grid"] or config["grid_spec"] or config["compare"] or config["halving"]:
        import experiments  # imported on use: it builds on fit()

        return experiments.run(config, grid, explicit)
    return fit(config)
