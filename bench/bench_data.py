"""Throughput of the training input path alone: image files -> normalised batches on the device.

    python bench/bench_data.py --data DIR --seed-policy resnet --workers 2             # ours
    python bench/bench_data.py --data DIR --seed-policy resnet --workers 2 --original  # the original

    python bench/bench_data.py --data DIR --seed-policy resnet --workers 2 --compare --repeats 3

DIR holds train/<class>/*.jpg. Ours = pipeline.build_loader with the original script's `seed`
augmentation (on CUDA, the decode cache resident on the device unless --resident off);
--original = the original's input path (bench/original.py: ImageFolder + its transforms +
DataLoader(shuffle)) with the same workers and batch size. Both are timed the same way: the
first --warmup batches are not counted, then whole batches are counted for --seconds
(epochs repeat as needed). Besides wall-clock images/s it reports the CPU time of the whole
process tree (main + loader workers) per image, which a busy shared machine disturbs less.
--compare alternates ours and the original --repeats times each and prints the medians and
their ratio. The process (and so both sides, workers included) first calls
pipeline.keep_freed_memory(), as our training scripts do; the original never did, so this
can only flatter the original. Prints cache_build_s=X and, last, images_per_s=N (ours with
--compare).
"""
import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import original  # noqa: E402  (bench/original.py)
from study import pipeline  # noqa: E402

