"""Options and the one config dict: the parser every script shares, the defaults a script sets,
the checks made before anything is written, the run's name and folder, and how two configs of
the same run may differ.
"""
import argparse
from pathlib import Path

from . import augment, loop, pipeline, processes
from .errors import fail
from .nets import ARCHS, TTAS, parse_unfreeze, weights_preprocess

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The options a scratch recipe sets (default None), and their values for pretrained weights (today's).
# optimizer stays None on the pretrained side (adamw when the run starts).
RECIPE_OPTIONS = {"optimizer": "adamw", "zero_init_residual": "off", "mixup": 0.0, "cutmix": 0.0, "erasing": 0.0,
                  "ema": 0.0, "auto_augment": "none", "tta": "none"}
# --scratch-recipe: what a network trained from random weights gets (docs/RESULTS.md#scratch).
# original: the original scripts' recipe, the script's own --lr/--weight-decay/--augment with AdamW.
# tuned: the same at lr 1e-3 with the evaluation framing mirrored as its only augmentation (--augment
# flip), chosen on validation at the 10-epoch proxy over SGD, zero-init, lr 3e-3, the weights' average,
# weight decay, a linear schedule and the original's crops, rotations and colours.
SCRATCH_RECIPES = {
    "original": dict(optimizer="adamw", zero_init_residual="off", mixup=0.0, cutmix=0.0, erasing=0.0, ema=0.0,
                     auto_augment="none", tta="none"),
    "tuned": dict(optimizer="adamw", lr=1e-3, augment="flip", zero_init_residual="off", mixup=0.0, cutmix=0.0,
                  erasing=0.0, ema=0.0, auto_augment="none", tta="none"),
}
# Options that cannot change a run's results: a resumed or reused run may differ in these.
# (--compile and --deterministic change the kernels and so the numbers: not exempt; --cache-frozen is
# bit-identical by test.)
EXEMPT = ("resume", "workers", "device", "cache_dir", "gpu_cache", "cache_frozen", "out", "name", "script", "grid",
          "grid_spec", "halving", "compare", "parallel", "explicit", "scratch_filled")
# Compared by what they resolve to (identity.py): --precision auto may mean bf16 on one machine and
# fp32 on another; --data by the files it holds (a copied data set is the same data); --weights by
# the bytes of its file; "identity" is the record itself, not an option.
RESOLVED = ("precision", "identity", "data", "weights")
# What older config.json files lack, and what it then meant (None: no single value; it differs).
# Runs older than --scratch-recipe trained without its options (optimizer None: AdamW, as pretrained runs now).
LEGACY = {"crop_mode": "center", "crop_scale": None, "class_balance": "none", "lr_schedule": "cosine",
          "split_seed": None, "scratch_recipe": "tuned", "optimizer": None, "zero_init_residual": "off", "mixup": 0.0,
          "cutmix": 0.0, "erasing": 0.0, "ema": 0.0, "auto_augment": "none", "tta": "none"}


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

    def parse_known_args(self, args=None, namespace=None):
        """As argparse, and `explicit`: the sorted dests given on the command line (what a scratch
        recipe must not override)."""
        ns, rest = super().parse_known_args(args, namespace)
        if not getattr(self, "_probing", False):
            saved = [(a, a.default) for a in self._actions]
            self._probing = True
            try:
                for a, _ in saved:
                    a.default = argparse.SUPPRESS
                given = vars(super().parse_known_args(args)[0])
            finally:
                for a, d in saved:
                    a.default = d
                self._probing = False
            ns.explicit = sorted(given)
        return ns, rest


def get_args_parser(defaults):
    """The one parser of every main_*.py; defaults: the script's DEFAULTS row."""
    d = defaults
    p = Parser(description=d.get("description"), formatter_class=HelpFormatter)
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
    a("--lr-schedule", default=d.get("lr_schedule", "cosine"), choices=loop.LR_SCHEDULES,
      help="after one epoch of linear warm-up, the rate falls to 0 at the run's end along half a cosine, or "
           "along a straight line (linear: budgeted training, Li et al. 2020)")
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
    a("--split-seed", type=int, default=0,
      help="decides which train/ images of each class are held out for validation (per class name)")
    a("--seed", type=int, default=0, help="seeds initialisation, batch order, augmentation and dropout")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: each process its LOCAL_RANK)")
    a("--workers", type=int, default=None,
      help="data loader processes per process (0: in the main process; default: this machine's cores over the "
           "processes torchrun started on it, at most 8)")
    a("--resume", default=None, help="PATH to a last.pth, or auto (this run's own last.pth if there is one)")
    a("--limit-per-class", type=int, default=None, help="use at most N images per class of each split (smoke runs)")
    a("--augment", default=d.get("augment", "seed"), choices=augment.AUGMENTS,
      help="seed: the original script's augmentation; light: random resized crop + flip; flip: the "
           "evaluation framing mirrored left-right half the time; none: the evaluation framing")
    a("--crop-scale", type=float, default=None,
      help="the smallest share of the image's area a training crop keeps, RandomResizedCrop's lower scale "
           "bound, for --augment seed or light (default: the policy's own: 0.7 for ResNet-18's seed, 0.08 light)")
    a("--precision", default="auto", choices=PRECISIONS,
      help="auto: bf16 on GPUs of compute capability >= 8.0, fp16 with loss scaling below (T4, V100); "
           "on the CPU bf16 where native, else fp32")
    a("--deterministic", action="store_true",
      help="turn off cudnn.benchmark and TF32 and ask torch for deterministic algorithms "
           "(GPU runs then repeat more closely, and slower)")
    a("--compile", action="store_true", help="torch.compile the model (pays on GPUs for long runs)")
    a("--bn-stats", default=d.get("bn_stats", "train"), choices=("train", "frozen"),
      help="BatchNorm in the trained part: train (batch statistics, running averages updated) or frozen "
           "(running statistics kept, as in the frozen part); frozen parts are always frozen")
    a("--probe-epochs", type=int, default=d.get("probe_epochs", 0),
      help="pretrained weights: first train the new head alone this many epochs on cached features at "
           "10 x --lr (linear probe, then fine-tune: LP-FT); 0 = off")
    a("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (the original used 0.1)")
    a("--class-balance", default=d.get("class_balance", "none"), choices=("none", "loss"),
      help="loss: weight each class's cross-entropy in the training epochs by 1 / its training images (the "
           "original scripts' weights; the linear probe and validation stay unweighted), so that a class of 31 "
           "images counts as much as one of 800; none: every image alike")
    a("--scratch-recipe", default=d.get("scratch_recipe", "tuned"), choices=SCRATCH_RECIPES,
      help="--weights none: tuned (this project's, chosen on validation: docs/RESULTS.md#scratch) or original "
           "(the original scripts': AdamW at the script's --lr, --augment seed); options given on the command "
           "line win over either")
    a("--optimizer", default=None, choices=("adamw", "sgd"),
      help="adamw, or sgd with Nesterov momentum 0.9 (default: adamw; with --weights none, the --scratch-recipe's)")
    a("--zero-init-residual", default=None, choices=("on", "off"),
      help="ResNets trained from random weights: the last BatchNorm of each residual block starts at zero "
           "(torchvision's zero_init_residual) (default: off; with --weights none, the --scratch-recipe's)")
    a("--mixup", type=float, default=None,
      help="MixUp alpha: each batch blended with itself reversed, labels alike (0 = off; with --cutmix too, "
           "one of the two per batch) (default: 0; with --weights none, the --scratch-recipe's)")
    a("--cutmix", type=float, default=None,
      help="CutMix alpha: a box of each image pasted from another, labels by area (0 = off) "
           "(default: 0; with --weights none, the --scratch-recipe's)")
    a("--erasing", type=float, default=None,
      help="random erasing probability per training image (a box set to the mean colour: 0 after "
           "normalisation) (default: 0; with --weights none, the --scratch-recipe's)")
    a("--auto-augment", default=None, choices=augment.AUTO_AUGMENTS,
      help="trivial: torchvision's TrivialAugmentWide (one op of random magnitude per training image), rand: "
           "RandAugment (two ops, magnitude 9), both on top of --augment; none = off (default: none; with "
           "--weights none, the --scratch-recipe's)")
    a("--tta", default=None, choices=TTAS,
      help="test-time augmentation of validation, the test and predict.py: flip averages the softmax "
           "probabilities of each image and its left-right mirror (default: none; with --weights none, the "
           "--scratch-recipe's)")
    a("--ema", type=float, default=None,
      help="decay per step of an exponential moving average of the weights, which validation, best.pth, the "
           "test and predict.py use (0 = off) (default: 0; with --weights none, the --scratch-recipe's)")
    a("--skip-bad", action="store_true", help="train without images that cannot be decoded instead of stopping")
    a("--cache-dir", default=None, help="decoded-image and feature caches (default DATA/.cache)")
    a("--gpu-cache", default="auto", choices=("auto", "off"),
      help="auto: decode caches stay in GPU memory while they fit in a quarter of what is free (batches "
           "are cut from them there, no workers); off: every decode cache stays in host memory and batches "
           "stream through the workers, which leaves the GPU's memory to training. Results are the same")
    a("--cache-frozen", default="auto", choices=("auto", "off"),
      help="auto: when the leading stages are frozen and training sees the evaluation framing "
           "(--augment none), compute their outputs once and train the rest on them; off: run them every step")
    add_experiment_options(p)
    p.add_argument("--arch", default=d["arch"], choices=list(ARCHS), help=argparse.SUPPRESS)
    return p


