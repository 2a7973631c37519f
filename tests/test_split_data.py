"""split_data.py: real-archive counts and guarantees, safe extraction, checking, download.

Two full runs over the real archive (module fixture `real_runs`, ~5-8 s each); every
other test uses tiny crafted folders and archives.
"""
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from split_data import get_args_parser, main
from study import archive, splitting
from study.archive import UnsafeArchiveError, download, file_md5, safe_extract
from study.data import class_seed, split_fingerprint
from study.splitting import BACKGROUND, SPLIT_FILE, check_images, disk_diff, find_class_root, split_class


# ----------------------------------------------------------------------------- helpers

def snapshot(folder, inodes=False):
    """rel path -> (size of files, mtime_ns[, inode]) for every file and folder under folder."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            snap[os.path.relpath(p, folder)] = (size, st.st_mtime_ns) + ((st.st_ino,) if inodes else ())
    return snap


def make_image(path, i, mode="RGB"):
    """A tiny distinct image; the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (8, 8), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).convert(mode)
    img.save(path)
    return path


def make_source(root, counts):
    """root/<class>/image_NNNN.{jpg,png}, counts[class] images each, mixed formats."""
    for c, n in counts.items():
        for i in range(1, n + 1):
            make_image(Path(root) / c / f"image_{i:04d}.{'png' if i % 3 == 0 else 'jpg'}", i + len(c))
    return Path(root)


