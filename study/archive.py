"""Archives and downloads for split_data.py: extraction that checks every member before it writes
anything (no absolute path, '..', link or device), and a download checked against its MD5."""
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from . import records
from .data import is_image_name

# The official CaltechDATA record for Caltech-101 (https://data.caltech.edu/records/mzrjq-6wc02);
# the same address and MD5 as torchvision.datasets.Caltech101.
OFFICIAL_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
OFFICIAL_MD5 = "3138e1922a9193bfa496528edbbc45d0"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


class SplitDataError(ValueError):
    """A source, archive or download split_data.py cannot use: main() turns it into a one-line SystemExit."""


class UnsafeArchiveError(SplitDataError):
    """An archive member would write outside the destination, or is a link or a device."""


def progress(iterable=None, **kwargs):
    # disable=None: bars on a terminal only, so logs and tests stay clean.
    return tqdm(iterable, disable=None, dynamic_ncols=True, **kwargs)


def is_hidden(name):
    return name.startswith(".") or name == "__MACOSX"


def is_archive_name(name):
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _member_target(dest_real, name, archive, link=False, special=False):
    """Where member `name` lands inside dest_real; refuse a link, a device, or anything that could leave it."""
    parts = name.replace("\\", "/").split("/")
    target = os.path.realpath(os.path.join(dest_real, *[p for p in parts if p not in ("", ".")]))
    why = ("absolute path" if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name)
           else "'..' component" if ".." in parts
           else "it leaves the destination" if target != dest_real and not target.startswith(dest_real + os.sep)
           else "a link" if link else "a device or special file" if special else None)
    if why:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: {why}")
    return target


def _extract_tar(archive, dest_real):
    with tarfile.open(archive) as tf:
        members = tf.getmembers()  # read all headers first: a bad member anywhere stops us before any write
        for m in members:
            _member_target(dest_real, m.name, archive, link=m.issym() or m.islnk(),
                           special=not (m.isfile() or m.isdir() or m.issym() or m.islnk()))
        # filter="data" (Python >= 3.11.4) is a second guard behind the checks above.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for m in progress(members, desc="extract", unit="file"):
            tf.extract(m, dest_real, **extra)


def _extract_zip(archive, dest_real):
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        kinds = [stat.S_IFMT(i.external_attr >> 16) for i in infos]  # Unix mode, 0 when made elsewhere
        targets = [_member_target(dest_real, i.filename, archive, link=k == stat.S_IFLNK,
                                  special=k not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK))
                   for i, k in zip(infos, kinds)]
        for info, target in progress(list(zip(infos, targets)), desc="extract", unit="file"):
            os.makedirs(target if info.is_dir() else os.path.dirname(target), exist_ok=True)
            if info.is_dir():
                continue
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            mtime = time.mktime(info.date_time + (0, 0, -1))
            os.utime(target, (mtime, mtime))


def safe_extract(archive, dest):
    """Extract a .zip or tar archive (.tar, .tar.gz, .tgz, ...) into dest; return dest. Every member is
    checked before anything is written: an absolute path, a '..' component, a symlink or hard link, or a
    device raises UnsafeArchiveError."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest_real = os.path.realpath(dest)
    name = archive.name.lower()
    try:
        if name.endswith(".zip") or (not is_archive_name(name) and zipfile.is_zipfile(archive)):
            _extract_zip(archive, dest_real)
        elif is_archive_name(name) or tarfile.is_tarfile(archive):
            _extract_tar(archive, dest_real)
        else:
            raise SplitDataError(f"{archive}: not a folder, .zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise SplitDataError(f"{archive}: damaged or unsupported archive ({e})") from e
    return dest


def _find_nested_archive(folder):
    """The archive inside an extracted archive that holds the images, or None: the official zip holds
    caltech-101/101_ObjectCategories.tar.gz beside Annotations.tar; a lone archive without images counts too."""
    archives, has_images = [], False
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        files = [f for f in sorted(filenames) if not is_hidden(f)]
        archives += [Path(dirpath) / f for f in files if is_archive_name(f)]
        has_images = has_images or any(is_image_name(f) for f in files)
    named = [a for a in archives if a.name.startswith("101_ObjectCategories")]
    return named[0] if named else archives[0] if len(archives) == 1 and not has_images else None


def extract_source(archive, dest):
    """Safely extract `archive` (and the tar.gz nested in the official zip) under dest; return the
    folder that holds the images."""
    dest = Path(dest)
    outer = safe_extract(archive, dest / "outer")
    nested = _find_nested_archive(outer)
    if nested is None:
        return outer
    inner = safe_extract(nested, dest / "inner")
    shutil.rmtree(outer)  # the nested copy is no longer needed; free the disk early
    return inner


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, md5, timeout=60.0):
    """Fetch url to dest via dest.part, check its MD5, rename into place; return dest. Any failure raises
    SplitDataError with a one-line message saying where to put the file by hand, leaving no file behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    by_hand = f"download {url} by hand and save it as {dest}, then rerun"
    try:
        h = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with progress(total=total, desc="download", unit="B", unit_scale=True) as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        f.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise SplitDataError(f"could not download {url} ({reason}); {by_hand}") from e
        if h.hexdigest() != md5.lower():
            raise SplitDataError(f"{url}: MD5 {h.hexdigest()} does not match the expected {md5}; "
                                 f"the file was not kept; {by_hand}")
        os.replace(part, dest)
    except BaseException:  # no .part file left behind, whatever stopped us
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    records.fsync_dir(dest.parent)
    return dest


def fetch_official(url, md5, dest):
    """dest (dataset/caltech-101.zip), downloaded unless already there with the right MD5."""
    dest = Path(dest)
    if dest.exists():
        got = file_md5(dest)
        if got != md5.lower():
            raise SplitDataError(f"{dest} exists but its MD5 is {got}, not {md5}; delete or replace it by hand")
        print(f"{dest} already downloaded (MD5 ok)")
        return dest
    print(f"downloading {url} -> {dest}")
    return download(url, dest, md5)
