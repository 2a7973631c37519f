"""Who trains which trial of a grid or comparison: the trial scheduler.

One ticket loop serves every case. Each process takes the next trial of a phase, trains it and
takes the next; at the end of the phase the processes meet and share their rows, so all of them
decide what comes next (the halving cuts, the winner) from the same numbers.
- One process, or --parallel ddp: the tickets are counted in the process (every process of a DDP
  grid takes every ticket, and they train each trial together).
- --parallel trials under torchrun: the tickets come from an atomic add in the key-value store
  torchrun's group already has; each process trains its trial alone, as one process would.
A restart (torchrun --max-restarts) counts tickets afresh; the run folders say what is finished
(reused) and what is half done (resumed).
"""
import contextlib
import sys
import time
import traceback

from . import hardware, processes
from .options import run_dir_of
from .records import FolderLock, write_json


def run_trial(fit, t, stop_after=None, writes=True):
    """fit(t) that records a failure (an exception, out of memory) instead of ending the grid ->
    (metrics or None, error line or None). writes: this process writes the trial's folder."""
    run_dir = run_dir_of(t)
    try:
        m, msg = fit(t, stop_after=stop_after), None
    except (Exception, SystemExit) as e:  # KeyboardInterrupt still stops everything
        m, msg = None, processes.error_line(e, typed=True)
        if not isinstance(e, SystemExit):
            traceback.print_exc()
    if msg is not None:
        if writes:  # once per trial: its writer (the processes of a DDP trial fail together)
            print(f"trial {t['name']} failed: {msg}", file=sys.stderr, flush=True)
        hardware.free_cached_memory()  # outside the except block, so the failed trial's tensors can go
        if writes:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "error.json", {"error": msg, "stop_after": stop_after})
    elif writes:
        (run_dir / "error.json").unlink(missing_ok=True)
    return m, msg


class Pool:
    """The processes of one command and how they share its trials (module docstring)."""

    def __init__(self, mode, rank, world, key, group):
        self.mode, self.rank, self.world, self.key, self.group = mode, rank, world, key, group
        self.phase = 0

    @property
    def shares_trials(self):
        return self.mode == "trials" and self.world > 1

    @property
    def trial_world(self):
        """The processes that train one trial together."""
        return 1 if self.mode == "trials" else self.world

    def as_trial(self):
        """The block in which this process trains a trial: alone in trials mode."""
        return processes.alone() if self.mode == "trials" else contextlib.nullcontext()

    def agreed(self):
        """A block whose failure on any process fails on every process (no collective inside)."""
        return processes.on_every_rank(self.world)

    def share(self, obj):
        """Rank 0's value on every process."""
        return processes.broadcast(obj)

    def train(self, fit, trials, to_row, stop_after=None, after=None, announce=None):
        """Each trial through run_trial -> {name: row}, the same on every process, in trial order.
        to_row(t, metrics, error): the trial's row. after(name, row): called on every process for
        every row, for this process's own trials as each ends and for the others' at the phase's end.
        announce(t, i): the line printed as trial i starts."""
        tickets = Tickets(processes.group_store(), f"{self.key}/phase{self.phase}") if self.shares_trials \
            else Tickets()
        self.phase += 1
        mine = {}
        while (i := tickets.take()) < len(trials):
            t = trials[i]
            said = announce(t, i) if announce is not None else f"{self.group}: trial {t['name']}"
            if self.shares_trials:
                done, taken = tickets.counts(len(trials))
                said += f": process {self.rank} takes it; {done} finished, {taken - done} running, " \
                        f"{len(trials) - taken} pending"
            if self.shares_trials or self.rank == 0:  # a DDP grid's processes train one trial together
                print(said, flush=True)
            with self.as_trial():
                m, error = run_trial(fit, t, stop_after, writes=self.shares_trials or self.rank == 0)
            mine[t["name"]] = to_row(t, m, error)
            tickets.finish()
            if after is not None:
                after(t["name"], mine[t["name"]])
        rows = tickets.meet(mine, self.world)
        for t in trials:
            if t["name"] not in mine and after is not None:
                after(t["name"], rows[t["name"]])
        return {t["name"]: rows[t["name"]] for t in trials}


class Tickets:
    """A phase's trial indices, handed out one at a time: counted in this process (one process, and
    every process of a DDP grid alike), or with a store by its atomic add, shared by all processes."""

    def __init__(self, store=None, key=""):
        self.store, self.key, self.taken = store, key, 0

    def take(self):
        if self.store is None:
            self.taken += 1
            return self.taken - 1
        return self.store.add(f"{self.key}/taken", 1) - 1

    def finish(self):
        if self.store is not None:
            self.store.add(f"{self.key}/finished", 1)

    def counts(self, n):
        """(finished, taken) over every process."""
        return self.store.add(f"{self.key}/finished", 0), min(self.store.add(f"{self.key}/taken", 0), n)

    def meet(self, mine, world):
        """Every process's rows, once all have run out of tickets."""
        if self.store is None:
            return mine
        # meet without a collective's timeout: a trial can take hours, and idle processes wait for it
        self.store.add(f"{self.key}/idle", 1)
        while self.store.add(f"{self.key}/idle", 0) < world:
            time.sleep(0.2)
        parts = processes.gather_lists([mine])
        return {name: row for part in parts for name, row in part.items()}


def make_pool(config, group):
    """The Pool of this command: under torchrun, --parallel trials (the default) or ddp, with its
    process group started; one process otherwise. Its store keys come from names every machine
    shares (the script and the group), never from a local path."""
    rank, world, local_rank = processes.torchrun_env()
    if not processes.launched_by_torchrun():
        return Pool(None, 0, 1, "", group)
    mode = config["parallel"] or "trials"
    if mode == "trials":
        threads = processes.start_trials_group()
        if rank == 0:
            print(f"{group}: {world} processes train whole trials side by side (--parallel trials), "
                  f"{threads} thread(s) each", flush=True)
    else:
        processes.init_distributed(hardware.pick_device(config["device"], local_rank, world), world)
    return Pool(mode, rank, world, f"grid/{config['script']}/{group}", group)


def lock_folder(pool, root):
    """The grid's or comparison's folder, held by this command as a whole (rank 0 for all of its
    processes); a second command on it stops at once, naming the holder."""
    lock = FolderLock(root)
    with pool.agreed():
        if pool.rank == 0:
            lock.acquire()
    return lock
