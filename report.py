"""The study's results: tables and figures from every finished run under a runs folder.

    python report.py            # reads runs/, writes runs/results.md and runs/figures/
    python report.py my_runs/

A finished run is a folder (at any depth: single runs, grid trials, comparisons) holding both
config.json and metrics.json. Runs are compared like with like: one table per setting (data
folder, validation carve, image size, images per class, validation fraction). The main table is
the full-data setting with the most runs; runs of --limit-per-class (smoke runs, CPU demos) are
shown apart, under their own heading, and never become an architecture's row of the main table.
In each table, per architecture, the pretrained run with the best *validation* top-1, and the
best run from random weights as its own row; the test set is reported, never used to choose.
Columns follow the original study's table (model | batch | epochs | lr | weight decay | trained
part | Top@1), then validation top-1, test top-5, test mean per-class accuracy and the run folder.
Accuracies are percent.

Figures go to RUNS_DIR/figures/ (the main setting; other settings in a sub-folder each), drawn
from the runs' own files, so runs made before this report existed are drawn too:
  curves-<arch>.png, .svg   validation top-1 and losses per epoch: the table's pretrained run
                            and its random-init run on the same axes (TensorBoard event files)
  summary.png, .svg         test top-1 and mean per-class per network, pretrained beside random
                            init, with the original study's published top-1 marked
  grid-<arch>.png, .svg     a grid's validation top-1 against the two options it varies most;
                            results.md lists each grid's trials with their status as the grid
                            wrote it ("done", "cut at epoch 2", "stopped at epoch 4")
  confusion-<run>.png       each table run's test confusion matrix (runs that recorded it), and
                            its 20 most-confused pairs in results.md
A figure that cannot be drawn is left out with one line saying why, in results.md and printed.
"""
import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

from study import identity
from study.experiments import GRID_KEYS  # the options a grid may vary, in the order that breaks ties between axes
from study.nets import ARCHS
from study.records import atomic_write

DISPLAY_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
                 "efficientnet_b4": "EfficientNet-B4", "efficientnet_lite0": "EfficientNet-Lite0"}
# Each script's default --img-size: a network at its own size is the same setting whatever that size is.
OWN_IMG_SIZE = {"resnet18": 224, "resnet50": 224, "resnet101": 224, "efficientnet_b4": 380, "efficientnet_lite0": 256}
# The original study's table: test top-1, percent; its checkpoints and recipes were chosen on that test split.
PUBLISHED = {"resnet18": {"pretrained": 91.81, "scratch": 69.44}, "resnet50": {"pretrained": 93.56},
             "resnet101": {"pretrained": 94.18}, "efficientnet_b4": {"pretrained": 97.57}}
COLUMNS = ("model", "batch", "epochs", "lr", "weight decay", "trained part", "Top@1", "val Top@1", "Top@5",
           "mean per-class", "run")
CURVE_TAGS = ("Accuracy/val", "Loss/train", "Loss/val")
FIGURE_NAME = re.compile(r"^(curves-.+|summary|grid-.+|confusion-.+)\.(png|svg)$")


# --------------------------------------------------------------------------------------------
# Gathering: run folders -> plain rows.
# --------------------------------------------------------------------------------------------
def find_runs(runs_dir):
    """Every folder under runs_dir (itself included) holding config.json and metrics.json, sorted."""
    root = Path(runs_dir)
    return sorted(p.parent for p in root.rglob("metrics.json") if (p.parent / "config.json").is_file())


def read_json_object(path):
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name}: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name}: expected a JSON object")
    return doc


