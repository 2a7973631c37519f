"""How the project reports a user's mistake: one line, no traceback, exit status 1."""


def fail(msg):
    """A clear one-line error for the user (SystemExit, so the grid can record it and go on)."""
    raise SystemExit(f"error: {msg}")


def oom_message(batch_size):
    """The one line every out-of-memory error of a run ends with."""
    return (f"out of GPU memory with --batch-size {batch_size}; "
            f"try --batch-size {max(2, batch_size // 2)}")
