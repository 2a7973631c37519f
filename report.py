"""The study's results table, from every finished run under a runs folder.

    python report.py            # reads runs/, writes runs/results.md
    python report.py my_runs/

A finished run is a folder (at any depth: single runs, grid trials, comparisons) holding both
config.json and metrics.json. For each architecture the table shows the pretrained run with
the best *validation* top-1, and the best run from random weights as its own row; the test
set is reported, never used to choose. Columns follow the original study's table
(model | batch | epochs | lr | weight decay | trained part | Top@1), then validation top-1,
test top-5, test mean per-class accuracy and the run folder. Accuracies are percent.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import common

DISPLAY_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
                 "efficientnet_b4": "EfficientNet-B4", "efficientnet_lite0": "EfficientNet-Lite0"}
COLUMNS = ("model", "batch", "epochs", "lr", "weight decay", "trained part", "Top@1", "val Top@1", "Top@5",
           "mean per-class", "run")


# --------------------------------------------------------------------------------------------
# Gathering: run folders -> plain rows.
# --------------------------------------------------------------------------------------------
def find_runs(runs_dir):
    """Every folder under runs_dir (itself included) holding config.json and metrics.json, sorted."""
    root = Path(runs_dir)
    return sorted(p.parent for p in root.rglob("metrics.json") if (p.parent / "config.json").is_file())


def read_run(run_dir, runs_dir):
    """-> one row dict; raises ValueError (one line) when a JSON is unreadable or lacks a field."""
    docs = {}
    for name in ("config.json", "metrics.json"):
        try:
            docs[name] = json.loads((run_dir / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{name}: {type(e).__name__}: {e}") from None
        if not isinstance(docs[name], dict):
            raise ValueError(f"{name}: expected a JSON object")
    c, m = docs["config.json"], docs["metrics.json"]
    missing = [k for k in ("arch", "weights", "batch_size", "epochs", "lr", "weight_decay", "unfreeze") if k not in c]
    missing += [f"metrics.{k}" for k in ("test_top1",) if k not in m]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return {"arch": c["arch"], "scratch": c["weights"] == "none", "batch": c["batch_size"],
            "epochs": m.get("epochs", c["epochs"]), "lr": c["lr"], "weight_decay": c["weight_decay"],
            "unfreeze": str(c["unfreeze"]), "test_top1": m["test_top1"], "val_top1": m.get("best_val_top1"),
            "test_top5": m.get("test_top5"), "mean_class": m.get("test_mean_class_acc"),
            "run": run_dir.relative_to(runs_dir).as_posix() or "."}


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
    """Pretrained rows in architecture order, then the random-weights rows: the original's layout."""
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
    if spec.startswith("last:") and spec[5:].isdigit() and arch in common.ARCHS:
        stages = common.ARCHS[arch].stages
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
                  f"{n_runs} finished run(s); Top@1, Top@5 and mean per-class are on the test set, in percent."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", nargs="?", default="runs",
                   help="folder searched at any depth for finished runs; results.md is written there (default: runs)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise SystemExit(f"error: {runs_dir}: no such folder")
    rows = gather(runs_dir, warn=lambda msg: print(msg, file=sys.stderr, flush=True))
    if not rows:
        raise SystemExit(f"error: no finished run under {runs_dir} (a run folder holds config.json and metrics.json)")
    text = render(table_rows(rows), len(rows))
    print(text, end="")
    common.atomic_write(runs_dir / "results.md", lambda f: f.write(text.encode()))
    return text


if __name__ == "__main__":
    main()
