"""bench/gpu_check.sh end to end in its CPU mode, on a tiny real-data subset.

`DEVICE=cpu bash bench/gpu_check.sh DATA` runs every step of the device check shrunk (32 px,
4 images per class, 1 epoch): a real run of each main_*.py, fp32, torchrun, kill and resume,
a four-trial grid on two processes (--parallel trials), the benches and the sync check. About
2 minutes on 2 CPU cores; it checks the script and the product's CLI, not speed.
"""
import os
import subprocess

import pytest

from conftest import ROOT, extract_subset

# every step of the CPU mode, fp16 included (autocast runs fp16 on the CPU)
PASSED = ["train-resnet18", "train-resnet50", "train-resnet101", "train-efficientnet_b4",
          "train-efficientnet_lite0", "resnet18-fp16", "resnet18-fp32", "torchrun-resnet18", "kill-resume-resnet18",
          "torchrun-trials-grid", "bench-data-resnet", "bench-data-efficientnet_b4", "sync-check",
          "bench-train-resnet18-bf16-synthetic",
          "bench-train-resnet50-bf16-data", "bench-train-resnet101-fp32-synthetic",
          "bench-train-efficientnet_b4-fp32-data", "bench-train-efficientnet_lite0-bf16-synthetic"]


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    # 2 classes, 4 train + 2 test images each, 64 px (skips without the real archive)
    data = extract_subset(tmp_path / "data", per_class=6, classes={"accordion", "anchor"})
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", OUT=str(out), BUDGET_S="1500")  # no step skipped for time here
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(data)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    lines = output.splitlines()
    assert proc.returncode == 0, output[-4000:]
    assert not [line for line in lines if "FAILED" in line], output[-4000:]
    assert lines[0].startswith("gpu_check 20") and "DEVICE=cpu" in lines[0]
    assert any(line.startswith("torch ") and line.endswith("no GPU") for line in lines)
    summary = (out / "gpu_check_summary.txt").read_text().splitlines()
    assert summary[0].startswith("gpu_check summary: DEVICE=cpu")
    for name in PASSED:
        assert any(line.startswith("PASSED") and line.split()[1] == name for line in summary), (name, summary)
    assert not [line for line in summary if line.startswith("SKIPPED")], summary  # the CPU mode skips nothing
    notes = [line for line in summary if line.startswith("NOTE")]
    assert notes == ["NOTE     bench-train: cpu mode runs one case per architecture (15 more on a GPU)"]
    assert len(summary) == 1 + len(PASSED) + len(notes)
    assert "kill-resume-resnet18" in output and "--resume auto" in output
    assert (out / "gpu_check.txt").read_text().endswith("\n".join(summary) + "\n")
    assert sorted(os.listdir(out)) == ["gpu_check.txt", "gpu_check_summary.txt"]  # runs went to a temp folder
