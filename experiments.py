"""Experiments built on common.fit(): the grid (ranked on validation, resumable, successive
halving) and the comparison of pretrained against randomly initialised networks.

Outputs live in OUT/<script>/<grid|compare|grid-compare>/: one run folder per trial (as a single
run writes them), results.csv and results.md. The test set decides nothing: trials are ranked
by validation top-1, and the winner's test metrics are only reported.
"""
import csv
import io
import itertools
import json
import math
import sys
from pathlib import Path

from common import atomic_write, check_config, fail, fit, parse_unfreeze, run_dir_of, write_json

GRID_KEYS = ("batch_size", "epochs", "lr", "weight_decay", "unfreeze", "img_size", "backbone_lr_ratio",
             "label_smoothing", "augment", "weights", "val_fraction")


def parse_grid_spec(spec):
    """'lr=1e-3,3e-4;batch_size=32,64;unfreeze=last:1,all' -> {'lr': [0.001, 0.0003], ...}"""
    grid = {}
    for axis in filter(None, (a.strip() for a in spec.split(";"))):
        key, sep, values = axis.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GRID_KEYS:
            fail(f"--grid-spec: bad axis {axis!r}; keys: {', '.join(GRID_KEYS)}")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            fail(f"--grid-spec: axis {key} has no values")
        grid[key] = [parse_value(key, v) for v in vals]
    if not grid:
        fail("--grid-spec is empty")
    return grid


def parse_value(key, v):
    try:
        if key in ("batch_size", "epochs", "img_size"):
            return int(v)
        if key in ("lr", "weight_decay", "backbone_lr_ratio", "label_smoothing", "val_fraction"):
            return float(v)
    except ValueError:
        fail(f"--grid-spec: {key}={v} is not a number")
    return v


def grid_trials(base, grid, explicit):
    """One config per combination; options given on the command line apply unless the grid varies them."""
    grid = {k: v for k, v in grid.items() if k not in explicit or len(v) > 1} if explicit else grid
    trials = []
    for combo in itertools.product(*grid.values()):
        c = dict(base, **dict(zip(grid, combo)))
        if c["weights"] == "none":
            c["backbone_lr_ratio"] = 1.0
        check_config(c)
        parse_unfreeze(c["unfreeze"], c["arch"])
        trials.append(c)
    return trials


def trial_name(c, varied):
    parts = [f"{k}={str(c[k]).replace(':', '').replace(',', '+').replace('/', '_')}" for k in varied]
    return "_".join(parts) or "default"


def run_grid(config, grid, explicit=(), group="grid"):
    """Every trial in OUT/<script>/<group>/<trial>/; ranked on validation; resumable; -> sorted rows."""
    trials = grid_trials(config, grid, explicit)
    varied = [k for k in grid if len({str(t[k]) for t in trials}) > 1]
    root = Path(config["out"]) / config["script"] / group
    for t in trials:
        t.update(out=str(root.parent.parent), name=None, resume="auto")
        t["script"] = f"{config['script']}/{group}"
        t["name"] = trial_name(t, varied)
    print(f"{group}: {len(trials)} trials in {root}", flush=True)
    rows = {}
    for t in trials:
        done = load_json(run_dir_of(t) / "metrics.json")
        rows[t["name"]] = row_of(t, done, "done" if done else "pending")
    active = [t for t in trials if rows[t["name"]]["status"] == "pending"]
    if config["halving"]:
        active = successive_halving(active, config["halving"], rows)
    for t in active:
        rows[t["name"]] = run_trial(t)
        write_results(root, list(rows.values()))
    ranked = write_results(root, list(rows.values()))
    best = next((r for r in ranked if r["status"] == "done"), None)
    if best:
        print(f"{group} winner by validation: {best['trial']} (val top-1 {best['val_top1']:.2f}%, "
              f"test top-1 {best['Top@1']:.2f}%)", flush=True)
    return ranked, {t["name"]: t for t in trials}


def run_trial(t, stop_after=None):
    """fit() that records a failure (exception, out of memory) instead of ending the grid."""
    try:
        m = fit(t, stop_after=stop_after)
    except (Exception, SystemExit) as e:
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else str(e.code)
        print(f"trial {t['name']} failed: {msg}", file=sys.stderr, flush=True)
        run_dir_of(t).mkdir(parents=True, exist_ok=True)
        write_json(run_dir_of(t) / "error.json", {"error": msg})
        return row_of(t, None, "failed", msg)
    if stop_after is not None and "test_top1" not in m:
        return row_of(t, None, "stopped", val=m["best_val_top1"])
    return row_of(t, m, "done")


