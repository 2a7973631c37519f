"""Several processes: a grid's trials side by side (--parallel trials), restarts, two nodes, the
comparison, and the DDP path's failures. Real gloo processes on the CPU, started by torchrun."""
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from conftest import at_step, driver
from study import nets, options, steps
from study import hardware, processes

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"accordion", "airplanes", "anchor", "ant"}
# the tiny network (conftest.driver registers it): a grid's mechanics, not ResNet-18's 134 MB checkpoints
TINY = ["--arch", "tiny", "--weights", "none", "--img-size", "32", "--workers", "0", "--precision", "fp32",
        "--device", "cpu"]
# three rungs: 4 trials to epoch 1, 2 to epoch 2, the last to its end at 4
GRID = ["--grid-spec", "lr=1e-3,3e-4;batch_size=4,8", "--halving", "1", "--epochs", "4"]
TIMING = {"train_seconds", "train_images_per_s", "minutes"}  # wall-clock figures: never equal twice


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import extract_subset

    global TINY_DRIVER
    TINY_DRIVER = driver(tmp_path_factory.mktemp("driver"))
    return extract_subset(tmp_path_factory.mktemp("parallel"), per_class=10, classes=CLASSES, max_side=40)


TINY_DRIVER = None  # set by the data fixture: main_ResNet-18.py with the tiny network registered