def add_experiment_options(p):
    """--grid, --grid-spec, --halving, --compare: experiments.py's options."""
    a = p.add_argument
    a("--grid", action="store_true", help="run this script's hyper-parameter grid (ranked on validation)")
    a("--grid-spec", default=None, help='replace the grid: "lr=1e-3,3e-4;batch_size=32,64;unfreeze=last:1,all"')
    a("--halving", type=int, default=0,
      help="grid: successive halving from this many epochs (keep the better half on validation, double, "
           "repeat); 0 = off")
    a("--compare", action="store_true", help="train the pretrained and the randomly initialised network and compare")
    a("--parallel", default=None, choices=("trials", "ddp"),
      help="under torchrun, for --grid/--grid-spec/--compare: trials (each process trains whole trials by "
           "itself, each at its one-process recipe; the default) or ddp (every process trains each trial "
           "together, so its batch is --batch-size times the processes)")


def resolve_config(args, defaults, script):
    """argparse namespace -> the one config dict; checks ranges before anything is written."""
    c = dict(vars(args))
    c["script"] = script
    scratch = c["weights"] == "none"
    if c["epochs"] is None:
        c["epochs"] = defaults["scratch_epochs"] if scratch else defaults["epochs"]
    given = c["unfreeze"] is not None
    c["unfreeze"] = c["unfreeze"] or defaults["unfreeze"]
    scratch_rules(c, unfreeze_given=given)
    c["img_size"] = c["img_size"] or weights_preprocess(c["arch"])["crop"]
    if c["workers"] is None:  # 8 processes on 16 cores: 2 workers each, not 8
        c["workers"] = min(8, processes.cores_each())
    check_config(c)
    return c


