"""results.md and its figures: per setting the table, the figures and the most-confused pairs; the grids.

Each figure is written under RUNS_DIR/figures/ (the main setting; other settings in a sub-folder
each), or left out with one line saying why, in results.md and printed.
"""
import re
import textwrap
from pathlib import Path

from . import figures
from .records import atomic_write
from .results import (CURVE_TAGS, DISPLAY_NAMES, arch_order, confusion_of, find_grids, group_settings, option_value,
                      read_scalars, scored_trials, table_rows, varied_keys)
from .tables import describe_setting, grid_table, model_name, recipe, render, setting_slug

# The original study's table: test top-1, percent; its checkpoints and recipes were chosen on that test split.
PUBLISHED = {"resnet18": {"pretrained": 91.81, "scratch": 69.44}, "resnet50": {"pretrained": 93.56},
             "resnet101": {"pretrained": 94.18}, "efficientnet_b4": {"pretrained": 97.57}}
FIGURE_NAME = re.compile(r"^(curves-.+|summary|grid-.+|confusion-.+)\.(png|svg)$")


# --------------------------------------------------------------------------------------------
# Drawing: each figure written, or left out with its reason.
# --------------------------------------------------------------------------------------------
class Figures:
    """Collects what was drawn ({file name: data}) and what was left out (lines), and writes files."""

    def __init__(self, runs_dir):
        self.runs_dir, self.root = runs_dir, runs_dir / "figures"
        self.drawn, self.left_out, self.written = {}, [], []

    def save(self, folder, name, fig, data, svg=False):
        folder.mkdir(parents=True, exist_ok=True)
        outputs = [(f"{name}.png", figures.png_bytes(fig))] + ([(f"{name}.svg", figures.svg_bytes(fig))] if svg else [])
        for file_name, blob in outputs:
            atomic_write(folder / file_name, lambda f, b=blob: f.write(b))
            self.written.append(folder / file_name)
        rel = (folder / f"{name}.png").relative_to(self.runs_dir).as_posix()
        w, h = fig.get_size_inches()
        self.drawn[rel] = dict(data, size_px=(round(w * figures.DPI), round(h * figures.DPI)))
        return rel

    def leave_out(self, folder, name, why):
        rel = (folder / f"{name}.png").relative_to(self.runs_dir).as_posix()
        self.left_out.append(f"left out {rel}: {why}")
        return self.left_out[-1]

    def remove_stale(self):
        """Figures of an earlier report that this one did not draw again (a run no longer in a table)."""
        if not self.root.is_dir():
            return
        keep = set(self.written)
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and FIGURE_NAME.match(p.name) and p not in keep:
                p.unlink()
        for d in sorted((p for p in self.root.iterdir() if p.is_dir()), reverse=True):
            if not any(d.iterdir()):  # the folder of a setting that has no run any more
                d.rmdir()


def draw_curves(figs, folder, setting, chosen):
    """curves-<arch>.png per architecture of a table: its pretrained and random-init rows."""
    lines = []
    for arch in sorted({r["arch"] for r in chosen}, key=arch_order):
        name = f"curves-{arch}"
        runs = []
        for row in (r for r in chosen if r["arch"] == arch):
            scalars = read_scalars(row["dir"])
            if not any(scalars.get(t) for t in CURVE_TAGS):
                lines.append(f"{name}.png: {row['run']} has no per-epoch scalars in its event files; drawn without it")
                continue
            runs.append({"label": recipe(row), "scalars": scalars, "run": row["run"]})
        if not runs:
            lines.append(figs.leave_out(folder, name, "no run of this network has per-epoch TensorBoard scalars"))
            continue
        if not any(r["scratch"] for r in chosen if r["arch"] == arch):
            lines.append(f"{name}.png: no random-init run of {DISPLAY_NAMES.get(arch, arch)} in this setting "
                         f"(--weights none or --compare): the pretrained run alone")
        title = (f"{DISPLAY_NAMES.get(arch, arch)}: pretrained against random initialisation, per epoch "
                 f"({describe_setting(setting, chosen).replace('`', '')})")
        fig, data = figures.curves_figure(runs, title=title)
        data["title"] = title
        for d, r in zip(data["runs"], runs):
            d["run"] = r["run"]
        figs.save(folder, name, fig, data, svg=True)
    return lines


