"""torchrun, kills, half-written files, non-finite losses, bad images, out of memory."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from conftest import at_step, driver, tmpfs
from study import loop, options
from study import records

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"accordion", "airplanes", "anchor", "ant", "barrel", "bass", "beaver", "binocular", "bonsai", "brain",
           "brontosaurus", "buddha"}
TINY = ["--weights", "none", "--img-size", "32", "--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import extract_subset

    global TINY_DRIVER
    TINY_DRIVER = driver(tmp_path_factory.mktemp("driver"))
    return extract_subset(tmp_path_factory.mktemp("faults"), per_class=8, classes=CLASSES)


TINY_DRIVER = None  # set by the data fixture: main_ResNet-18.py with the tiny network registered


def cmd(*args, nproc=1, script=None):
    """main_ResNet-18.py's command line, on the tiny network (conftest.driver registers it) unless
    `script` is another script to run as it is."""
    program = [str(script)] if script else [str(TINY_DRIVER), "--arch", "tiny"]
    if nproc == 1:
        return [sys.executable, *program, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *program,
            *map(str, args)]


def outputs(run_dir):
    """File names a run wrote, with the event file's unique name reduced to its kind."""
    return sorted("events" if f.name.startswith("events.out.tfevents") else f.name for f in run_dir.iterdir())


