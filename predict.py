"""Top-5 classes of images, from a checkpoint of this project.

    python predict.py runs/main_ResNet-18/<run>/best.pth photo.jpg more_photos/
    python predict.py best.pth photo.jpg --json       # machine-readable

The checkpoint carries everything needed: the architecture, the class names (index order)
and the evaluation preprocessing it was trained with (resize and centre crop, or squash;
mean/std). A folder is walked recursively, in sorted order, image extensions only; an
unreadable image is reported on stderr and skipped. Exit status 0 when at least one image
was predicted.
"""
import argparse
import json
import pickle
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import common
import pipeline

CHECKPOINT_KEYS = ("model", "classes", "arch", "preprocess")
PREPROCESS_KEYS = ("crop", "resize", "mean", "std", "interpolation")


class PredictError(ValueError):
    """A checkpoint or an input this tool cannot use; the message is one line for the user."""


# --------------------------------------------------------------------------------------------
# Checkpoint -> network in eval mode, class names, preprocessing.
# --------------------------------------------------------------------------------------------
def load_model(path):
    """best.pth / last.pth -> (model in eval mode on the CPU, class names, preprocess dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PredictError(f"checkpoint {path}: no such file") from None
    except IsADirectoryError:
        raise PredictError(f"checkpoint {path}: is a folder, expected a .pth file (e.g. <run>/best.pth)") from None
    except pickle.UnpicklingError:  # not a torch file, or objects weights_only refuses to unpickle
        raise PredictError(f"checkpoint {path}: not a PyTorch checkpoint of tensors and plain values "
                           f"(weights-only load refused it)") from None
    except Exception as e:  # truncated zip, wrong magic number ...
        first = (str(e).splitlines() or [""])[0]
        raise PredictError(f"checkpoint {path}: not loadable ({type(e).__name__}: {first})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise PredictError(f"checkpoint {path}: not a checkpoint of this project (missing {', '.join(missing)}); "
                           f"use the best.pth or last.pth of a run")
    arch, classes = ckpt["arch"], list(ckpt["classes"])
    if arch not in common.ARCHS:
        raise PredictError(f"checkpoint {path}: unknown architecture {arch!r}; valid: {', '.join(common.ARCHS)}")
    preprocess = check_preprocess(ckpt["preprocess"], path)
    model = common.build_model(arch, len(classes), "none")
    # a state dict saved from a DDP or torch.compile wrapper carries a prefix on every key
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise PredictError(f"checkpoint {path}: its weights do not fit {arch} with {len(classes)} classes "
                           f"({first})") from None
    return model.eval(), classes, preprocess


def check_preprocess(pre, source="checkpoint"):
    """The checkpoint's preprocess dict, checked: ints for the sizes, 3 floats for mean/std."""
    if not isinstance(pre, dict) or any(k not in pre for k in PREPROCESS_KEYS):
        raise PredictError(f"{source}: preprocess must hold {', '.join(PREPROCESS_KEYS)} (got {pre!r})")
    valid = [m.value for m in InterpolationMode]
    if pre["interpolation"] not in valid:
        raise PredictError(f"{source}: unknown interpolation {pre['interpolation']!r}; valid: {', '.join(valid)}")
    crop_mode = pre.get("crop_mode", "center")  # checkpoints written before --crop-mode: center
    if crop_mode not in pipeline.CROP_MODES:
        raise PredictError(f"{source}: unknown crop_mode {crop_mode!r}; valid: {', '.join(pipeline.CROP_MODES)}")
    return {"crop": int(pre["crop"]), "resize": int(pre["resize"]), "mean": [float(v) for v in pre["mean"]],
            "std": [float(v) for v in pre["std"]], "interpolation": pre["interpolation"], "crop_mode": crop_mode}