def draw_summary(figs, folder, setting, chosen):
    networks, lines = [], []
    archs = sorted({r["arch"] for r in chosen}, key=arch_order)
    for arch in archs:
        net = {"name": DISPLAY_NAMES.get(arch, arch), "published": PUBLISHED.get(arch, {})}
        for side, scratch in (("pretrained", False), ("scratch", True)):
            row = next((r for r in chosen if r["arch"] == arch and r["scratch"] == scratch), None)
            net[side] = row and {"top1": row["test_top1"], "mean_class": row["mean_class"], "run": row["run"]}
        networks.append(net)
    if not any(n["scratch"] for n in networks):
        lines.append("summary.png: no random-init run in this setting (--weights none or --compare): "
                     "its bars are left out")
    else:
        lines += [f"summary.png: no random-init run of {n['name']} in this setting: its bar is left out"
                  for n in networks if not n["scratch"]]
    lines += [f"summary.png: no pretrained run of {n['name']} in this setting: its bar is left out"
              for n in networks if not n["pretrained"]]
    caption = ("Ours: per network the run with the best validation top-1 (recipe and checkpoint chosen on a "
               "validation part carved from train/; the test split seen once, at the end). Black lines: the "
               "original study's published top-1, whose checkpoints and hyper-parameters were chosen on its test "
               f"split. Setting: {describe_setting(setting, chosen).replace('`', '')}.")
    fig, data = figures.summary_figure(networks, caption=caption)
    data["caption"] = caption
    figs.save(folder, "summary", fig, data, svg=True)
    return lines


def draw_confusions(figs, folder, chosen):
    """confusion-<run>.png per table row; -> markdown of the most-confused pairs, and lines."""
    parts, lines = [], []
    for row in chosen:
        name = "confusion-" + re.sub(r"[^A-Za-z0-9.+=-]", "_", row["run"])
        confusion, classes = confusion_of(row)
        head = f"**{model_name(row)}** (`{row['run']}`)"
        if confusion is None:
            lines.append(figs.leave_out(folder, name, classes))
            parts.append(f"{head}: no confusion matrix: {classes}.")
            continue
        fig = figures.confusion_figure(confusion, classes, title=f"{model_name(row)}, test confusion matrix "
                                                                 f"(rows: true class, normalised): {row['run']}")
        pairs = figures.most_confused(confusion, classes, 20)
        rel = figs.save(folder, name, fig, {"confusion": confusion, "classes": classes, "pairs": pairs})
        parts.append(f"{head}, [figure]({rel}):\n\n" + (figures.confused_pairs_markdown(pairs) if pairs
                                                         else "no test image was misclassified."))
    return "\n\n".join(parts), lines


