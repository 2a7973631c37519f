"""Finished runs on disk (config.json and metrics.json, at any depth) -> rows grouped by setting, the
best per network chosen on validation; and what report.py draws from: scalars, confusions, grids."""
import csv
import json
import math
from pathlib import Path

from . import identity
from .experiments import GRID_KEYS  # the options a grid may vary, in the order that breaks ties between axes

DISPLAY_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
                 "efficientnet_b4": "EfficientNet-B4", "efficientnet_lite0": "EfficientNet-Lite0"}
# Each script's default --img-size: a network at its own size is the same setting whatever that size is.
OWN_IMG_SIZE = {"resnet18": 224, "resnet50": 224, "resnet101": 224, "efficientnet_b4": 380, "efficientnet_lite0": 256}
CURVE_TAGS = ("Accuracy/val", "Loss/train", "Loss/val")


# --------------------------------------------------------------------------------------------
# Gathering: run folders -> plain rows.
# --------------------------------------------------------------------------------------------
def find_runs(runs_dir):
    """Every folder under runs_dir (itself included) holding config.json and metrics.json, sorted."""
    return sorted(p.parent for p in Path(runs_dir).rglob("metrics.json") if (p.parent / "config.json").is_file())


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
    fraction, split fingerprint or None for a run from before runs recorded it, device type or None).

    The carve: runs with split_seed share their validation images whatever their --seed; older
    runs carved validation with --seed itself, so their seed is part of their setting. A relative
    --data is resolved from the current folder (report.py is run where the runs were)."""
    data = str(Path(c["data"]).expanduser().resolve()) if c.get("data") else "(not recorded)"
    carve = ("split_seed", c["split_seed"]) if "split_seed" in c else ("seed", c.get("seed", 0))
    size = c.get("img_size")
    if size is None or size == OWN_IMG_SIZE.get(c.get("arch")):
        size = None
    ident = c.get("identity") or {}
    split = (ident.get("data") or {}).get("split")  # another split: another table
    device = (ident.get("compute") or {}).get("device_type")  # another augmentation renderer: another table
    return (data, carve, size, c.get("limit_per_class") or None, float(c.get("val_fraction", 0.1)),
            split[:12] if split else None, device)


def typed_data(rows, setting):
    """The setting's data folder as its runs' users typed it (config.json's --data, the most used
    spelling), not the resolved absolute path the setting is keyed by: no machine's paths in figures."""
    typed = [r["config"].get("data") for r in rows if r["config"].get("data")]
    return max(sorted(set(typed)), key=typed.count) if typed else setting[0]


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
    return min(rows, key=lambda r: (not has_score(r["val_top1"]), -(r["val_top1"] if has_score(r["val_top1"]) else 0),
                                    r["run"]), default=None)


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
    done = {t["name"]: t for t in trials if t["status"] == "done"}
    if done:  # the grid's own ranking (results.csv, ties in grid order), else the best validation score
        winner = next((done[n] for n in ranked if n in done), None) or max(done.values(), key=lambda t: t["val_top1"])
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