# --seed-policy -> (augment.SEED_POLICIES name, crop px) as the original scripts ran them
RECIPES = {"resnet": ("resnet18", 224), "efficientnet_b4": ("efficientnet_b4", 380)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train/<class>/ images")
    p.add_argument("--seed-policy", choices=sorted(RECIPES), default="resnet",
                   help="which original train transforms (default: resnet = ResNet-18's)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="measured time after the warm-up, s (default: 20)")
    p.add_argument("--warmup", type=int, default=6,
                   help="batches not counted, more than the prefetched ones (default: 6)")
    p.add_argument("--device", default="cpu", help="where batches must end up (default: cpu)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes (default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the main process (default: 1)")
    p.add_argument("--cache-dir", default=None,
                   help="decode cache folder (default: a temporary one, removed at the end)")
    p.add_argument("--on-device", choices=("auto", "on", "off"), default="auto",
                   help="ours: batched tensor augmentation; auto = on for CUDA (default: auto)")
    p.add_argument("--resident", choices=("auto", "on", "off"), default="auto",
                   help="ours: the whole decode cache as one tensor on the device (on-device path "
                        "only); auto = on for the on-device path on CUDA (default: auto)")
    p.add_argument("--original", action="store_true",
                   help="measure the original PIL pipeline instead of ours")
    p.add_argument("--compare", action="store_true",
                   help="measure ours and the original alternately, print medians and ratio")
    p.add_argument("--repeats", type=int, default=3,
                   help="measurements per side with --compare (default: 3)")
    return p


def tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process and all its live descendants (Linux /proc)."""
    pid = os.getpid() if pid is None else pid
    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / tick   # utime, stime
        kids = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):   # a process that just ended
        return 0.0
    return total + sum(tree_cpu_seconds(k) for k in kids)


def batches_forever(make_epoch_iter):
    epoch = 0
    while True:
        yield from make_epoch_iter(epoch)
        epoch += 1


def measure(batches, device: torch.device, warmup: int, seconds: float) -> tuple[float, float]:
    """(images/s, CPU ms/image) over whole batches after `warmup` batches (on the device)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        next(batches)
    sync()
    count, start, cpu = 0, time.perf_counter(), tree_cpu_seconds()
    while time.perf_counter() - start < seconds:
        x, _ = next(batches)
        count += len(x)
        if device.type == "cuda":
            sync()
    cpu = tree_cpu_seconds() - cpu
    return count / (time.perf_counter() - start), 1e3 * cpu / count


def wait_idle(limit_s: float = 60.0) -> None:
    """Wait until this process tree stops using CPU (the other side's workers finish their
    prefetched batches), so that one side's CPU time is not counted in the other's window."""
    end = time.perf_counter() + limit_s
    last, quiet = tree_cpu_seconds(), 0
    while quiet < 2 and time.perf_counter() < end:
        time.sleep(0.5)
        now = tree_cpu_seconds()
        quiet = quiet + 1 if now - last < 0.05 else 0
        last = now


def make_original(args, device):
    """Batches of the original pipeline, forever."""
    name, crop = RECIPES[args.seed_policy]
    return original.batches(os.path.join(args.data, "train"), original.train_transform(name, crop),
                            args.batch_size, args.workers, device)


def scratch_folder() -> str:
    """A decode cache folder for this process alone, removed when it ends (no --cache-dir)."""
    folder = tempfile.mkdtemp(prefix="bench-cache-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def make_ours(args, device):
    """Batches of pipeline.build_loader (builds or reuses the cache), forever."""
    from torchvision.datasets import ImageFolder
    name, crop = RECIPES[args.seed_policy]
    samples = ImageFolder(os.path.join(args.data, "train")).samples   # (path, class index)
    pre = pipeline.Preprocess(crop=crop, resize=original.resize_of(name, crop), mean=original.MEAN,
                              std=original.STD)
    on_device = {"auto": device.type == "cuda", "on": True, "off": False}[args.on_device]
    resident = {"auto": on_device and device.type == "cuda", "on": True, "off": False}[args.resident]
    if resident and not on_device:
        raise SystemExit("--resident on needs the on-device path: --on-device on (or auto on CUDA)")
    loader = pipeline.build_loader(
        samples, train=True, preprocess=pre, augment="seed", seed_policy=name,
        batch_size=args.batch_size, workers=args.workers, device=device, seed=0,
        cache_dir=args.cache_dir or scratch_folder(), on_device=on_device)
    if resident:   # as a run places its caches: after building the loader
        loader.make_resident()

    def epoch_iter(epoch):
        loader.set_epoch(epoch)
        yield from loader
    return len(loader.samples), batches_forever(epoch_iter)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    pipeline.keep_freed_memory()
    device = torch.device(args.device)
    if not os.path.isdir(os.path.join(args.data, "train")):
        raise SystemExit(f"no train/ folder in {args.data}")
    if args.seconds <= 0 or args.repeats < 1 or args.workers < 0:
        raise SystemExit("--seconds and --repeats must be positive, --workers >= 0")
    start = time.perf_counter()
    if args.original and not args.compare:
        n, batches = make_original(args, device)
        build = 0.0
    else:
        n, batches = make_ours(args, device)
        build = time.perf_counter() - start
    print(f"images={n}\ncache_build_s={build:.2f}", flush=True)
    if not args.compare:
        rate, cpu_ms = measure(batches, device, args.warmup, args.seconds)
        print(f"cpu_ms_per_image={cpu_ms:.2f}\nimages_per_s={rate:.1f}")
        return
    _, original = make_original(args, device)
    runs = {"ours": [], "original": []}
    for r in range(args.repeats):
        for side, it in (("ours", batches), ("original", original)):
            wait_idle()
            rate, cpu_ms = measure(it, device, args.warmup, args.seconds)
            runs[side].append((rate, cpu_ms))
            print(f"run {r + 1} {side}: images_per_s={rate:.1f} cpu_ms_per_image={cpu_ms:.2f}",
                  flush=True)
    med = {side: (statistics.median(x for x, _ in v), statistics.median(c for _, c in v))
           for side, v in runs.items()}
    print(f"original_images_per_s={med['original'][0]:.1f}\n"
          f"original_cpu_ms_per_image={med['original'][1]:.2f}\n"
          f"cpu_ms_per_image={med['ours'][1]:.2f}\n"
          f"speedup_wall={med['ours'][0] / med['original'][0]:.2f}\n"
          f"speedup_cpu={med['original'][1] / med['ours'][1]:.2f}\n"
          f"images_per_s={med['ours'][0]:.1f}")


if __name__ == "__main__":
    main()