def draw_grids(figs, runs_dir):
    """grid-<arch>.png per grid folder (grid-<arch>-<group>.png when a network has several), and
    each grid's table of trials. -> (left-out lines, tables)."""
    groups = [(g, scored_trials(g)) for g in find_grids(runs_dir)]
    groups = [(g, t) for g, t in groups if t or any((p / "config.json").is_file() for p in g.iterdir())]
    arch_of = {g: (t[0]["config"].get("arch", "?") if t else "?") for g, t in groups}
    lines, tables = [], []
    for g, trials in groups:
        rel_group = g.relative_to(runs_dir).as_posix()
        arch = arch_of[g]
        name = f"grid-{arch}"
        if sum(a == arch for a in arch_of.values()) > 1:
            name += "-" + re.sub(r"[^A-Za-z0-9.+=-]", "_", rel_group)
        keys = varied_keys(trials)
        if trials:
            tables.append(grid_table(rel_group, trials, keys))
        if len(trials) < 2:
            lines.append(figs.leave_out(figs.root, name, f"the grid {rel_group} has {len(trials)} trial(s) with a "
                                                         f"validation score: nothing to compare"))
            continue
        if not keys:
            lines.append(figs.leave_out(figs.root, name, f"the trials of {rel_group} differ in no grid option"))
            continue
        shown, rest = keys[:2], keys[2:]
        points = [{"values": {k: option_value(t["config"], k) for k in shown}, "val_top1": t["val_top1"],
                   "winner": t.get("winner", False), "status": t["status"]} for t in trials]
        title = f"{DISPLAY_NAMES.get(arch, arch)} grid {rel_group}: validation top-1 (%), {len(trials)} trials"
        if rest:
            title += f"; each cell the best over {', '.join(rest)}"
        if any(t["status"] != "done" for t in trials):
            title += "; trials cut by successive halving at their last validation, marked"
        fig, data = figures.grid_figure(points, shown, title="\n".join(textwrap.wrap(title, 90)))
        data["trials"] = points
        figs.save(figs.root, name, fig, data, svg=True)
    return lines, tables


# --------------------------------------------------------------------------------------------
# The report: tables, pairs and figures per setting -> results.md.
# --------------------------------------------------------------------------------------------
def figure_links(figs, folder):
    return [f"![{Path(r).stem}]({r})" for r in sorted(figs.drawn)
            if (figs.runs_dir / r).parent == folder and not r.split("/")[-1].startswith("confusion-")]


def setting_section(figs, setting, rows, folder, level, heading=""):
    """One setting's table, figures (in folder) and most-confused pairs -> (markdown, note lines)."""
    h = "#" * level
    chosen = table_rows(rows)
    out = [f"{h} {heading}{describe_setting(setting, rows)}", "", render(chosen, len(rows))]
    notes = draw_curves(figs, folder, setting, chosen) + draw_summary(figs, folder, setting, chosen)
    pairs, confusion_notes = draw_confusions(figs, folder, chosen)
    notes += confusion_notes
    out += [f"{h}# Figures", ""] + figure_links(figs, folder) + [""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out += [f"{h}# Most-confused test pairs (20 at most per run)", "", pairs, ""]
    return "\n".join(out), notes


def build_report(runs_dir, rows):
    """-> {"text": results.md, "figures": {path under runs_dir: data drawn}, "left_out": lines}."""
    figs = Figures(runs_dir)
    main, settings = group_settings(rows)
    parts, notes = ["# Results", ""], []
    if main is None:
        parts += ["No run on the full data yet: every run used --limit-per-class, so there is no main table; "
                  "the reduced settings are below.", ""]
    reduced_heading = others_heading = False
    slugs = set()
    for s, srows in settings:
        folder, level, heading = figs.root, 2, "Main table: "
        if s != main:
            if s[3] is None and not others_heading:
                parts += ["## Other settings (every image, other data, carve, size or validation fraction)", ""]
                others_heading = True
            if s[3] is not None and not reduced_heading:
                parts += ["## Reduced settings (--limit-per-class): smoke runs and demos, not the study's results", ""]
                reduced_heading = True
            slug = base = setting_slug(s)
            while slug in slugs:  # two data folders of the same name
                slug = f"{base}-{len(slugs) + 1}"
            slugs.add(slug)
            folder, level, heading = figs.root / slug, 3, ""
        text, n = setting_section(figs, s, srows, folder, level, heading)
        parts.append(text)
        notes += n
    grid_notes, grid_tables = draw_grids(figs, runs_dir)
    grid_links = [g for g in figure_links(figs, figs.root) if "](figures/grid-" in g]
    if grid_links or grid_notes or grid_tables:
        parts += ["## Grids", ""] + grid_tables + grid_links + [""] + [f"- {n}" for n in grid_notes] + \
            ([""] if grid_notes else [])
    figs.remove_stale()
    text = "\n".join(parts).rstrip("\n") + "\n"
    return {"text": text, "figures": figs.drawn, "left_out": figs.left_out, "notes": notes + grid_notes}
