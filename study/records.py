"""What a run leaves on disk: atomic writes, JSON files and checkpoints.

Every file goes to a temporary name in the same folder, is fsynced and renamed into place,
so a kill never leaves a half-written file. split_data.py writes through this module too, so
torch is imported only where a checkpoint is read or written.
"""
import contextlib
import errno
import json
import os
import pickle
import shutil
import socket
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no fcntl; folders are not locked there
    fcntl = None


# What a checkpoint of this project holds: enough to evaluate it (predict.py), and to resume its run.
EVALUATE_KEYS = ("model", "classes", "arch", "preprocess")
CHECKPOINT_KEYS = EVALUATE_KEYS + ("optimizer", "scheduler", "epoch", "config", "best")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project; the message is one line."""


class DiskFull(SystemExit):
    """A write met a full disk: the one-line error (errors.fail's kind), naming the file and its disk."""


def disk_full(error):
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(path, free=None, kept=None):
    """The one line of a write that met a full disk: the file, its disk's free space, what was kept."""
    path = Path(path)
    free = shutil.disk_usage(path.parent).free if free is None else free
    kept = kept or ("its previous version is kept" if path.exists() else "nothing was written")
    return (f"error: {path}: the disk is full ({free / 2**20:.1f} MiB free on the disk of {path.parent}); "
            f"{kept}: free some space, or write elsewhere (--out, --cache-dir)")


def atomic_write(path, write):
    """write(binary file object) into a hidden temporary file beside path, then fsync, rename, fsync of
    the folder: all or nothing. The temporary name is mkstemp's (O_EXCL, random): processes on machines
    that share the folder never write into one file. A full disk ends in one line that names the file
    and the disk (DiskFull), with the previous version kept and no temporary file left."""
    path = Path(path)
    f = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    tmp = Path(f.name)
    try:
        with f:
            write(f)
        umask = os.umask(0)  # the usual permissions: temporary files are often created 0600
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(path.parent).free  # before the temporary file goes
        # torch.save's zip writer reports a full disk as RuntimeError("... unexpected pos ...")
        if disk_full(e) or (isinstance(e, RuntimeError) and free < 2**20):
            raise DiskFull(disk_full_line(path, free)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path):
    """Make a rename inside `path` durable (a no-op where folders cannot be opened: Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def load_json(path):
    """The parsed file, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def save_checkpoint(path, state):
    import torch

    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, keys=()):
    """The one loader of .pth files (weights_only=True: tensors and plain values, no code).

    keys: entries a checkpoint of this project must hold. Raises CheckpointError with one line.
    """
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a .pth file (e.g. <run>/best.pth)") from None
    except pickle.UnpicklingError:  # not a torch file, or objects weights_only refuses to unpickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint of tensors and plain values "
                              f"(weights-only load refused it)") from None
    except Exception as e:  # truncated zip, wrong magic number ...
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not loadable ({type(e).__name__}: {first})") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this project (missing {', '.join(missing)}); "
                              f"use the best.pth or last.pth of a run")
    return obj


class FolderBusy(SystemExit):
    """Another live process holds the folder's lock: the one-line error (errors.fail's kind) that
    names the folder and the holder."""


class FolderLock:
    """One writer at a time: an exclusive lock on FOLDER/NAME, held while this process works there
    (a run, grid or comparison folder: NAME .lock, taken at once or refused; a cache key in a cache
    folder: waited for, so the first process builds and the others reuse). It is a POSIX record lock
    (fcntl.lockf): the operating system drops it when the process ends, however it ends (kill -9
    included), so a lock is never stale, and unlike flock it is not inherited by forked loader
    workers, which could outlive the run and keep its folder locked. The file keeps the holder's pid
    and host for the message a second process gets. Only its holder removes it, and a process that
    locked a file since removed locks the new one, so two processes never hold two files."""

    def __init__(self, folder, name=".lock", wait=False):
        self.folder, self.name, self.wait, self.fd, self.made = Path(folder), name, wait, None, []

    def acquire(self):
        """Take the lock (at once or raise FolderBusy; with wait, when its holder lets go); creates the
        folder. -> self."""
        if fcntl is None or self.fd is not None:
            return self
        self.made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # deepest first
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise FolderBusy(f"error: {self.folder} is in use by {holder}; wait for it to end, or pass "
                                 f"--name NEW for another folder") from None
            with contextlib.suppress(FileNotFoundError):  # still the file at path, not removed or replaced
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            os.close(fd)  # its holder removed the file as we opened it (release): lock the new one
        if not self.wait:  # for the message a second process gets (a waiting one gets none)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        """Drop the lock; a folder this lock made, where nothing else was written (a run refused or
        failed before its first file), goes again with the folders made for it: bad input leaves nothing."""
        if self.fd is None:
            return
        if self.made and [p.name for p in self.folder.iterdir()] == [self.name]:
            (self.folder / self.name).unlink()
            for p in self.made:
                try:
                    p.rmdir()
                except OSError:  # another run wrote there meanwhile
                    break
        os.close(self.fd)  # closing the descriptor drops the lock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def plain_state_dict(state):
    """A state dict without the prefixes DDP ("module.") and torch.compile ("_orig_mod.") add."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# TensorBoard: scalars per epoch, and at the end of a run the test figures and HParams.
