"""Where a run computes: device and torchrun setup, precision, speed settings, RNG state, and the
budget of what may stay resident in device memory.

Everything that depends on the hardware is decided here, from what the hardware reports
(compute capability, native bf16, free memory), so tests can fake those reports.
"""
import gc
import hashlib
import io
import os
import random
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import fail

# A collective that waits longer than this ends the run; the first decode of a large folder by
# rank 0, while the others wait for it, is the longest legitimate wait.
DIST_TIMEOUT = timedelta(minutes=15)


# --------------------------------------------------------------------------------------------
# Devices and torchrun.
# --------------------------------------------------------------------------------------------
_alone = [False]  # inside alone(): this process trains by itself, whatever torchrun started


@contextmanager
def alone():
    """A block in which this torchrun process trains a run by itself (a grid trial in --parallel
    trials): rank 0 of 1, no DDP, and no collective over the group the grid coordinates through."""
    before, _alone[0] = _alone[0], True
    try:
        yield
    finally:
        _alone[0] = before


def torchrun_env():
    """-> (rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) outside torchrun, and
    (0, 1, LOCAL_RANK) inside alone()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _alone[0]:
        return 0, 1, int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def distributed():
    """True when collectives reach other processes (a torchrun group, outside alone())."""
    return not _alone[0] and dist.is_available() and dist.is_initialized()


def pick_device(spec, local_rank=0, world=1):
    """--device -> torch.device, made current. Under torchrun each process takes cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and spec.startswith("cuda:"):
        fail(f"--device {spec} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda (or auto)")
    if world > 1 and spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        fail(f"--device {spec}: valid values are auto, cpu, cuda, cuda:N")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {spec}: valid values are auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {spec}: no CUDA GPU is available here (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            fail(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                 f"cuda:{torch.cuda.device_count() - 1}")
        # before any collective: NCCL's barriers and object broadcasts use the current device
        torch.cuda.set_device(device)
    return device


def launched_by_torchrun():
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device, world):
    """Start the process group of a torchrun run (one process too, so a single GPU checks the
    nccl path): nccl for CUDA devices, gloo for the CPU."""
    if dist.is_initialized() or not (world > 1 or launched_by_torchrun()):
        return
    if device.type == "cuda":
        # device_id binds the group to this process's GPU (no guessing at the first collective)
        init_group("nccl", device_id=device)
    else:
        init_group("gloo")


def start_store():
    """This start's own view of the store torchrun's agent shares with its workers, or None where
    the agent shares none. That store outlives a restart (--max-restarts), and a key left by the
    killed start (a peer's old address) would be read as this start's: keys go under a prefix
    counted per rank, which every rank reaches once per start, on every node alike."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=DIST_TIMEOUT)
    start = store.add(f"starts/rank{os.environ['RANK']}", 1)
    return dist.PrefixStore(f"start{start}", store)


def init_group(backend, **kwargs):
    """init_process_group of a torchrun process, on this start's own keys where the agent shares its store."""
    store = start_store()
    if store is None:
        dist.init_process_group(backend, timeout=DIST_TIMEOUT, **kwargs)
    else:
        dist.init_process_group(backend, timeout=DIST_TIMEOUT, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), **kwargs)


def cpu_share():
    """This process's share of the machine's cores: all of them over the processes torchrun started
    on this machine, unless the user set OMP_NUM_THREADS (torchrun sets it to 1 itself when it
    starts several processes on a machine, so there only a value above 1 is the user's)."""
    asked = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if asked > 1 or (asked == 1 and local == 1):
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