def env1():
    # unbuffered output, as in many containers: two processes' lines meet in one pipe at their worst
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def torchrun(*args, nproc=2, extra=(), script=None):
    """torchrun of main_ResNet-18.py (through the tiny network's driver unless `script` names another)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            str(script or TINY_DRIVER), *map(str, args)]


def alone(*args, script=None):
    return [sys.executable, str(script or TINY_DRIVER), *map(str, args)]


def run(cmd, timeout=600):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env1())
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def grid_record(root):
    """Everything a grid decided and measured, less wall-clock figures: per trial its metrics.json, the
    results.csv rows, and halving.json's scores."""
    trials = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = d / "metrics.json"
        trials[d.name] = {k: v for k, v in json.loads(m.read_text()).items() if k not in TIMING} if m.is_file() \
            else "unfinished"
    with open(root / "results.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
    halving = json.loads((root / "halving.json").read_text()) if (root / "halving.json").exists() else None
    return {"trials": trials, "results": rows, "halving": halving and halving["scores"]}


@pytest.fixture(scope="module")
def one_process_grid(data, tmp_path_factory):
    """The four-trial halving grid in one process, one thread: what every parallel form must equal
    (fp32 on the CPU is bit-reproducible for a given thread count)."""
    out = tmp_path_factory.mktemp("grid1")
    run(alone("--data", data, "--out", out, *TINY, *GRID))
    return grid_record(out / "main_ResNet-18" / "grid")


def takes(stdout):
    """[(trial, process)] from the lines 'halving: T to epoch N: process R takes it' and 'grid: trial T ...'."""
    out = []
    for line in stdout.splitlines():
        if ": process " in line and " takes it;" in line:
            head, _, rest = line.partition(": process ")
            out.append((head, int(rest.split()[0])))
    return out


@pytest.mark.slow
def test_a_halving_grid_on_two_processes_equals_the_one_process_grid(data, tmp_path, one_process_grid):
    r = run(torchrun("--data", data, "--out", tmp_path, *TINY, *GRID))
    taken = takes(r.stdout)
    # 4 trials to epoch 1, 2 to epoch 2, the one kept to its end: each handed to exactly one process
    assert len(taken) == 7 and len({t for t, _ in taken}) == 7, taken
    assert {p for _, p in taken} == {0, 1}  # both processes trained
    assert "1 thread(s) each" in r.stdout
    # the cuts, the scores of every rung and every trial's metrics (processes 1: each trial alone)
    assert grid_record(tmp_path / "main_ResNet-18" / "grid") == one_process_grid


@pytest.mark.slow
def test_trials_side_by_side_build_each_decode_cache_once(data, tmp_path):
    """Two processes ask for the same caches at once: the first builds each, the other waits and reuses it.
    --augment seed: the training cache of augmented runs (kept larger, for the crops) is built too."""
    r = run(torchrun("--data", data, "--out", tmp_path, "--cache-dir", tmp_path / "cache", *TINY, "--epochs", "1",
                     "--augment", "seed", "--grid-spec", "lr=1e-3,3e-4"))
    assert sorted(p for _, p in takes(r.stdout)) == [0, 1]  # the two trials at once
    assert r.stdout.count("building train cache") == 1 and r.stdout.count("train cache reused") == 1, r.stdout


@pytest.mark.slow
def test_compare_trains_both_networks_at_once_with_one_process_results(data, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(nets.build_model("tiny", 1000, "none").state_dict(), weights)
    args = ("--data", data, *TINY[:2], *TINY[4:], "--weights", weights, "--epochs", "1", "--compare")
    run(alone(*args, "--out", tmp_path / "one"))
    r = run(torchrun(*args, "--out", tmp_path / "two"))
    assert sorted(p for _, p in takes(r.stdout)) == [0, 1]  # one network per process
    for name in ("pretrained", "random_init"):
        a, b = (json.loads((tmp_path / o / "main_ResNet-18" / "compare" / name / "metrics.json").read_text())
                for o in ("one", "two"))
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def second_mount(tmp_path):
    """tmp_path/mount: the folder tmp_path/nodes mounted a second time (a bind mount), as a second machine
    mounts a shared disk at another path; skipped where this process may not mount."""
    (tmp_path / "nodes").mkdir()
    (tmp_path / "mount").mkdir()
    r = subprocess.run(["mount", "--bind", str(tmp_path / "nodes"), str(tmp_path / "mount")], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"a bind mount is not allowed here ({r.stderr.strip()}): needs root")
    yield tmp_path / "mount"
    subprocess.run(["umount", str(tmp_path / "mount")], check=True)


@pytest.mark.slow
def test_two_agents_as_two_nodes_finish_the_grid_with_one_process_results(data, tmp_path, one_process_grid,
                                                                          second_mount):
    """Two machines that reach the shared --out by different paths: the trials' keys are names both share."""
    port = free_port()
    agents = []
    for out in (tmp_path / "nodes", second_mount):
        node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "grid-test",
                str(TINY_DRIVER), "--data", str(data), "--out", str(out), *TINY, *GRID]
        agents.append(subprocess.Popen(node, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=env1()))
    outs = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [o[1][-2000:] for o in outs]
    assert {p for o in outs for _, p in takes(o[0])} == {0, 1}  # both nodes trained
    assert grid_record(tmp_path / "nodes" / "main_ResNet-18" / "grid") == one_process_grid


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_restarted_and_the_grid_ends_as_uninterrupted(data, tmp_path, one_process_grid):
    """Process 1 kills itself (SIGKILL) at its tenth training step, in the first start only: torchrun
    starts both again, the group forms on its own keys, and the grid ends as the one-process grid."""
    first_start = "os.environ['TORCHELASTIC_RESTART_COUNT'] == '0'"
    kill = driver(tmp_path, at_step(10, f"if rank == 1 and {first_start}: os.kill(os.getpid(), 9)"))
    r = subprocess.run(torchrun("--data", data, "--out", tmp_path, *TINY, *GRID, extra=["--max-restarts", "1"],
                                script=kill), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env1())
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert "Signals.SIGKILL" in text or "exitcode: -9" in text, text[-3000:]  # the kill happened
    assert r.stdout.count("grid: 4 trials in") == 2  # the group was started again
    assert grid_record(tmp_path / "main_ResNet-18" / "grid") == one_process_grid


@pytest.mark.slow
def test_a_restart_after_a_start_that_died_before_every_rank_met_forms_the_group(data, tmp_path):
    """In the first start process 1 dies (SIGKILL) once process 0 is joining the group, before process 1
    ever reached the store; torchrun starts both again and the second start's group forms."""
    marker = tmp_path / "rank0-joining"
    patch = (f"from study import processes\n"
             f"first = os.environ['TORCHELASTIC_RESTART_COUNT'] == '0'\n"
             f"real_init = processes.init_group\n"
             f"def joining(*a, **k):\n"
             f"    open({str(marker)!r}, 'w').close()\n"
             f"    return real_init(*a, **k)\n"
             f"processes.init_group = joining\n"
             f"if rank == 1 and first:\n"
             f"    import time\n"
             f"    while not os.path.exists({str(marker)!r}):\n"
             f"        time.sleep(0.05)\n"
             f"    time.sleep(1)  # process 0 is in the store by now\n"
             f"    os.kill(os.getpid(), 9)\n")
    r = subprocess.run(torchrun("--data", data, "--out", tmp_path, *TINY, "--epochs", "1", "--batch-size", "4",
                                extra=["--max-restarts", "1"], script=driver(tmp_path, patch)),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env1())
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "exitcode: -9" in r.stderr or "Signals.SIGKILL" in r.stderr, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "main_ResNet-18").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_a_rank_failing_inside_an_epoch_ends_both_processes_within_seconds(data, tmp_path):
    script = driver(tmp_path, at_step(3, "if rank == 1: raise RuntimeError('injected failure at step 3')"))
    t = time.time()
    r = subprocess.run(torchrun("--data", data, "--out", tmp_path, *TINY, "--batch-size", "2", "--epochs", "2",
                                script=script), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env1())
    assert time.time() - t < 60  # started, trained 2 steps, failed: the 15-minute timeout never came into it
    assert r.returncode != 0
    assert "error: process 1 of 2: injected failure at step 3" in r.stderr


