"""The training loop: one epoch of training, one evaluation, their metrics, the schedule and
the rule that picks the best epoch. Plain functions that take what they use and return dicts."""
import copy
import math
import time
import traceback

import torch

from .hardware import autocast
from .processes import all_reduce
from . import hardware, nets, processes
from .nets import set_train_mode


class NonFiniteLoss(RuntimeError):
    pass


def top5_correct(logits, y):
    """Images whose class is among the 5 highest logits; None with fewer than 5 classes (it would
    be every image, and mean nothing)."""
    if logits.shape[1] < 5:
        return None
    return logits.topk(5, dim=1).indices.eq(y[:, None]).any(dim=1).sum()


def train_one_epoch(model, loader, optimizer, scheduler, criterion, device, dtype, *, epoch, scaler=None,
                    clip=1.0, show_bar=True, bn_stats="train", batch_step=None, describe=processes.error_line):
    """One pass over the loader (images, or cached outputs of a frozen part).
    batch_step: (x, y) -> (x, target) on each batch (augment.batch_augment: auto-augment, erasing, MixUp/CutMix,
    whose targets are class probabilities; top-1 then counts the dominant class).
    Under torchrun, a rank whose batch or forward fails (out of memory, a one-line error) goes on in
    the others' collectives to the next read-back, where every rank raises RanksFailed with its
    line (describe: exception -> line). -> {loss, top1, images, seconds}, summed over processes."""
    from tqdm import tqdm

    set_train_mode(model, bn_stats)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start, step_losses, done, phase = 0, time.perf_counter(), [], 0, "batch"
    # disable=None: no bar when stderr is not a terminal (logs, CI), only the per-epoch line
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None if show_bar else True,
               dynamic_ncols=True)
    try:
        for step, (x, y) in enumerate(bar, 1):
            if x.ndim == 4:
                x = x.to(memory_format=torch.channels_last)
            target = y
            if batch_step is not None:
                x, target = batch_step(x, y)
                y = target.argmax(1) if target.ndim == 2 else target
            phase = "forward"  # from here on, DDP's collectives before the forward have run
            with autocast(device, dtype):
                logits = model(x)
                loss = criterion(logits.float(), target)
            phase = "step"  # a failure from here on leaves the gradient all-reduce half done: one_fails_all
            backward_and_step(loss, optimizer, params, scaler, clip)
            scheduler.step()
            step_losses.append(loss.detach())
            loss_sum += loss.detach().double() * y.shape[0]
            correct += logits.argmax(1).eq(y).sum()
            seen += y.shape[0]
            if reads_back(step, len(loader)):
                check_finite(step_losses, epoch, step - len(step_losses) + 1)
                step_losses = []
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            done, phase = step, "batch"
    except (Exception, SystemExit) as e:
        if phase == "step" or not processes.distributed():
            raise
        line = describe(e)
        if not isinstance(e, SystemExit):
            traceback.print_exc()
    else:
        totals = all_reduce(torch.stack([loss_sum, correct.double(), torch.tensor(seen, device=device).double()]))
        n = max(totals[2].item(), 1)
        return {"loss": totals[0].item() / n, "top1": 100 * totals[1].item() / n, "images": int(totals[2].item()),
                "seconds": time.perf_counter() - start}
    fail_with_the_others(model, done + 1, phase == "batch", len(loader), line, device)  # raises RanksFailed


READ_BACK_EVERY = 10  # steps: each read-back waits for the GPU


def reads_back(step, steps):
    """The steps (from 1) at which every rank reads its losses back and the ranks agree."""
    return step % READ_BACK_EVERY == 0 or step == steps


def fail_with_the_others(model, failed, whole, steps, line, device):
    """This rank's step `failed` raised (`whole`: before its forward began): it takes its part in the
    others' collectives, with zero gradients, up to the next read-back, and every rank raises
    RanksFailed there."""
    hardware.free_cached_memory()  # what the failed step held, for the buckets' zeros
    for step in range(failed, steps + 1):
        processes.shadow_step(model, whole=whole or step > failed)
        if reads_back(step, steps):
            break
    check_finite([], 0, 0, failed=line, device=device)


