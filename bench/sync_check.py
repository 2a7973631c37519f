"""Stream synchronisations per training batch, for each input path the runs use.

    python bench/sync_check.py --data DIR --device cuda [--batch-size 64] [--limit-per-class 12]

Each path trains ResNet-18 (--unfreeze last:1, the script's default) for a warm-up epoch and a
measured one: the decode cache resident on the device or streamed through the workers (what
--gpu-cache off gives), augmented or in the evaluation framing, the PIL path, and cached outputs of
a frozen part (features.CachedBatches, a linear head on them); and the resident path with --ema's
average of the weights updated after every step (loop.WeightAverage).

On CUDA, under torch.cuda.set_sync_debug_mode("warn"): torch warns at every synchronising call;
the warnings of each batch (loader, forward, backward, optimizer step) are counted and their
source lines listed. Last line: syncs_per_batch=N, the largest mean over the paths' measured
epochs (the target is 0; fp16's GradScaler, which reads its inf check back every step by design,
is listed apart). loop.train_one_epoch is counted as well, for information: it reads the loss
back every 10 steps on purpose.
On the CPU nothing synchronises; HostCopies then records, around each batch the loader makes,
the calls that would on CUDA: a tensor built from Python numbers, a copy to a device without
non_blocking=True, a read back to Python. Last line: blocking_calls_per_batch=N.
Exit status 1 when N > 0.
"""
import argparse
import copy
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from study import data, hardware, loop, nets  # noqa: E402
from study import features  # noqa: E402
from study import pipeline  # noqa: E402
import bench_data  # noqa: E402  (scratch_folder)

TORCH_DIR = os.path.dirname(torch.__file__)
SCALER = "grad_scaler.py:"   # torch/amp/grad_scaler.py, where a sync warning names it
# Tensor methods that read a value back to Python: on CUDA each waits for the stream.
READ_BACKS = {"item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__"}


