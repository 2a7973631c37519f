"""The grid, successive halving and the pretrained-vs-random comparison (experiments.py).

Real runs use main_ResNet-18.py on 12 real classes at 64 px, one epoch, in subprocesses with
OMP_NUM_THREADS=1 (on 2 shared cores, two OpenMP threads made each step ~25x slower). The
ranking and winner rules are also checked with a stand-in for common.fit whose validation and
test figures are chosen to disagree.
"""
import csv
import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from study import errors, options, records
from study import experiments

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SMOKE = ["--limit-per-class", "6", "--img-size", "64", "--epochs", "1", "--weights", "none", "--workers", "0"]
SPEC = "lr=1e-3,3e-4;batch_size=4,8"
TRIALS = ["lr=0.001_batch_size=4", "lr=0.001_batch_size=8", "lr=0.0003_batch_size=4", "lr=0.0003_batch_size=8"]
R18 = dict(arch="resnet18", batch_size=64, epochs=30, scratch_epochs=50, lr=3e-4, weight_decay=1e-5, unfreeze="last:1")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """This module's scratch folder; its checkpoints (134 MB each for ResNet-18) go at the end."""
    d = tmp_path_factory.mktemp("experiments")
    yield d
    for p in d.rglob("*.pth"):
        p.unlink()


@pytest.fixture(scope="module")
def tiny(work):
    """12 real classes, 6 train (5 + 1 validation) + 2 test images each, 64 px."""
    from conftest import extract_subset

    classes = {"accordion", "airplanes", "anchor", "ant", "barrel", "bass", "beaver", "binocular", "bonsai",
               "brain", "brontosaurus", "buddha"}
    return extract_subset(work / "tiny", per_class=8, classes=classes)


@pytest.fixture
def one_thread():
    """In-process training on one thread, as the subprocesses get through OMP_NUM_THREADS."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def script_args(*args):
    return [sys.executable, str(ROOT / "main_ResNet-18.py"), *map(str, args)]


def run_script(*args, timeout=300):
    return subprocess.run(script_args(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def steps(run_dir, tag="Loss/train"):
    return [e.step for e in events(run_dir).Scalars(tag)]


def hparams_of(run_dir):
    """The HParams plugin's session record in the run's own event files -> ({name: value}, metric tags)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = events(run_dir)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: (v.string_value or v.number_value) for k, v in start.hparams.items()}
    return values, {m.name.tag for m in exp.metric_infos}, set(acc.Tags()["scalars"])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mtimes(grid_dir, names):
    return {n: (grid_dir / n / "metrics.json").stat().st_mtime_ns for n in names}


# --------------------------------------------------------------------------------------------
# Rules without training: parsing, which options apply, ranking, halving arithmetic.
# --------------------------------------------------------------------------------------------
def config_for(data, out, argv=(), defaults=R18):
    parser = options.get_args_parser(defaults)
    args = parser.parse_args(["--data", str(data), "--out", str(out), *SMOKE, *argv])
    return options.resolve_config(args, defaults, "main_ResNet-18")


def test_a_script_may_set_its_backbone_lr_ratio(tiny, tmp_path):
    """DEFAULTS["backbone_lr_ratio"] (Lite0 sets 1) replaces 0.1; the option still wins; random init is 1."""
    pre = ["--weights", "imagenet"]   # resolving the config downloads nothing
    own = dict(R18, backbone_lr_ratio=1.0)
    assert config_for(tiny, tmp_path, pre)["backbone_lr_ratio"] == 0.1
    assert config_for(tiny, tmp_path, pre, defaults=own)["backbone_lr_ratio"] == 1.0
    assert config_for(tiny, tmp_path, [*pre, "--backbone-lr-ratio", "0.3"], defaults=own)["backbone_lr_ratio"] == 0.3
    assert config_for(tiny, tmp_path, ["--backbone-lr-ratio", "0.3"])["backbone_lr_ratio"] == 1.0   # weights none


