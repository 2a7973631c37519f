"""The report's words: the original study's table (its columns, then validation top-1, test top-5,
test mean per-class accuracy and the run folder; percent), settings and recipes in words."""
import re
from pathlib import Path

from .figures import fmt_value, markdown_table
from .nets import ARCHS
from .results import DISPLAY_NAMES, has_score, option_value, typed_data

COLUMNS = ("model", "batch", "epochs", "lr", "weight decay", "trained part", "Top@1", "val Top@1", "Top@5",
           "mean per-class", "run")


def describe_setting(s, rows=()):
    """The setting in words; rows: its runs, whose --data spelling is shown."""
    _, (how, seed), size, limit, val, split, device = s
    carve = (f"carved by split seed {seed}" if how == "split_seed"
             else f"carved by --seed {seed} (a run from before --split-seed)")
    render = {"cpu": "; trained on CPUs (augmentation by PIL)",
              "cuda": "; trained on GPUs (augmentation by tensor ops)"}
    return (f"data `{typed_data(rows, s)}`" + (f" (split {split})" if split else "")
            + "; " + ("every image" if limit is None else f"at most {limit} images per class of each split")
            + "; " + ("each network at its own image size" if size is None else f"{size} px")
            + f"; validation {100 * val:g}% of each train/ class, {carve}" + render.get(device, ""))


def setting_slug(s):
    data, (how, seed), size, limit, val, split, device = s
    parts = [Path(data).name or "data", f"{'split' if how == 'split_seed' else 'seed'}{seed}",
             "own-size" if size is None else f"{size}px", "all" if limit is None else f"lim{limit}", f"val{val:g}"]
    parts += ([split[:8]] if split else []) + (["gpu"] if device == "cuda" else [])
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", "-".join(parts))


def model_name(row):
    name = DISPLAY_NAMES.get(row["arch"], row["arch"])
    return f"{name} from random weights" if row["scratch"] else name


def trained_part(unfreeze, arch):
    """--unfreeze in words: last:1 on a ResNet -> 'layer4', last:N on an EfficientNet -> 'last N blocks'."""
    spec = unfreeze.strip()
    if spec == "all":
        return "all"
    if spec == "head" or spec == "last:0":
        return "head only"
    if spec.startswith("last:") and spec[5:].isdigit() and arch in ARCHS:
        stages = ARCHS[arch].stages
        n = int(spec[5:])
        if n >= len(stages):
            return "all"
        if arch.startswith("efficientnet"):
            return f"last {n} block" + ("s" if n > 1 else "")
        return ", ".join(m for stage in stages[len(stages) - n:] for m in stage)
    return ", ".join(s.strip() for s in spec.split(",") if s.strip()) or spec


def fmt_pct(v):
    return f"{v:.2f}" if has_score(v) else "-"


def cells(row):
    return {"model": model_name(row), "batch": str(row["batch"]), "epochs": str(row["epochs"]),
            "lr": fmt_value(row["lr"]), "weight decay": fmt_value(row["weight_decay"]),
            "trained part": trained_part(row["unfreeze"], row["arch"]), "Top@1": fmt_pct(row["test_top1"]),
            "val Top@1": fmt_pct(row["val_top1"]), "Top@5": fmt_pct(row["test_top5"]),
            "mean per-class": fmt_pct(row["mean_class"]), "run": row["run"]}


def render(chosen, n_runs):
    lines = markdown_table(COLUMNS, [[c[k] for k in COLUMNS] for c in map(cells, chosen)])
    lines += ["", f"Each row is the run with the best validation top-1 of its model and initialisation, out of "
                  f"{n_runs} finished run(s) of this setting; Top@1, Top@5 and mean per-class are on the test set, "
                  f"in percent."]
    return "\n".join(lines) + "\n"


def recipe(row):
    """A run's recipe in words, for legends: 'ResNet-18, ImageNet weights: layer4, lr 3e-4, batch 64, 30 epochs'."""
    c = row["config"]
    w = c["weights"]
    init = "random init" if w == "none" else "ImageNet weights" if w == "imagenet" else f"weights {Path(w).name}"
    words = (f"{DISPLAY_NAMES.get(row['arch'], row['arch'])}, {init}: {trained_part(row['unfreeze'], row['arch'])}, "
             f"lr {fmt_value(row['lr'])}, batch {row['batch']}, {row['epochs']} epochs")
    if c.get("probe_epochs") and w != "none" and trained_part(row["unfreeze"], row["arch"]) != "head only":
        words += f" after a {c['probe_epochs']}-epoch linear probe"
    return words + f" (val top-1 {fmt_pct(row['val_top1'])})"


def grid_table(rel_group, trials, keys):
    """One grid's trials, each with its validation top-1 and its status as the grid wrote it."""
    columns = ("trial", *keys, "val Top@1", "status")
    rows = [(t["name"], *(fmt_value(option_value(t["config"], k)) for k in keys), fmt_pct(t["val_top1"]),
             t["status"] + (", the winner" if t.get("winner") else ""))
            for t in sorted(trials, key=lambda t: (t["status"] != "done", -t["val_top1"], t["name"]))]
    return "\n".join([f"{rel_group}:", ""] + markdown_table(columns, rows)) + "\n"
