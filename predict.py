"""Top-5 classes of images, from a checkpoint of this project.

    python predict.py runs/main_ResNet-18/<run>/best.pth photo.jpg more_photos/
    python predict.py best.pth photo.jpg --json       # machine-readable
    python predict.py best.pth photos/ --explain      # and a Grad-CAM heat map per image in gradcam/

The checkpoint carries everything needed: the architecture, the class names (index order)
and the evaluation preprocessing it was trained with (resize and centre crop, or squash;
mean/std; a run made with --tta flip averages each image with its mirror, as its evaluation
did). A folder is walked recursively, in sorted order, image extensions only; an unreadable
image is reported on stderr and skipped. Exit status 0 when at least one image was predicted.
"""
import argparse
import json
import sys
from pathlib import Path

from study import hardware
from study.errors import fail
from study.prediction import PredictError, find_images, format_plain, load_model, predict_paths


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run's best.pth or last.pth")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files and/or folders (walked recursively, image extensions only)")
    p.add_argument("--json", action="store_true",
                   help='print a JSON list: [{"image": path, "top5": [{"class": name, "prob": p}, ...]}, ...]')
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--explain", action="store_true",
                   help="also save a Grad-CAM heat map of the top class over each image, as PNG in --out")
    p.add_argument("--out", default="gradcam", help="folder for --explain's heat maps (default: gradcam)")
    p.add_argument("--top", type=int, default=5,
                   help="classes shown per image (default: 5; capped at the number of classes; "
                        "the JSON key stays 'top5')")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.top < 1:
        fail(f"--top must be at least 1 (got {args.top})")
    device = hardware.pick_device(args.device)
    try:
        model, classes, preprocess = load_model(args.checkpoint)
    except PredictError as e:
        fail(e)
    model.to(device)
    explain = args.out if args.explain else None
    if explain:
        Path(explain).mkdir(parents=True, exist_ok=True)
    paths, problems = find_images(args.images)
    skipped = []

    def skip(path, reason):
        skipped.append(path)
        print(f"skipped {path}: {reason}", file=sys.stderr, flush=True)

    for path, reason in problems:
        skip(path, reason)
    results = []
    for r in predict_paths(model, classes, preprocess, paths, device=device, batch_size=args.batch_size,
                           k=args.top, on_skip=skip, explain=explain):
        results.append(r)
        if not args.json:  # plain blocks stream out as each batch finishes
            print(("\n" if len(results) > 1 else "") + format_plain(r), flush=True)
    if not results:
        fail(f"no image could be predicted ({len(paths)} found, {len(skipped)} skipped)")
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