def start_trials_group():
    """--parallel trials under torchrun: a CPU (gloo) group that only coordinates, so it never
    waits on a GPU stream; this process computes on cuda:(LOCAL_RANK mod the GPU count), so several
    processes can share one large GPU, and uses its share of the CPU cores. -> its thread count."""
    if not dist.is_initialized():
        init_group("gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.set_num_threads(cpu_share())
    return torch.get_num_threads()


def group_store():
    """The key-value store torchrun's group already has (no new server): grid trials are handed
    out through its atomic add. Its keys are this start's own (start_store)."""
    return dist.distributed_c10d._get_default_store()


def broadcast(obj):
    """Rank 0's object on every process (the object itself in a single process)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(tensor):
    """Sum across torchrun processes (a no-op in a single process)."""
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def error_line(error):
    """An exception's one line: fit()'s own message without 'error: ', else its text or type."""
    text = str(getattr(error, "code", None) or error) or type(error).__name__
    return text.removeprefix("error: ").strip().splitlines()[0] if text.strip() else type(error).__name__


class RanksFailed(SystemExit):
    """A block failed on some rank, and every rank raises this at the same point (on_every_rank),
    so that all of them can go on together (a DDP grid records the trial as failed)."""


@contextmanager
def on_every_rank(world):
    """Run a block on every rank and meet at its end; if it fails on one rank, it fails on all,
    with RanksFailed. The block must hold no collective: a rank that fails before one would leave
    the others waiting in it.
    """
    error = None
    try:
        yield
    except (Exception, SystemExit) as e:  # KeyboardInterrupt still ends the process at once
        error = e
    if world > 1:
        texts = [None] * world
        dist.all_gather_object(texts, None if error is None else error_line(error))
        failed = [(r, t) for r, t in enumerate(texts) if t is not None]
        if error is not None:  # its own line; a traceback where it was no one-line error
            if not isinstance(error, SystemExit):
                traceback.print_exception(error)
            raise RanksFailed(f"error: {texts[dist.get_rank()]}") from error
        if failed:
            r, t = failed[0]
            raise RanksFailed(f"error: process {r} of {world} failed: {t}")
    if error is not None:
        raise error


@contextmanager
def one_fails_all(world, rank):
    """Code that holds collectives (DDP's all-reduce, all_reduce, gathers): a rank that fails there
    cannot meet the others, who would wait in a collective until the timeout. It prints its one
    line and ends its process at once; torchrun then ends the group (and restarts it, with
    --max-restarts). Failures already agreed by every rank (RanksFailed) pass through."""
    try:
        yield
    except RanksFailed:
        raise
    except (Exception, SystemExit) as e:
        if world <= 1:
            raise
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        print(f"error: process {rank} of {world}: {error_line(e)}", file=sys.stderr, flush=True)
        os._exit(1)


def barrier():
    if distributed():
        dist.barrier()


def whole_lines(*streams):
    """Each printed line leaves in one write, so the lines of processes sharing a terminal or pipe
    (torchrun's workers) never mix mid-line. Unbuffered (python -u, PYTHONUNBUFFERED, common in
    containers), print writes a line's text and its newline apart."""
    for stream in streams:
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=False)


def close_distributed():
    """The end of a torchrun process: leave the group cleanly (recent torch warns otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Precision and speed settings.
# --------------------------------------------------------------------------------------------
def cpu_has_native_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def gpu_has_native_bf16(device):
    """bf16 tensor cores: compute capability 8.0 (Ampere) and later. torch.cuda.is_bf16_supported()
    also counts emulation, which says yes on a T4 or V100 (7.x), where bf16 is slow."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision, device, warn=True):
    """--precision -> the autocast dtype, or None for fp32.

    auto: bf16 on GPUs of compute capability >= 8.0, fp16 (with a GradScaler) below; on the CPU
    bf16 where it is native, fp32 elsewhere.
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if gpu_has_native_bf16(device) else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    elif precision == "bf16" and warn and device.type == "cuda" and not gpu_has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        print(f"warning: --precision bf16 on {torch.cuda.get_device_name(device)} (compute capability "
              f"{major}.{minor}) has no bf16 tensor cores: slow or unsupported kernels; --precision auto "
              f"picks fp16 there", file=sys.stderr, flush=True)
    elif precision == "fp16" and warn and device.type == "cpu":
        print("warning: --precision fp16 on the CPU runs slowly and exists to check the fp16 path; "
              "use bf16 or fp32 there", file=sys.stderr, flush=True)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype):
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, dtype):
    """fp16 needs its loss scaled so small gradients do not flush to zero; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def speed_settings(device, dtype, deterministic):
    """cudnn.benchmark (input sizes are fixed, so the autotuner's pick holds for the whole run) and
    TF32 for fp32 on GPUs of capability >= 8.0; --deterministic turns both off.
    -> {"cudnn_benchmark": bool, "tf32": bool} for the run's header line."""
    cuda = device.type == "cuda"
    tf32 = cuda and dtype is None and not deterministic and torch.cuda.get_device_capability(device) >= (8, 0)
    torch.backends.cudnn.benchmark = cuda and not deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark, "tf32": tf32}


# --------------------------------------------------------------------------------------------
# Random state: seeds, and what a checkpoint keeps so a resumed run draws the same numbers.
# --------------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def seed_rank(seed, rank, world):
    """After the network is built (the same initial weights on every rank): each rank of a DDP run
    draws its own dropout and stochastic-depth masks. One process keeps its generator as it is."""
    if world > 1:
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/rank{rank}".encode()).digest()[:8], "big"))


def rng_state(device, world=1):
    """torch's generators: the CPU one, and every CUDA device's when the run uses CUDA. Under
    torchrun (a collective) every rank's, in rank order, as "rank_rng"."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if world > 1:
        return {"rank_rng": gather_lists([state])}
    return state


def set_rng_state(ckpt, device, rank=0):
    state = ckpt["rank_rng"][rank] if ckpt.get("rank_rng") else ckpt
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])


# --------------------------------------------------------------------------------------------
# Memory: one budget per run for what stays resident; out of memory ends in one line.
# --------------------------------------------------------------------------------------------
def memory_limit(device):
    """Bytes a run may keep resident: a quarter of the GPU's free memory (the rest is for
    training), or a quarter of the RAM for tensors kept on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume a 16 GB machine
        return 4 << 30


class MemoryBudget:
    """What a run keeps resident on its device (decode caches, frozen-prefix outputs, features),
    by name, against one limit. It decides what may be placed; callers release what they drop."""

    def __init__(self, limit):
        self.limit, self.held = limit, {}

    @property
    def used(self):
        return sum(self.held.values())

    def reserve(self, name, nbytes):
        """True (and counted) when nbytes more fit under the limit."""
        if self.used + nbytes > self.limit:
            return False
        self.hold(name, nbytes)
        return True

    def hold(self, name, nbytes):
        """Count what must stay resident whatever the limit (the features the head trains on)."""
        self.held[name] = self.held.get(name, 0) + nbytes

    def release(self, name):
        self.held.pop(name, None)


def free_cached_memory():
    """After a failure: let the dead run's tensors go, so the next grid trial starts with the memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gather_lists(items):
    """Every process's list, concatenated in rank order (the list itself in a single process)."""
    if not distributed():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]
