"""What a run is, beyond its options: the data it saw, how it was computed, its weights.

A run's options are recorded as given (config.json). Several things change its numbers without
being options: the split that lay in --data, the images of each class, the validation carve, the
number of processes (and so the global batch), the precision that `auto` resolved to, the device
type (and with it the augmentation's renderer) and the bytes of a weights file. They are recorded as
the config's "identity" entry (run_identity). A resume, a grid's reuse of a folder and --compare's
reuse of a grid winner refuse a run whose identity differs, naming what differs (check_same_run);
report.py keeps runs of different splits in different tables.
"""
import hashlib
from pathlib import Path

from .errors import fail
from .options import describe_differences, differing_options


def run_identity(config, world, device_type, precision, data_id):
    """The config's "identity" entry: the data it sees (data.data_identity), how it computes, and
    its weights file's bytes."""
    return {"data": data_id, "compute": compute_identity(world, config["batch_size"], precision, device_type),
            "weights": weights_identity(config["weights"])}


def compute_identity(processes, batch_size, precision, device_type):
    """How a run computes: processes, global batch (images per optimizer step over all processes),
    the resolved precision, the device type and the augmentation's renderer, which follows it (PIL
    on the CPU, tensor ops on a GPU: they differ in antialiasing and interpolation)."""
    return {"processes": processes, "global_batch": batch_size * processes, "precision": precision,
            "device_type": device_type, "render": render_path(device_type)}


def render_path(device_type):
    return "tensor ops" if device_type == "cuda" else "PIL"


def weights_identity(weights):
    """imagenet, none, or 'sha256:...' of a weights file: a file replaced under the same name is
    other weights."""
    if weights in ("imagenet", "none"):
        return weights
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def batch_label(per_process, processes):
    """The global batch a table shows: '64', or '256 (64 x 4)' where processes share each step."""
    processes = processes or 1
    return str(per_process) if processes == 1 else f"{per_process * processes} ({per_process} x {processes})"


def file_changes(there, now):
    """'train/accordion: 1 image added' for each class folder that differs, in order."""
    out = []
    for key in sorted(set(there) | set(now)):
        a, b = there.get(key), now.get(key)
        if a == b:
            continue
        if a is None:
            out.append(f"{key}: new ({b[0]} images)")
        elif b is None:
            out.append(f"{key}: gone ({a[0]} images)")
        elif a[0] == b[0]:
            out.append(f"{key}: images replaced")
        else:
            n = b[0] - a[0]
            out.append(f"{key}: {abs(n)} image{'s' if abs(n) != 1 else ''} {'added' if n > 0 else 'removed'}")
    return out


def data_differences(there, now):
    """[line] naming how the data a run saw differs from what lies in --data now."""
    if there is None:
        return ["the data it saw was not recorded (a run from before data fingerprints)"]
    out = []
    changes = file_changes(there.get("files", {}), now["files"])
    if there.get("split") != now["split"]:
        shown = "; ".join(changes[:3]) + (f"; {len(changes) - 3} more" if len(changes) > 3 else "")
        out.append(f"the split in --data is another one (split {there.get('split', '?')[:12]} there, "
                   f"{now['split'][:12]} now" + (f": {shown})" if shown else ")"))
    elif changes:
        out.append("images changed in --data: " + "; ".join(changes[:3]))
    if there.get("carve") != now["carve"] and not out:
        out.append(f"the validation carve differs (carve {there.get('carve')} there, {now['carve']} now)")
    return out


def compute_differences(there, now):
    """[line] for process count, global batch, precision, device type and renderer."""
    if there is None:
        return ["how it was computed was not recorded (a run from before process and precision records)"]
    out = []
    if there["processes"] != now["processes"] or there["global_batch"] != now["global_batch"]:
        out.append(f"{there['processes']} process(es) there (global batch {there['global_batch']}), "
                   f"{now['processes']} now (global batch {now['global_batch']})")
    if there["precision"] != now["precision"]:
        out.append(f"precision {there['precision']} there, {now['precision']} now")
    if there["device_type"] != now["device_type"]:
        out.append(f"device {there['device_type']} there, {now['device_type']} now (its augmentation rendered by "
                   f"{render_path(there['device_type'])} there, {now['render']} now)")
    return out


def weights_differences(saved, config):
    """[line] when the weights differ: by their bytes where recorded, else by the option's value."""
    there, now = (saved.get("identity") or {}).get("weights"), (config.get("identity") or {}).get("weights")
    if there is not None and now is not None:
        return [] if there == now else [f"--weights {saved.get('weights')} there holds other weights than "
                                        f"{config.get('weights')} now"]
    a, b = saved.get("weights"), config.get("weights")
    resolved = lambda w: w if w in ("imagenet", "none", None) else str(Path(w).resolve())
    return [] if resolved(a) == resolved(b) else [f"--weights {a} there, {b} now"]


def differences(saved, config):
    """Every way the run in `saved` (a config with its identity) differs from `config` as it would
    run now (its "identity" entry holds what is known of it now): options, weights, then data, then
    computation. -> [line]; [] when it is the same run."""
    diff = differing_options(saved, config)
    out = [describe_differences(diff)] if diff else []
    out += weights_differences(saved, config)
    there, now = saved.get("identity") or {}, config.get("identity") or {}
    if "data" in now:
        out += data_differences(there.get("data"), now["data"])
    if "compute" in now:
        out += compute_differences(there.get("compute"), now["compute"])
    return out


def check_same_run(saved, config, what, advice):
    """Refuse, in one line, to continue or reuse a run that is not this one. what: e.g. '--resume
    runs/x/last.pth: the run was made with other options or data'; advice: what the user can do."""
    diff = differences(saved, config)
    if diff:
        fail(f"{what} ({'; '.join(diff)}); {advice}")
