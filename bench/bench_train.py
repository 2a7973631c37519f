"""Throughput of whole training steps (forward, backward, optimizer step) per architecture.

    python bench/bench_train.py --arch resnet18 --unfreeze last:1 --synthetic
    python bench/bench_train.py --arch resnet18 --unfreeze last:1 --data DIR --workers 2
    python bench/bench_train.py --arch resnet18 --unfreeze last:1 --data DIR --workers 2 --original
    python bench/bench_train.py --arch resnet18 --unfreeze last:1 --data DIR --workers 2 --compare

Ours = the project's own pieces: nets.build_model (random weights: nothing to download),
nets.freeze + parse_unfreeze, nets.param_groups (AdamW), nets.set_train_mode (frozen
BatchNorm in eval mode), channels_last, hardware.resolve_precision + autocast, gradient
clipping at 1.0 as loop.train_one_epoch; batches from pipeline.build_loader (--data, the
`seed` augmentation of the architecture's seed policy) or synthetic tensors (--synthetic).
--original = the original study's loop on the same images: its input path (bench/original.py:
ImageFolder + the original script's PIL transforms + DataLoader(shuffle)), the same network in fp32
and contiguous memory, every BatchNorm in train mode, the original optimiser (AdamW + clip
1.0 for the ResNet-18/101 scripts, Adam for ResNet-50 and B4), with glibc's default malloc
(ours calls pipeline.keep_freed_memory() first, as common.main does). --compare runs each
side as its own child process (so each has its own malloc setting and peak memory),
alternately, --repeats times, and prints the medians and their ratio.

The first --warmup steps are not counted; then whole steps are counted for --seconds. Prints
the peak resident memory (getrusage of this process and of its finished children, and the
largest sampled sum over the live process tree, in MB) and, last, images_per_s=N (ours with
--compare).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import resource  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import bench_data  # noqa: E402  (tree_cpu_seconds, wait_idle, batches_forever, scratch_folder)
from study import hardware, loop, nets  # noqa: E402
import original  # noqa: E402  (bench/original.py)
from study import pipeline  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, choices=list(nets.ARCHS), help="network to train")
    p.add_argument("--img-size", type=int, default=None,
                   help="crop side, px (default: the weights' own, 224 or 380)")
    p.add_argument("--unfreeze", default="last:1",
                   help="trained part as main_*.py's --unfreeze: all, head, last:N, names "
                        "(default: last:1, i.e. layer4 / features.8 + head)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="ours: autocast dtype; auto = bf16 where native, else fp32 (default: auto)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="measured time after the warm-up, s (default: 30)")
    p.add_argument("--warmup", type=int, default=3, help="steps not counted (default: 3)")
    p.add_argument("--synthetic", action="store_true",
                   help="random normalised tensors instead of images (model cost alone)")
    p.add_argument("--data", default=None, help="folder with train/<class>/ images")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes (default: 2)")
    p.add_argument("--cache-dir", default=None,
                   help="ours: decode cache folder (default: a temporary one, removed at the end)")
    p.add_argument("--resident", choices=("auto", "on", "off"), default="auto",
                   help="ours: the whole decode cache as one tensor on the device, batches "
                        "augmented there; auto = on for CUDA (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default: torch's own)")
    p.add_argument("--fused", action="store_true",
                   help="ours: AdamW(fused=True) instead of common's default AdamW "
                        "(default: off)")
    p.add_argument("--original", action="store_true", help="measure the original loop instead")
    p.add_argument("--compare", action="store_true",
                   help="measure ours and the original alternately, print medians and ratio")
    p.add_argument("--repeats", type=int, default=3,
                   help="measurements per side with --compare (default: 3)")
    return p


def tree_rss_mb(pid: int | None = None) -> float:
    """Resident MB of a process and its live descendants (shared pages counted once each)."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
        kids = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, StopIteration, PermissionError):
        return 0.0
    return pss + sum(tree_rss_mb(k) for k in kids)