@pytest.mark.slow
def test_a_setup_failure_on_one_rank_of_a_ddp_grid_fails_the_trial_on_every_rank(data, tmp_path):
    script = driver(tmp_path, "real = steps.build_network\n"
                              "def build(config, *a, **k):\n"
                              "    if rank == 1 and config['lr'] == 1e-3:\n"
                              "        raise OSError('weights download refused')\n"
                              "    return real(config, *a, **k)\n"
                              "steps.build_network = build\n")
    r = subprocess.run(torchrun("--data", data, "--out", tmp_path, *TINY, "--epochs", "1", "--parallel", "ddp",
                                "--grid-spec", "lr=1e-3,3e-4", script=script),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env1())
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "main_ResNet-18" / "grid" / "results.csv", newline="") as f:
        rows = {row["run"].split("/")[-1]: row for row in csv.DictReader(f)}
    assert {k: v["status"] for k, v in rows.items()} == {"lr=0.001": "failed", "lr=0.0003": "done"}
    assert rows["lr=0.0003"]["batch_size"] == "128 (64 x 2)"  # the global batch, and per process
    assert r.stderr.count("trial lr=0.001 failed") == 1  # one line, by the trial's writer
    assert "process 1 of 2 failed: weights download refused" in r.stderr
    m = json.loads((tmp_path / "main_ResNet-18" / "grid" / "lr=0.0003" / "metrics.json").read_text())
    assert m["processes"] == 2  # the next trial was trained by both, together


@pytest.mark.slow
def test_a_diverging_trial_of_a_ddp_grid_is_recorded_failed_and_the_grid_goes_on(data, tmp_path):
    """Both processes meet the non-finite loss at the same read-back, agree, and go on to the next trial."""
    r = subprocess.run(torchrun("--data", data, "--out", tmp_path, *TINY, "--batch-size", "8", "--epochs", "3",
                                "--parallel", "ddp", "--grid-spec", "lr=1e-3,1e12"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env1())
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "main_ResNet-18" / "grid" / "results.csv", newline="") as f:
        rows = {float(row["lr"]): row for row in csv.DictReader(f)}
    assert {lr: row["status"] for lr, row in rows.items()} == {1e-3: "done", 1e12: "failed"}
    assert rows[1e12]["error"].startswith("non-finite loss at epoch 1, step ")
    assert r.stdout.count("grid: trial lr=0.001 (") == 1  # a DDP grid's lines, printed once