def read_run(run_dir, runs_dir):
    """-> one row dict; raises ValueError (one line) when a JSON is unreadable or lacks a field."""
    c, m = read_json_object(run_dir / "config.json"), read_json_object(run_dir / "metrics.json")
    missing = [k for k in ("arch", "weights", "batch_size", "epochs", "lr", "weight_decay", "unfreeze") if k not in c]
    missing += [f"metrics.{k}" for k in ("test_top1",) if k not in m]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    # the global batch: a run of N processes stepped on N batches of --batch-size
    return {"arch": c["arch"], "scratch": c["weights"] == "none",
            "batch": identity.batch_label(c["batch_size"], m.get("processes")),
            "epochs": m.get("epochs", c["epochs"]), "lr": c["lr"], "weight_decay": c["weight_decay"],
            "unfreeze": str(c["unfreeze"]), "test_top1": m["test_top1"], "val_top1": m.get("best_val_top1"),
            "test_top5": m.get("test_top5"), "mean_class": m.get("test_mean_class_acc"),
            "run": run_dir.relative_to(runs_dir).as_posix() or ".", "dir": run_dir, "config": c, "metrics": m,
            "setting": setting_of(c)}


def gather(runs_dir, warn=None):
    """-> rows of every readable finished run; warn(message) for each one skipped."""
    rows = []
    for run_dir in find_runs(runs_dir):
        try:
            rows.append(read_run(run_dir, Path(runs_dir)))
        except ValueError as e:
            if warn:
                warn(f"skipped {run_dir}: {e}")
    return rows


# --------------------------------------------------------------------------------------------
# Settings: only runs on the same data, validation carve, image size, limit and validation
# fraction are ranked against each other.
# --------------------------------------------------------------------------------------------
def setting_of(c):
    """-> (data folder, carve, image size or None for the network's own, limit or None, validation
    fraction, split fingerprint or None for a run from before runs recorded it).

    The carve: runs with split_seed share their validation images whatever their --seed; older
    runs carved validation with --seed itself, so their seed is part of their setting. A relative
    --data is resolved from the current folder (report.py is run where the runs were)."""
    data = str(Path(c["data"]).expanduser().resolve()) if c.get("data") else "(not recorded)"
    carve = ("split_seed", c["split_seed"]) if "split_seed" in c else ("seed", c.get("seed", 0))
    size = c.get("img_size")
    if size is None or size == OWN_IMG_SIZE.get(c.get("arch")):
        size = None
    split = ((c.get("identity") or {}).get("data") or {}).get("split")  # another split: another table
    return (data, carve, size, c.get("limit_per_class") or None, float(c.get("val_fraction", 0.1)),
            split[:12] if split else None)


def typed_data(rows, setting):
    """The setting's data folder as its runs' users typed it (config.json's --data, the most used
    spelling), not the resolved absolute path the setting is keyed by: no machine's paths in figures."""
    typed = [r["config"].get("data") for r in rows if r["config"].get("data")]
    return max(sorted(set(typed)), key=typed.count) if typed else setting[0]


def describe_setting(s, rows=()):
    """The setting in words; rows: its runs, whose --data spelling is shown."""
    data, (how, seed), size, limit, val, split = s
    data = typed_data(rows, s)
    carve = (f"carved by split seed {seed}" if how == "split_seed"
             else f"carved by --seed {seed} (a run from before --split-seed)")
    return (f"data `{data}`" + (f" (split {split})" if split else "") + "; " + ("every image" if limit is None else f"at most {limit} images per class of each split")
            + "; " + ("each network at its own image size" if size is None else f"{size} px")
            + f"; validation {100 * val:g}% of each train/ class, {carve}")


def setting_slug(s):
    data, (how, seed), size, limit, val, split = s
    parts = [Path(data).name or "data", f"{'split' if how == 'split_seed' else 'seed'}{seed}",
             "own-size" if size is None else f"{size}px", "all" if limit is None else f"lim{limit}", f"val{val:g}"]
    parts += [split[:8]] if split else []
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", "-".join(parts))


def group_settings(rows):
    """-> (main setting or None, [(setting, rows)] in report order): the full-data setting with the
    most runs first, then the other full-data settings, then the reduced ones (--limit-per-class)."""
    groups = {}
    for r in rows:
        groups.setdefault(r["setting"], []).append(r)
    order = sorted(groups, key=lambda s: (s[3] is not None, -len(groups[s]), repr(s)))
    main = order[0] if order and order[0][3] is None else None
    return main, [(s, groups[s]) for s in order]


