"""Device decisions with faked CUDA properties: torchrun setup per rank, precision per compute
capability, speed settings, and the memory budget. No GPU is needed: torch.cuda is monkeypatched."""
import io
import sys

import pytest
import torch
import torch.distributed as dist

from study import hardware, processes


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda reporting `count` GPUs of one compute capability; records set_device calls."""
    state = {"capability": (8, 0), "count": 4, "current": 0, "calls": []}

    def set_device(d):
        state["current"] = torch.device(d).index
        state["calls"].append(("set_device", torch.device(d)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: state["calls"].append(("init", backend, kw)))
    return state


def torchrun(monkeypatch, rank, local_rank, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


@pytest.mark.parametrize("rank,local_rank", [(0, 0), (1, 1), (3, 3), (5, 1)])  # 5, 1: second node of 2 x 4
def test_each_rank_takes_its_local_gpu_before_nccl_starts(fake_cuda, monkeypatch, rank, local_rank):
    torchrun(monkeypatch, rank, local_rank, world=8)
    r, world, lr = processes.torchrun_env()
    assert (r, world, lr) == (rank, 8, local_rank)
    for spec in ("auto", "cuda"):
        fake_cuda["calls"].clear()
        device = hardware.pick_device(spec, lr, world)
        processes.init_distributed(device, world)
        assert device == torch.device("cuda", local_rank)
        (first, dev), (init, backend, kw) = fake_cuda["calls"]
        assert (first, dev) == ("set_device", torch.device("cuda", local_rank))  # before the group
        assert (init, backend) == ("init", "nccl")
        assert kw["device_id"] == torch.device("cuda", local_rank)
        assert kw["timeout"] == processes.DIST_TIMEOUT


def test_cpu_under_torchrun_uses_gloo_even_where_cuda_exists(fake_cuda, monkeypatch):
    torchrun(monkeypatch, 1, 1, world=2)
    device = hardware.pick_device("cpu", 1, 2)
    processes.init_distributed(device, 2)
    assert device == torch.device("cpu")
    assert fake_cuda["calls"] == [("init", "gloo", {"timeout": processes.DIST_TIMEOUT})]


@pytest.mark.parametrize("spec", ["cuda:0", "cuda:1"])
def test_an_explicit_gpu_under_torchrun_is_refused_in_one_line(fake_cuda, spec):
    with pytest.raises(SystemExit) as e:
        hardware.pick_device(spec, local_rank=1, world=4)
    msg = str(e.value)
    assert msg.startswith(f"error: --device {spec} under torchrun") and "cuda:LOCAL_RANK" in msg
    assert "\n" not in msg and fake_cuda["calls"] == []


def test_single_process_device_choices(fake_cuda):
    assert hardware.pick_device("cuda:2") == torch.device("cuda", 2)
    assert fake_cuda["calls"][-1] == ("set_device", torch.device("cuda", 2))
    with pytest.raises(SystemExit, match="has 4 GPU"):
        hardware.pick_device("cuda:7")
    with pytest.raises(SystemExit, match="valid values"):
        hardware.pick_device("tpu")


@pytest.mark.parametrize("capability,auto", [((6, 0), torch.float16), ((7, 0), torch.float16),
                                             ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                             ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16),
                                             ((10, 0), torch.bfloat16)])
def test_precision_follows_the_compute_capability(fake_cuda, monkeypatch, capsys, capability, auto):
    fake_cuda["capability"] = capability
    # torch's own check counts emulation and says yes on 7.x: the decision must not rest on it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu = torch.device("cuda", 0)
    assert hardware.resolve_precision("auto", gpu) == auto
    assert (hardware.grad_scaler(gpu, auto) is not None) == (auto == torch.float16)
    assert hardware.resolve_precision("fp32", gpu) is None
    assert hardware.resolve_precision("fp16", gpu) == torch.float16
    capsys.readouterr()
    assert hardware.resolve_precision("bf16", gpu) == torch.bfloat16  # honoured either way
    err = capsys.readouterr().err
    if capability < (8, 0):
        assert err.count("\n") == 1 and err.startswith("warning: --precision bf16 on Fake GPU")
        assert f"compute capability {capability[0]}.{capability[1]}" in err
    else:
        assert err == ""


@pytest.mark.parametrize("native,auto", [(True, torch.bfloat16), (False, None)])
def test_precision_on_the_cpu(monkeypatch, native, auto):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert hardware.resolve_precision("auto", torch.device("cpu")) == auto


@pytest.mark.parametrize("capability,dtype,deterministic,expect", [
    ((8, 0), None, False, {"cudnn_benchmark": True, "tf32": True}),
    ((7, 5), None, False, {"cudnn_benchmark": True, "tf32": False}),  # no TF32 before Ampere
    ((9, 0), torch.bfloat16, False, {"cudnn_benchmark": True, "tf32": False}),  # only fp32 uses TF32
    ((9, 0), None, True, {"cudnn_benchmark": False, "tf32": False}),
])
def test_speed_settings_of_a_gpu_run(fake_cuda, capability, dtype, deterministic, expect):
    fake_cuda["capability"] = capability
    try:
        got = hardware.speed_settings(torch.device("cuda", 0), dtype, deterministic)
        assert got == expect
        assert torch.backends.cudnn.benchmark == expect["cudnn_benchmark"]
        assert torch.get_float32_matmul_precision() == ("high" if expect["tf32"] else "highest")
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    finally:
        hardware.speed_settings(torch.device("cpu"), None, False)
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_the_budget_counts_everything_resident():
    b = hardware.MemoryBudget(100)
    assert b.reserve("train images", 60) and b.used == 60
    assert not b.reserve("val images", 50) and b.used == 60  # refused: nothing counted
    assert b.reserve("val images", 40) and b.used == 100
    b.release("train images")
    assert b.used == 40 and b.reserve("frozen outputs", 60)


def test_the_out_of_memory_line_names_the_batch_size():
    from study import errors

    assert errors.oom_message(64, "training", False) == \
        "out of GPU memory in the training stage with --batch-size 64; try --batch-size 32"
    assert errors.oom_message(3, "training", False).endswith("try --batch-size 2")


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_every_rank_at_once(tmp_path):
    """Two gloo processes: rank 1 fails before the meeting point, rank 0 must not wait for a timeout."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "two_ranks.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from study import errors, hardware, processes\n"
        "rank, world, local = processes.torchrun_env()\n"
        "processes.init_distributed(torch.device('cpu'), world)\n"
        "with processes.on_every_rank(world):\n"
        "    if rank == 1:\n"
        "        errors.fail('bad image data/x.jpg')\n"
        "print('rank', rank, 'went on')\n")
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120)
    assert time.time() - t < 60  # the timeout is 15 minutes: nobody waited for it
    assert p.returncode != 0 and "went on" not in p.stdout
    assert "error: bad image data/x.jpg" in p.stderr  # rank 1's own message
    assert "error: process 1 of 2 failed: bad image data/x.jpg" in p.stderr  # and rank 0's


