"""The frozen part runs once: one mechanism for --cache-frozen, --unfreeze head and the probe.

When a leading part of the network trains nothing and computes the same in training as in
evaluation, its output for an image never changes while training sees the evaluation framing.
It is computed once per image, kept in memory (and, for the small features before the head, on
disk), and the loop trains the rest of the network on it, in the loader's own batch order.
Two cuts: the longest deterministic frozen prefix (--cache-frozen auto), and everything before
the final Linear, in evaluation mode (--unfreeze head and the linear probe).
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.ops import StochasticDepth

from .hardware import autocast
from .nets import forward_sequence, make_preprocess, preprocess_dict, set_train_mode
from .pipeline import to_device
from .records import FolderLock, load_checkpoint, save_checkpoint


@dataclass
class Frozen:
    """A network cut in two: its frozen part ran once per image; `rest` trains on those outputs.
    batches: split name -> CachedBatches (None for an empty split)."""
    rest: nn.Module
    batches: dict


def deterministic_frozen(module):
    """True when the module trains nothing and computes the same in training as in evaluation, under
    set_train_mode: no trained parameter, every BatchNorm in eval mode, no dropout or stochastic depth."""
    if any(p.requires_grad for p in module.parameters()):
        return False
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return False
        if isinstance(m, (nn.modules.dropout._DropoutNd, StochasticDepth)) and m.p > 0:
            return False
    return True


def split_frozen_prefix(model, bn_stats):
    """-> (prefix, rest): nn.Sequentials sharing the model's modules; prefix is the longest run of
    leading feature modules that deterministic_frozen holds for (empty when there is none)."""
    seq = forward_sequence(model)
    n_features = len(seq) - 3  # then pooling, flatten, head
    set_train_mode(model, bn_stats)
    k = 0
    while k < n_features and deterministic_frozen(seq[k]):
        k += 1
    model.eval()
    return nn.Sequential(*seq[:k]), nn.Sequential(*seq[k:])


def cut_head(seq):
    """Modules in forward order -> (everything before the final Linear, that Linear). EfficientNet's
    classifier is Dropout then Linear: its dropout goes with the first part (a no-op in evaluation)."""
    last = seq[-1]
    if isinstance(last, nn.Sequential):
        return nn.Sequential(*seq[:-1], *last[:-1]), last[-1]
    return nn.Sequential(*seq[:-1]), last


def part_name(model, part):
    names = {id(m): name for name, m in model.named_modules()}
    first, last = names.get(id(part[0]), "?"), names.get(id(part[-1]), "?")
    return first if len(part) == 1 else f"{first} to {last}"


@torch.no_grad()
def outputs_of(part, batches, n, device, dtype, as_float=False):
    """part's outputs for every batch, in order, into one tensor allocated once (no concatenation,
    so the peak is the outputs themselves), and the labels."""
    part.eval()
    out, labels, i = None, torch.empty(n, dtype=torch.long, device=device), 0
    for x, y in batches:
        if x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        with autocast(device, dtype):
            o = part(x)
        if as_float:
            o = o.float()
        if out is None:
            out = torch.empty((n, *o.shape[1:]), dtype=o.dtype, device=o.device)
        out[i:i + len(o)] = o
        labels[i:i + len(o)] = y
        i += len(o)
    if i != n:
        raise ValueError(f"{i} outputs for {n} samples")
    return out, labels


def output_bytes(part, side, n, device, dtype):
    """Bytes the part's outputs for n images of side x side px take (one blank image measures it)."""
    with torch.no_grad(), autocast(device, dtype):
        one = part.eval()(torch.zeros(1, 3, side, side, device=device))
    return n * one.numel() * one.element_size(), one


class CachedBatches:
    """A pipeline.Loader's batches, same order and labels, with cached outputs in place of the
    images (outputs[i] belongs to loader.samples[i])."""

    def __init__(self, loader, outputs):
        if len(outputs) != len(loader.samples):
            raise ValueError(f"{len(outputs)} cached outputs for {len(loader.samples)} samples")
        self.loader, self.outputs = loader, outputs
        self.labels = loader.labels.to(outputs.device)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def batch_indices(self):
        return self.loader.batch_indices()

    def __iter__(self):
        for idx in self.loader.batch_indices():
            i = to_device(idx, self.outputs.device)   # pinned, non_blocking: no stream sync per batch
            yield self.outputs[i], self.labels[i]


