"""How the project reports a user's mistake: one line, no traceback, exit status 1."""


def fail(msg):
    """A clear one-line error for the user (SystemExit, so the grid can record it and go on)."""
    raise SystemExit(f"error: {msg}")


# What frees GPU memory in each step of a run, after --gpu-cache off where decode caches are
# resident. Only training's batch grows with --batch-size (evaluation batches are
# max(64, --batch-size) images), so only training suggests a smaller one.
GPU_CACHE_OFF = "--gpu-cache off (decode caches in host memory, same results)"
OOM_REMEDIES = {"setup": None, "decode caches": GPU_CACHE_OFF, "training": "--batch-size", "evaluation": None,
                "frozen prefix": "--cache-frozen off", "probe": None, "features": None, "test": None}


def oom_message(batch_size, stage, caches_resident):
    """The one line every out-of-memory error of a run ends with: the step it happened in (a key of
    OOM_REMEDIES) and what to try, --gpu-cache off first when decode caches sit in GPU memory."""
    tries = [GPU_CACHE_OFF] if caches_resident else []
    remedy = OOM_REMEDIES[stage]
    if remedy == "--batch-size":
        tries.append(f"--batch-size {max(2, batch_size // 2)}")
    elif remedy and remedy not in tries:
        tries.append(remedy)
    line = f"out of GPU memory in the {stage} stage" if stage != "decode caches" else \
        "out of GPU memory while placing the decode caches on the GPU"
    if stage == "training":
        line += f" with --batch-size {batch_size}"
    if not tries:
        return f"{line}; the decode caches are in host memory already: free the GPU of other work or use a larger one"
    return f"{line}; try {tries[0]}" + "".join(f", then {t}" for t in tries[1:])