def backward_and_step(loss, optimizer, params, scaler=None, clip=1.0):
    """Backward, gradient clipping at norm `clip`, optimizer step; with an fp16 GradScaler if given
    (it skips the step when a gradient is inf or nan, and lowers its scale)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def check_finite(losses, epoch, first_step, failed=None, device=None):
    """Raise NonFiniteLoss at the first non-finite loss of these steps. Under torchrun the processes
    agree here (every one reads back at the same step): each raises it for the first such step of
    any process, so all stop together and a DDP grid records the trial and goes on; a rank that
    failed (`failed`: its line) makes every rank raise RanksFailed instead."""
    bad = (~torch.isfinite(torch.stack(losses))).nonzero() if losses else []
    first = torch.tensor([-1.0 if failed is not None else float(bad[0]) if len(bad) else math.inf],
                         dtype=torch.float64, device=losses[0].device if losses else device)
    first = all_reduce(first, op="min").item()
    if first < 0:
        processes.raise_together(None, failed)
    if first < math.inf:
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {first_step + int(first)}; stopping "
                            f"(the last good checkpoint stays; try a lower --lr or --precision fp32)")


@torch.no_grad()
def evaluate(model, loader, criterion, device, dtype, num_classes, mistakes=0, tta="none"):
    """-> {loss, top1, top5, mean_class_acc, per_class, confusion, mistakes} over every sample of
    every process. mistakes: how many of the most confident wrong predictions to keep, as
    (sample index, true class, predicted class, probability), most confident first.
    tta: --tta, for batches of images (nets.evaluation_logits); none on cached features."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long) if num_classes >= 5 else None
    wrong = []
    for idx, (x, y) in zip(loader.batch_indices(), loader):
        if x.ndim == 4:
            x = x.to(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = nets.evaluation_logits(model, x, tta)
        loss_sum += criterion(logits, y).double() * y.shape[0]
        if top5 is not None:
            top5 += top5_correct(logits, y)
        confusion.index_put_((y, logits.argmax(1)), torch.ones_like(y), accumulate=True)
        if mistakes:
            wrong += worst_mistakes(logits, y, idx, mistakes)
    all_reduce(confusion)
    totals = all_reduce(torch.stack([loss_sum, top5.double() if top5 is not None else loss_sum * 0]))
    m = metrics_from_confusion(confusion.cpu(), loss_sum=totals[0].item(),
                               top5=None if top5 is None else totals[1].item())
    # every process passes the same `mistakes`, so all or none of them gather
    m["mistakes"] = sorted(processes.gather_lists(wrong), key=lambda t: -t[3])[:mistakes] if mistakes else []
    return m


def worst_mistakes(logits, y, idx, n):
    """The batch's n most confident wrong predictions: [(sample index, true, predicted, probability)]."""
    prob, pred = logits.softmax(1).max(1)
    bad = (pred != y).nonzero().flatten()
    bad = bad[prob[bad].argsort(descending=True)[:n]].cpu()
    return [(int(idx[i]), int(y[i]), int(pred[i]), float(prob[i])) for i in bad]


def metrics_from_confusion(confusion, loss_sum=0.0, top5=None):
    """Rows: true class, columns: predicted. Percentages, like the original table."""
    n = confusion.sum().item()
    per_class_n = confusion.sum(1)
    present = per_class_n > 0
    per_class = torch.where(present, confusion.diag() / per_class_n.clamp(min=1), torch.nan)
    return {"loss": loss_sum / max(n, 1), "top1": 100 * confusion.diag().sum().item() / max(n, 1),
            "top5": None if top5 is None else 100 * top5 / max(n, 1),
            "mean_class_acc": 100 * per_class[present].mean().item() if n else 0.0,
            "per_class": [None if math.isnan(v) else 100 * v for v in per_class.tolist()],
            "images": int(n), "confusion": confusion}


LR_SCHEDULES = ("cosine", "linear")  # --lr-schedule


def lr_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs=1.0, shape="cosine"):
    """Linear warm-up (1 epoch, at most a tenth of the run), then to 0 at the run's last scheduler
    step; stepped every batch. shape: cosine (half a cosine) or linear (a straight line, torch's
    LinearLR from 1 to 0: the budgeted-training schedule of Li, Yumer & Ramanan, ICLR 2020)."""
    if shape not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {shape!r}; choose from {', '.join(LR_SCHEDULES)}")
    total = max(1, steps_per_epoch * epochs)
    warm = max(1, min(int(warmup_epochs * steps_per_epoch), total // 10))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - done if shape == "linear" else 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(samples, num_classes):
    """--class-balance loss: each class's cross-entropy weighted by 1 / its training images (the
    original scripts' weights), scaled so that the weights average 1 over the training images."""
    counts = torch.bincount(torch.tensor([y for _, y in samples]), minlength=num_classes).double()
    return (counts.sum() / ((counts > 0).sum() * counts.clamp(min=1))).float()


def improves(m, best):
    """Checkpoint selection on validation: higher top-1; on a tie, lower loss. Ties are common (on a
    few hundred images top-1 moves in coarse steps and stalls as the cosine schedule ends), and the
    loss tells the tied epochs apart. m: metrics with top1 and loss; best: the same keys (older
    checkpoints lack loss: any tie then counts as no better)."""
    return (m["top1"], -m["loss"]) > (best["top1"], -best.get("loss", -math.inf))


def best_record(vm, epoch):
    """What a checkpoint keeps of its best epoch; vm None (no validation part): every epoch is best."""
    if vm is None:
        return {"top1": float("nan"), "epoch": epoch}
    return {"top1": vm["top1"], "loss": vm["loss"], "epoch": epoch}


class WeightAverage:
    """--ema: an exponential moving average of a network's trained parameters and of the buffers of
    the modules that train (BatchNorm's running statistics), kept on the network's device and
    updated after each optimizer step with one fused lerp: no host copy, no read-back. Frozen
    parameters never change, so they are not averaged. Step for step what torch's AveragedModel
    with get_ema_multi_avg_fn(decay) and use_buffers=True computes (the first step copies)."""

    def __init__(self, model, decay):
        self.module, self.decay, self.steps = copy.deepcopy(model), decay, 0
        trains = {name for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters(False))}
        own = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        pairs = [(own[n], p) for n, p in model.named_parameters() if p.requires_grad]
        pairs += [(own[n], b) for n, b in model.named_buffers() if n.rpartition(".")[0] in trains]
        self.floats = [pair for pair in pairs if pair[1].is_floating_point()]
        self.counts = [pair for pair in pairs if not pair[1].is_floating_point()]  # num_batches_tracked: copied

    @torch.no_grad()
    def update(self):
        """After an optimizer step (a step the fp16 scaler skips is no step: hook it to the optimizer)."""
        avg, now = [a for a, _ in self.floats], [b for _, b in self.floats]
        if self.steps == 0:
            torch._foreach_copy_(avg, now)
        else:
            torch._foreach_lerp_(avg, now, 1 - self.decay)
        for a, b in self.counts:
            a.copy_(b)
        self.steps += 1