# --------------------------------------------------------------------------------------------
# Choosing: the best run per (architecture, initialisation) on validation only.
# --------------------------------------------------------------------------------------------
def has_score(v):
    return isinstance(v, (int, float)) and not math.isnan(v)


def pick_best(rows):
    """Highest validation top-1; a run without a validation score (--val-fraction 0) comes after
    every run that has one, and ties go to the first run folder in sorted order (not to the test)."""
    ranked = sorted(rows, key=lambda r: (not has_score(r["val_top1"]),
                                         -(r["val_top1"] if has_score(r["val_top1"]) else 0), r["run"]))
    return ranked[0] if ranked else None


def arch_order(arch):
    known = list(DISPLAY_NAMES)
    return (known.index(arch), arch) if arch in known else (len(known), arch)


def table_rows(rows):
    """Pretrained rows in architecture order, then the random-weights rows: the original's layout.
    rows: the runs of one setting."""
    chosen = []
    for scratch in (False, True):
        for arch in sorted({r["arch"] for r in rows}, key=arch_order):
            best = pick_best([r for r in rows if r["arch"] == arch and r["scratch"] == scratch])
            if best:
                chosen.append(best)
    return chosen


# --------------------------------------------------------------------------------------------
# Formatting: the original's words and number styles.
# --------------------------------------------------------------------------------------------
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


def fmt_rate(v):
    """Learning rates and weight decays the way papers write them: 3e-4, 1e-5, 0.01."""
    if not isinstance(v, (int, float)):
        return str(v)
    if v == 0 or abs(v) >= 0.01:
        return f"{v:g}"
    mantissa, exponent = f"{v:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def fmt_pct(v):
    return f"{v:.2f}" if has_score(v) else "-"


def cells(row):
    return {"model": model_name(row), "batch": str(row["batch"]), "epochs": str(row["epochs"]),
            "lr": fmt_rate(row["lr"]), "weight decay": fmt_rate(row["weight_decay"]),
            "trained part": trained_part(row["unfreeze"], row["arch"]), "Top@1": fmt_pct(row["test_top1"]),
            "val Top@1": fmt_pct(row["val_top1"]), "Top@5": fmt_pct(row["test_top5"]),
            "mean per-class": fmt_pct(row["mean_class"]), "run": row["run"]}


def render(chosen, n_runs):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in chosen:
        c = cells(row)
        lines.append("| " + " | ".join(c[k].replace("|", "/") for k in COLUMNS) + " |")
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
             f"lr {fmt_rate(row['lr'])}, batch {row['batch']}, {row['epochs']} epochs")
    if c.get("probe_epochs") and w != "none" and trained_part(row["unfreeze"], row["arch"]) != "head only":
        words += f" after a {c['probe_epochs']}-epoch linear probe"
    return words + f" (val top-1 {fmt_pct(row['val_top1'])})"