def run(argv):
    """main(argv) in-process; returns (record, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        record = main([str(a) for a in argv])
    return record, out.getvalue(), err.getvalue()


def refused(argv):
    """The SystemExit message of a run that must stop."""
    with pytest.raises(SystemExit) as e:
        run(argv)
    return str(e.value.code)


def make_tar(path, tree, mode="w"):
    """tree: arcname -> bytes; a tar (mode 'w', 'w:gz') with those regular files."""
    with tarfile.open(path, mode) as tf:
        for name, data in tree.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return Path(path)


def tree_of(root):
    """arcname -> bytes for every file under root, prefixed by root's name."""
    root = Path(root)
    return {f"{root.name}/{p.relative_to(root).as_posix()}": p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_official_zip(path, images_root):
    """The official caltech-101.zip layout: caltech-101/101_ObjectCategories.tar.gz beside
    Annotations.tar and show_annotation.m, plus macOS junk."""
    tgz = make_tar(Path(path).with_suffix(".inner.tar.gz"), tree_of(images_root), "w:gz")
    ann = make_tar(Path(path).with_suffix(".ann.tar"), {"Annotations/readme.txt": b"boxes"})
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(tgz, "caltech-101/101_ObjectCategories.tar.gz")
        zf.write(ann, "caltech-101/Annotations.tar")
        zf.writestr("caltech-101/show_annotation.m", "% matlab")
        zf.writestr("__MACOSX/caltech-101/._101_ObjectCategories.tar.gz", b"\0\5\x16\7junk")
    tgz.unlink()
    ann.unlink()
    return Path(path)


@pytest.fixture
def crafted(tmp_path):
    """101_ObjectCategories-like folder: three classes plus BACKGROUND_Google."""
    return make_source(tmp_path / "101_ObjectCategories", {"ant": 10, "Bee": 7, "cat": 5, BACKGROUND: 4})


@contextlib.contextmanager
def serve(folder):
    """An HTTP server on 127.0.0.1 (loopback only) serving folder; yields its base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ----------------------------------------------------------------------------- the real archive

@pytest.fixture(scope="module")
def real_runs(caltech_archive, tmp_path_factory):
    """Run 1: the archive -> a/. Run 2: the same archive extracted to a folder -> b/."""
    tmp = tmp_path_factory.mktemp("real")
    r = {"archive_hash_before": file_md5(caltech_archive)}
    r["a"], r["a_stdout"], _ = run(["--source", caltech_archive, "--out", tmp / "a"])
    r["archive_hash_after"] = file_md5(caltech_archive)
    src = find_class_root(safe_extract(caltech_archive, tmp / "src"))
    r["src"], r["src_before"] = src, snapshot(src)
    r["b"], r["b_stdout"], _ = run(["--source", src, "--out", tmp / "b"])
    r["src_after"] = snapshot(src)
    r["out_a"], r["out_b"] = tmp / "a", tmp / "b"
    return r


@pytest.mark.slow
def test_real_archive_counts(real_runs):
    for rec, out in ((real_runs["a"], real_runs["out_a"]), (real_runs["b"], real_runs["out_b"])):
        assert rec["counts"]["classes"] == 101 and len(rec["classes"]) == 101
        assert (rec["counts"]["train"], rec["counts"]["test"]) == (6907, 1770)
        assert (len(rec["train"]), len(rec["test"])) == (6907, 1770)
        assert rec["classes"] == sorted(rec["classes"]) and BACKGROUND not in rec["classes"]
        assert rec["excluded_classes"] == [BACKGROUND]
        assert rec["skipped"] == []  # all 8,677 object JPEGs decode, the 411 grayscale ones included
        assert disk_diff(out, rec) == ([], [])
        assert sorted(p.name for p in (out / "train").iterdir()) == rec["classes"]
        assert json.loads((out / SPLIT_FILE).read_text()) == rec
    assert "6907 train + 1770 test" in real_runs["a_stdout"]


def test_real_split_identical_from_archive_and_folder(real_runs):
    a = json.loads((real_runs["out_a"] / SPLIT_FILE).read_text())
    b = json.loads((real_runs["out_b"] / SPLIT_FILE).read_text())
    assert a["args"].pop("source").endswith("101_ObjectCategories.tar.gz")
    assert b["args"].pop("source") == str(real_runs["src"].resolve())
    assert a == b  # same classes, file lists, counts, fingerprint: only the source path differs
    assert a["fingerprint"] == split_fingerprint(b["classes"], b["train"], b["test"])


def test_real_sources_unchanged(real_runs):
    assert real_runs["archive_hash_after"] == real_runs["archive_hash_before"]
    assert real_runs["src_after"] == real_runs["src_before"]  # file list, sizes, mtimes
    assert len(real_runs["src_before"]) > 9144
    rel = real_runs["b"]["train"][0]  # same file system: hard links, not copies
    assert os.stat(real_runs["out_b"] / "train" / rel).st_ino == os.stat(real_runs["src"] / rel).st_ino


def test_real_second_run_is_noop_and_other_args_refused(real_runs):
    out, before = real_runs["out_b"], snapshot(real_runs["out_b"], inodes=True)
    rec, stdout, _ = run(["--source", real_runs["src"], "--out", out])
    assert "split already there" in stdout and "nothing to do" in stdout
    assert rec == real_runs["b"]
    msg = refused(["--source", real_runs["src"], "--out", out, "--train-ratio", "0.7"])
    assert msg == (f"{out} already holds a split made with other arguments (train_ratio 0.8 -> 0.7); "
                   f"pass --force to rebuild it")
    assert snapshot(out, inodes=True) == before


# ----------------------------------------------------------------------------- crafted folders

def test_split_deterministic_floor_and_per_class_independent(crafted, tmp_path):
    rec1, _, _ = run(["--source", crafted, "--out", tmp_path / "o1"])
    run(["--source", crafted, "--out", tmp_path / "o2"])
    assert (tmp_path / "o1" / SPLIT_FILE).read_bytes() == (tmp_path / "o2" / SPLIT_FILE).read_bytes()
    assert rec1["classes"] == ["Bee", "ant", "cat"]  # code-point order = class index
    assert rec1["counts"]["per_class"] == {"Bee": {"train": 5, "test": 2}, "ant": {"train": 8, "test": 2},
                                           "cat": {"train": 4, "test": 1}}
    # Another class added and files created in reverse order: the old classes split the same way.
    other = tmp_path / "other"
    for c in ("cat", "ant", "Bee"):
        for f in sorted((crafted / c).iterdir(), reverse=True):
            (other / c).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, other / c / f.name)
    make_source(other, {"dog": 6})
    rec3, _, _ = run(["--source", other, "--out", tmp_path / "o3"])
    assert [p for p in rec3["train"] if not p.startswith("dog/")] == rec1["train"]
    assert [p for p in rec3["test"] if not p.startswith("dog/")] == rec1["test"]
    rec4, _, _ = run(["--source", crafted, "--out", tmp_path / "o4", "--seed", "7"])
    assert rec4["test"] != rec1["test"]


def test_split_class_exact_floor_and_stable_seed():
    files = [f"c/{i:03d}.jpg" for i in range(100)]
    train, test = split_class(files, 0.29, 42, "c")  # float 0.29 * 100 = 28.999...; exact floor is 29
    assert (len(train), len(test)) == (29, 71) and sorted(train + test) == files
    assert split_class(list(reversed(files)), 0.29, 42, "c") == (train, test)
    # A fixed value: sha256("42/accordion")[:8], so any machine gets the same generator.
    assert class_seed(42, "accordion") == int(hashlib.sha256(b"42/accordion").hexdigest()[:16], 16)


def test_non_images_and_truncated_skipped_grayscale_kept(tmp_path):
    src = make_source(tmp_path / "src", {"ant": 4, "bee": 4})
    make_image(src / "ant" / "gray.png", 9, mode="L")
    (src / "ant" / "notes.txt").write_text("not an image")
    (src / "ant" / "fake.jpg").write_text("text pretending to be a JPEG")
    good = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(good, "JPEG")
    (src / "bee" / "trunc.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (src / "bee" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    rec, stdout, _ = run(["--source", src, "--out", tmp_path / "out"])
    reasons = {s["path"]: s["reason"] for s in rec["skipped"]}
    assert sorted(reasons) == ["ant/fake.jpg", "ant/notes.txt", "bee/.DS_Store", "bee/trunc.jpg"]
    assert "truncated" in reasons["bee/trunc.jpg"] and "cannot identify" in reasons["ant/fake.jpg"]
    assert str(tmp_path) not in json.dumps(rec["skipped"])  # no machine-specific paths
    assert json.loads((tmp_path / "out" / SPLIT_FILE).read_text())["skipped"] == rec["skipped"]
    assert "ant/gray.png" in rec["train"] + rec["test"]
    assert (rec["counts"]["train"], rec["counts"]["test"], rec["counts"]["skipped"]) == (7, 2, 4)
    assert disk_diff(tmp_path / "out", rec) == ([], [])
    assert "skipped 4 file(s):" in stdout and "bee/trunc.jpg" in stdout


def test_check_images_pool_matches_inline(tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", i) for i in range(70)]
    paths[5].write_bytes(b"junk")
    inline, pooled = check_images(paths, 1), check_images(paths, 2)
    assert pooled == inline and [i for i, r in enumerate(pooled) if r] == [5]


def test_tiny_class_stays_in_train_with_warning(tmp_path):
    src = make_source(tmp_path / "src", {"ant": 5, "solo": 1})
    rec, _, stderr = run(["--source", src, "--out", tmp_path / "out"])
    assert [p for p in rec["train"] if p.startswith("solo/")] == ["solo/image_0001.jpg"]
    assert not any(p.startswith("solo/") for p in rec["test"])
    assert "warning: class 'solo' has only 1 image(s)" in stderr
    assert any("'solo'" in w for w in rec["warnings"])
    assert (tmp_path / "out" / "train" / "solo" / "image_0001.jpg").is_file()
    assert not (tmp_path / "out" / "test" / "solo").exists()


def test_background_left_out_unless_kept(crafted, tmp_path):
    rec, stdout, _ = run(["--source", crafted, "--out", tmp_path / "o1"])
    assert BACKGROUND not in rec["classes"] and rec["excluded_classes"] == [BACKGROUND]
    assert not (tmp_path / "o1" / "train" / BACKGROUND).exists() and "--keep-background" in stdout
    rec, _, _ = run(["--source", crafted, "--out", tmp_path / "o2", "--keep-background"])
    assert rec["classes"] == [BACKGROUND, "Bee", "ant", "cat"] and rec["args"]["keep_background"] is True
    assert len(list((tmp_path / "o2" / "train" / BACKGROUND).iterdir())) == 3


def test_folder_source_unchanged_hardlink_or_copy(crafted, tmp_path):
    before = snapshot(crafted)
    rec, stdout, _ = run(["--source", crafted, "--out", tmp_path / "linked"])
    rel = rec["train"][0]
    assert os.stat(tmp_path / "linked" / "train" / rel).st_ino == os.stat(crafted / rel).st_ino
    assert "22 hard-linked, 0 copied" in stdout
    rec, stdout, _ = run(["--source", crafted, "--out", tmp_path / "copied", "--copy"])
    copy = tmp_path / "copied" / "train" / rel
    assert os.stat(copy).st_ino != os.stat(crafted / rel).st_ino
    assert copy.read_bytes() == (crafted / rel).read_bytes() and "0 hard-linked, 22 copied" in stdout
    assert snapshot(crafted) == before


def test_noop_force_no_stale_files(crafted, tmp_path):
    out = tmp_path / "out"
    run(["--source", crafted, "--out", out])
    before = snapshot(out, inodes=True)
    _, stdout, _ = run(["--source", crafted, "--out", out])
    assert stdout.startswith(f"split already there: {out} holds 3 classes, 17 train + 5 test images")
    assert snapshot(out, inodes=True) == before
    msg = refused(["--source", crafted, "--out", out, "--train-ratio", "0.5", "--seed", "1"])
    assert "other arguments (seed 42 -> 1, train_ratio 0.8 -> 0.5); pass --force" in msg
    (out / "train" / "ant" / "stale.jpg").write_bytes(b"left from an old split")
    (out / "test" / "gone").mkdir()
    rec, _, _ = run(["--source", crafted, "--out", out, "--train-ratio", "0.5", "--seed", "1", "--force"])
    assert (rec["counts"]["train"], rec["counts"]["test"]) == (5 + 3 + 2, 5 + 4 + 3)
    assert disk_diff(out, rec) == ([], [])
    assert sorted(p.name for p in out.iterdir()) == [SPLIT_FILE, "test", "train"]  # no temp folder left
    assert sorted(p.name for p in (out / "test").iterdir()) == ["Bee", "ant", "cat"]


def test_changed_disk_or_foreign_folder_refused(crafted, tmp_path):
    out = tmp_path / "out"
    rec, _, _ = run(["--source", crafted, "--out", out])
    (out / "test" / rec["test"][0]).unlink()
    msg = refused(["--source", crafted, "--out", out])
    assert "no longer match split.json (1 missing, 0 extra files" in msg and "--force" in msg
    foreign = tmp_path / "foreign"
    (foreign / "train" / "ant").mkdir(parents=True)
    msg = refused(["--source", crafted, "--out", foreign])
    assert msg == (f"{foreign / 'train'} exists but {foreign / SPLIT_FILE} does not (an older or interrupted "
                   f"split); move it away or pass --force to replace it")


def test_interrupted_build_leaves_old_split_and_no_temp(crafted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(["--source", crafted, "--out", out])
    before, json_before = snapshot(out, inodes=True), (out / SPLIT_FILE).read_bytes()
    calls, real_place = [], splitting._place

    def dying_place(src, dst, link):
        calls.append(dst)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-copy
        return real_place(src, dst, link)

    monkeypatch.setattr(splitting, "_place", dying_place)
    with pytest.raises(KeyboardInterrupt):
        run(["--source", crafted, "--out", out, "--seed", "3", "--force"])
    assert snapshot(out, inodes=True) == before and (out / SPLIT_FILE).read_bytes() == json_before
    monkeypatch.setattr(splitting, "_place", real_place)
    (out / ".split_data-killed").mkdir()  # what a SIGKILLed run leaves
    (out / ".split_data-killed" / "x").write_text("x")
    _, stdout, _ = run(["--source", crafted, "--out", out, "--seed", "3", "--force"])
    assert "left by an interrupted run" in stdout
    assert sorted(p.name for p in out.iterdir()) == [SPLIT_FILE, "test", "train"]


# ----------------------------------------------------------------------------- archives

def _tar_bad(path, kind):
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("101_ObjectCategories/ant/image_0001.jpg")
        ok.size = 1
        tf.addfile(ok, io.BytesIO(b"x"))  # a good member first: it must not be written either
        bad = tarfile.TarInfo({"dotdot": "101_ObjectCategories/../../evil", "absolute": str(path.parent / "evil"),
                               "symlink": "101_ObjectCategories/link", "hardlink": "101_ObjectCategories/hard",
                               "device": "101_ObjectCategories/dev"}[kind])
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "../../evil"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "101_ObjectCategories/ant/image_0001.jpg"
        elif kind == "device":
            bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
        else:
            bad.size = 4
        tf.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)
    return path


def _zip_bad(path, kind):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("101_ObjectCategories/ant/image_0001.jpg", b"x")
        if kind == "symlink":
            info = zipfile.ZipInfo("101_ObjectCategories/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "../../evil")
        else:
            zf.writestr({"dotdot": "../evil", "absolute": str(path.parent / "evil")}[kind], b"evil")
    return path


@pytest.mark.parametrize("fmt,kind,why", [
    ("tar", "dotdot", "'..' component"), ("tar", "absolute", "absolute path"), ("tar", "symlink", "a link"),
    ("tar", "hardlink", "a link"), ("tar", "device", "a device"),
    ("zip", "dotdot", "'..' component"), ("zip", "absolute", "absolute path"), ("zip", "symlink", "a link"),
])
def test_unsafe_archive_refused_nothing_written(tmp_path, fmt, kind, why):
    box = tmp_path / "box"  # everything lives here; after the refusal it must hold only archive + empty dest
    box.mkdir()
    archive = (_tar_bad if fmt == "tar" else _zip_bad)(box / f"bad.{fmt}", kind)
    with pytest.raises(UnsafeArchiveError, match=f"refusing member .*: {why}"):
        safe_extract(archive, box / "dest")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "box", f"box/bad.{fmt}", "box/dest"]
    msg = refused(["--source", archive, "--out", box / "out"])
    assert msg.startswith(f"{archive}: refusing member") and why in msg
    assert list((box / "out").iterdir()) == []  # no split, no temp folder
    assert not (tmp_path / "evil").exists() and not (box / "evil").exists()


@pytest.mark.parametrize("fmt", ["official-zip", "tgz", "tar", "flat-zip"])
def test_archive_sources(crafted, tmp_path, fmt):
    archive = {
        "official-zip": lambda: make_official_zip(tmp_path / "caltech-101.zip", crafted),
        "tgz": lambda: make_tar(tmp_path / "x.tgz", tree_of(crafted), "w:gz"),
        "tar": lambda: make_tar(tmp_path / "x.tar", tree_of(crafted)),
        "flat-zip": lambda: shutil.make_archive(str(tmp_path / "x"), "zip", crafted.parent, crafted.name),
    }[fmt]()
    digest = file_md5(archive)
    rec, _, _ = run(["--source", archive, "--out", tmp_path / "out"])
    folder_rec, _, _ = run(["--source", crafted, "--out", tmp_path / "from-folder"])
    assert rec["classes"] == ["Bee", "ant", "cat"] and rec["skipped"] == []
    assert (rec["train"], rec["test"]) == (folder_rec["train"], folder_rec["test"])
    assert file_md5(archive) == digest
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SPLIT_FILE, "test", "train"]


def test_default_layout_extracts_tar_gz(crafted, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "dataset").mkdir(parents=True)
    make_tar(work / "dataset" / "101_ObjectCategories.tar.gz", tree_of(crafted), "w:gz")
    monkeypatch.chdir(work)
    rec, stdout, _ = run([])
    assert "extracting dataset/101_ObjectCategories.tar.gz -> dataset/images/101_ObjectCategories" in stdout
    images = work / "dataset" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["101_ObjectCategories", SPLIT_FILE, "test", "train"]
    assert snapshot(images / "101_ObjectCategories").keys() == snapshot(crafted).keys()
    assert rec["args"]["source"] == str(images / "101_ObjectCategories")
    _, stdout, _ = run([])
    assert "split already there" in stdout


def test_no_data_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = refused([])
    assert msg.startswith("no data: dataset/images/101_ObjectCategories is missing") and "--download" in msg
    assert "\n" not in msg and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- download

def test_download_from_loopback_then_default_layout(crafted, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    zip_path = make_official_zip(served / "caltech-101.zip", crafted)
    md5 = hashlib.md5(zip_path.read_bytes()).hexdigest()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with serve(served) as base:
        rec, stdout, _ = run(["--download", "--url", f"{base}/caltech-101.zip", "--md5", md5])
    assert (work / "dataset" / "caltech-101.zip").read_bytes() == zip_path.read_bytes()
    assert sorted(p.name for p in (work / "dataset").iterdir()) == ["caltech-101.zip", "images"]
    assert rec["classes"] == ["Bee", "ant", "cat"] and disk_diff(work / "dataset" / "images", rec) == ([], [])
    assert "extracting dataset/caltech-101.zip" in stdout
    rec2, stdout, _ = run(["--download", "--url", "http://127.0.0.1:9/never-contacted", "--md5", md5])
    assert "already downloaded (MD5 ok)" in stdout and "split already there" in stdout and rec2 == rec


def test_download_bad_checksum_leaves_nothing(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "caltech-101.zip").write_bytes(b"not the real zip")
    monkeypatch.chdir(tmp_path)
    with serve(served) as base:
        msg = refused(["--download", "--url", f"{base}/caltech-101.zip", "--md5", "0" * 32])
    assert f"MD5 {hashlib.md5(b'not the real zip').hexdigest()} does not match the expected {'0' * 32}" in msg
    assert "save it as dataset/caltech-101.zip" in msg and "\n" not in msg
    assert list((tmp_path / "dataset").iterdir()) == []


def test_download_unreachable_clear_message(tmp_path, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{port}/caltech-101.zip"
    msg = refused(["--download", "--url", url])
    assert msg.startswith(f"could not download {url} (") and "\n" not in msg
    assert msg.endswith(f"download {url} by hand and save it as dataset/caltech-101.zip, then rerun")
    assert list((tmp_path / "dataset").iterdir()) == []


def test_download_file_url_and_defaults(tmp_path):
    src = tmp_path / "a.zip"
    src.write_bytes(b"payload")
    dest = download(src.as_uri(), tmp_path / "d" / "caltech-101.zip", hashlib.md5(b"payload").hexdigest())
    assert dest.read_bytes() == b"payload" and sorted(os.listdir(dest.parent)) == ["caltech-101.zip"]
    assert archive.OFFICIAL_URL == "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
    assert archive.OFFICIAL_MD5 == "3138e1922a9193bfa496528edbbc45d0"


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("argv,expected", [
    (["--train-ratio", "1.5"], "--train-ratio must be between 0 and 1 (exclusive), got 1.5"),
    (["--train-ratio", "0"], "--train-ratio must be between 0 and 1 (exclusive), got 0.0"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--download", "--source", "x"], "--download fetches dataset/caltech-101.zip for the default layout"),
    (["--source", "does/not/exist"], "--source does/not/exist does not exist"),
])
def test_bad_arguments(argv, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refused(argv).startswith(expected)


def test_out_inside_source_refused(crafted):
    msg = refused(["--source", crafted, "--out", crafted / "ant" / "split"])
    assert "is inside the source" in msg and not (crafted / "ant" / "split").exists()


def test_every_option_has_help():
    parser = get_args_parser()
    options = [a for a in parser._actions if a.dest != "help"]
    assert {a.dest for a in options} >= {"source", "out", "train_ratio", "seed", "keep_background", "force",
                                         "download", "url", "md5", "workers", "copy"}
    assert all(a.help and len(a.help) > 20 for a in options)