def test_one_process_under_torchrun_starts_its_group_and_a_plain_run_does_not(fake_cuda, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    processes.init_distributed(hardware.pick_device("auto"), 1)
    assert [c[0] for c in fake_cuda["calls"]] == ["set_device"]  # no process group outside torchrun
    torchrun(monkeypatch, 0, 0, world=1)  # torchrun --nproc_per_node=1: checks nccl on one GPU
    fake_cuda["calls"].clear()
    processes.init_distributed(hardware.pick_device("auto", 0, 1), 1)
    assert [c[:2] for c in fake_cuda["calls"]] == [("set_device", torch.device("cuda", 0)), ("init", "nccl")]


class Writes(io.RawIOBase):
    """A raw stream that records each write it is handed, as a pipe's reader would see them."""

    def __init__(self):
        self.writes = []

    def writable(self):
        return True

    def write(self, b):
        self.writes.append(bytes(b))
        return len(b)


def test_whole_lines_hands_each_printed_line_over_in_one_write():
    raw = Writes()
    stream = io.TextIOWrapper(raw, write_through=True)  # stdout's shape under python -u / PYTHONUNBUFFERED
    print("process 0 takes it", file=stream, flush=True)
    assert raw.writes == [b"process 0 takes it", b"\n"]  # another process's line could land in between
    raw.writes.clear()
    processes.whole_lines(stream)
    print("process 1 takes it", file=stream, flush=True)
    print("epoch 1/1", file=stream)
    assert raw.writes == [b"process 1 takes it\n", b"epoch 1/1\n"]


def test_a_script_sets_whole_lines_on_stdout_and_stderr_before_anything_else(monkeypatch, tmp_path):
    import common

    streams = {name: io.TextIOWrapper(Writes(), write_through=True) for name in ("stdout", "stderr")}
    for name, stream in streams.items():
        monkeypatch.setattr(sys, name, stream)
    defaults = dict(arch="resnet18", batch_size=64, epochs=1, scratch_epochs=1, lr=3e-4, weight_decay=1e-5,
                    unfreeze="all")
    argv = ["--data", str(tmp_path / "missing"), "--out", str(tmp_path), "--device", "cpu"]
    with pytest.raises(SystemExit, match="^error: "):  # fails at its data folder, having set them
        common.main(defaults, {}, argv=argv, script="t")
    assert all(s.line_buffering and not s.write_through for s in streams.values())