def test_grid_spec_values_are_typed_and_bad_axes_fail_clearly():
    g = experiments.parse_grid_spec(" lr=1e-3,3e-4 ; batch-size=32,64;unfreeze=last:1,all;weights=none ")
    assert g == {"lr": [1e-3, 3e-4], "batch_size": [32, 64], "unfreeze": ["last:1", "all"], "weights": ["none"]}
    assert isinstance(g["batch_size"][0], int)
    for spec, message in (("colour=red", "--grid-spec: bad axis 'colour=red'"), ("lr", "--grid-spec: bad axis 'lr'"),
                          ("epochs=3.5", "--grid-spec: epochs=3.5 is not a whole number"),
                          ("lr=;", "--grid-spec: axis lr has no values"),
                          ("lr=1e-3;lr=3e-4", "--grid-spec: axis lr is given twice"), (" ; ", "--grid-spec is empty")):
        with pytest.raises(SystemExit, match="^" + re.escape("error: " + message)):
            experiments.parse_grid_spec(spec)
    with pytest.raises(SystemExit, match="grid axis lr lists 0.001 more than once"):
        experiments.grid_axes({"lr": [1e-3, 1e-3]})


def test_command_line_options_apply_unless_the_grid_varies_them(tiny, tmp_path):
    base = config_for(tiny, tmp_path, ["--lr", "0.01"])
    grid = {"epochs": [30], "lr": [1e-3, 3e-4], "batch_size": [32]}
    axes = experiments.grid_axes(grid, explicit={"epochs", "lr", "limit_per_class"})
    trials = experiments.grid_trials(base, axes)
    # --epochs 1 beats the one-valued epochs axis; the lr axis varies, so it beats --lr 0.01;
    # batch_size was not given, so the grid's 32 applies
    assert [(t["epochs"], t["lr"], t["batch_size"]) for t in trials] == [(1, 1e-3, 32), (1, 3e-4, 32)]
    assert all(t["limit_per_class"] == 6 and t["img_size"] == 64 for t in trials)
    # a --grid-spec axis always applies, even with one value
    spec = experiments.grid_axes({"epochs": [2]}, explicit={"epochs"}, from_spec=True)
    assert [t["epochs"] for t in experiments.grid_trials(base, spec)] == [2]
    # random weights: every layer at one lr, as a single run does
    pre = config_for(tiny, tmp_path, ["--weights", "imagenet", "--bn-stats", "frozen", "--probe-epochs", "5"])
    scratch = experiments.grid_trials(pre, {"weights": ["imagenet", "none"]})
    assert [(t["unfreeze"], t["backbone_lr_ratio"], t["bn_stats"], t["probe_epochs"]) for t in scratch] == [
        ("last:1", 0.1, "frozen", 5), ("all", 1.0, "train", 0)]
    with pytest.raises(SystemExit, match="unknown module layer9"):
        experiments.grid_trials(base, {"unfreeze": ["all", "layer9"]})
    with pytest.raises(SystemExit, match="--val-fraction must be > 0"):
        experiments.grid_trials(base, {"val_fraction": [0.1, 0.0]})


def row(name, val, test, status="done"):
    return {"trial": name, "val_top1": val, "Top@1": test, "status": status}


def test_ranking_follows_validation_never_test():
    rows = [row("best_on_test", 40.0, 99.0), row("cut", 95.0, None, "cut at epoch 4"),
            row("best_on_val", 80.0, 10.0), row("tie_listed_later", 80.0, 50.0), row("no_val", math.nan, 100.0),
            row("failed", None, None, "failed"), row("from_csv", "60.0", "1.0")]
    ranked = [r["trial"] for r in experiments.rank_rows(rows)]
    assert ranked == ["best_on_val", "tie_listed_later", "from_csv", "best_on_test", "no_val", "cut", "failed"]


# --------------------------------------------------------------------------------------------
# A stand-in for common.fit: what fit writes and returns, from chosen validation/test figures.
# --------------------------------------------------------------------------------------------
class FakeFit:
    """val(config, epoch) and test(config) decide the figures; `calls` and `reached` record the work."""

    def __init__(self, val, test):
        self.val, self.test, self.calls, self.reached = val, test, [], {}

    def __call__(self, c, stop_after=None):
        run_dir = options.run_dir_of(c)
        self.calls.append((c["name"], stop_after, c))
        run_dir.mkdir(parents=True, exist_ok=True)
        records.write_json(run_dir / "config.json", dict(c, identity=experiments.expected_identity(c, 1)))  # as fit
        last = c["epochs"] if stop_after is None else min(stop_after, c["epochs"])
        self.reached[c["name"]] = max(last, self.reached.get(c["name"], 0))
        best = max(self.val(c, e) for e in range(1, last + 1))
        if last < c["epochs"]:
            return {"stopped_at": last, "best_val_top1": best, "best_epoch": last}
        m = {"test_top1": self.test(c), "test_top5": 100.0, "test_mean_class_acc": self.test(c), "best_val_top1": best,
             "best_epoch": last, "epochs": c["epochs"], "train_seconds": 60.0 * last}
        records.write_json(run_dir / "metrics.json", m)
        return m


