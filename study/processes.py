"""Processes: torchrun's environment, the process group and its store, how processes agree on
a failure, and the collectives the loop uses (each a no-op in a single process)."""
import io
import os
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


# A collective that waits longer than this ends the run; the first decode of a large folder by
# rank 0, while the others wait for it, is the longest legitimate wait.
DIST_TIMEOUT = timedelta(minutes=15)


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
    the agent shares none. That store outlives a restart (--max-restarts), and a key left by a
    killed start (a peer's old address) would be read as this start's: keys go under a prefix that
    rank 0 of this start draws and hands to each rank of this start (agreed_prefix)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=DIST_TIMEOUT)
    return dist.PrefixStore(agreed_prefix(store, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])), store)


def agreed_prefix(store, rank, world):
    """A key prefix every rank of this start shares, and no other start: rank 0 draws it and hands it
    to each rank that says hello with a fresh nonce. Rank 0 first removes the hellos a killed start
    left (so whatever hello it reads is this start's); a rank whose hello it removed says it again.
    Ranks of a start that died before all of them met, or that an elastic change renumbered, never
    share a prefix with this one."""
    prefix, deadline = f"start-{uuid.uuid4().hex}", time.monotonic() + DIST_TIMEOUT.total_seconds()
    if rank == 0:
        for r in range(1, world):
            store.delete_key(f"hello/rank{r}")
        for r in range(1, world):
            store.set(f"welcome/{read_key(store, f'hello/rank{r}', deadline)}", prefix)
        return prefix
    nonce = uuid.uuid4().hex
    while True:
        store.set(f"hello/rank{rank}", nonce)  # again each second: rank 0 may have removed it
        if (prefix := read_key(store, f"welcome/{nonce}", deadline, once=True)) is not None:
            return prefix


def read_key(store, key, deadline, once=False):
    """The key's value once it is set (waiting a second at a time; None after one second with once),
    or TimeoutError past the deadline."""
    while time.monotonic() < deadline:
        try:
            store.wait([key], timedelta(seconds=1))
            return store.get(key).decode()
        except (RuntimeError, dist.DistStoreError):  # not set within the second
            if once:
                return None
    raise TimeoutError(f"the processes of this torchrun start did not all meet within {DIST_TIMEOUT} ({key})")


def init_group(backend, **kwargs):
    """init_process_group of a torchrun process, on this start's own keys where the agent shares its store."""
    store = start_store()
    if store is None:
        dist.init_process_group(backend, timeout=DIST_TIMEOUT, **kwargs)
    else:
        dist.init_process_group(backend, timeout=DIST_TIMEOUT, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), **kwargs)


def machine_cores():
    """The cores this process may run on (its affinity), or the machine's count where none is known."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores_each():
    """The machine's cores over the processes torchrun started on it (all of them outside torchrun)."""
    return max(1, machine_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cpu_share():
    """This process's threads: its share of the machine's cores (cores_each), unless the user set
    OMP_NUM_THREADS (torchrun sets it to 1 itself when it starts several processes on a machine,
    so there only a value above 1 is the user's)."""
    asked = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if asked > 1 or (asked == 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1):
        return asked
    return cores_each()


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


def all_reduce(tensor, op="sum"):
    """Sum (or min) across torchrun processes, in place (a no-op in a single process)."""
    if distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return tensor


def error_line(error, typed=False):
    """An exception's one line: fit()'s own message without 'error: ', else its first line (typed:
    after its type's name, as a results table shows it), or its type's name."""
    if isinstance(error, SystemExit):
        return (str(error.code or "").removeprefix("error: ").strip().splitlines() or ["SystemExit"])[0]
    first = (str(error).strip().splitlines() or [""])[0]
    if not first:
        return type(error).__name__
    return f"{type(error).__name__}: {first}" if typed else first


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
        raise_together(error, None if error is None else error_line(error))
    if error is not None:
        raise error


def raise_together(error, line):
    """The ranks meet (a gather); if any failed, each raises RanksFailed: a failed rank with its own
    `line`, the others naming the first failed rank and its line. Returns where none failed."""
    texts = [None] * dist.get_world_size()
    dist.all_gather_object(texts, line)
    failed = [(r, t) for r, t in enumerate(texts) if t is not None]
    if line is not None:  # its own line; a traceback where it was no one-line error
        if error is not None and not isinstance(error, SystemExit):
            traceback.print_exception(error)
        raise RanksFailed(f"error: {line}") from error
    if failed:
        r, t = failed[0]
        raise RanksFailed(f"error: process {r} of {len(texts)} failed: {t}")


def shadow_step(module, whole):
    """A rank whose training step failed takes the rest of its part in the others' step, with zero
    gradients, so that every rank reaches the next read-back (loop.train_one_epoch) and they agree
    there. DDP's collectives of a step: bucket rebuild and buffer broadcast before the forward
    (`whole`: the failure came before the forward), then one all-reduce per gradient bucket; the
    same calls DDP's own join hook makes for a rank out of inputs. Nothing to do for a module
    without DDP (every rank trains its own copy, as the probe's head)."""
    ddp = getattr(module, "_orig_mod", module)  # under torch.compile
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return
    if whole:
        ddp.reducer._rebuild_buckets()
        if ddp._check_sync_bufs_pre_fwd():
            ddp._sync_buffers()
    ddp._match_all_reduce_for_bwd_pass()
    ddp.reducer._push_all_rebuilt_params()  # buckets rebuilt at the next step as on the other ranks
    ddp.require_forward_param_sync = True  # as a training forward leaves it: buffers go out at the next


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


def gather_lists(items):
    """Every process's list, concatenated in rank order (the list itself in a single process)."""
    if not distributed():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]
