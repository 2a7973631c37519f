"""A run's validation curve from its TensorBoard events: top-1 and mean per class by epoch, training
top-1, and the best epoch as the run chose it (metrics.json / best.pth). No test figure is read.

    python bench/val_curve.py runs/main_ResNet-18/RUN [RUN ...]
"""
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def curve(run_dir):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    get = lambda t: {e.step: e.value for e in ea.Scalars(t)} if t in tags else {}
    return get("Accuracy/val"), get("Accuracy/val_mean_class"), get("Accuracy/train"), get("Speed/train_images_per_s")


def main(runs):
    for r in runs:
        val, mpc, train, speed = curve(r)
        m = {}
        p = Path(r) / "metrics.json"
        if p.is_file():
            full = json.loads(p.read_text())
            m = {k: full[k] for k in ("best_val_top1", "best_epoch", "train_seconds", "epochs")}
        print(f"{r}: {json.dumps(m)}")
        for e in sorted(val):
            print(f"  epoch {e:2d}  val top-1 {val[e]:6.2f}  val mean/class {mpc.get(e, float('nan')):6.2f}  "
                  f"train top-1 {train.get(e, float('nan')):6.2f}  {speed.get(e, float('nan')):5.1f} img/s")


if __name__ == "__main__":
    main(sys.argv[1:])
