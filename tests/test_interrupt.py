"""Ctrl-C anywhere in a run, its loader workers included: one line that says how to resume, no
traceback, no temporary file; the command it names finishes the run."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stopped(pid):
    """True once the process is stopped (state T), None once it is gone, else False."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_ctrl_c_mid_epoch_with_workers_names_the_resume_command_and_it_finishes_the_run(tmp_path):
    from conftest import driver, extract_subset, at_step

    classes = {"Faces", "beaver", "cup", "ferry", "lotus", "panda", "pizza", "wrench"}
    data = extract_subset(tmp_path / "data", per_class=12, classes=classes, max_side=48)  # 80 train images
    out = tmp_path / "runs"
    args = ["--data", str(data), "--weights", "none", "--img-size", "32", "--epochs", "2",
            "--batch-size", "4", "--workers", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    # the run stops itself (SIGSTOP) at the third step of epoch 2 (epoch 1 has 18 steps: 72 images,
    # batch 4), its loader workers busy: a state, not a moment a faster machine could outrun
    pause = driver(tmp_path, at_step(18 + 3, "os.kill(os.getpid(), 19)"))
    # its own process group, as a terminal's: Ctrl-C reaches the run and its loader workers alike. SIGINT
    # as a terminal gives it, even where the tests run in a background job (which inherits it ignored)
    p = subprocess.Popen([sys.executable, str(pause), *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while stopped(p.pid) is False and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C, delivered as the run goes on
    os.killpg(p.pid, signal.SIGCONT)
    log = p.communicate(timeout=120)[0]
    lines, rest = log.splitlines(keepends=True), log
    assert any(x.startswith("epoch 1/2") for x in lines) and "epoch 2/2" not in log, log[-3000:]
    assert p.returncode == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    (run_dir,) = (out / "main_ResNet-18").iterdir()
    said = [x for x in rest.splitlines() if x.startswith("interrupted:")]
    assert len(said) == 1 and rest.strip().splitlines()[-1] == said[0], rest
    assert said[0].startswith(f"interrupted: {run_dir} keeps what was saved; resume with: ")
    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[-2:] == ["--resume", "auto"]
    assert not (run_dir / "metrics.json").exists()
    assert [f for f in tmp_path.rglob(".*.tmp*")] == [] and [f for f in tmp_path.rglob("*.tmp")] == []

    r = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1/2" not in r.stdout and "epoch 2/2" in r.stdout  # it continued from epoch 1's last.pth
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["test_top1"] <= 100
