"""Training step with the frozen prefix run every step vs on its cached outputs (--cache-frozen).

    python bench/bench_frozen_prefix.py --arch efficientnet_lite0 --unfreeze last:5 --img-size 256
    python bench/bench_frozen_prefix.py --arch resnet18 --unfreeze last:1 --img-size 224

Both sides are the project's own step (features.split_frozen_prefix, set_train_mode with frozen
BatchNorm, param_groups + AdamW, autocast at --precision, channels_last, backward_and_step with
clipping at 1.0) on one synthetic batch made on the CPU, random weights. "every step" runs the
whole network; "cached" runs only the part after the frozen prefix, on the prefix's output for
that batch, computed once. The two alternate, --repeats rounds of --steps timed steps each
after one warm-up step; the medians over all timed steps and their ratio are printed, and the
prefix's own forward time (what caching saves per step). Last line: speedup=R.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from study import features, hardware, loop, nets  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="efficientnet_lite0", choices=list(nets.ARCHS))
    p.add_argument("--unfreeze", default="last:5", help="trained part, as main_*.py's --unfreeze")
    p.add_argument("--img-size", type=int, default=256, help="input side, px")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds, sides alternating")
    return p


def timed(fn, n):
    """Seconds of each of n calls of fn (after one untimed call)."""
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def make_step(net, optimizer, criterion, x, y, device, dtype):
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step():
        with hardware.autocast(device, dtype):
            loss = criterion(net(x).float(), y)
        loop.backward_and_step(loss, optimizer, params)
    return step


def main(args):
    torch.manual_seed(0)
    device = torch.device("cpu")
    dtype = hardware.resolve_precision(args.precision, device)
    model = nets.build_model(args.arch, 101, "none")
    nets.freeze(model, args.arch, nets.parse_unfreeze(args.unfreeze, args.arch))
    model.to(memory_format=torch.channels_last)
    prefix, rest = features.split_frozen_prefix(model, "frozen")
    if not len(prefix):
        sys.exit(f"--unfreeze {args.unfreeze}: nothing leading is frozen, nothing to cache")
    nets.set_train_mode(model, "frozen")
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 101, (args.batch_size,))
    optimizer = torch.optim.AdamW(nets.param_groups(model, args.arch, 1e-4, 1e-4, 1.0))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    with torch.no_grad(), hardware.autocast(device, dtype):
        cached = prefix(x)

    def prefix_only():
        with torch.no_grad(), hardware.autocast(device, dtype):
            prefix(x)

    sides = {"every step": make_step(model, optimizer, criterion, x, y, device, dtype),
             "cached": make_step(rest, optimizer, criterion, cached, y, device, dtype)}
    times = {k: [] for k in sides}
    pre = []
    for _ in range(args.repeats):
        for k, fn in sides.items():
            times[k] += timed(fn, args.steps)
        pre += timed(prefix_only, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.arch} {args.unfreeze}, batch {args.batch_size}, {args.img_size} px, "
          f"{'fp32' if dtype is None else str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads; "
          f"frozen prefix output {tuple(cached.shape[1:])}")
    for k, v in med.items():
        print(f"{k:11s} {v * 1000:7.0f} ms/step  {args.batch_size / v:6.1f} images/s")
    print(f"prefix forward {statistics.median(pre) * 1000:5.0f} ms/step")
    print(f"speedup={med['every step'] / med['cached']:.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