def scratch_rules(c, unfreeze_given=False):
    """--weights none: the settings a random network needs whatever else was asked. The one place
    for them: single runs, grid trials and the comparison's random side. -> c, changed in place.

    The --scratch-recipe's values (SCRATCH_RECIPES) fill what is still open: the recipe options that
    are None, and the shared ones (lr, augment, ...) unless c["explicit"] names them (given on the
    command line). They are filled once (scratch_filled): grid trials vary lr and the rest on a
    resolved config, and keep their values."""
    scratch = c["weights"] == "none"
    if scratch:
        if not unfreeze_given:
            c["unfreeze"] = "all"  # nothing pretrained to keep frozen
        c["backbone_lr_ratio"] = 1.0  # nothing pretrained to protect: one lr for every layer
        c["bn_stats"] = "train"  # a random network's running statistics mean nothing yet
        c["probe_epochs"] = 0  # no features worth probing
        chosen = SCRATCH_RECIPES[c.get("scratch_recipe") or "original"]
        open_shared = not c.get("scratch_filled")
        for k, v in chosen.items():
            if c.get(k) is None or (open_shared and k not in c.get("explicit", ())):
                c[k] = v
        c["scratch_filled"] = True
    for k, v in RECIPE_OPTIONS.items():  # pretrained: today's choices
        if c.get(k) is None and not (scratch or k == "optimizer"):
            c[k] = v
    return c


