"""Experiments built on a fit function (common.fit, passed in): the hyper-parameter grid (ranked on validation,
resumable, with optional successive halving) and the comparison of a pretrained network
against the same network trained from random weights.

    python main_ResNet-50.py --grid                       # the script's GRID
    python main_ResNet-50.py --grid-spec "lr=1e-3,3e-4;batch_size=32,64;unfreeze=last:1,all"
    python main_ResNet-50.py --grid --halving 4           # stop weak trials early
    python main_ResNet-50.py --grid --compare             # then the winner against random init
    python main_ResNet-50.py --compare                    # after --grid: the grid's winner

Outputs go to OUT/<script>/<group>/, group = --name, else grid, compare or <grid>-compare:
one run folder per trial (exactly what a single run writes, so TensorBoard shows one run per
trial and its HParams tab compares them), results.csv and results.md. Accuracies are percent.

Rules:
- Ranking: by best validation top-1 (the split carved from train/); ties keep grid order.
  The test set decides nothing: each finished trial is tested once and the figure reported.
- Options given on the command line apply to every trial, unless the grid varies them: a
  script GRID axis with two or more values, or any --grid-spec axis, wins over the option.
- Resumable: a trial folder with metrics.json is finished and reused; one with last.pth
  resumes from it. A trial folder run with other options stops the grid with an error.
- A trial that fails (an exception, out of memory, fit()'s one-line error) is recorded with
  its error (results.csv, error.json in its folder); the grid goes on; a rerun retries it.
- Successive halving (--halving N): rungs at N, 2N, 4N, ... epochs trained. At each rung every
  trial still in the race trains to min(rung, its own epochs) and is ranked by its best
  validation top-1 so far; the better half (rounded up) stays. A trial whose own schedule
  ends by the rung finishes (test included) and competes with its final score. The race
  stops when one trial is left or the rung reaches the longest remaining schedule; the
  survivors then train to their own end. Each trial keeps its own learning-rate schedule
  (cosine over its own epochs): a grid that varies epochs compares trials at equal epochs
  trained, not at an equal fraction of their schedules. Scores per rung are kept in
  halving.json, so a rerun replays the same decisions instead of training again.
"""
import csv
import io
import itertools
import math
import os
import re
import sys
from pathlib import Path

from . import hardware, identity, processes
from .data import read_data, scan_split
from .errors import fail
from .nets import parse_unfreeze
from .options import check_config, default_run_name, run_dir_of, scratch_rules
from .pool import Pool, lock_folder, make_pool
from .records import atomic_write, load_json, write_hparams, write_json

# Options a grid may vary (option names with underscores).
GRID_KEYS = ("batch_size", "epochs", "lr", "weight_decay", "unfreeze", "img_size", "crop_mode", "backbone_lr_ratio",
             "bn_stats", "probe_epochs", "label_smoothing", "augment", "weights", "val_fraction", "seed",
             "class_balance", "lr_schedule")
INT_KEYS = ("batch_size", "epochs", "img_size", "probe_epochs", "seed")
FLOAT_KEYS = ("lr", "weight_decay", "backbone_lr_ratio", "label_smoothing", "val_fraction")
# The original table's columns (model .. Top@1), then ours. Top@1 is test top-1.
RESULT_COLUMNS = ("model", "batch_size", "epochs", "lr", "weight_decay", "strategy", "Top@1", "val_top1", "test_top5",
                  "mean_class_acc", "minutes", "weights", "status", "run", "error")
SINGLE_RUN_ONLY = dict(grid=False, grid_spec=None, compare=False, halving=0, resume="auto", parallel=None)


# --------------------------------------------------------------------------------------------
# The grid: axes -> one config per combination.
# --------------------------------------------------------------------------------------------
def parse_grid_spec(spec):
    """'lr=1e-3,3e-4;batch_size=32,64;unfreeze=last:1,all' -> {'lr': [0.001, 0.0003], ...}"""
    grid = {}
    for axis in filter(None, (a.strip() for a in spec.split(";"))):
        key, sep, values = axis.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GRID_KEYS:
            fail(f"--grid-spec: bad axis {axis!r}; write key=v1,v2 with a key among {', '.join(GRID_KEYS)}")
        if key in grid:
            fail(f"--grid-spec: axis {key} is given twice")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            fail(f"--grid-spec: axis {key} has no values")
        grid[key] = [parse_value(key, v) for v in vals]
    if not grid:
        fail("--grid-spec is empty; example: \"lr=1e-3,3e-4;batch_size=32,64\"")
    return grid


