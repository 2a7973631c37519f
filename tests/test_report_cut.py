"""report.py over a real successive-halving grid: the trial it cut is in the grid's table and figure,
with its status as the grid wrote it."""
import csv
from pathlib import Path

import pytest

import common
import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_halving_grid_with_a_cut_trial_is_reported_with_its_status(tmp_path, capsys):
    import main_EfficientNet_Lite0 as lite0
    from conftest import extract_subset

    data = extract_subset(tmp_path / "data", per_class=8, classes={"Faces", "beaver", "cup", "ferry"}, max_side=48)
    out = tmp_path / "runs"
    # the head alone on cached features of random weights: two epochs cost next to nothing; a rate
    # of 1e-6 learns nothing, so halving cuts it after the first rung
    common.main(lite0.DEFAULTS, {}, script="main_EfficientNet_Lite0", argv=[
        "--data", str(data), "--out", str(out), "--weights", "none", "--unfreeze", "head", "--img-size", "32",
        "--workers", "0", "--precision", "fp32", "--epochs", "2", "--batch-size", "8", "--cache-dir",
        str(tmp_path / "cache"), "--grid-spec", "lr=3e-2,1e-6", "--halving", "1"])
    group = out / "main_EfficientNet_Lite0" / "grid"
    with open(group / "results.csv", newline="") as f:
        status = {r["run"].split("/")[-1]: r["status"] for r in csv.DictReader(f)}
    assert sorted(status.values()) == ["cut at epoch 1", "done"], status
    (cut,) = [n for n, s in status.items() if s != "done"]
    capsys.readouterr()

    res = report.main([str(out)])
    text = (out / "results.md").read_text()
    grids = text[text.index("## Grids"):]
    cut_rows = [ln for ln in grids.splitlines() if ln.startswith(f"| {cut} |")]
    assert len(cut_rows) == 1 and cut_rows[0].endswith("| cut at epoch 1 |"), grids
    assert any(ln.endswith("| done, the winner |") for ln in grids.splitlines()), grids
    (figure,) = [d for rel, d in res["figures"].items() if Path(rel).name == "grid-efficientnet_lite0.png"]
    assert sorted(t["status"] for t in figure["trials"]) == ["cut at epoch 1", "done"]
    assert sorted(s for (s,) in figure["status"]) == ["cut at epoch 1", "done"]  # one bar per lr