# Rank 1 fails inside the first trial's epochs, before any gradient of that step is all-reduced:
# in its forward (out of memory) or while its batch is read (a loader's error). Each: the patch, the
# line the trial is recorded with, the failed rank's traceback.
FAILS_IN = {
    "forward": ("from torchvision.models.resnet import ResNet\n"
                "real, calls = ResNet.forward, [0]\n"
                "def forward(self, x):\n"
                "    if torch.is_grad_enabled():  # training's forwards, not evaluation's\n"
                "        calls[0] += 1\n"
                "        if rank == 1 and calls[0] == 3:\n"
                "            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
                "    return real(self, x)\n"
                "ResNet.forward = forward\n",
                "out of GPU memory in the training stage with --batch-size 8; try --batch-size 4",
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    "batch": ("from study import pipeline\n"
              "real, batches = pipeline.Loader.__iter__, [0]\n"
              "def iterate(self):\n"
              "    for b in real(self):\n"
              "        if torch.is_grad_enabled():\n"
              "            batches[0] += 1\n"
              "            if rank == 1 and batches[0] == 4:\n"
              "                raise OSError('image file is truncated (3 bytes not processed)')\n"
              "        yield b\n"
              "pipeline.Loader.__iter__ = iterate\n",
              "image file is truncated (3 bytes not processed)",
              "OSError: image file is truncated (3 bytes not processed)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", FAILS_IN)
def test_a_rank_failing_inside_the_epochs_of_a_ddp_grid_is_agreed_and_the_grid_goes_on(data, tmp_path, where):
    """The failed rank takes its part in the others' gradient all-reduces up to the next read-back;
    there both raise its line, the trial is recorded failed and both train the next one."""
    patch, line, traceback = FAILS_IN[where]
    script = driver(tmp_path, "import torch\n" + patch)
    r = subprocess.run(torchrun("--data", data, "--out", tmp_path, *TINY, "--batch-size", "8", "--epochs", "3",
                                "--parallel", "ddp", "--grid-spec", "lr=1e-3,3e-4", script=script),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env1())
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "main_ResNet-18" / "grid" / "results.csv", newline="") as f:
        rows = {row["run"].split("/")[-1]: row for row in csv.DictReader(f)}
    assert {k: v["status"] for k, v in rows.items()} == {"lr=0.001": "failed", "lr=0.0003": "done"}
    assert rows["lr=0.001"]["error"] == f"process 1 of 2 failed: {line}"
    assert traceback in r.stderr  # the failed rank's own traceback, where its error was no one-line error
    m = json.loads((tmp_path / "main_ResNet-18" / "grid" / "lr=0.0003" / "metrics.json").read_text())
    assert m["processes"] == 2 and m["epochs"] == 3


@pytest.mark.slow
def test_parallel_with_a_single_run_is_an_error(data, tmp_path):
    r = subprocess.run(alone("--data", data, "--out", tmp_path, *TINY, "--parallel", "trials"), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --parallel applies to --grid")
    assert not (tmp_path / "main_ResNet-18").exists()


def test_ranks_start_from_one_network_and_draw_their_own_dropout_masks(data):
    """Two ranks of one run: identical initial weights, different dropout draws; one process keeps its
    generator untouched (so a one-process run is what it always was)."""
    config = dict(options.resolve_config(options.get_args_parser(DEFAULTS).parse_args(
        ["--data", str(data), "--weights", "none"]), DEFAULTS, "t"))
    nets, masks = [], []
    for rank in (0, 1):
        nets.append(steps.build_network(config, 4, None, torch.device("cpu"), rank, 2))
        masks.append(torch.nn.functional.dropout(torch.ones(1000), 0.5))
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))
    assert not torch.equal(masks[0], masks[1])
    hardware.seed_everything(0)
    before = torch.get_rng_state()
    hardware.seed_rank(0, 0, 1)
    assert torch.equal(torch.get_rng_state(), before)


DEFAULTS = dict(arch="tiny", batch_size=8, epochs=1, scratch_epochs=1, lr=1e-3, weight_decay=1e-5,
                unfreeze="layer4")


@pytest.mark.slow
def test_a_resume_under_another_process_count_is_refused_naming_both(data, tmp_path):
    args = ("--data", data, "--out", tmp_path, *TINY, "--batch-size", "4", "--epochs", "1", "--name", "r")
    run(torchrun(*args))
    r = subprocess.run(alone(*args, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "2 process(es) there (global batch 8), 1 now (global batch 4)" in line, line


@pytest.mark.slow
def test_a_torchrun_run_leaves_its_process_group(data, tmp_path, monkeypatch):
    """torchrun --nproc_per_node 1 starts a group of one; main() destroys it at the end (recent torch
    warns at exit otherwise)."""
    import torch.distributed as dist

    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    common.main(DEFAULTS, {}, ["--data", str(data), "--out", str(tmp_path), *TINY, "--epochs", "1"], script="t")
    assert (tmp_path / "t").is_dir() and not dist.is_initialized()


def test_each_process_takes_its_share_of_the_cores_unless_the_user_set_the_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    cases = [("1", "4", 4), ("1", "1", 1), (None, "1", 16), (None, "8", 2), ("3", "4", 3)]
    for omp, local, want in cases:  # OMP_NUM_THREADS (torchrun's 1 where it starts several), processes here
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert processes.cpu_share() == want, (omp, local)


def test_loader_workers_default_to_each_process_share_of_the_cores(monkeypatch):
    """8 trial processes on 16 cores start 2 loader workers each, not 8; a lone process at most 8."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for local, want in (("8", 2), ("1", 8), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        config = options.resolve_config(options.get_args_parser(DEFAULTS).parse_args([]), DEFAULTS, "t")
        assert config["workers"] == want, local
    assert options.resolve_config(options.get_args_parser(DEFAULTS).parse_args(["--workers", "3"]), DEFAULTS,
                                  "t")["workers"] == 3
