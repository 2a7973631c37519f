"""A run knows what it is: the split and images it saw, how it computed, and one writer at a time."""
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import split_data
from study import nets, options
from study import data as data_mod
from study import records

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"accordion", "airplanes", "anchor", "ant"}
DEFAULTS = dict(arch="tiny", batch_size=8, epochs=2, scratch_epochs=2, lr=1e-3, weight_decay=1e-5,
                unfreeze="layer4")
TINY = ["--weights", "none", "--img-size", "32", "--workers", "0", "--precision", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Class folders of real images (what split_data.py splits)."""
    from conftest import extract_subset

    cut = extract_subset(tmp_path_factory.mktemp("cut"), per_class=10, classes=CLASSES, max_side=40)
    src = tmp_path_factory.mktemp("source")
    for side in ("train", "test"):
        for f in (cut / side).glob("*/*.jpg"):
            (src / f.parent.name).mkdir(exist_ok=True)
            shutil.copy(f, src / f.parent.name / f.name)
    return src


def split(source, out, seed):
    """split_data.py, in this process (its command line is tests/test_split_data.py's subject)."""
    split_data.main(["--source", str(source), "--out", str(out), "--seed", str(seed), "--force", "--copy",
                     "--workers", "1"])
    return out


def config(data, out, *extra, **over):
    args = options.get_args_parser(DEFAULTS).parse_args(["--data", str(data), "--out", str(out), *TINY,
                                                        "--cache-dir", str(out / "cache"), *extra])
    return dict(options.resolve_config(args, DEFAULTS, "main_test"), **over)


def test_the_split_fingerprint_of_the_files_equals_split_json(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    classes, train, test = data_mod.scan_split(data)
    ident = data_mod.data_identity(data, classes, train, test, [])
    assert ident["split"] == json.loads((data / "split.json").read_text())["fingerprint"]


@pytest.mark.slow
def test_a_resume_after_a_re_split_is_refused_naming_the_split(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    c = config(data, tmp_path, name="r")
    common.fit(c, stop_after=1)
    before = json.loads((tmp_path / "main_test" / "r" / "config.json").read_text())["identity"]["data"]["split"]
    split(source, data, 2)
    with pytest.raises(SystemExit) as e:
        common.fit(dict(c, resume="auto"))
    msg = str(e.value)
    assert "\n" not in msg and f"the split in --data is another one (split {before[:12]} there" in msg


@pytest.mark.slow
def test_an_image_added_to_a_class_mid_run_refuses_the_resume_naming_it(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    c = config(data, tmp_path, name="r")
    common.fit(c, stop_after=1)
    extra = next((data / "test" / "ant").iterdir())
    shutil.copy(extra, data / "train" / "ant" / "added_by_hand.jpg")
    with pytest.raises(SystemExit, match=r"train/ant: 1 image added"):
        common.fit(dict(c, resume="auto"))
    (data / "train" / "ant" / "added_by_hand.jpg").unlink()  # back as it was: the run continues
    assert common.fit(dict(c, resume="auto"))["epochs"] == 2


@pytest.mark.slow
def test_a_grid_after_a_re_split_is_refused_naming_the_split(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    argv = ["--data", str(data), "--out", str(tmp_path), *TINY, "--epochs", "1", "--grid-spec", "lr=1e-3"]
    common.main(DEFAULTS, {}, argv, script="main_test")
    split(source, data, 2)
    with pytest.raises(SystemExit, match=r"holds a run with other options or data \(the split in --data is another"):
        common.main(DEFAULTS, {}, argv, script="main_test")


@pytest.mark.slow
def test_resume_path_continues_that_run_in_its_own_folder(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    c = config(data, tmp_path, name="first")
    common.fit(c, stop_after=1)
    last = tmp_path / "main_test" / "first" / "last.pth"
    m = common.fit(config(data, tmp_path, "--resume", str(last), name="elsewhere"))
    assert m["epochs"] == 2 and (tmp_path / "main_test" / "first" / "metrics.json").is_file()
    assert not (tmp_path / "main_test" / "elsewhere").exists()
    with pytest.raises(SystemExit, match=r"give a run's last.pth"):
        common.fit(config(data, tmp_path, "--resume", str(last.with_name("best.pth")), name="x"))


@pytest.mark.slow
def test_a_resume_with_another_precision_or_device_type_is_refused(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    c = config(data, tmp_path, name="p")
    common.fit(c, stop_after=1)
    with pytest.raises(SystemExit, match=r"precision fp32 there, bf16 now"):
        common.fit(dict(c, resume="auto", precision="bf16"))
    # a run recorded on a GPU: its augmentation was rendered otherwise, whatever the precision
    path = tmp_path / "main_test" / "p" / "last.pth"
    ck = torch.load(path, weights_only=True)
    ck["config"]["identity"]["compute"]["device_type"] = "cuda"
    torch.save(ck, path)
    with pytest.raises(SystemExit, match=r"device cuda there, cpu now \(its augmentation rendered by tensor ops "
                                         r"there, PIL now\)"):
        common.fit(dict(c, resume="auto", precision="fp32"))


@pytest.mark.slow
def test_a_moved_data_set_resumes_and_what_changes_numbers_is_refused(source, tmp_path):
    """--data is compared by what it holds, --weights by its bytes; --cache-frozen changes nothing,
    --compile and --deterministic change the kernels."""
    data = split(source, tmp_path / "data", 1)
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(nets.build_model("tiny", 1000, "none").state_dict(), weights)
    c = config(data, tmp_path, "--weights", str(weights), "--unfreeze", "layer4", name="m")
    common.fit(c, stop_after=1)
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)  # the data set copied to a node's local disk
    for option, value, refused in (("compile", True, "--compile False there, True now"),
                                   ("deterministic", True, "--deterministic False there, True now")):
        with pytest.raises(SystemExit, match=re.escape(refused)):
            common.fit(dict(c, data=str(moved), resume="auto", **{option: value}))
    torch.save(nets.build_model("tiny", 1000, "none").state_dict(), weights)  # other weights, same file name
    with pytest.raises(SystemExit, match=f"--weights {re.escape(str(weights))} there holds other weights"):
        common.fit(dict(c, resume="auto"))
    torch.manual_seed(0)
    torch.save(nets.build_model("tiny", 1000, "none").state_dict(), weights)  # the same bytes again
    assert common.fit(dict(c, data=str(moved), resume="auto", cache_frozen="off"))["epochs"] == 2


def held_while(first, cmd):
    """Runs cmd while the first process is paused (SIGSTOP) holding its folder, so the first cannot end
    before the second looks, however fast the machine; then lets the first go on."""
    first.send_signal(signal.SIGSTOP)
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)


@pytest.mark.slow
def test_the_same_command_twice_at_once_the_second_stops_naming_the_holder(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    cmd = [sys.executable, str(ROOT / "main_ResNet-18.py"), "--data", str(data), "--out", str(tmp_path), *TINY,
           "--epochs", "8"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = None
    deadline = time.time() + 120
    while run_dir is None and time.time() < deadline:  # the first holds the folder once it has made it
        found = list((tmp_path / "main_ResNet-18").glob("*/.lock"))
        run_dir = found[0].parent if found and found[0].read_text() else None
        time.sleep(0.1)
    second = held_while(first, cmd)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1
    assert lines[0] == f"error: {run_dir} is in use by pid {first.pid} on {socket.gethostname()}; " \
                       f"wait for it to end, or pass --name NEW for another folder"
    first.communicate(timeout=300)
    assert first.returncode == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    best = records.load_checkpoint(run_dir / "best.pth")
    assert best["epoch"] == m["best_epoch"] and best["best"]["top1"] == m["best_val_top1"]


@pytest.mark.slow
def test_a_second_grid_command_on_a_grid_in_use_stops_naming_the_holder(source, tmp_path):
    data = split(source, tmp_path / "data", 1)
    cmd = [sys.executable, str(ROOT / "main_ResNet-18.py"), "--data", str(data), "--out", str(tmp_path), *TINY,
           "--epochs", "1", "--grid-spec", "lr=1e-3,3e-4"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "main_ResNet-18" / "grid" / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    second = held_while(first, cmd)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: {lock.parent} is in use by pid {first.pid} on ")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert sum(line.startswith("test top-1") for line in out.splitlines()) == 2  # each trial once, by the first


def test_report_keeps_runs_of_two_splits_or_two_device_types_in_their_own_tables(tmp_path):
    from study import results, tables

    for name, split, device in (("a", "1" * 64, "cpu"), ("b", "2" * 64, "cpu"), ("c", "1" * 64, "cuda")):
        run_dir = tmp_path / "main_ResNet-18" / name
        run_dir.mkdir(parents=True)
        c = dict(arch="resnet18", weights="imagenet", batch_size=32, epochs=2, lr=1e-3, weight_decay=1e-5,
                 unfreeze="layer4", data="dataset/images", split_seed=0, img_size=224, val_fraction=0.1,
                 identity={"data": {"split": split}, "compute": {"processes": 2, "device_type": device}})
        (run_dir / "config.json").write_text(json.dumps(c))
        (run_dir / "metrics.json").write_text(json.dumps({"test_top1": 90.0, "best_val_top1": 91.0, "processes": 2}))
    rows = results.gather(tmp_path)
    main, groups = results.group_settings(rows)
    settings = {(s[5], s[6]): s for s, _ in groups}
    assert sorted(settings) == [("1" * 12, "cpu"), ("1" * 12, "cuda"), ("2" * 12, "cpu")]
    assert {r["batch"] for r in rows} == {"64 (32 x 2)"}  # the global batch, and per process
    assert "(split 111111111111)" in tables.describe_setting(settings["1" * 12, "cpu"])
    assert tables.describe_setting(settings["1" * 12, "cuda"]).endswith("trained on GPUs (augmentation by tensor ops)")