# --------------------------------------------------------------------------------------------
HPARAM_KEYS = ("arch", "weights", "unfreeze", "batch_size", "epochs", "lr", "weight_decay", "img_size", "crop_mode",
               "augment", "backbone_lr_ratio", "bn_stats", "probe_epochs", "seed", "split_seed")
MISTAKES_SHOWN = 32  # test images in the end-of-run grid of the worst mistakes


def open_writer(run_dir, start_epoch):
    """A TensorBoard writer for epochs from start_epoch on, in a new event file of the run folder.

    purge_step: TensorBoard drops the steps >= start_epoch that a killed run had logged. It
    reads a folder's event files in name order, and a name starts with the creation second and
    ends with a per-process counter, so a writer opened in the same second as an earlier one
    (a resume in the same process: successive halving, tests) waits for the next second,
    or its file could sort first (".10" < ".9") and be purged by the older one.
    """
    import time

    from torch.utils.tensorboard import SummaryWriter

    newest = max((int(f.name.split(".")[3]) for f in Path(run_dir).glob("events.out.tfevents.*")
                  if f.name.split(".")[3].isdigit()), default=0)
    while int(time.time()) <= newest:
        time.sleep(0.05)
    return SummaryWriter(str(run_dir), purge_step=start_epoch)


def log_epoch(writer, epoch, tm, vm, lrs, epochs):
    """One epoch's scalars, and its line on stdout. tm, vm: training and validation metrics
    (vm None without a validation part); lrs: the optimizer groups' current rates."""
    writer.add_scalar("Loss/train", tm["loss"], epoch)
    writer.add_scalar("Accuracy/train", tm["top1"], epoch)
    writer.add_scalar("LR", max(lrs), epoch)
    writer.add_scalar("Speed/train_images_per_s", tm["images"] / max(tm["seconds"], 1e-9), epoch)
    line = f"epoch {epoch}/{epochs}  train loss {tm['loss']:.4f} top-1 {tm['top1']:.2f}%"
    if vm:
        writer.add_scalar("Loss/val", vm["loss"], epoch)
        writer.add_scalar("Accuracy/val", vm["top1"], epoch)
        if vm["top5"] is not None:
            writer.add_scalar("Accuracy/val_top5", vm["top5"], epoch)
        writer.add_scalar("Accuracy/val_mean_class", vm["mean_class_acc"], epoch)
        line += f"  val loss {vm['loss']:.4f} top-1 {vm['top1']:.2f}%"
    writer.flush()
    print(line + f"  {tm['images'] / max(tm['seconds'], 1e-9):.0f} img/s  lr {lrs[-1]:.2e}", flush=True)


def write_hparams(writer, config, metrics):
    """TensorBoard HParams records, written into the run's own event file (no stray sub-folder)."""
    from torch.utils.tensorboard.summary import hparams

    h = {k: (config.get(k) if isinstance(config.get(k), (int, float, str, bool)) else str(config.get(k)))
         for k in HPARAM_KEYS}
    for s in hparams(h, metrics):
        writer.file_writer.add_summary(s)
    for k, v in metrics.items():
        writer.add_scalar(k, v, 0)


def finish_run(writer, run_dir, config, classes, test_m, metrics, mistake_images):
    """The end of a finished run: test records in TensorBoard (the confusion matrix, the worst mistakes
    as the images were evaluated, the per-class table from worst to best), metrics.json, the summary line."""
    from . import figures  # matplotlib: only at the end of a run

    writer.add_figure("Test/confusion_matrix", figures.confusion_figure(test_m["confusion"], classes), 0)
    if test_m["mistakes"]:
        idx, true, pred, prob = zip(*test_m["mistakes"])
        writer.add_figure("Test/worst_mistakes", figures.mistakes_figure(mistake_images, true, pred, prob, classes), 0)
    writer.add_text("Test/per_class_accuracy", figures.per_class_markdown(classes, test_m["per_class"]), 0)
    for k in ("test_top1", "test_top5", "test_mean_class_acc"):
        if metrics[k] is not None:
            writer.add_scalar(f"Test/{k[5:]}", metrics[k], 0)
    write_hparams(writer, config, {"hparam/test_top1": metrics["test_top1"],
                                   "hparam/best_val_top1": metrics["best_val_top1"]})
    writer.close()
    out = dict(metrics, test_per_class_acc=dict(zip(classes, test_m["per_class"])), classes=list(classes),
               test_confusion=test_m["confusion"].tolist())
    write_json(run_dir / "metrics.json", out)
    top5 = "-" if metrics["test_top5"] is None else f"{metrics['test_top5']:.2f}%"
    print(f"test top-1 {metrics['test_top1']:.2f}%  top-5 {top5}  mean per-class "
          f"{metrics['test_mean_class_acc']:.2f}%  (best val top-1 {metrics['best_val_top1']:.2f}% at epoch "
          f"{metrics['best_epoch']})  -> {run_dir}/metrics.json", flush=True)
