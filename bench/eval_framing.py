"""Evaluation framing and size on a run's saved weights, no training.

For each run folder given, loads its best.pth (records.load_checkpoint: torch.load with
weights_only=True), rebuilds the network with the project's helpers and evaluates it on the
run's own validation carve (data.read_data with the run's config) with:
  * the run's own framing (--crop-mode and --img-size of its config): must give the best epoch's
    validation top-1 exactly, which is checked first (exit status 1 otherwise);
  * each --modes x --sizes framing (nets.make_preprocess: centre crop of the 256/224-scaled
    resize, or the whole image squashed to a square);
  * each of those with the BatchNorm statistics re-estimated at that framing and size on the
    training images (the run's training part of train/, each image once, in that evaluation
    framing), torch.optim.swa_utils.update_bn, under the run's autocast precision (FixRes-style).
The test set is never loaded. Prints a table and writes framing.json into the run folder.

    python bench/eval_framing.py runs/main_ResNet-18/RUN [RUN ...] [--sizes 112 128 144]
        [--modes center squash] [--no-bn] [--bn-stride 1] [--tta none flip] [--tag T] [--workers 0]
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study import data, loop, nets, records, steps  # noqa: E402
from study.hardware import autocast, pick_device, resolve_precision  # noqa: E402


def load_run(run_dir, device):
    """-> (config, classes, the validation and training samples, the best-epoch model, its best record)."""
    ckpt = records.load_checkpoint(Path(run_dir) / "best.pth", records.CHECKPOINT_KEYS)
    config = ckpt["config"]
    classes, splits, _ = data.read_data(config)
    if classes != ckpt["classes"]:
        raise SystemExit(f"{run_dir}: the checkpoint's classes differ from {config['data']}'s")
    model = nets.build_model(config["arch"], len(classes), "none")
    model.to(device=device, memory_format=torch.channels_last)
    model.load_state_dict(ckpt["model"])
    return config, classes, splits, model, ckpt["best"]


def loader_at(config, samples, device, size, mode, workers):
    """An evaluation loader of `samples` (each image once, in order) at `size` px, framing `mode`."""
    cfg = dict(config, img_size=size, crop_mode=mode, workers=workers)
    options = steps.loader_options(cfg, device)
    return steps.make_loader(samples, options, train=False, augment="none", batch_size=cfg["batch_size"])


def evaluate_on(model, loader, config, device, dtype, n_classes, tta=None):
    """tta: none or flip (loop.evaluate's); None: the run's own."""
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])  # as train_epochs scores val
    m = loop.evaluate(model, loader, criterion, device, dtype, n_classes, tta=tta or config.get("tta") or "none")
    return {"top1": m["top1"], "mean_class_acc": m["mean_class_acc"], "loss": m["loss"], "images": m["images"]}


def reestimated(model, loader, device, dtype):
    """A copy of model with its BatchNorm running statistics recomputed over loader (cumulative
    average over one pass, update_bn's momentum=None), under the run's autocast."""
    m = copy.deepcopy(model)
    with torch.no_grad(), autocast(device, dtype):
        update_bn(loader, m, device=device)
    return m


def framing_table(run_dir, sizes, modes, bn, workers, device, bn_stride=1, tag="", ttas=(None,)):
    config, classes, splits, model, best = load_run(run_dir, device)
    dtype = resolve_precision(config["precision"], device, warn=False)
    n = len(classes)
    own = (config["crop_mode"], config["img_size"])
    rows = []
    t0 = time.perf_counter()
    val = loader_at(config, splits["val"], device, own[1], own[0], workers)
    ref = evaluate_on(model, val, config, device, dtype, n)
    same = ref["top1"] == best["top1"]
    print(f"{run_dir}: best epoch {best['epoch']}, recorded val top-1 {best['top1']:.2f} (loss "
          f"{best.get('loss', float('nan')):.4f}); own framing {own[0]} {own[1]} px here: {ref['top1']:.2f} "
          f"(loss {ref['loss']:.4f}, mean per class {ref['mean_class_acc']:.2f}) -> "
          f"{'reproduced exactly' if same else 'NOT REPRODUCED'}", flush=True)
    if not same:
        raise SystemExit(1)
    for mode in modes:
        for size in sizes:
            val = loader_at(config, splits["val"], device, size, mode, workers)
            nets_here = [("trained", model)]
            if bn:
                train = loader_at(config, splits["train"][::bn_stride], device, size, mode, workers)
                nets_here.append(("re-estimated", reestimated(model, train, device, dtype)))
            for bn_name, net in nets_here:
                for tta in ttas:
                    own_row = (mode, size, bn_name, tta) == (*own, "trained", None)
                    m = ref if own_row else evaluate_on(net, val, config, device, dtype, n, tta)
                    rows.append({"mode": mode, "size": size, "bn": bn_name, "tta": tta or "own", **m})
                    print(f"  {mode:6s} {size:4d} px  BN {bn_name:12s} tta {tta or 'own':4s}  top-1 "
                          f"{m['top1']:6.2f}  mean/class {m['mean_class_acc']:6.2f}  loss {m['loss']:.4f}",
                          flush=True)
    out = {"run": str(run_dir), "best": best, "own_framing": {"mode": own[0], "size": own[1], **ref},
           "reproduced": same, "rows": rows, "bn_images": len(splits["train"][::bn_stride]) if bn else 0,
           "seconds": round(time.perf_counter() - t0, 1),
           "note": "validation carve only; BN re-estimated with torch.optim.swa_utils.update_bn on the "
                   "training images in that evaluation framing"}
    records.write_json(Path(run_dir) / f"framing{tag and '-' + tag}.json", out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders holding best.pth")
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 128, 144])
    p.add_argument("--modes", nargs="+", default=["center", "squash"], choices=["center", "squash"])
    p.add_argument("--no-bn", dest="bn", action="store_false", help="skip the BatchNorm re-estimation")
    p.add_argument("--bn-stride", type=int, default=1, help="re-estimate BatchNorm on every K-th training image")
    p.add_argument("--tag", default="", help="writes framing-TAG.json instead of framing.json")
    p.add_argument("--tta", nargs="+", default=[None], choices=["none", "flip"],
                   help="test-time augmentation of each row (default: the run's own)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = pick_device(args.device, 0, 1)
    return [framing_table(r, args.sizes, args.modes, args.bn, args.workers, device, args.bn_stride, args.tag,
                          args.tta) for r in args.runs]


if __name__ == "__main__":
    main()