def test_grid_compare_takes_the_validation_winner_not_the_test_one(tiny, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"never read by the stand-in")
    fake = FakeFit(val=lambda c, e: {1e-3: 40.0, 3e-4: 60.0}[c["lr"]],
                   test=lambda c: 20.0 if c["weights"] == "none" else {1e-3: 90.0, 3e-4: 30.0}[c["lr"]])
    # the original scratch recipe: the random side takes the winner's lr (the tuned one: tests/test_scratch.py)
    config = config_for(tiny, tmp_path, ["--weights", str(weights), "--grid-spec", "lr=1e-3,3e-4", "--compare",
                                         "--scratch-recipe", "original"])
    ranked = experiments.run(config, {}, fake)
    assert [r["trial"] for r in ranked] == ["lr=0.0003", "lr=0.001"]
    assert "grid winner by validation: lr=0.0003 (val top-1 60.00%, test top-1 30.00%)" in capsys.readouterr().out
    # the winner itself is not trained again; the random-init network gets its options
    assert [n for n, _, _ in fake.calls] == ["lr=0.001", "lr=0.0003", "random_init"]
    scratch = fake.calls[-1][2]
    assert (scratch["lr"], scratch["weights"], scratch["unfreeze"], scratch["backbone_lr_ratio"]) == (3e-4, "none",
                                                                                                       "all", 1.0)
    cmp_dir = tmp_path / "main_ResNet-18" / "grid-compare"
    summary = json.loads((cmp_dir / "compare.json").read_text())
    assert summary == {"pretrained_top1": 30.0, "random_init_top1": 20.0, "difference": 10.0,
                       "pretrained_run": "grid/lr=0.0003", "random_init_run": "grid-compare/random_init"}
    # a later plain --compare starts from the same winner and finds both runs finished
    later = config_for(tiny, tmp_path, ["--weights", str(weights), "--compare", "--scratch-recipe", "original"])
    rows = experiments.run(later, {}, fake)
    assert len(fake.calls) == 3 and [r["run"] for r in rows] == ["grid/lr=0.0003", "grid-compare/random_init"]
    assert "starting from the grid winner lr=0.0003" in capsys.readouterr().out