def tb_steps(run_dir, tag="Loss/train"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_two_process_gloo_run_writes_the_outputs_of_one_process_with_one_writer(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for n in (1, 2):
        r = subprocess.run(cmd("--data", data, "--out", tmp_path / f"p{n}", "--epochs", "2", *TINY, nproc=n),
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("test top-1") == 1  # rank 0 alone prints
    one, two = (next((tmp_path / f"p{n}" / "main_ResNet-18").iterdir()) for n in (1, 2))
    assert outputs(one) == outputs(two) == sorted([".lock", "best.pth", "config.json", "events", "last.pth", "metrics.json"])
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["test_images"] == m2["test_images"] == 24  # every test image exactly once, in both
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert tb_steps(two) == [1, 2]


@pytest.mark.slow
def test_two_processes_probe_alike_and_then_fine_tune(data, tmp_path):
    """The linear probe under torchrun: every process probes on every image, so the heads agree."""
    from study import efficientnet_lite

    weights = tmp_path / "lite0.pth"
    torch.save(efficientnet_lite.imagenet_state_dict(), weights)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "main_EfficientNet_Lite0.py"), "--data", str(data), "--out", str(tmp_path / "runs"),
                        "--weights", str(weights), "--img-size", "32", "--workers", "0", "--batch-size", "8",
                        "--epochs", "1", "--probe-epochs", "2", "--unfreeze", "last:1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("linear probe: head trained 2 epochs") == 1 and r.stdout.count("test top-1") == 1
    # the features are computed once, by rank 0, and read by the other: one writer of each file
    assert r.stdout.count("train: features of") == 1 and r.stdout.count("val: features of") == 1


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_auto_ends_like_an_uninterrupted_run(data, tmp_path):
    args = ["--data", data, "--epochs", "3", *TINY]
    full = subprocess.run(cmd(*args, "--out", tmp_path / "full"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    # killed at the third step of epoch 2 (epoch 1 has 8 steps: 60 images, batch 8): epoch 1 saved, the rest lost
    kill = driver(tmp_path, at_step(8 + 3, "os.kill(os.getpid(), 9)"))
    cut = subprocess.run(cmd(*args, "--arch", "tiny", "--out", tmp_path / "cut", script=kill), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert cut.returncode == -signal.SIGKILL and "epoch 1/3" in cut.stdout and "epoch 2/3" not in cut.stdout
    run_dir = next((tmp_path / "cut").glob("main_ResNet-18/*/last.pth")).parent
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 1
    assert not (run_dir / "metrics.json").exists()
    again = subprocess.run(cmd(*args, "--out", tmp_path / "cut", "--resume", "auto"), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "epoch 1/3" not in again.stdout  # it continued, it did not restart
    a = json.loads((run_dir / "metrics.json").read_text())
    b = json.loads(next((tmp_path / "full" / "main_ResNet-18").iterdir()).joinpath("metrics.json").read_text())
    assert (a["test_top1"], a["best_val_top1"], a["best_epoch"]) == (b["test_top1"], b["best_val_top1"], b["best_epoch"])
    assert tb_steps(run_dir) == [1, 2, 3]


def test_a_crash_between_write_and_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    records.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(records.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        records.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == ["last.pth"]
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(records.os, "replace", crash)
        records.write_json(tmp_path / "metrics.json", {"a": 1})
    assert not (tmp_path / "metrics.json").exists()


def small_config(data, out, **over):
    parser = options.get_args_parser(dict(arch="tiny", batch_size=8, epochs=3, scratch_epochs=3, lr=1e-3,
                                          weight_decay=1e-4, unfreeze="last:1"))
    args = parser.parse_args(["--data", str(data), "--out", str(out), *TINY, "--cache-dir", str(out / "cache")])
    return dict(options.resolve_config(args, dict(epochs=3, scratch_epochs=3, unfreeze="last:1"), "main_test"), **over)


@pytest.fixture
def small_disk(tmp_path):
    """256 KiB: room for a run's records, not for the tiny network's checkpoint (about 1 MB with its
    optimizer state)."""
    with tmpfs(tmp_path / "disk", "256k") as mnt:
        yield mnt


def test_a_full_disk_while_best_pth_is_written_ends_in_one_line_and_leaves_no_temporary_file(data, tmp_path,
                                                                                             small_disk):
    c = dict(small_config(data, small_disk, epochs=1), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        common.fit(c)
    run_dir = options.run_dir_of(c)
    line = str(e.value)
    assert line.startswith(f"error: {run_dir / 'best.pth'}: the disk is full (") and "\n" not in line, line
    assert f"MiB free on the disk of {run_dir}); nothing was written: free some space" in line
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.")) == [".lock", "config.json"]


def test_a_full_disk_while_tensorboard_writes_ends_in_one_line(data, tmp_path, monkeypatch):
    """TensorBoard's event files are written by its own writer, not records.atomic_write: a full disk
    there ends in the same one line, naming the file."""
    c = small_config(data, tmp_path, epochs=2)
    events = options.run_dir_of(c) / "events.out.tfevents.1"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(events))

    monkeypatch.setattr(records, "log_epoch", full)
    with pytest.raises(SystemExit) as e:
        common.fit(c)
    line = str(e.value)
    assert line.startswith(f"error: {events}: the disk is full (") and "the run's saved epochs are kept" in line


@pytest.mark.slow
def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real = torch.nn.CrossEntropyLoss
    calls = {"n": 0}

    class PoisonedLoss(real):
        def forward(self, logits, y):
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == 8 + 3:  # epoch 1 has 8 steps (60 images, batch 8): step 3 of epoch 2
                    return super().forward(logits, y) * float("nan")
            return super().forward(logits, y)

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", PoisonedLoss)
    config = small_config(data, tmp_path)
    with pytest.raises(SystemExit, match=r"non-finite loss at epoch 2, step 3"):
        common.fit(config)
    run_dir = options.run_dir_of(config)
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 1
    assert not (run_dir / "metrics.json").exists()


def test_out_of_memory_names_the_batch_size_and_suggests_a_smaller_one(data, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "train_one_epoch", oom)
    with pytest.raises(SystemExit, match=r"out of GPU memory in the training stage with --batch-size 8; try --batch-size 4"):
        common.fit(small_config(data, tmp_path))


@pytest.mark.slow
def test_a_truncated_jpeg_is_reported_by_path_and_skip_bad_trains_without_it(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    victim = sorted((copy / "train" / "anchor").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    r = subprocess.run(cmd("--data", copy, "--out", tmp_path / "runs", "--epochs", "1", *TINY), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and str(victim) in r.stderr and "--skip-bad" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = subprocess.run(cmd("--data", copy, "--out", tmp_path / "runs", "--epochs", "1", "--skip-bad", *TINY),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(victim) in r.stdout + r.stderr