def check_config(c):
    """Every range check, before any folder is written; one line each."""
    checks = [
        (c["epochs"] >= 1, f"--epochs must be at least 1 (got {c['epochs']})"),
        (c["batch_size"] >= 2, f"--batch-size must be at least 2: training BatchNorm needs two images "
                               f"per batch (got {c['batch_size']})"),
        (c["lr"] > 0, f"--lr must be > 0 (got {c['lr']})"),
        (c["weight_decay"] >= 0, f"--weight-decay must be >= 0 (got {c['weight_decay']})"),
        (0 <= c["val_fraction"] <= 0.5, f"--val-fraction must be within [0, 0.5] (got {c['val_fraction']})"),
        (c["img_size"] >= 16, f"--img-size must be at least 16 px (got {c['img_size']})"),
        (c["probe_epochs"] >= 0, f"--probe-epochs must be >= 0 (got {c['probe_epochs']})"),
        (c["workers"] >= 0, f"--workers must be >= 0 (got {c['workers']})"),
        (c["limit_per_class"] is None or c["limit_per_class"] >= 1,
         f"--limit-per-class must be at least 1 (got {c['limit_per_class']})"),
        (0 <= c["label_smoothing"] < 1, f"--label-smoothing must be within [0, 1) (got {c['label_smoothing']})"),
        ((c.get("mixup") or 0) >= 0 and (c.get("cutmix") or 0) >= 0,
         f"--mixup and --cutmix must be >= 0 (got {c.get('mixup')}, {c.get('cutmix')})"),
        (0 <= (c.get("erasing") or 0) <= 1, f"--erasing must be within [0, 1] (got {c.get('erasing')})"),
        (0 <= (c.get("ema") or 0) < 1, f"--ema must be within [0, 1) (got {c.get('ema')})"),
        (c.get("crop_scale") is None or 0 < c["crop_scale"] <= 1,
         f"--crop-scale must be within (0, 1] (got {c.get('crop_scale')})"),
        (c.get("crop_scale") is None or c["augment"] in ("seed", "light"),
         f"--crop-scale sets the crop of --augment seed or light, not of --augment {c['augment']}"),
        (c["unfreeze"] != "head" or not image_options(c),
         f"{' and '.join(image_options(c))} act on images: not with --unfreeze head, which trains and evaluates "
         f"on cached features (--unfreeze last:0 trains the same parameters on images)"),
        (c["weights"] in ("imagenet", "none") or Path(c["weights"]).is_file(),
         f"--weights {c['weights']}: not imagenet, none, or an existing file"),
    ]
    for ok, msg in checks:
        if not ok:
            fail(msg)
    parse_unfreeze(c["unfreeze"], c["arch"])  # fails early on an unknown module name


def image_options(c):
    """['--tta flip', ...]: the options given that act on images, which a frozen part's cached outputs are not."""
    return [f"--{k.replace('_', '-')} {c[k]}" for k in ("auto_augment", "erasing", "mixup", "cutmix", "tta")
            if (c.get(k) or "none") not in ("none", 0, 0.0)]


def default_run_name(c):
    """Deterministic, so that the same command finds its own run again (--resume auto, the grid)."""
    w = c["weights"] if c["weights"] in ("imagenet", "none") else Path(c["weights"]).stem
    u = c["unfreeze"].replace(":", "").replace(",", "+")
    name = f"{w}-{u}-b{c['batch_size']}-lr{c['lr']:g}-wd{c['weight_decay']:g}-e{c['epochs']}-{c['img_size']}px"
    if c.get("crop_mode", "center") != "center":
        name += f"-{c['crop_mode']}"
    if c.get("lr_schedule", "cosine") != "cosine":
        name += f"-{c['lr_schedule']}"
    if c.get("class_balance", "none") != "none":
        name += "-balanced"
    if c.get("seed", 0):
        name += f"-seed{c['seed']}"
    if c.get("split_seed", 0):
        name += f"-split{c['split_seed']}"
    if c["limit_per_class"]:
        name += f"-lim{c['limit_per_class']}"
    return name


def run_dir_of(c):
    return Path(c["out"]) / c["script"] / (c["name"] or default_run_name(c))


def differing_options(saved, c):
    """[(option, value there, value now)] for every option that may change results (all but EXEMPT,
    and RESOLVED, which identity.py compares) whose value differs between a run's saved config and c."""
    keys = sorted((set(saved) | set(c)) - set(EXEMPT) - set(RESOLVED))
    missing = object()
    out = []
    for k in keys:
        there = saved.get(k, LEGACY.get(k, missing))
        if there != c.get(k, missing):
            out.append((k, "(not recorded)" if there in (None, missing) else there, c.get(k)))
    return out


def describe_differences(diff):
    """'--val-fraction 0.1 there, 0.2 now; --epochs 5 there, 6 now'"""
    return "; ".join(f"--{k.replace('_', '-')} {a} there, {b} now" for k, a, b in diff)