def weights_digest(part):
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, bytes): what its outputs
    depend on whatever made them (--weights, the seed of random weights, a resumed checkpoint)."""
    h = hashlib.sha256()
    for name, t in sorted(part.state_dict().items()):
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def features_path(config, split, samples, dtype, digest, device):
    """Where the features before the head of one split are kept: keyed by everything that decides
    them: the backbone's weights (digest: weights_digest), the preprocessing, the precision, the device type,
    the torch and torchvision versions and every file's path, label, size and mtime."""
    import torchvision

    pre = preprocess_dict(make_preprocess(config["arch"], config["img_size"], config["crop_mode"]))
    files = [(s[0], s[1], os.path.getsize(s[0]), os.path.getmtime(s[0])) for s in samples]
    key = hashlib.sha256(json.dumps([config["arch"], digest, pre, str(dtype),
                                     torch.device(device).type, torch.__version__, torchvision.__version__, files],
                                    default=str).encode())
    cache = Path(config["cache_dir"] or Path(config["data"]) / ".cache")
    return cache / f"features-{config['arch']}-{split}-{key.hexdigest()[:16]}.pt"


def features_before_head(part, split, batches, n, device, dtype, path):
    """(features, labels) of one split before the head, from `path` when it holds them, else
    computed and kept there (by the first of the processes side by side that ask; the others wait
    for it and read them)."""
    with FolderLock(path.parent, f".{path.name}.lock", wait=True):
        if path.is_file():
            obj = load_checkpoint(path)
            return obj["features"].to(device), obj["labels"].to(device)
        t = time.perf_counter()
        f, y = outputs_of(part, batches, n, device, dtype, as_float=True)
        save_checkpoint(path, {"features": f.cpu(), "labels": y.cpu()})
    print(f"{split}: features of {n} images computed in {time.perf_counter() - t:.1f} s (cached in {path})",
          flush=True)
    return f, y


def frozen_prefix(model, bn_stats, sources, served, side, device, dtype, budget):
    """--cache-frozen auto: -> Frozen for the longest deterministic frozen prefix, or None.

    sources: split -> an evaluation-order loader of that split's images (the training images in
    the evaluation framing, which is what --augment none trains on); served: split -> the loader
    whose batch order training and evaluation follow. The outputs are counted in `budget`.
    """
    prefix, rest = split_frozen_prefix(model, bn_stats)
    if not len(prefix):
        return None
    n = sum(len(s.samples) for s in sources.values() if s is not None)
    need, one = output_bytes(prefix, side, n, device, dtype)
    what = part_name(model, prefix)
    if not budget.reserve("frozen outputs", need):
        print(f"frozen {what}: outputs of {n} images would take {need / 2**20:.0f} MiB, over the memory "
              f"budget (a quarter of the memory, less what is already resident); running them every step",
              flush=True)
        return None
    t = time.perf_counter()
    batches = {split: None if src is None else
               CachedBatches(served[split], outputs_of(prefix, src, len(src.samples), device, dtype)[0])
               for split, src in sources.items()}
    print(f"frozen {what}: outputs of {n} images ({'x'.join(map(str, one.shape[1:]))}, "
          f"{str(one.dtype).replace('torch.', '')}, {need / 2**20:.0f} MiB) computed once in "
          f"{time.perf_counter() - t:.1f} s; training runs the rest on them", flush=True)
    return Frozen(rest=rest, batches=batches)


def head_features(model, config, sources, served, device, dtype, budget, frozen=None):
    """-> Frozen cut before the head: the head trains on the backbone's features, computed once
    per split and kept on disk. With a Frozen prefix, only the rest of the backbone runs, on the
    prefix's cached outputs. sources, served: as frozen_prefix."""
    backbone, head = cut_head(forward_sequence(model))
    body = cut_head(list(frozen.rest))[0] if frozen is not None else backbone
    batches, digest = {}, weights_digest(backbone)
    for split, src in sources.items():
        if src is None:
            batches[split] = None
            continue
        inputs = CachedBatches(src, frozen.batches[split].outputs) if frozen is not None else src
        path = features_path(config, split, src.samples, dtype, digest, device)
        f, _ = features_before_head(body, split, inputs, len(src.samples), device, dtype, path)
        budget.hold("features", f.numel() * f.element_size())
        batches[split] = CachedBatches(served[split], f)
    return Frozen(rest=head, batches=batches)