# --------------------------------------------------------------------------------------------
# Reading the runs' own records: TensorBoard scalars, the confusion matrix, grid folders.
# --------------------------------------------------------------------------------------------
def read_scalars(run_dir, tags=CURVE_TAGS):
    """{tag: [(step, value), ...]} from every event file of a run folder, in file-name order (the
    order TensorBoard reads them): a resumed run's later file replaces the steps from its first
    step on (its purge_step), so a step logged twice keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged = {}
    for f in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1,
                                                      "audio": 1, "compressedHistograms": 1})
        try:
            acc.Reload()
        except Exception:  # a truncated record at the end of a killed run's file: keep what was read
            pass
        for tag in acc.Tags().get("scalars", []):
            if tags and tag not in tags:
                continue
            events = acc.Scalars(tag)
            if not events:
                continue
            series = merged.setdefault(tag, {})
            first = min(e.step for e in events)
            for step in [s for s in series if s >= first]:
                del series[step]
            series.update((e.step, e.value) for e in events)
    return {tag: sorted(s.items()) for tag, s in merged.items()}


def confusion_of(row):
    """-> (confusion C x C, classes) from metrics.json, or (None, why)."""
    m = row["metrics"]
    if "test_confusion" not in m:
        return None, "its metrics.json has no test_confusion (a run from before it was recorded)"
    classes = m.get("classes") or list(m.get("test_per_class_acc") or {})
    confusion = m["test_confusion"]
    if not classes or len(confusion) != len(classes) or any(len(r) != len(classes) for r in confusion):
        return None, f"its test_confusion does not fit its {len(classes)} classes"
    return confusion, classes


def find_grids(runs_dir):
    """Grid folders: OUT/<script>/<group>/ with results.csv and trial folders; comparisons
    (compare.json beside results.csv) are drawn by the curves and the summary instead."""
    return sorted(p.parent for p in Path(runs_dir).rglob("results.csv") if not (p.parent / "compare.json").exists())


def scored_trials(group):
    """-> [{"name", "config", "val_top1", "status"}] of a grid folder's trial folders with a
    validation score: finished ones (metrics.json, status "done") and, from results.csv, those
    successive halving cut or stopped, with the status as the grid wrote it ("cut at epoch 2")."""
    try:
        with open(group / "results.csv", newline="") as f:
            listed = {r.get("run", "").split("/")[-1]: r for r in csv.DictReader(f)}
    except (OSError, csv.Error, UnicodeDecodeError):
        listed = {}
    trials = []
    for d in sorted(p for p in group.iterdir() if (p / "config.json").is_file()):
        try:
            config = read_json_object(d / "config.json")
            metrics = read_json_object(d / "metrics.json") if (d / "metrics.json").is_file() else None
        except ValueError:
            continue
        if metrics is not None and has_score(metrics.get("best_val_top1")):
            trials.append({"name": d.name, "config": config, "val_top1": metrics["best_val_top1"], "status": "done"})
            continue
        row = listed.get(d.name, {})
        try:
            val = float(row.get("val_top1", ""))
        except ValueError:
            continue
        if row.get("status", "").startswith(("cut", "stopped")) and not math.isnan(val):
            trials.append({"name": d.name, "config": config, "val_top1": val, "status": row["status"]})
    ranked = [r.get("run", "").split("/")[-1] for r in listed.values() if r.get("status") == "done"]
    done = [t for t in trials if t["status"] == "done"]
    if done:  # the grid's own ranking (results.csv, ties in grid order), else the best validation score
        names = {t["name"]: t for t in done}
        winner = next((names[n] for n in ranked if n in names), None) or max(done, key=lambda t: t["val_top1"])
        winner["winner"] = True
    return trials


def option_value(config, key):
    v = config.get(key)
    if key == "weights" and v not in ("imagenet", "none", None):
        return Path(v).stem
    return v


def varied_keys(trials):
    """The grid options taking the most distinct values among the trials (ties: GRID_KEYS order)."""
    counts = {k: len({repr(option_value(t["config"], k)) for t in trials}) for k in GRID_KEYS}
    return sorted((k for k in GRID_KEYS if counts[k] > 1), key=lambda k: (-counts[k], GRID_KEYS.index(k)))


# --------------------------------------------------------------------------------------------
# Drawing: each figure written, or left out with its reason.
# --------------------------------------------------------------------------------------------
class Figures:
    """Collects what was drawn ({file name: data}) and what was left out (lines), and writes files."""

    def __init__(self, runs_dir):
        self.runs_dir, self.root = runs_dir, runs_dir / "figures"
        self.drawn, self.left_out, self.written = {}, [], []

    def save(self, folder, name, fig, data, svg=False):
        from study import figures

        folder.mkdir(parents=True, exist_ok=True)
        outputs = [(f"{name}.png", figures.png_bytes(fig))] + ([(f"{name}.svg", figures.svg_bytes(fig))] if svg else [])
        for file_name, blob in outputs:
            atomic_write(folder / file_name, lambda f, b=blob: f.write(b))
            self.written.append(folder / file_name)
        rel = (folder / f"{name}.png").relative_to(self.runs_dir).as_posix()
        w, h = fig.get_size_inches()
        self.drawn[rel] = dict(data, size_px=(round(w * figures.DPI), round(h * figures.DPI)))
        return rel

    def leave_out(self, folder, name, why):
        rel = (folder / f"{name}.png").relative_to(self.runs_dir).as_posix()
        self.left_out.append(f"left out {rel}: {why}")
        return self.left_out[-1]

    def remove_stale(self):
        """Figures of an earlier report that this one did not draw again (a run no longer in a table)."""
        if not self.root.is_dir():
            return
        keep = set(self.written)
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and FIGURE_NAME.match(p.name) and p not in keep:
                p.unlink()
        for d in sorted((p for p in self.root.iterdir() if p.is_dir()), reverse=True):
            if not any(d.iterdir()):  # the folder of a setting that has no run any more
                d.rmdir()


def draw_curves(figs, folder, setting, chosen):
    """curves-<arch>.png per architecture of a table: its pretrained and random-init rows."""
    from study import figures

    lines = []
    for arch in sorted({r["arch"] for r in chosen}, key=arch_order):
        name = f"curves-{arch}"
        runs = []
        for row in (r for r in chosen if r["arch"] == arch):
            scalars = read_scalars(row["dir"])
            if not any(scalars.get(t) for t in CURVE_TAGS):
                lines.append(f"{name}.png: {row['run']} has no per-epoch scalars in its event files; drawn without it")
                continue
            runs.append({"label": recipe(row), "scalars": scalars, "run": row["run"]})
        if not runs:
            lines.append(figs.leave_out(folder, name, "no run of this network has per-epoch TensorBoard scalars"))
            continue
        if not any(r["scratch"] for r in chosen if r["arch"] == arch):
            lines.append(f"{name}.png: no random-init run of {DISPLAY_NAMES.get(arch, arch)} in this setting "
                         f"(--weights none or --compare): the pretrained run alone")
        title = (f"{DISPLAY_NAMES.get(arch, arch)}: pretrained against random initialisation, per epoch "
                 f"({describe_setting(setting, chosen).replace('`', '')})")
        fig, data = figures.curves_figure(runs, title=title)
        data["title"] = title
        for d, r in zip(data["runs"], runs):
            d["run"] = r["run"]
        figs.save(folder, name, fig, data, svg=True)
    return lines


def draw_summary(figs, folder, setting, chosen):
    from study import figures

    networks, lines = [], []
    archs = sorted({r["arch"] for r in chosen}, key=arch_order)
    for arch in archs:
        net = {"name": DISPLAY_NAMES.get(arch, arch), "published": PUBLISHED.get(arch, {})}
        for side, scratch in (("pretrained", False), ("scratch", True)):
            row = next((r for r in chosen if r["arch"] == arch and r["scratch"] == scratch), None)
            net[side] = row and {"top1": row["test_top1"], "mean_class": row["mean_class"], "run": row["run"]}
        networks.append(net)
    if not any(n["scratch"] for n in networks):
        lines.append("summary.png: no random-init run in this setting (--weights none or --compare): "
                     "its bars are left out")
    else:
        lines += [f"summary.png: no random-init run of {n['name']} in this setting: its bar is left out"
                  for n in networks if not n["scratch"]]
    lines += [f"summary.png: no pretrained run of {n['name']} in this setting: its bar is left out"
              for n in networks if not n["pretrained"]]
    caption = ("Ours: per network the run with the best validation top-1 (recipe and checkpoint chosen on a "
               "validation part carved from train/; the test split seen once, at the end). Black lines: the "
               "original study's published top-1, whose checkpoints and hyper-parameters were chosen on its test "
               f"split. Setting: {describe_setting(setting, chosen).replace('`', '')}.")
    fig, data = figures.summary_figure(networks, caption=caption)
    data["caption"] = caption
    figs.save(folder, "summary", fig, data, svg=True)
    return lines


def draw_confusions(figs, folder, chosen):
    """confusion-<run>.png per table row; -> markdown of the most-confused pairs, and lines."""
    from study import figures

    parts, lines = [], []
    for row in chosen:
        name = "confusion-" + re.sub(r"[^A-Za-z0-9.+=-]", "_", row["run"])
        confusion, classes = confusion_of(row)
        head = f"**{model_name(row)}** (`{row['run']}`)"
        if confusion is None:
            lines.append(figs.leave_out(folder, name, classes))
            parts.append(f"{head}: no confusion matrix: {classes}.")
            continue
        fig = figures.confusion_figure(confusion, classes, title=f"{model_name(row)}, test confusion matrix "
                                                                 f"(rows: true class, normalised): {row['run']}")
        pairs = figures.most_confused(confusion, classes, 20)
        rel = figs.save(folder, name, fig, {"confusion": confusion, "classes": classes, "pairs": pairs})
        parts.append(f"{head}, [figure]({rel}):\n\n" + (figures.confused_pairs_markdown(pairs) if pairs
                                                         else "no test image was misclassified."))
    return "\n\n".join(parts), lines


def grid_table(rel_group, trials, keys):
    """One grid's trials, each with its validation top-1 and its status as the grid wrote it."""
    columns = ("trial", *keys, "val Top@1", "status")
    lines = [f"{rel_group}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for t in sorted(trials, key=lambda t: (t["status"] != "done", -t["val_top1"], t["name"])):
        values = [fmt_rate(option_value(t["config"], k)) for k in keys]
        status = t["status"] + (", the winner" if t.get("winner") else "")
        lines.append("| " + " | ".join(v.replace("|", "/") for v in (t["name"], *values, fmt_pct(t["val_top1"]),
                                                                     status)) + " |")
    return "\n".join(lines) + "\n"


def draw_grids(figs, runs_dir):
    """grid-<arch>.png per grid folder (grid-<arch>-<group>.png when a network has several), and
    each grid's table of trials. -> (left-out lines, tables)."""
    from study import figures

    groups = [(g, scored_trials(g)) for g in find_grids(runs_dir)]
    groups = [(g, t) for g, t in groups if t or any((p / "config.json").is_file() for p in g.iterdir())]
    arch_of = {g: (t[0]["config"].get("arch", "?") if t else "?") for g, t in groups}
    lines, tables = [], []
    for g, trials in groups:
        rel_group = g.relative_to(runs_dir).as_posix()
        arch = arch_of[g]
        name = f"grid-{arch}"
        if sum(a == arch for a in arch_of.values()) > 1:
            name += "-" + re.sub(r"[^A-Za-z0-9.+=-]", "_", rel_group)
        keys = varied_keys(trials)
        if trials:
            tables.append(grid_table(rel_group, trials, keys))
        if len(trials) < 2:
            lines.append(figs.leave_out(figs.root, name, f"the grid {rel_group} has {len(trials)} trial(s) with a "
                                                         f"validation score: nothing to compare"))
            continue
        if not keys:
            lines.append(figs.leave_out(figs.root, name, f"the trials of {rel_group} differ in no grid option"))
            continue
        shown, rest = keys[:2], keys[2:]
        points = [{"values": {k: option_value(t["config"], k) for k in shown}, "val_top1": t["val_top1"],
                   "winner": t.get("winner", False), "status": t["status"]} for t in trials]
        title = f"{DISPLAY_NAMES.get(arch, arch)} grid {rel_group}: validation top-1 (%), {len(trials)} trials"
        if rest:
            title += f"; each cell the best over {', '.join(rest)}"
        if any(t["status"] != "done" for t in trials):
            title += "; trials cut by successive halving at their last validation, marked"
        fig, data = figures.grid_figure(points, shown, title="\n".join(wrap(title, 90)))
        data["trials"] = points
        figs.save(figs.root, name, fig, data, svg=True)
    return lines, tables


def wrap(text, width):
    import textwrap

    return textwrap.wrap(text, width)


# --------------------------------------------------------------------------------------------
# The report: tables, pairs and figures per setting -> results.md.
# --------------------------------------------------------------------------------------------
def figure_links(figs, folder):
    rels = sorted(r for r in figs.drawn if (figs.runs_dir / r).parent == folder and not r.split("/")[-1].startswith(
        "confusion-"))
    return [f"![{Path(r).stem}]({r})" for r in rels]


def setting_section(figs, setting, rows, folder, level, heading=""):
    """One setting's table, figures (in folder) and most-confused pairs -> (markdown, note lines)."""
    h = "#" * level
    chosen = table_rows(rows)
    out = [f"{h} {heading}{describe_setting(setting, rows)}", "", render(chosen, len(rows))]
    notes = draw_curves(figs, folder, setting, chosen)
    notes += draw_summary(figs, folder, setting, chosen)
    pairs, confusion_notes = draw_confusions(figs, folder, chosen)
    notes += confusion_notes
    out += [f"{h}# Figures", ""] + figure_links(figs, folder) + [""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out += [f"{h}# Most-confused test pairs (20 at most per run)", "", pairs, ""]
    return "\n".join(out), notes


def build_report(runs_dir, rows):
    """-> {"text": results.md, "figures": {path under runs_dir: data drawn}, "left_out": lines}."""
    figs = Figures(runs_dir)
    main, settings = group_settings(rows)
    parts, notes = ["# Results", ""], []
    if main is None:
        parts += ["No run on the full data yet: every run used --limit-per-class, so there is no main table; "
                  "the reduced settings are below.", ""]
    reduced_heading = others_heading = False
    slugs = set()
    for s, srows in settings:
        if s == main:
            text, n = setting_section(figs, s, srows, figs.root, 2, heading="Main table: ")
            parts += [text]
        else:
            if s[3] is None and not others_heading:
                parts += ["## Other settings (every image, other data, carve, size or validation fraction)", ""]
                others_heading = True
            if s[3] is not None and not reduced_heading:
                parts += ["## Reduced settings (--limit-per-class): smoke runs and demos, not the study's results", ""]
                reduced_heading = True
            slug = base = setting_slug(s)
            while slug in slugs:  # two data folders of the same name
                slug = f"{base}-{len(slugs) + 1}"
            slugs.add(slug)
            text, n = setting_section(figs, s, srows, figs.root / slug, 3)
            parts += [text]
        notes += n
    grid_notes, grid_tables = draw_grids(figs, runs_dir)
    grid_links = [g for g in figure_links(figs, figs.root) if "](figures/grid-" in g]
    if grid_links or grid_notes or grid_tables:
        parts += ["## Grids", ""] + grid_tables + grid_links + [""] + [f"- {n}" for n in grid_notes] + \
            ([""] if grid_notes else [])
    figs.remove_stale()
    text = "\n".join(parts).rstrip("\n") + "\n"
    return {"text": text, "figures": figs.drawn, "left_out": figs.left_out, "notes": notes + grid_notes}


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", nargs="?", default="runs",
                   help="folder searched at any depth for finished runs; results.md and figures/ are written there "
                        "(default: runs)")
    return p


def main(argv=None):
    """-> build_report's dict (text, figures drawn with their data, left-out lines)."""
    args = get_args_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise SystemExit(f"error: {runs_dir}: no such folder")
    rows = gather(runs_dir, warn=lambda msg: print(msg, file=sys.stderr, flush=True))
    if not rows:
        raise SystemExit(f"error: no finished run under {runs_dir} (a run folder holds config.json and metrics.json)")
    result = build_report(runs_dir, rows)
    print(result["text"], end="")
    atomic_write(runs_dir / "results.md", lambda f: f.write(result["text"].encode()))
    print(f"wrote {runs_dir / 'results.md'} and {len(result['figures'])} figure(s) under {runs_dir / 'figures'}",
          flush=True)
    return result


if __name__ == "__main__":
    main()