def parse_value(key, v):
    try:
        if key in INT_KEYS:
            return int(v)
        if key in FLOAT_KEYS:
            return float(v)
    except ValueError:
        fail(f"--grid-spec: {key}={v} is not a {'whole ' if key in INT_KEYS else ''}number")
    return v


def grid_axes(grid, explicit=(), from_spec=False):
    """The axes that apply: a command-line option beats a script GRID axis with a single value."""
    axes = {}
    for key, values in grid.items():
        values = list(values)
        if key not in GRID_KEYS:
            fail(f"grid axis {key!r} is not an option a grid may vary; valid: {', '.join(GRID_KEYS)}")
        if not values:
            fail(f"grid axis {key} has no values")
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            fail(f"grid axis {key} lists {', '.join(twice)} more than once")
        if from_spec or len(values) > 1 or key not in explicit:
            axes[key] = values
    return axes


def grid_trials(base, axes):
    """One checked config per combination, in grid order (the first axis varies slowest). A trial's
    axes count as given on its command line: a scratch recipe fills only what neither sets."""
    trials = []
    for combo in itertools.product(*axes.values()):
        c = dict(base, **dict(zip(axes, combo)))
        c["explicit"] = sorted(set(base.get("explicit", ())) | set(axes))
        scratch_rules(c, unfreeze_given="unfreeze" in c["explicit"])  # as a single run
        check_config(c)
        parse_unfreeze(c["unfreeze"], c["arch"])
        if not c["val_fraction"] > 0:
            fail("a grid ranks its trials on validation: --val-fraction must be > 0 (the test set decides nothing)")
        trials.append(c)
    return trials


def trial_name(c, varied):
    """'lr=0.001_batch_size=32': the varied options only, safe as a folder name."""
    parts = []
    for k in varied:
        v = c[k]
        if k == "weights" and v not in ("imagenet", "none"):
            v = Path(v).stem
        v = re.sub(r"[^A-Za-z0-9.+\-]", "_", str(v).replace(":", "").replace(",", "+"))
        parts.append(f"{k}={v}")
    return "_".join(parts) or default_run_name(c)


def place(c, out, script, group, name):
    """The config of a run in OUT/<script>/<group>/<name>/: a single run's config, resumable."""
    return dict(c, **SINGLE_RUN_ONLY, out=out, script=f"{script}/{group}", name=name)


def expected_identity(c, world):
    """The identity a run of config c would have here, trained by `world` processes: its data now,
    how this process computes it, its weights."""
    _, env_world, local_rank = processes.torchrun_env()
    device = hardware.pick_device(c["device"], local_rank, env_world)
    precision = hardware.precision_name(hardware.resolve_precision(c["precision"], device, warn=False))
    return identity.run_identity(c, world, device.type, precision, read_data(c)[2])


def same_run(saved, c, world):
    """True when the run saved in a folder (its config.json) is the run c would be here."""
    return isinstance(saved, dict) and not identity.differences(saved, dict(c, identity=expected_identity(c, world)))


def check_run_folder(c, world):
    """Stop before a finished or half-done run of other options, data or computation is reused or resumed."""
    run_dir = run_dir_of(c)
    saved = load_json(run_dir / "config.json")
    if isinstance(saved, dict):
        identity.check_same_run(saved, dict(c, identity=expected_identity(c, world)),
                                f"{run_dir} holds a run with other options or data",
                                f"pass --name NEW for a new folder, or remove {run_dir.parent}")


# --------------------------------------------------------------------------------------------
# Trials: fit() with failures recorded; rows of the results table.
# --------------------------------------------------------------------------------------------
def is_writer():
    """Under torchrun only rank 0 writes the tables and prints the grid's lines."""
    return int(os.environ.get("RANK", "0")) == 0


def say(line, err=False):
    """A line of the grid or comparison, printed once whatever the processes (by rank 0)."""
    if is_writer():
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def trial_row(t, m, error):
    """The row of a trial that pool.run_trial ran: failed, stopped at a halving rung, or done."""
    if error is not None:
        return row_of(t, None, "failed", error=error)
    if "test_top1" not in m:
        return row_of(t, m, f"stopped at epoch {m['stopped_at']}", val=m["best_val_top1"])
    return row_of(t, m, "done")


