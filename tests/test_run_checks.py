"""What a run checks before it trains: resume with other options, the validation carve, batch
sizes and image counts, top-5 with few classes, and head-only runs that record their options."""
import json

import pytest

import common
from study import loop, nets, options, steps
from study import data as data_mod
from study import experiments


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 real classes, 6 train + 2 test images each, 64 px."""
    from conftest import extract_subset

    return extract_subset(tmp_path_factory.mktemp("checks"), per_class=8,
                          classes={"accordion", "anchor", "barrel", "bonsai"})


DEFAULTS = dict(arch="tiny", batch_size=8, epochs=2, scratch_epochs=2, lr=1e-3, weight_decay=1e-4,
                unfreeze="last:1")


def config(data, out, *extra, **over):
    args = options.get_args_parser(DEFAULTS).parse_args(
        ["--data", str(data), "--out", str(out), "--weights", "none", "--img-size", "32", "--workers", "0",
         "--cache-dir", str(out / "cache"), *extra])
    return dict(options.resolve_config(args, DEFAULTS, "main_test"), **over)


@pytest.mark.slow
def test_resume_refuses_other_options_naming_each_with_both_values(data, tmp_path):
    c = config(data, tmp_path, name="r")
    common.fit(c, stop_after=1)
    with pytest.raises(SystemExit) as e:
        common.fit(dict(c, resume="auto", val_fraction=0.2, epochs=3))
    msg = str(e.value)
    assert "\n" not in msg and "--val-fraction 0.1 there, 0.2 now" in msg and "--epochs 2 there, 3 now" in msg
    run_dir = options.run_dir_of(c)
    assert json.loads((run_dir / "config.json").read_text())["val_fraction"] == 0.1  # nothing lost
    # options that cannot change results may differ
    m = common.fit(dict(c, resume="auto", workers=1, cache_dir=str(tmp_path / "other_cache")))
    assert m["epochs"] == 2 and (run_dir / "metrics.json").is_file()


@pytest.mark.slow
def test_resume_of_a_run_carved_by_older_code_is_refused(data, tmp_path):
    import torch

    c = config(data, tmp_path, name="old")
    common.fit(c, stop_after=1)
    path = options.run_dir_of(c) / "last.pth"
    ck = torch.load(path, weights_only=True)
    del ck["config"]["split_seed"]  # as written before --split-seed
    torch.save(ck, path)
    with pytest.raises(SystemExit, match=r"--split-seed \(not recorded\) there, 0 now"):
        common.fit(dict(c, resume="auto"))


def test_the_validation_carve_depends_on_class_names_and_split_seed_only():
    samples = [(f"{c}/{i}.jpg", k) for k, c in enumerate(["ant", "bee", "cat"]) for i in range(20)]
    classes = ["ant", "bee", "cat"]
    _, val = data_mod.carve_validation(samples, classes, 0.2, split_seed=0)
    assert sorted(len([s for s in val if s[1] == k]) for k in range(3)) == [4, 4, 4]
    # a new class before the others shifts every label index, and moves no image
    shifted = [(p, k + 1) for p, k in samples] + [(f"aardvark/{i}.jpg", 0) for i in range(20)]
    _, val2 = data_mod.carve_validation(shifted, ["aardvark"] + classes, 0.2, split_seed=0)
    assert {p for p, _ in val} == {p for p, k in val2 if k > 0}
    _, other = data_mod.carve_validation(samples, classes, 0.2, split_seed=1)
    assert {p for p, _ in other} != {p for p, _ in val}


def test_seed_varies_the_run_but_not_its_validation_images(data, tmp_path):
    a = data_mod.read_data(config(data, tmp_path, "--seed", "0"))[1]["val"]
    b = data_mod.read_data(config(data, tmp_path, "--seed", "3"))[1]["val"]
    c = data_mod.read_data(config(data, tmp_path, "--split-seed", "3"))[1]["val"]
    assert a == b and a != c


def test_batch_size_1_is_one_line_before_any_folder(data, tmp_path):
    with pytest.raises(SystemExit) as e:
        common.fit(config(data, tmp_path / "runs", "--batch-size", "1"))
    assert "--batch-size must be at least 2" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_too_few_images_for_one_batch_is_one_line_before_any_folder(data, tmp_path):
    import shutil

    one = tmp_path / "one"
    for side in ("train", "test"):
        (one / side / "anchor").mkdir(parents=True)
        shutil.copy(sorted((data / side / "anchor").iterdir())[0], one / side / "anchor")
    with pytest.raises(SystemExit) as e:
        common.fit(config(one, tmp_path / "runs", "--val-fraction", "0"))
    assert "1 training image(s) after the validation carve: too few for one batch of 2" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_top5_is_left_out_with_fewer_than_5_classes(data, tmp_path, capsys):
    m = common.fit(config(data, tmp_path))
    assert m["test_top5"] is None and 0 <= m["test_top1"] <= 100
    assert "top-5 -" in capsys.readouterr().out


@pytest.mark.slow
def test_a_grid_with_head_and_last1_trials_records_its_options_and_reruns_nothing(data, tmp_path, capsys):
    import torch

    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"  # a "pretrained" state dict saved in the test
    torch.save(nets.build_model("tiny", 1000, "none").state_dict(), weights)
    c = config(data, tmp_path, "--augment", "seed", "--weights", str(weights), grid_spec="unfreeze=head,last:1",
               epochs=1)
    experiments.run(c, {}, common.fit)
    grid = tmp_path / "main_test" / "grid"
    assert json.loads((grid / "unfreeze=head" / "config.json").read_text())["augment"] == "seed"  # as given
    mtimes = {p: p.stat().st_mtime_ns for p in grid.rglob("*.pth")}
    assert len(mtimes) == 4
    capsys.readouterr()
    experiments.run(c, {}, common.fit)
    assert "nothing to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # --compare after the grid: the winner's own options match its folder, so it is reused, not retrained
    rows, _ = experiments.run_compare(common.fit, dict(c, grid_spec=None, compare=True))
    assert rows[0]["run"].startswith("grid/unfreeze=") and rows[0]["status"] == "done"
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


@pytest.mark.slow
def test_the_test_pass_shows_only_wrong_predictions_most_confident_first(data, tmp_path):
    import torch

    from study import hardware
    from test_run import tb_scalars

    c = config(data, tmp_path, precision="fp32")
    common.fit(c)
    acc = tb_scalars(options.run_dir_of(c))
    assert {"Test/confusion_matrix", "Test/worst_mistakes"} <= set(acc.Tags()["images"])
    run = steps.start_run(dict(c, name="again"))
    run.model.load_state_dict(torch.load(options.run_dir_of(c) / "best.pth", weights_only=True)["model"])
    loaders, _ = steps.build_loaders(run, hardware.MemoryBudget(hardware.memory_limit(run.device)))
    test = loaders["test"]
    m = loop.evaluate(run.model, test, torch.nn.CrossEntropyLoss(), run.device, None, 4, mistakes=32)
    wrong = m["images"] - int(m["confusion"].diag().sum())
    assert wrong > 0 and len(m["mistakes"]) == min(32, wrong)
    for i, true, pred, prob in m["mistakes"]:
        assert true != pred and test.samples[i][1] == true and 0 < prob <= 1
        assert m["confusion"][true, pred] > 0
    probs = [p for *_, p in m["mistakes"]]
    assert probs == sorted(probs, reverse=True)
    image = common.evaluated_image(test, m["mistakes"][0][0])
    assert image.shape == (32, 32, 3) and image.dtype.name == "uint8"
