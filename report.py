"""The study's results: tables and figures from every finished run under a runs folder.

    python report.py            # reads runs/, writes runs/results.md and runs/figures/
    python report.py my_runs/

A finished run is a folder (at any depth: single runs, grid trials, comparisons) holding both
config.json and metrics.json. Runs are compared like with like: one table per setting (data
folder, validation carve, image size, images per class, validation fraction). The main table is
the full-data setting with the most runs; runs of --limit-per-class (smoke runs, CPU demos) are
shown apart, under their own heading, and never become an architecture's row of the main table.
In each table, per architecture, the pretrained run with the best *validation* top-1, and the
best run from random weights as its own row; the test set is reported, never used to choose.
Columns follow the original study's table (model | batch | epochs | lr | weight decay | trained
part | Top@1), then validation top-1, test top-5, test mean per-class accuracy and the run folder.
Accuracies are percent.

Figures go to RUNS_DIR/figures/ (the main setting; other settings in a sub-folder each), drawn
from the runs' own files, so runs made before this report existed are drawn too:
  curves-<arch>.png, .svg   validation top-1 and losses per epoch: the table's pretrained run
                            and its random-init run on the same axes (TensorBoard event files)
  summary.png, .svg         test top-1 and mean per-class per network, pretrained beside random
                            init, with the original study's published top-1 marked
  grid-<arch>.png, .svg     a grid's validation top-1 against the two options it varies most;
                            results.md lists each grid's trials with their status as the grid
                            wrote it ("done", "cut at epoch 2", "stopped at epoch 4")
  confusion-<run>.png       each table run's test confusion matrix (runs that recorded it), and
                            its 20 most-confused pairs in results.md
A figure that cannot be drawn is left out with one line saying why, in results.md and printed.
"""
import argparse
import sys
from pathlib import Path

from study.errors import fail
from study.records import atomic_write
from study.results import gather
from study.results_page import build_report


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", nargs="?", default="runs",
                   help="folder searched at any depth for finished runs; results.md and figures/ are written there "
                        "(default: runs)")
    return p


def main(argv=None):
    """-> build_report's dict (text, figures drawn with their data, left-out lines)."""
    args = get_args_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        fail(f"{runs_dir}: no such folder")
    rows = gather(runs_dir, warn=lambda msg: print(msg, file=sys.stderr, flush=True))
    if not rows:
        fail(f"no finished run under {runs_dir} (a run folder holds config.json and metrics.json)")
    result = build_report(runs_dir, rows)
    print(result["text"], end="")
    atomic_write(runs_dir / "results.md", lambda f: f.write(result["text"].encode()))
    print(f"wrote {runs_dir / 'results.md'} and {len(result['figures'])} figure(s) under {runs_dir / 'figures'}",
          flush=True)
    return result


if __name__ == "__main__":
    main()