def test_a_weights_by_lr_grid_trains_the_four_trials_it_names(tiny, tmp_path):
    """Grid axes count as given: the random-init trials keep the grid's lr (a scratch recipe fills only
    what neither the command line nor the grid sets)."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"never read by the stand-in")
    fake = FakeFit(val=lambda c, e: 10.0, test=lambda c: 0.0)
    # the command's own weights are a file: the scratch recipe has not been applied before the grid
    config = config_for(tiny, tmp_path, ["--weights", str(weights), "--grid-spec", f"weights={weights},none;lr=1e-3,3e-4"])
    ranked = experiments.run(config, {}, fake)
    trained = {(c["weights"] == "none", c["lr"]) for _, _, c in fake.calls}
    assert trained == {(False, 1e-3), (False, 3e-4), (True, 1e-3), (True, 3e-4)} and len(fake.calls) == 4
    assert sorted(r["status"] for r in ranked) == ["done"] * 4
    random_init = [c for _, _, c in fake.calls if c["weights"] == "none"]
    tuned = options.SCRATCH_RECIPES["tuned"]["augment"]
    assert all(c["augment"] == tuned and c["unfreeze"] == "all" for c in random_init)  # the recipe's other parts


def test_halving_rule_when_the_grid_varies_epochs(tiny, tmp_path, monkeypatch):
    # val at each epoch: the 2-epoch trial with lr 1e-3 leads at every rung; among the 8-epoch
    # ones lr 1e-3 is better too
    val = {(2, 1e-3): 50.0, (2, 3e-4): 10.0, (8, 1e-3): 40.0, (8, 3e-4): 20.0}
    fake = FakeFit(val=lambda c, e: val[(c["epochs"], c["lr"])] + e, test=lambda c: 0.0)
    config = config_for(tiny, tmp_path, ["--grid-spec", "epochs=2,8;lr=1e-3,3e-4", "--halving", "1"])
    ranked = experiments.run(config, {}, fake)
    status = {r["trial"]: r["status"] for r in ranked}
    # rung 1: all four to epoch 1, the two best stay; rung 2: the 2-epoch trial finishes its own
    # schedule (tested) and beats the 8-epoch one, which is cut at 2; one left: the race ends
    assert status == {"epochs=2_lr=0.001": "done", "epochs=8_lr=0.001": "cut at epoch 2",
                      "epochs=2_lr=0.0003": "cut at epoch 1", "epochs=8_lr=0.0003": "cut at epoch 1"}
    assert [(n, s) for n, s, _ in fake.calls] == [("epochs=2_lr=0.001", 1), ("epochs=2_lr=0.0003", 1),
                                                  ("epochs=8_lr=0.001", 1), ("epochs=8_lr=0.0003", 1),
                                                  ("epochs=2_lr=0.001", 2), ("epochs=8_lr=0.001", 2)]
    assert sum(fake.reached.values()) == 6  # 4 trials to 1 epoch, then 2 to epoch 2
    # a rerun replays the recorded rungs: nothing trains
    experiments.run(config, {}, fake)
    assert len(fake.calls) == 6


# --------------------------------------------------------------------------------------------
# Real runs.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid_runs(tiny, work):
    """A 2x2 grid killed (SIGKILL) during its third trial, run again, then run a third time."""
    out = work / "grid"
    args = ["--data", tiny, "--out", out, "--grid-spec", SPEC, *SMOKE]
    grid_dir = out / "main_ResNet-18" / "grid"
    log = open(work / "killed.log", "w")
    proc = subprocess.Popen(script_args(*args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.monotonic() + 300
    while not (grid_dir / TRIALS[2]).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    killed = {"returncode": proc.returncode,
              "finished": [n for n in TRIALS if (grid_dir / n / "metrics.json").exists()],
              "folders": sorted(p.name for p in grid_dir.iterdir() if p.is_dir())}
    first_two = mtimes(grid_dir, TRIALS[:2])
    resumed = run_script(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after_resume = mtimes(grid_dir, TRIALS)
    again = run_script(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    return dict(dir=grid_dir, killed=killed, first_two=first_two, resumed=resumed, after_resume=after_resume,
                again=again, args=args)


@pytest.mark.slow
def test_killed_grid_reruns_only_the_unfinished_trials(grid_runs):
    k = grid_runs["killed"]
    assert k["returncode"] == -signal.SIGKILL
    assert k["finished"] == TRIALS[:2] and k["folders"] == sorted(TRIALS[:3])  # killed during the third
    out = grid_runs["resumed"].stdout
    assert "2 finished earlier (reused), 2 to run" in out
    assert f"trained 2 trial(s) in this run: {TRIALS[2]}, {TRIALS[3]}" in out
    assert out.count("/metrics.json") == 2  # one test evaluation per trained trial
    assert {n: grid_runs["after_resume"][n] for n in TRIALS[:2]} == grid_runs["first_two"]  # untouched


def test_finished_grid_trains_nothing_on_a_rerun(grid_runs):
    out = grid_runs["again"].stdout
    assert "4 finished earlier (reused), 0 to run" in out and "nothing to train" in out
    assert "epoch 1/1" not in out and "/metrics.json" not in out
    assert mtimes(grid_runs["dir"], TRIALS) == grid_runs["after_resume"]


def test_grid_writes_trial_folders_tables_and_hparams(grid_runs):
    grid_dir = grid_runs["dir"]
    assert sorted(p.name for p in grid_dir.iterdir()) == sorted(TRIALS + [".lock", "results.csv", "results.md"])
    rows = read_csv(grid_dir / "results.csv")
    assert list(rows[0])[:11] == ["model", "batch_size", "epochs", "lr", "weight_decay", "strategy", "Top@1",
                                  "val_top1", "test_top5", "mean_class_acc", "minutes"]
    assert sorted(r["run"] for r in rows) == sorted(f"grid/{n}" for n in TRIALS)
    vals = [float(r["val_top1"]) for r in rows]
    assert vals == sorted(vals, reverse=True) and all(r["status"] == "done" for r in rows)
    md = (grid_dir / "results.md").read_text().splitlines()
    assert md[0].startswith("| model | batch_size | epochs | lr | weight_decay | strategy | Top@1 | val_top1 |")
    assert len(md) == 2 + 4
    for r in rows:
        run_dir = grid_dir.parent / r["run"]
        m = json.loads((run_dir / "metrics.json").read_text())
        assert float(r["Top@1"]) == pytest.approx(m["test_top1"]) and float(r["val_top1"]) == pytest.approx(
            m["best_val_top1"])
        assert float(r["test_top5"]) == pytest.approx(m["test_top5"]) and r["minutes"] != ""
        # the HParams record sits in the trial's own event file: one TensorBoard run per trial
        assert not [p for p in run_dir.iterdir() if p.is_dir()]
        hp, metric_tags, scalars = hparams_of(run_dir)
        assert hp["lr"] == pytest.approx(float(r["lr"])) and hp["batch_size"] == int(r["batch_size"])
        assert hp["weights"] == "none" and hp["epochs"] == 1
        assert metric_tags == {"hparam/test_top1", "hparam/best_val_top1"} <= scalars
    winner = rows[0]["run"].split("/")[1]
    assert f"grid winner by validation: {winner} " in grid_runs["again"].stdout


def test_grid_folder_of_other_options_is_refused(grid_runs):
    argv = [str(a) for a in grid_runs["args"]] + ["--epochs", "2"]
    with pytest.raises(SystemExit, match=r"holds a run with other options or data \(--epochs 1 there, 2 now\); pass --name NEW"):
        common.main(R18, {}, argv=argv, script="main_ResNet-18")
    assert mtimes(grid_runs["dir"], TRIALS) == grid_runs["after_resume"]


@pytest.mark.slow
def test_failing_trial_is_recorded_and_the_grid_goes_on(tiny, work, monkeypatch, one_thread):
    real_fit = common.fit

    def flaky(c, stop_after=None):
        if c["lr"] == 1e-3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if c["lr"] == 3e-4:
            errors.fail("non-finite loss at epoch 1, step 3; stopping")
        return real_fit(c, stop_after)

    config = config_for(tiny, work / "failing", ["--grid-spec", "lr=1e-3,3e-4,1e-4"])
    ranked = experiments.run(config, {}, flaky)
    grid_dir = work / "failing" / "main_ResNet-18" / "grid"
    rows = {r["run"].split("/")[1]: r for r in read_csv(grid_dir / "results.csv")}
    assert rows["lr=0.001"]["status"] == "failed"
    assert rows["lr=0.001"]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["lr=0.0003"]["error"] == "non-finite loss at epoch 1, step 3; stopping"
    assert rows["lr=0.0001"]["status"] == "done" and float(rows["lr=0.0001"]["Top@1"]) >= 0
    assert ranked[0]["trial"] == "lr=0.0001"
    assert json.loads((grid_dir / "lr=0.001" / "error.json").read_text())["error"].startswith("OutOfMemoryError")
    done_at = (grid_dir / "lr=0.0001" / "metrics.json").stat().st_mtime_ns
    # the next run retries the failed trials only
    experiments.run(config, {}, real_fit)
    rows = read_csv(grid_dir / "results.csv")
    assert [r["status"] for r in rows] == ["done"] * 3 and not list(grid_dir.glob("*/error.json"))
    assert (grid_dir / "lr=0.0001" / "metrics.json").stat().st_mtime_ns == done_at


@pytest.mark.slow
def test_successive_halving_cuts_on_validation_and_survivors_resume(tiny, work):
    out = work / "halving"
    r = run_script("--data", tiny, "--out", out, "--grid-spec", SPEC, *SMOKE, "--epochs", "4", "--halving", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    grid_dir = out / "main_ResNet-18" / "grid"
    scores = json.loads((grid_dir / "halving.json").read_text())["scores"]
    val = {n: [e.value for e in events(grid_dir / n).Scalars("Accuracy/val")] for n in TRIALS}
    # rung 1: every trial trained 1 epoch; scores are their validation top-1 from TensorBoard
    assert scores["1"] == pytest.approx({n: val[n][0] for n in TRIALS})
    by_val = lambda names, at: sorted(names, key=lambda n: (-at[n], TRIALS.index(n)))  # ties: grid order
    kept = by_val(TRIALS, scores["1"])[:2]
    assert set(scores["2"]) == set(kept)
    assert scores["2"] == pytest.approx({n: max(val[n][:2]) for n in kept})  # best so far
    winner = by_val(kept, scores["2"])[0]
    rows = {x["run"].split("/")[1]: x for x in read_csv(grid_dir / "results.csv")}
    expected = {n: "cut at epoch 1" for n in TRIALS if n not in kept}
    expected.update({n: "cut at epoch 2" for n in kept if n != winner})
    expected[winner] = "done"
    assert {n: x["status"] for n, x in rows.items()} == expected
    assert list(rows)[0] == winner and all(rows[n]["Top@1"] == "" for n in TRIALS if n != winner)
    assert [n for n in TRIALS if (grid_dir / n / "metrics.json").exists()] == [winner]
    # the survivor resumed: epochs 1..4 once each in TensorBoard; the cut ones stopped at their rung
    trained = {n: steps(grid_dir / n) for n in TRIALS}
    assert trained[winner] == [1, 2, 3, 4] and steps(grid_dir / winner, "Accuracy/val") == [1, 2, 3, 4]
    assert {n: s for n, s in trained.items() if n != winner} == {n: list(range(1, int(expected[n][-1]) + 1))
                                                                 for n in TRIALS if n != winner}
    assert sum(map(len, trained.values())) == 8  # 4 to epoch 1, 2 to 2, the last to 4
    assert r.stdout.count("epoch 1/4") == 4 and r.stdout.count("epoch 2/4") == 2 and r.stdout.count("epoch 4/4") == 1
    # cut trials appear in the HParams tab with their validation score
    cut = next(n for n in TRIALS if expected[n] == "cut at epoch 1")
    hp, _, scalars = hparams_of(grid_dir / cut)
    assert hp["lr"] == pytest.approx(float(rows[cut]["lr"])) and "hparam/best_val_top1" in scalars


@pytest.mark.slow
def test_compare_trains_pretrained_and_random_init_and_reports_the_difference(tiny, work):
    from torchvision import models

    torch.manual_seed(0)
    weights = work / "r18_untrained.pth"
    torch.save(models.resnet18().state_dict(), weights)  # a 1000-class state dict, like torchvision's file
    out = work / "compare"
    args = [a for a in SMOKE if a not in ("--weights", "none")]
    r = run_script("--data", tiny, "--out", out, *args, "--compare", "--weights", weights, "--scratch-recipe", "original")
    assert r.returncode == 0, r.stderr[-3000:]
    cmp_dir = out / "main_ResNet-18" / "compare"
    pre = json.loads((cmp_dir / "pretrained" / "config.json").read_text())
    scratch = json.loads((cmp_dir / "random_init" / "config.json").read_text())
    assert (pre["weights"], pre["unfreeze"]) == (str(weights), "last:1")
    assert (scratch["weights"], scratch["unfreeze"], scratch["backbone_lr_ratio"]) == ("none", "all", 1.0)
    for k in ("data", "epochs", "img_size", "limit_per_class", "batch_size", "lr", "weight_decay", "seed"):
        assert pre[k] == scratch[k], k
    # the pretrained run really started from the file: its frozen stem is still the file's
    ck = torch.load(cmp_dir / "pretrained" / "last.pth", map_location="cpu", weights_only=True)
    assert torch.equal(ck["model"]["conv1.weight"], torch.load(weights, weights_only=True)["conv1.weight"])
    m = {n: json.loads((cmp_dir / n / "metrics.json").read_text())["test_top1"] for n in ("pretrained", "random_init")}
    summary = json.loads((cmp_dir / "compare.json").read_text())
    assert summary["pretrained_top1"] == m["pretrained"] and summary["random_init_top1"] == m["random_init"]
    assert summary["difference"] == pytest.approx(m["pretrained"] - m["random_init"])
    rows = read_csv(cmp_dir / "results.csv")
    assert [x["init"] for x in rows] == ["pretrained", "random init"]
    line = f"pretrained - random init, test top-1: {experiments.fmt(summary['difference'])} points"
    assert line in (cmp_dir / "results.md").read_text() and line in r.stdout


def test_bad_experiment_options_fail_before_writing(tiny, tmp_path):
    out = tmp_path / "runs"
    base = ["--data", str(tiny), "--out", str(out), *SMOKE]
    for extra, message in ((["--grid", "--halving", "-1"], "--halving must be >= 0"),
                           (["--compare"], "--compare trains the pretrained network against random init"),
                           (["--grid-spec", "lr=1e-3", "--resume", "x.pth"], "--resume PATH continues one run"),
                           (["--grid-spec", "unfreeze=all,layer9"], "unknown module layer9"),
                           (["--grid"], "this script has no GRID")):
        with pytest.raises(SystemExit, match=message):
            common.main(R18, {}, argv=base + extra, script="main_ResNet-18")
        assert not out.exists()
    # common.main() sends only --grid/--grid-spec/--compare here; --halving alone is refused by run()
    with pytest.raises(SystemExit, match="--halving works with --grid or --grid-spec"):
        experiments.run(config_for(tiny, out, ["--halving", "2"]), {}, common.fit)
    assert not out.exists()
