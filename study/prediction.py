"""predict.py's machinery: a checkpoint -> the network, its classes and its evaluation preprocessing;
images -> top-k classes and, with --explain, Grad-CAM heat maps."""
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from . import nets, pipeline, records
from .data import is_image_name
from .decode_cache import evaluation_frame

PREPROCESS_KEYS = ("crop", "resize", "mean", "std", "interpolation")


class PredictError(ValueError):
    """A checkpoint or an input this tool cannot use; the message is one line for the user."""


# --------------------------------------------------------------------------------------------
# Checkpoint -> network in eval mode, class names, preprocessing.
# --------------------------------------------------------------------------------------------
def load_model(path):
    """best.pth / last.pth -> (model in eval mode on the CPU, class names, preprocess dict). The
    preprocess dict also holds the run's --tta ("tta"; none for checkpoints without a config)."""
    try:
        ckpt = records.load_checkpoint(path, records.EVALUATE_KEYS)
    except records.CheckpointError as e:
        raise PredictError(f"checkpoint {e}") from None
    arch, classes = ckpt["arch"], list(ckpt["classes"])
    if arch not in nets.ARCHS:
        raise PredictError(f"checkpoint {path}: unknown architecture {arch!r}; valid: {', '.join(nets.ARCHS)}")
    preprocess = check_preprocess(ckpt["preprocess"], path)
    tta = (ckpt.get("config") or {}).get("tta") or "none"  # runs made before --tta: none
    if tta not in nets.TTAS:
        raise PredictError(f"checkpoint {path}: unknown tta {tta!r}; valid: {', '.join(nets.TTAS)}")
    preprocess["tta"] = tta
    model = nets.build_model(arch, len(classes), "none")
    try:
        model.load_state_dict(records.plain_state_dict(ckpt["model"]))
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
    """The evaluation framing (nets.evaluation_frame), scaled to [0, 1] and normalised."""
    return transforms.Compose([lambda img: evaluation_frame(img, preprocess), transforms.ToTensor(),
                               transforms.Normalize(preprocess["mean"], preprocess["std"])])


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
            paths += sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_name(f.name))
        elif p.is_file():
            paths.append(str(p))
        else:
            problems.append((str(p), "no such file or folder"))
    return paths, problems


# --------------------------------------------------------------------------------------------
# Prediction: batches of images -> top-k (class, probability), most probable first.
# --------------------------------------------------------------------------------------------
def grad_cam(model, batch, target):
    """Grad-CAM (Selvaraju et al., 2017) on the last backbone stage: where the network looked for
    class target[i] in image i. -> [n, H, W] maps in [0, 1] at the input's size."""
    layer = nets.forward_sequence(model)[-4]  # the last stage, before pooling, flatten and the head
    seen = {}
    hook = layer.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    try:
        with torch.enable_grad():
            logits = model(batch)
            a = seen["a"]
            (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    finally:
        hook.remove()
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))  # channels weighted by mean gradient
    cam = F.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax((1, 2), keepdim=True).clamp(min=1e-12)).detach()


def save_overlay(path, image, cam, preprocess):
    """The image as the network saw it (de-normalised), with the heat map blended over it, as PNG."""
    from matplotlib import colormaps  # only with --explain

    mean, std = torch.tensor(preprocess["mean"])[:, None, None], torch.tensor(preprocess["std"])[:, None, None]
    rgb = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    heat = colormaps["jet"](cam.cpu().numpy())[..., :3]
    Image.fromarray((255 * (0.55 * rgb + 0.45 * heat)).round().astype("uint8")).save(path)


def explain_path(out_dir, image_path, taken):
    """out_dir/<image stem>.png, with -2, -3 ... when two images share a stem."""
    stem = Path(image_path).stem
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return Path(out_dir) / name


def predict_paths(model, classes, preprocess, paths, *, device, batch_size=32, k=5, on_skip=None, explain=None):
    """Yield {"image": path, "top5": [{"class": name, "prob": p}, ...]} per readable image, in order.

    Images are decoded one batch at a time, so memory stays bounded on a large folder.
    on_skip(path, reason) is called for each unreadable file (default: ignore it).
    explain: a folder: also a Grad-CAM map of the top class per image, saved there as PNG (its
    path under the result's "gradcam").
    """
    transform = build_transform(preprocess)
    model.eval()
    taken = set()
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
        batch = torch.stack(tensors).to(device)
        with torch.no_grad():  # under tta flip, averaged with the mirror's, as the run's evaluation
            probs = torch.softmax(nets.evaluation_logits(model, batch, preprocess.get("tta", "none")), dim=1)
        probs, idx = probs.topk(min(k, probs.shape[1]), dim=1)
        cams = grad_cam(model, batch, idx[:, 0]) if explain else None
        for n, (path, p_row, i_row) in enumerate(zip(kept, probs.tolist(), idx.tolist())):
            result = {"image": path, "top5": [{"class": classes[i], "prob": p} for p, i in zip(p_row, i_row)]}
            if explain:
                out = explain_path(explain, path, taken)
                save_overlay(out, batch[n], cams[n], preprocess)
                result["gradcam"] = str(out)
            yield result


def format_plain(result):
    """One block: the path, then one `  0.873  accordion` line per class."""
    return "\n".join([result["image"]] + [f"  {c['prob']:.3f}  {c['class']}" for c in result["top5"]])
