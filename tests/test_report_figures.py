"""report.py's figures and like-with-like tables, and figures.py's drawings for TensorBoard.

Most tests write synthetic run folders (config.json, metrics.json, TensorBoard events via
SummaryWriter) in seconds; the last one trains two real short runs on the real archive.
"""
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import report
from study import figures
from study.results import OWN_IMG_SIZE, read_scalars

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["wasp", "ant", "zebra", "bee", "cat"]
CONFUSION = [[8, 1, 0, 1, 0],   # wasp: 2 mistakes
             [3, 5, 0, 0, 2],   # ant: 3 taken for wasp, 2 for cat
             [0, 0, 10, 0, 0],
             [0, 0, 0, 7, 3],   # bee -> cat 3
             [0, 0, 0, 0, 6]]


def run_script(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def curve(epochs, start, step):
    return [start + step * e for e in range(epochs)]


def write_events(d, scalars, first_step=1, purge_step=None, name=None):
    """scalars: {tag: [value per epoch]} from first_step on, in a new event file of d."""
    from torch.utils.tensorboard import SummaryWriter

    before = set(d.glob("events.out.tfevents.*"))
    w = SummaryWriter(str(d), purge_step=purge_step)
    for tag, values in scalars.items():
        for i, v in enumerate(values):
            w.add_scalar(tag, v, first_step + i)
    w.close()
    (new,) = set(d.glob("events.out.tfevents.*")) - before
    if name:  # fix the name order: TensorBoard, and report.py, read a folder's files in name order
        new.rename(d / name)


def write_run(root, rel, *, arch="resnet18", weights="imagenet", unfreeze="last:1", epochs=3, val=None, test=80.0,
              limit=None, img_size=None, data="/data/caltech", split_seed=0, seed=0, val_fraction=0.1, lr=3e-4,
              batch=64, confusion=None, events=True):
    """A finished run folder. split_seed None: a run from before --split-seed (no such key);
    confusion None: a run from before test_confusion was recorded."""
    d = root / rel
    d.mkdir(parents=True)
    val = val if val is not None else curve(epochs, 40.0, 10.0)
    config = {"arch": arch, "weights": weights, "unfreeze": unfreeze, "batch_size": batch, "epochs": epochs, "lr": lr,
              "weight_decay": 1e-5, "img_size": img_size or OWN_IMG_SIZE[arch], "data": data,
              "limit_per_class": limit, "val_fraction": val_fraction, "seed": seed, "script": rel.split("/")[0]}
    if split_seed is not None:
        config["split_seed"] = split_seed
    metrics = {"test_top1": test, "test_top5": min(100.0, test + 5), "test_mean_class_acc": test - 1,
               "best_val_top1": max(val), "best_epoch": val.index(max(val)) + 1, "epochs": epochs,
               "test_per_class_acc": {c: 50.0 for c in CLASSES}}
    if confusion is not None:
        metrics.update(test_confusion=confusion, classes=CLASSES)
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.json").write_text(json.dumps(metrics))
    if events:
        write_events(d, {"Accuracy/val": val, "Loss/train": curve(epochs, 3.0, -0.5),
                         "Loss/val": curve(epochs, 3.2, -0.4), "Accuracy/train": curve(epochs, 30, 10),
                         "Accuracy/val_top5": curve(epochs, 60, 5), "Accuracy/val_mean_class": val,
                         "LR": curve(epochs, 1e-3, -1e-4)})
    return d


def write_grid(root, group, trials, arch="resnet50"):
    """trials: [(lr, batch_size, val)]; results.csv ranked on validation as experiments.py writes it."""
    rows = []
    for lr, batch, val in trials:
        name = f"lr={lr:g}_batch_size={batch}"
        write_run(root, f"{group}/{name}", arch=arch, lr=lr, batch=batch, epochs=2, val=[val - 5, val])
        rows.append({"model": arch, "batch_size": batch, "lr": lr, "val_top1": val, "status": "done",
                     "run": f"{Path(group).name}/{name}"})
    rows.sort(key=lambda r: -r["val_top1"])
    with open(root / group / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def png_size(path):
    with Image.open(path) as im:
        im.load()  # decodes the whole file
        return im.size


def first_table(text):
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append(ln)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in table[2:]]


# --------------------------------------------------------------------------------------------
# report.py on synthetic runs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """ResNet-18 pretrained (3 epochs, with the new confusion record) and from random weights (5
    epochs, an old run without it); ResNet-50 pretrained only, with a 2 x 2 grid; report.py run."""
    runs = tmp_path_factory.mktemp("study")
    write_run(runs, "main_ResNet-18/imagenet", epochs=3, val=[70.0, 80.0, 85.0], test=90.0, confusion=CONFUSION)
    write_run(runs, "main_ResNet-18/imagenet-worse", epochs=3, val=[60.0, 65.0, 70.0], test=99.0)  # best on test only
    write_run(runs, "main_ResNet-18/none", weights="none", unfreeze="all", epochs=5, val=curve(5, 10.0, 5.0), test=40.0)
    write_run(runs, "main_ResNet-50/single", arch="resnet50", epochs=4, val=[50.0, 60.0, 70.0, 75.0], test=85.0,
              lr=1e-3)
    write_grid(runs, "main_ResNet-50/grid", [(1e-3, 32, 81.0), (1e-3, 64, 77.0), (3e-4, 32, 79.0), (3e-4, 64, 88.0)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = report.main([str(runs)])  # in-process: what each figure drew, and what was printed
    return runs, out.getvalue(), res


def test_report_writes_each_figure_and_each_png_decodes_at_its_size(study):
    runs, stdout, res = study
    fig_dir = runs / "figures"
    want = {"curves-resnet18.png", "curves-resnet18.svg", "curves-resnet50.png", "curves-resnet50.svg",
            "summary.png", "summary.svg", "grid-resnet50.png", "grid-resnet50.svg",
            "confusion-main_ResNet-18_imagenet.png"}
    assert {p.name for p in fig_dir.iterdir()} == want
    for rel, data in res["figures"].items():
        assert png_size(runs / rel) == data["size_px"], rel
    assert png_size(fig_dir / "curves-resnet18.png") == (1100, 525)  # 11 x 5.25 in at 100 dpi (2 runs)
    assert png_size(fig_dir / "summary.png")[0] == 800
    svg = (fig_dir / "summary.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert stdout.startswith((runs / "results.md").read_text())
    assert stdout.rstrip().endswith(f"wrote {runs / 'results.md'} and 5 figure(s) under {fig_dir}")
    assert "![curves-resnet18](figures/curves-resnet18.png)" in stdout


def test_curves_carry_one_line_per_run_with_the_runs_epochs(study):
    runs, _, res = study
    c18 = res["figures"]["figures/curves-resnet18.png"]
    assert [d["run"] for d in c18["runs"]] == ["main_ResNet-18/imagenet", "main_ResNet-18/none"]  # the table's rows
    pre, scratch = c18["runs"]
    assert [s for s, _ in pre["val_top1"]] == [1, 2, 3] and [s for s, _ in scratch["val_top1"]] == [1, 2, 3, 4, 5]
    assert [v for _, v in pre["val_top1"]] == pytest.approx([70.0, 80.0, 85.0])
    assert [v for _, v in scratch["train_loss"]] == pytest.approx(curve(5, 3.0, -0.5))
    assert pre["label"].startswith("ResNet-18, ImageNet weights: layer4, lr 3e-4, batch 64, 3 epochs")
    assert scratch["label"].startswith("ResNet-18, random init: all")
    c50 = res["figures"]["figures/curves-resnet50.png"]
    assert [d["run"] for d in c50["runs"]] == ["main_ResNet-50/grid/lr=0.0003_batch_size=64"]  # best on validation
    assert "curves-resnet50.png: no random-init run of ResNet-50 in this setting" in res["text"]


def test_summary_bars_equal_the_metrics_and_a_missing_random_init_bar_is_said(study):
    runs, stdout, res = study
    s = res["figures"]["figures/summary.png"]
    # ResNet-50's row is the grid trial best on validation (88.0; its test top-1 80.0), not the single run
    assert s["top1"] == {"ResNet-18": {"pretrained": 90.0, "random init": 40.0}, "ResNet-50": {"pretrained": 80.0}}
    assert s["mean_class"] == {"ResNet-18": {"pretrained": 89.0, "random init": 39.0},
                               "ResNet-50": {"pretrained": 79.0}}
    assert s["published"] == {"ResNet-18": {"pretrained": 91.81, "random init": 69.44},
                              "ResNet-50": {"pretrained": 93.56}}
    assert "- summary.png: no random-init run of ResNet-50 in this setting: its bar is left out" in stdout.splitlines()


def test_grid_figure_shows_the_two_varied_options_and_marks_the_winner(study):
    _, _, res = study
    g = res["figures"]["figures/grid-resnet50.png"]
    assert g["keys"] == ["batch_size", "lr"]  # 2 values each; ties in the grid's own key order
    assert g["rows"] == [32, 64] and g["cols"] == [0.0003, 0.001]
    assert g["cells"] == [[79.0, 81.0], [88.0, 77.0]]
    assert g["winner"] == (1, 0)  # lr 3e-4, batch 64: 88.0


def test_confusion_figure_and_most_confused_pairs_for_runs_that_recorded_it(study):
    runs, stdout, res = study
    c = res["figures"]["figures/confusion-main_ResNet-18_imagenet.png"]
    assert c["classes"] == CLASSES and c["pairs"][0] == ("ant", "wasp", 3, 30.0)
    text = (runs / "results.md").read_text()
    assert "| ant | wasp | 3 | 30.0 |" in text and "| bee | cat | 3 | 30.0 |" in text
    # the random-init run is an old one: left out with its reason, the others still drawn
    assert ("- left out figures/confusion-main_ResNet-18_none.png: its metrics.json has no test_confusion "
            "(a run from before it was recorded)") in stdout.splitlines()


def test_no_random_init_run_gives_a_summary_without_those_bars_and_says_so(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "main_ResNet-18/a", test=88.0)
    write_run(runs, "main_Efficient_B4/b", arch="efficientnet_b4", unfreeze="last:6", test=95.0)
    res = report.main([str(runs)])
    s = res["figures"]["figures/summary.png"]
    assert s["top1"] == {"ResNet-18": {"pretrained": 88.0}, "EfficientNet-B4": {"pretrained": 95.0}}
    assert ("summary.png: no random-init run in this setting (--weights none or --compare): its bars are left out"
            in res["notes"])
    assert "- summary.png: no random-init run in this setting" in res["text"]


def test_runs_without_the_new_records_still_give_curves(tmp_path):
    """Runs written before test_confusion, classes and split_seed existed, and without data and
    img_size in config.json: curves and summary are drawn; the confusion figures are left out."""
    runs = tmp_path / "runs"
    for rel, w in (("main_ResNet-18/old", "imagenet"), ("main_ResNet-18/old-none", "none")):
        d = write_run(runs, rel, weights=w, unfreeze="all" if w == "none" else "last:1", split_seed=None, epochs=2,
                      val=[30.0, 35.0] if w == "none" else [60.0, 70.0])
        config = json.loads((d / "config.json").read_text())
        del config["data"], config["img_size"], config["limit_per_class"], config["val_fraction"]
        (d / "config.json").write_text(json.dumps(config))
    res = report.main([str(runs)])
    c = res["figures"]["figures/curves-resnet18.png"]
    assert [len(d["val_top1"]) for d in c["runs"]] == [2, 2]
    assert set(res["figures"]) == {"figures/curves-resnet18.png", "figures/summary.png"}
    assert len([ln for ln in res["left_out"] if "no test_confusion" in ln]) == 2
    assert "carved by --seed 0 (a run from before --split-seed)" in res["text"]


def test_a_resumed_run_keeps_the_last_value_of_each_step(tmp_path):
    """Killed after logging epoch 3, resumed from epoch 3 (purge_step 3) in a later file."""
    d = tmp_path / "run"
    d.mkdir()
    write_events(d, {"Accuracy/val": [10.0, 20.0, 99.0]}, name="events.out.tfevents.1000000000.host.1.0")
    write_events(d, {"Accuracy/val": [30.0, 40.0]}, first_step=3, purge_step=3,
                 name="events.out.tfevents.1000000100.host.2.0")
    assert read_scalars(d)["Accuracy/val"] == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]


def test_a_grid_with_one_trial_is_left_out_with_a_line(tmp_path):
    runs = tmp_path / "runs"
    write_grid(runs, "main_ResNet-50/grid", [(1e-3, 32, 81.0)])
    res = report.main([str(runs)])
    assert not any("grid-" in k for k in res["figures"])
    assert ("left out figures/grid-resnet50.png: the grid main_ResNet-50/grid has 1 trial(s) with a validation "
            "score: nothing to compare") in res["left_out"]
    assert not (runs / "figures" / "grid-resnet50.png").exists()


@pytest.mark.slow
def test_a_limited_run_is_never_the_row_of_its_architecture(tmp_path):
    """Like with like: a --limit-per-class run with a higher validation score than the full run
    goes under the reduced settings, and so do its figures; other sizes, validation fractions and
    carves are tables of their own."""
    runs = tmp_path / "runs"
    write_run(runs, "main_ResNet-18/full", val=[60.0, 70.0, 75.0], test=80.0)
    write_run(runs, "main_ResNet-18/full-none", weights="none", unfreeze="all", val=[10.0, 20.0, 30.0], test=30.0)
    write_run(runs, "main_ResNet-18/lim8", val=[90.0, 95.0, 99.0], test=97.0, limit=8, img_size=64)
    write_run(runs, "main_ResNet-18/small", val=[90.0, 95.0, 98.0], test=96.0, img_size=64)
    write_run(runs, "main_ResNet-18/val2", val=[90.0, 95.0, 97.0], test=96.0, val_fraction=0.2)
    write_run(runs, "main_ResNet-18/split1", val=[90.0, 91.0, 96.0], test=95.0, split_seed=1)
    res = report.main([str(runs)])
    text = res["text"]
    main_rows = first_table(text)
    assert [(r["model"], r["run"]) for r in main_rows] == [
        ("ResNet-18", "main_ResNet-18/full"), ("ResNet-18 from random weights", "main_ResNet-18/full-none")]
    assert text.index("## Main table: data `/data/caltech`; every image; each network at its own image size; "
                      "validation 10% of each train/ class, carved by split seed 0") < text.index("## Other settings")
    reduced = text.index("## Reduced settings (--limit-per-class)")
    assert text.index("main_ResNet-18/lim8") > reduced
    assert "### data `/data/caltech`; at most 8 images per class of each split; 64 px" in text[reduced:]
    for run in ("small", "val2", "split1"):
        assert text.index(f"| main_ResNet-18/{run} |") < reduced
    assert res["figures"]["figures/curves-resnet18.png"]["runs"][0]["run"] == "main_ResNet-18/full"
    assert res["figures"]["figures/summary.png"]["top1"] == {"ResNet-18": {"pretrained": 80.0, "random init": 30.0}}
    lim = "figures/caltech-split0-64px-lim8-val0.1/curves-resnet18.png"
    assert res["figures"][lim]["runs"][0]["run"] == "main_ResNet-18/lim8"


def test_a_second_report_removes_the_figures_of_runs_no_longer_reported(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "main_ResNet-18/a", val=[50.0, 60.0, 70.0], confusion=CONFUSION)
    report.main([str(runs)])
    assert (runs / "figures" / "confusion-main_ResNet-18_a.png").is_file()
    write_run(runs, "main_ResNet-18/b", val=[50.0, 60.0, 80.0], confusion=CONFUSION)  # better: now the row
    (runs / "figures" / "notes.txt").write_text("mine")
    report.main([str(runs)])
    assert sorted(p.name for p in (runs / "figures").iterdir()) == [
        "confusion-main_ResNet-18_b.png", "curves-resnet18.png", "curves-resnet18.svg", "notes.txt", "summary.png",
        "summary.svg"]


# --------------------------------------------------------------------------------------------
# figures.py: the pure functions the end of a run uses
# --------------------------------------------------------------------------------------------
def test_most_confused_pairs_and_their_share_of_the_true_class():
    pairs = figures.most_confused(torch.tensor(CONFUSION), CLASSES, n=3)
    assert pairs == [("ant", "wasp", 3, 30.0), ("bee", "cat", 3, 30.0), ("ant", "cat", 2, 20.0)]
    assert len(figures.most_confused(CONFUSION, CLASSES)) == 5  # every non-zero off-diagonal cell
    assert figures.most_confused(np.eye(5, dtype=int) * 4, CLASSES) == []
    with pytest.raises(ValueError, match="shape"):
        figures.most_confused([[1, 2]], CLASSES)


def test_per_class_markdown_is_sorted_worst_to_best():
    md = figures.per_class_markdown(["a", "b", "c", "d"], [90.0, None, 12.5, 50.0])
    assert md.splitlines() == ["| class | test accuracy % |", "|---|---|", "| c | 12.5 |", "| d | 50.0 |",
                               "| a | 90.0 |", "| b | - |"]
    assert figures.per_class_markdown(["a", "b"], {"a": 7.0, "b": 3.0}).splitlines()[2] == "| b | 3.0 |"


def test_confusion_figure_names_every_class_normalises_rows_and_grows_with_the_class_count():
    fig = figures.confusion_figure(torch.tensor(CONFUSION), CLASSES)
    ax, bar = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES == [t.get_text() for t in ax.get_yticklabels()]
    shown = ax.images[0].get_array()
    want = np.array(CONFUSION) / np.array(CONFUSION).sum(1, keepdims=True)
    assert np.allclose(shown.filled(0), want) and shown.mask[0, 2]  # a zero cell stays white
    assert " ".join(bar.get_ylabel().split()) == "share of the true class's test images"
    names = [f"class_{i:03d}_long_name" for i in range(101)]
    big = figures.confusion_figure(np.eye(101, dtype=int) * 3, names)
    assert [t.get_text() for t in big.axes[0].get_yticklabels()] == names
    assert min(t.get_fontsize() for t in big.axes[0].get_xticklabels()) >= 7  # readable at 101 classes
    w, h = big.get_size_inches()
    assert w > 15 and h > 15 and w > 2 * fig.get_size_inches()[0]
    png = figures.png_bytes(big)
    assert Image.open(io.BytesIO(png)).size == (round(w * 100), round(h * 100))


def test_mistakes_figure_holds_only_misclassified_images_with_their_classes():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(40)]
    true = [i % 5 for i in range(40)]
    pred = [(t + 1) % 5 if i % 4 else t for i, t in enumerate(true)]  # every 4th right: 30 mistakes
    probs = [0.2 + 0.01 * i for i in range(40)]
    fig = figures.mistakes_figure(images, true, pred, probs, CLASSES)
    titles = [ax.get_title() for ax in fig.axes]
    wrong = [i for i in range(40) if true[i] != pred[i]]
    assert len(titles) == len(wrong) == 30
    order = sorted(wrong, key=lambda i: -probs[i])  # most confident mistake first
    assert titles == [f"true: {CLASSES[true[i]]}\npred: {CLASSES[pred[i]]} {100 * probs[i]:.0f}%" for i in order]
    assert all(np.array_equal(ax.images[0].get_array(), images[i]) for ax, i in zip(fig.axes, order))
    many = figures.mistakes_figure(images * 2, true * 2, [(t + 1) % 5 for t in true * 2], probs * 2, CLASSES)
    assert len(many.axes) == 32
    assert figures.mistakes_figure(images[:2], [0, 1], [0, 1], [0.9, 0.8], CLASSES) is None  # nothing to show


def test_curves_figure_draws_one_line_per_run_and_series():
    runs = [{"label": "a", "scalars": {"Accuracy/val": [(1, 10.0), (2, 20.0)], "Loss/train": [(1, 2.0), (2, 1.0)],
                                       "Loss/val": [(1, 2.5), (2, 1.5)]}},
            {"label": "b", "scalars": {"Accuracy/val": [(1, 5.0), (2, 6.0), (3, 7.0)],
                                       "Loss/train": [(1, 3.0), (2, 2.0), (3, 1.0)]}}]
    fig, data = figures.curves_figure(runs, title="t")
    acc, loss = fig.axes
    assert [list(ln.get_xdata()) for ln in acc.lines] == [[1, 2], [1, 2, 3]]
    assert [list(ln.get_ydata()) for ln in acc.lines] == [[10.0, 20.0], [5.0, 6.0, 7.0]]
    assert len(loss.lines) == 3  # b has no validation loss
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    assert data["runs"][1]["val_loss"] == []


# --------------------------------------------------------------------------------------------
# Real short runs (the real archive)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_on_real_short_runs(tmp_path, caltech_archive, capsys):
    """Lite0 with its genuine ImageNet weights (head only) against Lite0 from random weights, 6
    real classes at 32 px, 2 epochs each, the two runs side by side: every figure named, drawn
    from the runs' own files."""
    from conftest import extract_subset

    classes = {"Faces", "beaver", "cup", "ferry", "lotus", "panda"}
    data = extract_subset(tmp_path / "data", per_class=7, classes=classes, max_side=48, test_per_class=2)
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "main_EfficientNet_Lite0.py"), "--data", str(data),
                               "--img-size", "32", "--epochs", "2", "--workers", "0", "--limit-per-class", "5",
                               "--out", str(out), "--cache-dir", str(tmp_path / f"cache{k}"), *extra],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, extra in enumerate((["--unfreeze", "head"], ["--weights", "none", "--precision", "fp32"]))]
    for p in procs:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    res = report.main([str(out)])
    printed = capsys.readouterr().out
    text = (out / "results.md").read_text()
    assert printed.startswith(text)
    assert "No run on the full data yet" in text and "## Reduced settings (--limit-per-class)" in text
    (folder,) = [p for p in (out / "figures").iterdir() if p.is_dir()]  # the reduced setting's own folder
    # ... named by the setting, the split's fingerprint last
    assert re.fullmatch(r"data-split0-32px-lim5-val0\.1-[0-9a-f]{8}", folder.name), folder.name
    names = {p.name for p in folder.iterdir()}
    assert {"curves-efficientnet_lite0.png", "curves-efficientnet_lite0.svg", "summary.png"} <= names
    runs = sorted(p for p in (out / "main_EfficientNet_Lite0").iterdir())
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        png = folder / f"confusion-main_EfficientNet_Lite0_{run.name}.png"
        if "test_confusion" in m:
            assert png.is_file() and png_size(png)[0] > 300
        else:  # the training code from before test_confusion was recorded
            assert f"left out {png.relative_to(out).as_posix()}: its metrics.json has no test_confusion" in printed
    (curves,) = [v for k, v in res["figures"].items() if k.endswith("curves-efficientnet_lite0.png")]
    assert len(curves["runs"]) == 2
    assert [[s for s, _ in d["val_top1"]] for d in curves["runs"]] == [[1, 2], [1, 2]]  # 2 epochs each
    for rel, d in res["figures"].items():
        assert png_size(out / rel) == d["size_px"]
    (summary,) = [v for k, v in res["figures"].items() if k.endswith("summary.png")]
    got = {json.loads((p / "config.json").read_text())["weights"]: json.loads((p / "metrics.json").read_text())
           for p in runs}
    assert summary["top1"] == {"EfficientNet-Lite0": {"pretrained": pytest.approx(got["imagenet"]["test_top1"]),
                                                      "random init": pytest.approx(got["none"]["test_top1"])}}


def test_figures_and_tables_show_the_data_folder_as_it_was_typed(tmp_path, monkeypatch):
    """Runs made with --data dataset/images (relative) and ./dataset/images are one setting, shown
    as typed: no absolute path of the machine that ran them in a figure or a heading."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    write_run(runs, "main_ResNet-18/a", data="dataset/images", val=[60.0, 70.0, 75.0], test=80.0)
    write_run(runs, "main_ResNet-18/b", data="dataset/images", weights="none", unfreeze="all", test=30.0)
    write_run(runs, "main_ResNet-18/c", data="./dataset/images", val=[50.0, 55.0, 60.0], test=70.0)
    res = report.main([str(runs)])
    assert "## Main table: data `dataset/images`; every image" in res["text"]
    assert str(tmp_path) not in res["text"].replace(str(runs), "")
    curves = res["figures"]["figures/curves-resnet18.png"]
    summary = res["figures"]["figures/summary.png"]
    assert "data dataset/images;" in curves["title"] and "Setting: data dataset/images;" in summary["caption"]
    assert str(tmp_path) not in curves["title"] + summary["caption"]
