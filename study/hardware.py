"""The hardware a run computes on: the device, the precision from what the hardware really
does (compute capability, native bf16), speed settings, random state, and the budget of what
stays in device memory. Decided from what the hardware reports, so tests can fake the reports."""
import gc
import hashlib
import os
import random
import sys

import numpy as np
import torch

from .errors import fail
from .processes import gather_lists


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