class HostCopies(TorchFunctionMode):
    """Records the torch calls made inside it that synchronise a CUDA stream when the tensors
    live there, on any device: calls[i] = "file:line name". A tensor made from Python data
    (torch.tensor, as_tensor of a list), .to() / .cuda() with a device and without
    non_blocking=True, and READ_BACKS. Only calls from code outside torch are kept (torch's
    DataLoader reads its host-side seed back, for one)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        f = sys._getframe(1)
        if blocks(name, args, kwargs) and not f.f_code.co_filename.startswith(TORCH_DIR):
            self.calls.append(f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {name}")
        return func(*args, **kwargs)


def blocks(name, args, kwargs):
    """Whether a call of torch function `name` would wait for a CUDA stream (see HostCopies)."""
    if name == "tensor":
        return True
    if name == "as_tensor":
        return not isinstance(args[0] if args else kwargs.get("data"), torch.Tensor)
    if name in ("to", "cuda"):
        device = "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
        non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
        return (device or name == "cuda") and not non_blocking
    return name in READ_BACKS


def blocking_calls(batches):
    """[calls recorded while making each batch] over one pass of `batches` (a loader), and the
    batches themselves, in order."""
    out, it = [], iter(batches)
    while True:
        with HostCopies() as rec:
            try:
                batch = next(it)
            except StopIteration:
                return out
        out.append((rec.calls, batch))


def cuda_syncs(step, batches):
    """[source lines of the synchronising calls of each batch: its making and step(x, y)] over one
    pass of `batches`, under torch.cuda.set_sync_debug_mode("warn")."""
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            it = iter(batches)
            while True:
                n = len(caught)
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                step(x, y)
                out.append([f"{Path(w.filename).name}:{w.lineno}" for w in caught[n:]
                            if "synchroniz" in str(w.message)])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


def make_step(model, arch, device, dtype, ema=0.0):
    """The body of loop.train_one_epoch for `model`: forward, loss, backward, clip, AdamW (and with
    ema, the weights' average updated after it, as --ema does), schedule."""
    optimizer = torch.optim.AdamW(nets.param_groups(model, arch, 1e-3, 1e-4, 0.1))
    if ema:
        average = loop.WeightAverage(model, ema)
        optimizer.register_step_post_hook(lambda *_: average.update())
    scheduler = loop.lr_schedule(optimizer, 100, 10)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = hardware.grad_scaler(device, dtype)

    def step(x, y):
        if x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        with hardware.autocast(device, dtype):
            loss = criterion(model(x).float(), y)
        loop.backward_and_step(loss, optimizer, params, scaler, 1.0)
        scheduler.step()
    return step, (optimizer, scheduler, criterion, scaler)


def paths(samples, classes, args, device, dtype):
    """-> {path name: (loader or CachedBatches, model)} for every input path."""
    pre = nets.make_preprocess(args.arch, args.img_size)
    kw = dict(train=True, preprocess=pre, seed_policy=nets.ARCHS[args.arch].seed_policy, batch_size=args.batch_size,
              workers=args.workers, device=device, seed=0, progress=False,
              cache_dir=args.cache_dir or bench_data.scratch_folder())

    def network():
        model = nets.build_model(args.arch, len(classes), "none")
        nets.freeze(model, args.arch, nets.parse_unfreeze("last:1", args.arch))
        nets.set_train_mode(model)
        return model.to(device=device, memory_format=torch.channels_last)

    out = {}
    for name, augment, on_device, resident in [("resident-augmented", "seed", True, True),
                                                 ("streamed-augmented", "seed", True, False),
                                                 ("resident-eval-framing", "none", True, True),
                                                 ("pil-augmented", "seed", False, False)]:
        loader = pipeline.build_loader(samples, augment=augment, on_device=on_device, **kw)
        if resident:   # as a run places its caches: after building the loader
            loader.make_resident()
        out[name] = loader, network()
    # a frozen backbone's features, computed once; a linear head trains on them in the loader's order
    loader = out["resident-eval-framing"][0]
    backbone, _ = features.cut_head(nets.forward_sequence(network()))
    outputs, _ = features.outputs_of(backbone, loader, len(loader.samples), device, dtype, as_float=True)
    head = nn.Linear(outputs.shape[1], len(classes)).to(device)
    out["cached-outputs"] = features.CachedBatches(loader, outputs), head
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train/<class>/ images")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--arch", default="resnet18", choices=list(nets.ARCHS), help="network (default: resnet18)")
    p.add_argument("--img-size", type=int, default=None, help="crop side, px (default: the weights' own)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--limit-per-class", type=int, default=12, help="images per class (default: 12)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes of the streamed paths (default: 2)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="as main_*.py (default: auto); fp16's GradScaler reads back every step")
    p.add_argument("--cache-dir", default=None, help="decode cache folder (default: a temporary one)")
    args = p.parse_args(argv)
    device = hardware.pick_device(args.device)
    dtype = hardware.resolve_precision(args.precision, device)
    hardware.speed_settings(device, dtype, deterministic=False)   # cudnn.benchmark as the runs
    classes, train, _ = data.scan_split(args.data)
    samples = data.limit_per_class(train, args.limit_per_class)
    cuda = device.type == "cuda"
    what = "syncs" if cuda else "blocking calls"
    print(f"sync_check: {args.arch}, {len(samples)} images, batch {args.batch_size}, {device}, "
          f"{hardware.precision_name(dtype)}; {what} per batch of the measured epoch (after a warm-up epoch)",
          flush=True)
    worst, built = 0.0, paths(samples, classes, args, device, dtype)
    # --ema: the resident path again, with the weights' average after each optimizer step
    runs = [(name, batches, model, 0.0) for name, (batches, model) in built.items()]
    loader = built["resident-augmented"][0]
    runs.append(("resident-augmented+ema", loader, copy.deepcopy(built["resident-augmented"][1]), 0.99))
    for name, batches, model, ema in runs:
        step, _ = make_step(model, args.arch, device, dtype, ema)
        for epoch in (1, 2):
            batches.set_epoch(epoch)
            if cuda:
                per_batch = cuda_syncs(step, batches)
            else:
                per_batch = []
                for calls, (x, y) in blocking_calls(batches):
                    step(x, y)
                    per_batch.append(calls)
            if epoch == 1:
                warm = sum(map(len, per_batch))
        # fp16's GradScaler reads its inf check back every step, by design: listed, not counted
        scaler = [[c for c in calls if c.startswith(SCALER)] for calls in per_batch]
        per_batch = [[c for c in calls if not c.startswith(SCALER)] for calls in per_batch]
        mean = sum(map(len, per_batch)) / max(len(per_batch), 1)
        worst = max(worst, mean)
        where = Counter(c for calls in per_batch + scaler for c in calls).most_common(5)
        print(f"{name}: {len(per_batch)} batches, {mean:g} {what} per batch (warm-up epoch: {warm} in all)"
              + (f", and {sum(map(len, scaler)) / len(scaler):g} of fp16's GradScaler" if any(scaler) else "")
              + "".join(f"\n    {n} x {c}" for c, n in where), flush=True)
    if cuda:
        loader, model = built["resident-augmented"]
        step, (optimizer, scheduler, criterion, scaler) = make_step(model, args.arch, device, dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.train_one_epoch(model, loader, optimizer, scheduler, criterion, device, dtype, epoch=1,
                                       scaler=scaler, show_bar=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        n = sum("synchroniz" in str(w.message) for w in caught)
        print(f"loop.train_one_epoch (resident-augmented): {n} syncs in {len(loader)} batches "
              f"(it reads the loss back every 10 steps and once at the end, on purpose)", flush=True)
    print(f"{'syncs' if cuda else 'blocking_calls'}_per_batch={worst:g}", flush=True)
    return 1 if worst > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