def successive_halving(trials, first_epochs, rows):
    """Train all trials `first_epochs` epochs, keep the better half on validation, double, repeat.

    The trials keep their own schedules (a cut trial has simply stopped early); the survivors
    resume from their last.pth. Returns the trials still to finish.
    """
    rung = first_epochs
    alive = list(trials)
    while len(alive) > 1 and rung < max(t["epochs"] for t in alive):
        scored = []
        for t in alive:
            r = run_trial(t, stop_after=rung)
            rows[t["name"]] = r
            scored.append((r.get("val_top1") if r["status"] in ("stopped", "done") else -1, t))
        scored.sort(key=lambda s: -(s[0] if s[0] is not None and not math.isnan(s[0]) else -1))
        keep = max(1, len(scored) // 2)
        for _, t in scored[keep:]:
            if rows[t["name"]]["status"] == "stopped":
                rows[t["name"]]["status"] = f"cut at epoch {rung}"
        alive = [t for _, t in scored[:keep]]
        rung *= 2
    return alive


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def row_of(t, m, status, error="", val=None):
    m = m or {}
    return {"trial": t["name"], "model": t["arch"], "weights": t["weights"], "batch_size": t["batch_size"],
            "epochs": t["epochs"], "lr": t["lr"], "weight_decay": t["weight_decay"], "strategy": t["unfreeze"],
            "Top@1": m.get("test_top1"), "val_top1": m.get("best_val_top1", val), "test_top5": m.get("test_top5"),
            "mean_class_acc": m.get("test_mean_class_acc"),
            "minutes": round(m["train_seconds"] / 60, 2) if "train_seconds" in m else None,
            "status": status, "error": error}


RESULT_COLUMNS = ("model", "weights", "batch_size", "epochs", "lr", "weight_decay", "strategy", "Top@1", "val_top1",
                  "test_top5", "mean_class_acc", "minutes", "status", "trial", "error")


def write_results(root, rows):
    """results.csv and results.md, ranked by validation top-1 (the test set decides nothing)."""
    key = lambda r: (r["status"] != "done", -(r["val_top1"] if r["val_top1"] is not None else -1))
    ranked = sorted(rows, key=key)
    root.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(ranked)
    atomic_write(root / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    atomic_write(root / "results.md", lambda f: f.write(markdown_table(ranked, RESULT_COLUMNS).encode()))
    return ranked


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:g}"
    return str(v)


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_compare(config, base=None, group="compare"):
    """Pretrained vs random initialisation, same data, epochs and image size; the random one trains every layer."""
    base = dict(base or config)
    pre = dict(base, weights=config["weights"] if config["weights"] != "none" else "imagenet")
    scratch = dict(base, weights="none", unfreeze="all", backbone_lr_ratio=1.0)
    rows = []
    root = Path(config["out"]) / config["script"] / group
    for label, c in (("pretrained", pre), ("random_init", scratch)):
        c.update(out=config["out"], script=f"{config['script']}/{group}", name=label, resume="auto")
        rows.append(dict(run_trial(c), trial=label))
    a, b = rows[0]["Top@1"], rows[1]["Top@1"]
    diff = None if a is None or b is None else a - b
    text = markdown_table(rows, RESULT_COLUMNS)
    text += f"\npretrained - random init, test top-1: {fmt(diff)} points\n"
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "results.md", lambda f: f.write(text.encode()))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(root / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    write_json(root / "compare.json", {"pretrained_top1": a, "random_init_top1": b, "difference": diff})
    print(text, flush=True)
    return rows, diff


def run(config, grid, explicit=()):
    """--grid / --grid-spec / --compare, as main() received them."""
    if config["grid"] or config["grid_spec"]:
        g = parse_grid_spec(config["grid_spec"]) if config["grid_spec"] else grid
        ranked, trials = run_grid(config, g, explicit)
        if config["compare"]:
            winner = next((r for r in ranked if r["status"] == "done"), None)
            if winner is None:
                fail("--compare: no grid trial finished, nothing to compare")
            run_compare(config, trials[winner["trial"]], group="grid-compare")
        return ranked
    return run_compare(config)