# --------------------------------------------------------------------------------------------
# Images: preprocessing exactly as torchvision's evaluation presets do it.
# --------------------------------------------------------------------------------------------
def build_transform(preprocess):
    """Resize the shorter side to `resize` px and centre-crop `crop` px (crop_mode squash: resize the
    whole image to crop x crop), scale to [0, 1], normalise."""
    mode = InterpolationMode(preprocess["interpolation"])
    crop = preprocess["crop"]
    framing = ([transforms.Resize((crop, crop), interpolation=mode)] if preprocess.get("crop_mode") == "squash" else
               [transforms.Resize(preprocess["resize"], interpolation=mode), transforms.CenterCrop(crop)])
    return transforms.Compose(framing + [
        transforms.ToTensor(),
        transforms.Normalize(preprocess["mean"], preprocess["std"]),
    ])


def load_image(path, preprocess, transform=None):
    """One image file -> float tensor (3, crop, crop). Grayscale, palette and RGBA become RGB.

    Raises OSError (unreadable, truncated, not an image) or ValueError (decompression bomb).
    """
    transform = transform or build_transform(preprocess)
    with Image.open(path) as img:
        rgb = img.convert("RGB")  # forces the full decode: a truncated file fails here
    return transform(rgb)


def find_images(inputs):
    """Files and folders -> (image paths, problems). Folders are walked recursively, sorted,
    keeping image extensions only; a file named explicitly is tried whatever its extension."""
    paths, problems = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in common.IMG_EXTENSIONS)
        elif p.is_file():
            paths.append(str(p))
        else:
            problems.append((str(p), "no such file or folder"))
    return paths, problems


# --------------------------------------------------------------------------------------------
# Prediction: batches of images -> top-k (class, probability), most probable first.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def topk(model, batch, k):
    """-> (probabilities, class indices), each (n, k), from the softmax over all classes."""
    probs = torch.softmax(model(batch).float(), dim=1)
    return probs.topk(min(k, probs.shape[1]), dim=1)


def predict_paths(model, classes, preprocess, paths, *, device, batch_size=32, k=5, on_skip=None):
    """Yield {"image": path, "top5": [{"class": name, "prob": p}, ...]} per readable image, in order.

    Images are decoded one batch at a time, so memory stays bounded on a large folder.
    on_skip(path, reason) is called for each unreadable file (default: ignore it).
    """
    transform = build_transform(preprocess)
    model.eval()
    for start in range(0, len(paths), batch_size):
        tensors, kept = [], []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(load_image(path, preprocess, transform))
                kept.append(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if on_skip:
                    on_skip(path, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        if not tensors:
            continue
        probs, idx = topk(model, torch.stack(tensors).to(device), k)
        for path, p_row, i_row in zip(kept, probs.tolist(), idx.tolist()):
            yield {"image": path, "top5": [{"class": classes[i], "prob": p} for p, i in zip(p_row, i_row)]}


def format_plain(result):
    """One block: the path, then one `  0.873  accordion` line per class."""
    return "\n".join([result["image"]] + [f"  {c['prob']:.3f}  {c['class']}" for c in result["top5"]])


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run's best.pth or last.pth")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files and/or folders (walked recursively, image extensions only)")
    p.add_argument("--json", action="store_true",
                   help='print a JSON list: [{"image": path, "top5": [{"class": name, "prob": p}, ...]}, ...]')
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--top", type=int, default=5,
                   help="classes shown per image (default: 5; capped at the number of classes; "
                        "the JSON key stays 'top5')")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1 (got {args.batch_size})")
    if args.top < 1:
        raise SystemExit(f"error: --top must be at least 1 (got {args.top})")
    device = common.pick_device(args.device)
    try:
        model, classes, preprocess = load_model(args.checkpoint)
    except PredictError as e:
        raise SystemExit(f"error: {e}")
    model.to(device)
    paths, problems = find_images(args.images)
    skipped = []

    def skip(path, reason):
        skipped.append(path)
        print(f"skipped {path}: {reason}", file=sys.stderr, flush=True)

    for path, reason in problems:
        skip(path, reason)
    results = []
    for r in predict_paths(model, classes, preprocess, paths, device=device, batch_size=args.batch_size,
                           k=args.top, on_skip=skip):
        results.append(r)
        if not args.json:  # plain blocks stream out as each batch finishes
            print(("\n" if len(results) > 1 else "") + format_plain(r), flush=True)
    if not results:
        raise SystemExit(f"error: no image could be predicted ({len(paths)} found, {len(skipped)} skipped)")
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