def row_of(t, m, status, error="", val=None):
    m = m or {}
    seconds = m.get("train_seconds")
    # the global batch: a trial trained by N processes together (--parallel ddp) stepped on N batches
    return {"model": t["arch"], "batch_size": identity.batch_label(t["batch_size"], m.get("processes")),
            "epochs": t["epochs"], "lr": t["lr"],
            "weight_decay": t["weight_decay"], "strategy": t["unfreeze"], "Top@1": m.get("test_top1"),
            "val_top1": m.get("best_val_top1", val), "test_top5": m.get("test_top5"),
            "mean_class_acc": m.get("test_mean_class_acc"),
            "minutes": round(seconds / 60, 2) if seconds is not None else None, "weights": t["weights"],
            "status": status, "run": f"{Path(t['script']).name}/{t['name']}", "error": error, "trial": t["name"]}


def first_row(t):
    """A trial's row before this run trains anything: finished (metrics.json) or pending."""
    m = load_json(run_dir_of(t) / "metrics.json")
    return row_of(t, m, "done") if isinstance(m, dict) and "test_top1" in m else row_of(t, None, "pending")


def score(v):
    """Validation top-1 as a number for ranking; missing or NaN (no validation images) ranks last."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(v) else v


def rank_rows(rows):
    """Finished trials first, by validation top-1 (higher first), ties in grid order; then cut,
    stopped, pending and failed ones by the same score. The test columns take no part."""
    return sorted(rows, key=lambda r: (r["status"] != "done", -score(r.get("val_top1"))))


# --------------------------------------------------------------------------------------------
# Successive halving.
# --------------------------------------------------------------------------------------------
def successive_halving(fit, trials, first, rows, root, pool):
    """Race the trials on validation at rungs first, 2*first, ... epochs (rules: module docstring). rows
    (trial name -> row) is updated in place. -> (survivors still to finish, names trained here)."""
    path = root / "halving.json"
    state = pool.share(load_json(path) if pool.rank == 0 else None)
    scores = state.get("scores", {}) if isinstance(state, dict) else {}  # "rung" -> {trial: val top-1}
    trained = []
    alive = [t for t in trials if rows[t["name"]]["status"] != "failed"]
    order = {t["name"]: i for i, t in enumerate(trials)}  # ties go to the trial listed first in the grid
    rung = first
    while len(alive) > 1 and rung < max(t["epochs"] for t in alive):
        at = scores.setdefault(str(rung), {})
        for t in alive:  # decided in an earlier run of this grid, or finished: replay, do not train
            if t["name"] not in at and rows[t["name"]]["status"] == "done":
                at[t["name"]] = rows[t["name"]]["val_top1"]
        todo = [t for t in alive if t["name"] not in at]

        def record(name, row):
            rows[name] = row
            trained.append(name)
            if row["status"] != "failed":
                at[name] = row["val_top1"]
            if is_writer():
                write_json(path, {"first": first, "scores": scores})
                write_results(root, rows.values())

        pool.train(fit, todo, trial_row, stop_after=rung, after=record,
                   announce=lambda t, i, rung=rung: f"halving: {t['name']} to epoch {min(rung, t['epochs'])}")
        ranked = sorted((t for t in alive if t["name"] in at), key=lambda t: (-score(at[t["name"]]), order[t["name"]]))
        keep = (len(ranked) + 1) // 2
        for t in ranked[keep:]:
            name = t["name"]
            if rows[name]["status"] != "done":
                rows[name] = row_of(t, None, f"cut at epoch {rung}", val=at[name])
                if name in trained and is_writer():
                    write_cut_hparams(t, at[name])
        alive = ranked[:keep]
        say(f"halving: rung {rung} epochs, kept {', '.join(t['name'] for t in alive)}")
        rung *= 2
    return alive, trained


def write_cut_hparams(t, val_top1):
    """HParams record of a cut trial (validation only: it is never tested), in its own event folder."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir_of(t)))
    write_hparams(writer, t, {"hparam/best_val_top1": val_top1})
    writer.close()


