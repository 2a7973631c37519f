"""The study's figures: matplotlib drawings for report.py and for the end of each run's TensorBoard.

Only this module imports matplotlib, so training pays for it only when a run ends. Every function
takes plain data (lists, numpy arrays, tensors) and returns a matplotlib Figure built without
pyplot (no global figure state, no display: the Agg backend); the report's figures also return the
data they drew, so tests check the series, not pixels. Accuracies are percent, like the tables.
"""
import io
import math
import sys
import textwrap

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # never switch the backend under a notebook that chose one
    matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 100  # PNG pixels per inch: a figure's size in inches x 100 = its size in pixels
PRETRAINED_COLOR, SCRATCH_COLOR, PUBLISHED_COLOR = "#1f77b4", "#d62728", "black"
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


# --------------------------------------------------------------------------------------------
# Output: PNG / SVG bytes.
# --------------------------------------------------------------------------------------------
def inches(x):
    """Figure sizes in quarter inches: exact in binary, so the PNG is exactly inches x DPI pixels."""
    return round(4 * x) / 4


def png_bytes(fig, dpi=DPI):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def svg_bytes(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Confusion matrix: the figure, the most-confused pairs, the per-class table.
# --------------------------------------------------------------------------------------------
def as_matrix(confusion, classes):
    """C x C counts (list of lists, numpy array or tensor) -> int64 numpy array; checks the shape."""
    if hasattr(confusion, "detach"):
        confusion = confusion.detach().cpu().numpy()
    m = np.asarray(confusion, dtype=np.int64)
    if m.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix of shape {m.shape} for {len(classes)} classes")
    return m


def row_shares(m):
    """Each row divided by its sum: the share of a true class's images given to each prediction;
    a class with no test image gives a row of NaN (drawn blank)."""
    totals = m.sum(1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, m / np.where(totals > 0, totals, 1), np.nan)


def most_confused(confusion, classes, n=20):
    """The n largest off-diagonal cells -> [(true class, predicted class, count, percent of the true
    class's test images)], most images first (ties: larger share, then class order)."""
    m = as_matrix(confusion, classes)
    totals = m.sum(1)
    cells = [(int(m[t, p]), t, p) for t in range(len(classes)) for p in range(len(classes))
             if t != p and m[t, p] > 0]
    cells.sort(key=lambda c: (-c[0], -c[0] / totals[c[1]], c[1], c[2]))
    return [(classes[t], classes[p], count, 100.0 * count / totals[t]) for count, t, p in cells[:n]]


def markdown_table(columns, rows):
    """Lines of a markdown table: the header, the rule, a line per row of cells ('|' in a cell becomes '/')."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in rows]


def confused_pairs_markdown(pairs):
    return "\n".join(markdown_table(("true class", "predicted as", "test images", "share of the true class %"),
                                    [(t, p, c, f"{s:.1f}") for t, p, c, s in pairs]))


def per_class_markdown(classes, per_class_pct):
    """Markdown table of per-class test accuracy (percent), worst first; None (no test image) is
    written '-' and goes last. per_class_pct: a list in class order, or {class: percent}."""
    if isinstance(per_class_pct, dict):
        per_class_pct = [per_class_pct.get(c) for c in classes]
    order = sorted(range(len(classes)), key=lambda i: (per_class_pct[i] is None, per_class_pct[i] or 0.0, i))
    rows = [(classes[i], "-" if per_class_pct[i] is None else f"{per_class_pct[i]:.1f}") for i in order]
    return "\n".join(markdown_table(("class", "test accuracy %"), rows))


def confusion_figure(confusion, classes, title=None):
    """A confusion matrix that reads at 101 classes: rows are true classes, normalised to shares of
    their test images; class names on both axes; colour bar. The side grows with the class count
    (0.15 in per class, class names at 7 pt from 40 classes on). Zero cells stay white, and the
    colour scale is a square root, so the rare confusions show beside the bright diagonal; below 26
    classes every non-zero cell also carries its percentage."""
    m = as_matrix(confusion, classes)
    c = len(classes)
    shares = row_shares(m)
    cell = 0.15 if c >= 40 else min(0.6, 8.0 / max(c, 1))  # inches per class
    font = 7 if c >= 40 else 9
    label = 0.06 * max((len(s) for s in classes), default=1) * font / 7 + 0.5  # room for the longest name
    side = c * cell
    fig = Figure(figsize=(inches(side + label + 1.5), inches(side + label + (0.6 if c >= 40 else 0.9))), dpi=DPI)
    left, bottom = label / fig.get_figwidth(), label / fig.get_figheight()
    ax = fig.add_axes((left, bottom, side / fig.get_figwidth(), side / fig.get_figheight()))
    cax = fig.add_axes((left + (side + 0.2) / fig.get_figwidth(), bottom, 0.18 / fig.get_figwidth(),
                        side / fig.get_figheight()))
    shown = np.ma.masked_where(~(shares > 0), shares)  # zero and NaN cells: white
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="white")
    im = ax.imshow(shown, cmap=cmap, norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest", aspect="equal")
    ax.set_xticks(range(c), labels=classes, rotation=90, fontsize=font)
    ax.set_yticks(range(c), labels=classes, fontsize=font)
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("predicted class", fontsize=font + 3)
    ax.set_ylabel("true class", fontsize=font + 3)
    ax.set_xticks(np.arange(-0.5, c, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, c, 1), minor=True)
    ax.grid(which="minor", color="#eeeeee", linewidth=0.3)
    ax.tick_params(which="minor", length=0)
    if c <= 25:
        for t in range(c):
            for p in range(c):
                if m[t, p]:
                    ax.text(p, t, f"{100 * shares[t, p]:.0f}", ha="center", va="center", fontsize=font - 1,
                            color="white" if shares[t, p] > 0.25 else "black")  # dark half of the scale
    bar = fig.colorbar(im, cax=cax)
    bar.set_label("share of the true class's test images" if side >= 4 else "share of the true\nclass's test images",
                  fontsize=font + 2)
    bar.ax.tick_params(labelsize=font + 1)
    n = int(m.sum())
    title = title or (f"Test confusion matrix: {c} classes, {n} images; rows sum to 1 "
                      f"({100 * np.trace(m) / max(n, 1):.2f}% on the diagonal)")
    chars = int(fig.get_figwidth() * 72 / (0.55 * (font + 4)) * 0.9)  # characters that fit across the figure
    ax.set_title("\n".join(textwrap.wrap(title, chars)), fontsize=font + 4, loc="left")
    return fig


# --------------------------------------------------------------------------------------------
# The worst test mistakes, as the images were evaluated.
# --------------------------------------------------------------------------------------------
def worst_mistakes(true_idx, pred_idx, probs, n=32):
    """Positions of the misclassified images, the most confident mistake first (ties: position) ->
    at most n of them. probs: the probability the model gave its (wrong) prediction."""
    wrong = [i for i, (t, p) in enumerate(zip(true_idx, pred_idx)) if int(t) != int(p)]
    return sorted(wrong, key=lambda i: (-float(probs[i]), i))[:n]


def mistakes_figure(images, true_idx, pred_idx, probs, classes, n=32):
    """A grid of up to n misclassified images (H x W x 3 uint8 arrays, as evaluated), the most
    confident mistakes first, each titled with its true class and the predicted class with its
    probability. Correct predictions are never shown; with no mistake at all -> None."""
    chosen = worst_mistakes(true_idx, pred_idx, probs, n)
    if not chosen:
        return None
    cols = min(8, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(1.75 * cols, 2.0 * rows + 0.5), dpi=DPI)
    fig.suptitle(f"Test mistakes, most confident first ({len(chosen)} shown)", fontsize=10)
    grid = fig.add_gridspec(rows, cols, left=0.01, right=0.99, bottom=0.01, top=1 - 0.5 / (2.0 * rows + 0.5),
                            hspace=0.5, wspace=0.08)
    for k, i in enumerate(chosen):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        ax.imshow(np.asarray(images[i]), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        t, p = classes[int(true_idx[i])], classes[int(pred_idx[i])]
        ax.set_title(f"true: {short(t)}\npred: {short(p)} {100 * float(probs[i]):.0f}%", fontsize=7, color="#b00000")
    return fig


def short(name, width=20):
    return name if len(name) <= width else name[:width - 1] + "…"


# --------------------------------------------------------------------------------------------
# report.py: curves, summary, grid. Each returns (Figure, the data it drew).
# --------------------------------------------------------------------------------------------
def curves_figure(runs, title=""):
    """Validation top-1 and train/validation loss per epoch, one colour per run.

    runs: [{"label": recipe words, "scalars": {tag: [(epoch, value), ...]}}], tags Accuracy/val,
    Loss/train, Loss/val. -> (fig, {"runs": [{"label", "val_top1", "train_loss", "val_loss"}]}),
    each series a list of (epoch, value) as drawn."""
    fig = Figure(figsize=(11, 4.75 + 0.25 * len(runs)), dpi=DPI)
    acc_ax, loss_ax = fig.subplots(1, 2)
    drawn = []
    for k, run in enumerate(runs):
        color = RUN_COLORS[k % len(RUN_COLORS)]
        s = run["scalars"]
        d = {"label": run["label"], "val_top1": list(s.get("Accuracy/val", [])),
             "train_loss": list(s.get("Loss/train", [])), "val_loss": list(s.get("Loss/val", []))}
        if d["val_top1"]:
            acc_ax.plot(*zip(*d["val_top1"]), color=color, marker="o", markersize=3, label=run["label"])
        if d["train_loss"]:
            loss_ax.plot(*zip(*d["train_loss"]), color=color, linestyle="--", marker=".", markersize=3)
        if d["val_loss"]:
            loss_ax.plot(*zip(*d["val_loss"]), color=color, marker="o", markersize=3)
        drawn.append(d)
    acc_ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="validation top-1")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy (label-smoothed)", title="loss: training --, validation —")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=RUN_COLORS[k % len(RUN_COLORS)], marker="o", markersize=3,
                                       label=run["label"]) for k, run in enumerate(runs)]
    fig.legend(handles=handles, loc="lower center", ncols=1, fontsize=9, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, 130)), fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.84, bottom=0.14 + 0.055 * len(runs), wspace=0.22)
    return fig, {"runs": drawn}


def summary_figure(networks, caption=""):
    """Test top-1 and mean per-class accuracy per network, pretrained beside random init, the
    original study's published top-1 marked as a black bar-wide line.

    networks: [{"name", "pretrained": {"top1", "mean_class"} or None, "scratch": the same or None,
    "published": {"pretrained": pct, "scratch": pct} (either may be absent)}]. A missing run has no
    bar (nothing is drawn at 0). -> (fig, {"top1": {name: {"pretrained": v, "random init": v}},
    "mean_class": the same, "published": {name: {...}}}) with only the bars drawn."""
    width_in = max(8.0, 2.0 * len(networks) + 4)
    fig = Figure(figsize=(width_in, 5.5), dpi=DPI)
    axes = fig.subplots(1, 2, sharey=True)
    data = {"top1": {}, "mean_class": {}, "published": {}}
    width = 0.38
    sides = (("pretrained", "pretrained", -width / 2, PRETRAINED_COLOR),
             ("scratch", "random init", width / 2, SCRATCH_COLOR))
    for ax, key, name in ((axes[0], "top1", "test top-1 (%)"), (axes[1], "mean_class", "test mean per-class (%)")):
        for x, net in enumerate(networks):
            bars = data[key].setdefault(net["name"], {})
            for side, words, offset, color in sides:
                run = net.get(side)
                v = run.get(key) if run else None
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    continue
                ax.bar(x + offset, v, width, color=color)
                inside = v > 8  # the value inside the bar's top, clear of the published line above it
                ax.text(x + offset, v - 1.5 if inside else v + 1, f"{v:.1f}", ha="center", fontsize=8,
                        va="top" if inside else "bottom", color="white" if inside else "black")
                bars[words] = v
                if key == "top1" and side in net.get("published", {}):
                    p = net["published"][side]
                    ax.hlines(p, x + offset - width / 2, x + offset + width / 2, color=PUBLISHED_COLOR, linewidth=2.5)
                    ax.text(x + offset + width / 2, p, f" {p:.2f}", va="center", fontsize=7)
                    data["published"].setdefault(net["name"], {})[words] = p
        ax.set_xticks(range(len(networks)), labels=[n["name"] for n in networks], rotation=15, fontsize=9)
        ax.set_xlim(-0.7, len(networks) - 0.3)
        ax.set_ylim(0, 109)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("percent of test images")
    handles = [Rectangle((0, 0), 1, 1, color=PRETRAINED_COLOR, label="pretrained (ImageNet)"),
               Rectangle((0, 0), 1, 1, color=SCRATCH_COLOR, label="random init")]
    if data["published"]:
        handles.append(Line2D([], [], color=PUBLISHED_COLOR, linewidth=2.5,
                              label="original study (chosen on its test split)"))
    fig.legend(handles=handles, loc="upper center", ncols=3, fontsize=9, frameon=False)
    text = "\n".join(textwrap.wrap(caption, int(width_in * 15)))
    fig.text(0.01, 0.015, text, fontsize=8, va="bottom")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.18 + 0.03 * text.count("\n"), wspace=0.06)
    return fig, data


def fmt_value(v):
    """A hyper-parameter value as papers write it: 3e-4, 1e-5, 0.01, 64, last:1."""
    if isinstance(v, float) and v != 0 and abs(v) < 0.01:
        mantissa, exponent = f"{v:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def sort_values(values):
    """Axis order of a hyper-parameter's values: numbers by size, anything else by text."""
    values = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def grid_figure(trials, keys, title=""):
    """Validation top-1 of a grid's trials against one or two hyper-parameters, the winner boxed.

    trials: [{"values": {key: value}, "val_top1": pct, "winner": bool, "status": str}]; status "done"
    or as the grid wrote it ("cut at epoch 2"), printed under a cell's score when its best trial is
    not done. Two keys: a heat map, rows keys[0], columns keys[1]; a cell holds the best trial of
    that pair (other varied options collapsed, the title says which). One key: bars.
    -> (fig, {"keys", "rows", "cols", "cells": rows x cols of pct or None, "status": rows x cols of
    str or None, "winner": (row, col)})."""
    rows = sort_values(t["values"][keys[0]] for t in trials)
    cols = sort_values(t["values"][keys[1]] for t in trials) if len(keys) > 1 else [None]
    cells = [[None] * len(cols) for _ in rows]
    status = [[None] * len(cols) for _ in rows]
    winner = None
    for t in trials:
        r = rows.index(t["values"][keys[0]])
        c = cols.index(t["values"][keys[1]]) if len(keys) > 1 else 0
        v = t["val_top1"]
        if v is not None and (cells[r][c] is None or v > cells[r][c]):
            cells[r][c] = v
            status[r][c] = t.get("status", "done")
        if t.get("winner"):
            winner = (r, c)
    labels = [["-" if v is None else f"{v:.2f}" + ("" if st in (None, "done") else f"\n{st}") for v, st in zip(vs, sts)]
              for vs, sts in zip(cells, status)]
    fig = Figure(figsize=(inches(max(5.5, 1.1 * len(cols) + 3.5)), inches(max(3.75, 0.6 * len(rows) + 2.4))),
                 dpi=DPI)
    ax = fig.add_subplot()
    if len(keys) > 1:
        a = np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(a), cmap=matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd"),
                       aspect="auto")
        for r in range(len(rows)):
            for c in range(len(cols)):
                v = cells[r][c]
                ax.text(c, r, labels[r][c], ha="center", va="center", fontsize=9,
                        color="black" if v is None or v >= np.nanmean(a) else "white")
        if winner:
            ax.add_patch(Rectangle((winner[1] - 0.5, winner[0] - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=3))
            ax.set_title("red box: the winner (best validation top-1)", fontsize=8, loc="right")
        ax.set_xticks(range(len(cols)), labels=[fmt_value(v) for v in cols])
        ax.set_yticks(range(len(rows)), labels=[fmt_value(v) for v in rows])
        ax.set(xlabel=keys[1], ylabel=keys[0])
        fig.colorbar(im, ax=ax, label="validation top-1 (%)")
    else:
        heights = [np.nan if row[0] is None else row[0] for row in cells]
        colors = ["red" if winner and winner[0] == r else PRETRAINED_COLOR for r in range(len(rows))]
        ax.bar(range(len(rows)), heights, color=colors)
        for r, h in enumerate(heights):
            ax.text(r, 0 if math.isnan(h) else h, labels[r][0], ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), labels=[fmt_value(v) for v in rows])
        ax.set(xlabel=keys[0], ylabel="validation top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("winner in red", fontsize=8, loc="right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, {"keys": list(keys), "rows": rows, "cols": cols if len(keys) > 1 else [], "cells": cells,
                 "status": status, "winner": winner}