def getrusage_mb() -> tuple[float, float]:
    """(peak RSS of this process, peak RSS of its largest finished child), MB (Linux: KiB)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def synthetic_batches(args, crop: int, num_classes: int, device):
    """The same normalised-range batch again and again, already on the device."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, crop, crop, generator=g).to(device)
    y = torch.randint(0, num_classes, (args.batch_size,), generator=g).to(device)
    while True:
        yield x, y


def setup_ours(args, device, samples, num_classes):
    """-> (step function, batch iterator) with the project's own pieces."""
    arch = args.arch
    pre = nets.make_preprocess(arch, args.img_size)
    model = nets.build_model(arch, num_classes, "none")
    nets.freeze(model, arch, nets.parse_unfreeze(args.unfreeze, arch))
    model.to(device=device, memory_format=torch.channels_last)
    dtype = hardware.resolve_precision(args.precision, device)
    optimizer = torch.optim.AdamW(nets.param_groups(model, arch, 3e-4, 1e-5, 0.1),
                                  fused=True if args.fused else None)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    nets.set_train_mode(model)

    def step(x, y):   # the body of loop.train_one_epoch
        x = x.to(memory_format=torch.channels_last)
        with hardware.autocast(device, dtype):
            loss = criterion(model(x).float(), y)
        loop.backward_and_step(loss, optimizer, params, scaler, clip=1.0)
        return loss

    if args.synthetic:
        return step, synthetic_batches(args, pre.crop, num_classes, device), dtype
    resident = {"auto": device.type == "cuda", "on": True, "off": False}[args.resident]
    loader = pipeline.build_loader(
        samples, train=True, preprocess=pre, augment="seed", seed_policy=nets.ARCHS[arch].seed_policy,
        batch_size=args.batch_size, workers=args.workers, device=device, seed=0,
        cache_dir=args.cache_dir or bench_data.scratch_folder(), on_device=True if resident else None)
    if resident:   # as a run places its caches: after building the loader
        loader.make_resident()

    def epoch(e):
        loader.set_epoch(e)
        yield from loader
    return step, bench_data.batches_forever(epoch), dtype


def setup_original(args, device, data_train, num_classes):
    """-> (step function, batch iterator): the original loop, fp32, contiguous, BN training."""
    arch = args.arch
    crop = args.img_size or nets.weights_preprocess(arch)["crop"]
    model = nets.build_model(arch, num_classes, "none").to(device)
    nets.freeze(model, arch, nets.parse_unfreeze(args.unfreeze, arch))
    head = nets.ARCHS[arch].head + "."
    groups = [{"params": [p for n, p in model.named_parameters()
                          if p.requires_grad and not n.startswith(head)], "lr": 3e-5},
              {"params": [p for n, p in model.named_parameters()
                          if p.requires_grad and n.startswith(head)], "lr": 3e-4}]
    groups = [g for g in groups if g["params"]]
    adam = arch in ("resnet50", "efficientnet_b4")   # those scripts use Adam, no clipping
    optimizer = (torch.optim.Adam if adam else torch.optim.AdamW)(groups, weight_decay=1e-4)
    params = [p for g in groups for p in g["params"]]
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()   # the original: every BatchNorm in train mode, frozen or not

    def step(x, y):
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if not adam:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    if args.synthetic:
        return step, synthetic_batches(args, crop, num_classes, device)
    _, batches = original.batches(data_train, original.train_transform(nets.ARCHS[arch].seed_policy, crop),
                                  args.batch_size, args.workers, device)
    return step, batches