# --------------------------------------------------------------------------------------------
# Results tables.
# --------------------------------------------------------------------------------------------
def fmt(v):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:g}"
    return str(v)


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_tables(root, rows, columns, footer=""):
    root.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(root / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    atomic_write(root / "results.md", lambda f: f.write((markdown_table(rows, columns) + footer).encode()))


def write_results(root, rows):
    """results.csv and results.md of a grid, ranked on validation -> the ranked rows."""
    ranked = rank_rows(list(rows))
    if is_writer():
        write_tables(root, ranked, RESULT_COLUMNS)
    return ranked


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------
def run_grid(fit, config, grid, pool, from_spec=False):
    """Every trial in OUT/<script>/<group>/<trial>/, ranked on validation, resumable.
    -> (ranked rows, {trial name: trial config}), the same on every process."""
    group = config["name"] or "grid"
    root = Path(config["out"]) / config["script"] / group
    axes = grid_axes(grid, config.get("explicit", ()), from_spec)
    trials = grid_trials(config, axes)
    varied = [k for k in axes if len({str(t[k]) for t in trials}) > 1]
    trials = [place(t, config["out"], config["script"], group, trial_name(t, varied)) for t in trials]
    names = [t["name"] for t in trials]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        fail(f"two grid trials would share the folder {clash} (weights files with the same name?)")
    lock = lock_folder(pool, root)
    rows = None
    with pool.agreed():  # rank 0 reads the folders; every process then starts from its rows
        if pool.rank == 0:
            with pool.as_trial():
                for t in trials:
                    check_run_folder(t, pool.trial_world)
            rows = {t["name"]: first_row(t) for t in trials}
            write_results(root, rows.values())
    rows = pool.share(rows)
    done = sum(r["status"] == "done" for r in rows.values())
    say(f"{group}: {len(trials)} trials in {root}; {done} finished earlier (reused), {len(trials) - done} to run")
    todo = [t for t in trials if rows[t["name"]]["status"] != "done"]
    trained = []
    if config["halving"] and todo:
        todo, trained = successive_halving(fit, trials, config["halving"], rows, root, pool)
    todo = [t for t in todo if rows[t["name"]]["status"] != "done"]

    def record(name, row):
        rows[name] = row
        trained.append(name)
        write_results(root, rows.values())

    pool.train(fit, todo, trial_row, after=record,
               announce=lambda t, i: f"{group}: trial {t['name']} ({names.index(t['name']) + 1}/{len(trials)})")
    ranked = write_results(root, rows.values())
    trained = list(dict.fromkeys(trained))
    if trained:
        say(f"{group}: trained {len(trained)} trial(s) in this run: {', '.join(trained)}")
    else:
        say(f"{group}: nothing to train, every trial had finished or was cut (results reused)")
    failed = [r["trial"] for r in ranked if r["status"] == "failed"]
    if failed:
        say(f"{group}: {len(failed)} trial(s) failed (see {root / 'results.csv'}): {', '.join(failed)}", err=True)
    best = next((r for r in ranked if r["status"] == "done"), None)
    if best:
        say(f"{group} winner by validation: {best['trial']} (val top-1 {fmt(best['val_top1'])}%, "
            f"test top-1 {fmt(best['Top@1'])}%)  -> {root / 'results.md'}")
    lock.release()
    return ranked, {t["name"]: t for t in trials}


def grid_winner(root):
    """The config of the finished trial best on validation in an earlier grid's folder, or None."""
    path = root / "results.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rank_rows([r for r in rows if r.get("status") == "done"]):
        c = load_json(root.parent / r["run"] / "config.json")
        if isinstance(c, dict) and (root.parent / r["run"] / "metrics.json").is_file():
            return c
    return None


def run_compare(fit, config, winner=None, pool=None):
    """The pretrained network against random initialisation: same data, epochs, image size,
    batch, lr and weight decay; the random one trains every layer at one lr. Under torchrun
    (--parallel trials) the two train at the same time, one per process.

    winner: a grid trial's config (--grid --compare). Without it, the winner of an earlier
    --grid in OUT/<script>/<--name or grid>/ is used when there is one, with the options given
    on this command line applied over it. -> (rows, pretrained minus random test top-1, points).
    """
    pool = pool or Pool(None, 0, 1, "", "compare")
    grid_root = Path(config["out"]) / config["script"] / (config["name"] or "grid")
    if winner is not None:
        pre = dict(winner)
    else:
        winner = pool.share(grid_winner(grid_root) if pool.rank == 0 else None)
        pre = dict(config)
        if winner is not None:
            pre.update({k: winner[k] for k in GRID_KEYS if k in winner and k not in config.get("explicit", ())})
            say(f"compare: starting from the grid winner {winner['name']} in {grid_root}")
    if pre["weights"] == "none":
        fail("--compare trains the pretrained network against random init: give --weights imagenet or PATH, not none")
    group = f"{grid_root.name}-compare" if winner is not None else (config["name"] or "compare")
    root = Path(config["out"]) / config["script"] / group
    runs = [(label, place(c, config["out"], config["script"], group, label.replace(" ", "_")))
            for label, c in (("pretrained", pre), ("random init", scratch_rules(dict(pre, weights="none"))))]
    lock = lock_folder(pool, root)
    rows, reused = None, False
    with pool.agreed():
        if pool.rank == 0:
            # the grid already trained exactly this network (same options, data and computation): reuse it
            with pool.as_trial():
                reused = winner is not None and first_row(winner)["status"] == "done" and \
                    same_run(load_json(run_dir_of(winner) / "config.json"), pre, pool.trial_world)
                if reused:
                    runs[0] = ("pretrained", winner)
                for _, c in runs[reused:]:
                    check_config(c)
                    check_run_folder(c, pool.trial_world)
            rows = [first_row(c) for _, c in runs]
    runs, rows, reused = pool.share((runs, rows, reused))
    if reused:
        say(f"compare: pretrained = grid trial {run_dir_of(runs[0][1])} (finished, reused)")
    label = {c["name"]: lab for lab, c in runs}
    todo = [c for (_, c), row in zip(runs, rows) if row["status"] != "done"]
    got = pool.train(fit, todo, trial_row,
                     announce=lambda c, i: f"compare: training {label[c['name']]} in {run_dir_of(c)}")
    rows = [dict(got.get(c["name"], row), init=lab) for (lab, c), row in zip(runs, rows)]
    diff = write_comparison(root, rows)
    lock.release()
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        fail(f"--compare: the {failed[0]['init']} run failed: {failed[0]['error']} (see {root / 'results.md'})")
    return rows, diff


def write_comparison(root, rows):
    """results.csv/.md and compare.json of a comparison (rank 0) -> pretrained minus random test top-1."""
    a, b = rows[0]["Top@1"], rows[1]["Top@1"]
    diff = None if a is None or b is None else a - b
    footer = f"\npretrained - random init, test top-1: {fmt(diff)} points\n"
    if is_writer():
        write_tables(root, rows, ("init",) + RESULT_COLUMNS, footer)
        write_json(root / "compare.json", {"pretrained_top1": a, "random_init_top1": b, "difference": diff,
                                           "pretrained_run": rows[0]["run"], "random_init_run": rows[1]["run"]})
        print(markdown_table(rows, ("init",) + RESULT_COLUMNS) + footer, flush=True)
    return diff


def run(config, grid, fit):
    """--grid / --grid-spec / --compare, as common.main() received them (fit(config, stop_after=None)
    trains one run and returns its metrics)."""
    if config["halving"] < 0:
        fail(f"--halving must be >= 0 (got {config['halving']})")
    is_grid = bool(config["grid"] or config["grid_spec"])
    if config["halving"] and not is_grid:
        fail("--halving works with --grid or --grid-spec")
    if config["resume"] not in (None, "auto"):
        fail("--resume PATH continues one run; a grid or a comparison resumes its own runs: rerun the same command")
    scan_split(config["data"])  # a missing or empty data folder stops here, before anything is written
    group = config["name"] or ("grid" if is_grid else "compare")
    pool = make_pool(config, group)
    if not is_grid:
        return run_compare(fit, config, pool=pool)[0]
    axes = parse_grid_spec(config["grid_spec"]) if config["grid_spec"] else grid
    if not axes:
        fail("this script has no GRID; give one with --grid-spec")
    ranked, trials = run_grid(fit, config, axes, pool, from_spec=bool(config["grid_spec"]))
    winner = next((r for r in ranked if r["status"] == "done"), None)
    if winner is None:
        fail(f"no grid trial finished; see {Path(config['out']) / config['script'] / group}/results.csv")
    if config["compare"]:
        run_compare(fit, config, winner=trials[winner["trial"]], pool=pool)
    return ranked