def measure(step, batches, device, warmup: int, seconds: float) -> dict:
    """Whole steps after `warmup` steps: images/s, CPU ms/image, peak sampled tree PSS (MB)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(*next(batches))
    sync()
    count, peak = 0, tree_rss_mb()
    start, cpu = time.perf_counter(), bench_data.tree_cpu_seconds()
    while time.perf_counter() - start < seconds:
        x, y = next(batches)
        loss = step(x, y)
        sync()
        count += len(y)
        peak = max(peak, tree_rss_mb())
    cpu = bench_data.tree_cpu_seconds() - cpu
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss.detach()).item():
        raise SystemExit("non-finite loss during the measurement")
    return {"images_per_s": count / elapsed, "cpu_ms": 1e3 * cpu / count, "tree_mb": peak,
            "steps": count // max(1, len(y))}


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seconds <= 0 or args.repeats < 1 or args.workers < 0 or args.batch_size < 2:
        raise SystemExit("--seconds and --repeats must be positive, --workers >= 0, "
                         "--batch-size >= 2")
    if args.synthetic == bool(args.data):
        raise SystemExit("give exactly one of --data DIR and --synthetic")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU is available here")
    samples, data_train, num_classes = None, None, 101
    if args.data:
        data_train = os.path.join(args.data, "train")
        if not os.path.isdir(data_train):
            raise SystemExit(f"no train/ folder in {args.data}")
        from torchvision.datasets import ImageFolder
        folder = ImageFolder(data_train)
        samples, num_classes = folder.samples, len(folder.classes)
        if len(samples) < args.batch_size:
            raise SystemExit(f"{len(samples)} images in {data_train}: fewer than one batch")
    nets.parse_unfreeze(args.unfreeze, args.arch)   # a bad spec fails before any work
    print(f"arch={args.arch} unfreeze={args.unfreeze} batch={args.batch_size} device={device} "
          f"threads={torch.get_num_threads()} workers={args.workers} "
          f"input={'synthetic' if args.synthetic else args.data}", flush=True)
    if args.compare:
        return compare(args, argv if argv is not None else sys.argv[1:])
    if not args.original:
        pipeline.keep_freed_memory()
        step, batches, dtype = setup_ours(args, device, samples, num_classes)
        print(f"ours: precision={'fp32' if dtype is None else str(dtype)[6:]} channels_last",
              flush=True)
    else:
        step, batches = setup_original(args, device, data_train, num_classes)
        print("original: fp32, contiguous, BatchNorm in train mode", flush=True)
    m = measure(step, batches, device, args.warmup, args.seconds)
    self_mb, child_mb = getrusage_mb()
    print(f"cpu_ms_per_image={m['cpu_ms']:.1f}\nsteps={m['steps']}\n"
          f"peak_tree_pss_mb={m['tree_mb']:.0f}\npeak_rss_self_mb={self_mb:.0f}\n"
          f"peak_rss_children_mb={child_mb:.0f}\nimages_per_s={m['images_per_s']:.2f}", flush=True)


def compare(args, argv: list[str]) -> None:
    """Ours and the original as child processes, alternately; medians and their ratio."""
    base = [sys.executable, os.path.abspath(__file__)] + [a for a in argv if a != "--compare"]
    base = [a for a in base if a != "--original"]
    keys = ("images_per_s", "cpu_ms_per_image", "peak_rss_self_mb", "peak_tree_pss_mb")
    runs = {"ours": [], "original": []}
    for r in range(args.repeats):
        for side in runs:
            bench_data.wait_idle()
            got = subprocess.run(base + (["--original"] if side == "original" else []),
                                 capture_output=True, text=True)
            if got.returncode != 0:
                raise SystemExit(f"{side} run failed: {(got.stderr or got.stdout).strip()[-500:]}")
            vals = {k: float(re.findall(rf"^{k}=([0-9.]+)$", got.stdout, re.M)[-1]) for k in keys}
            runs[side].append(vals)
            print(f"run {r + 1} {side}: " + " ".join(f"{k}={v:g}" for k, v in vals.items()),
                  flush=True)
    med = {side: {k: statistics.median(v[k] for v in vals) for k in keys}
           for side, vals in runs.items()}
    for side in ("original", "ours"):
        print(f"{side}_peak_rss_self_mb={max(v['peak_rss_self_mb'] for v in runs[side]):.0f}\n"
              f"{side}_peak_tree_pss_mb={max(v['peak_tree_pss_mb'] for v in runs[side]):.0f}\n"
              f"{side}_cpu_ms_per_image={med[side]['cpu_ms_per_image']:.1f}")
    print(f"original_images_per_s={med['original']['images_per_s']:.2f}\n"
          f"speedup={med['ours']['images_per_s'] / med['original']['images_per_s']:.2f}\n"
          f"images_per_s={med['ours']['images_per_s']:.2f}")

if __name__ == "__main__":
    main()
