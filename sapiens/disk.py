"""Where a run writes: checked before it starts, and a full disk named when it happens.

A run that fails at its first checkpoint, hours in, because ``checkpoints`` is a file or the output
folder is read-only, has wasted those hours: :func:`check_writable_dir` finds that before anything
starts. A disk that fills up during a run is reported as ``no space left on <mount> (<device>) while
writing <file>`` (:func:`no_space_error`) instead of the error of whichever library was writing.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

# errno values that mean "the place to write is wrong", which the user can fix.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
}


class WriteError(OSError):
    """An OSError whose message (``strerror``) already says what, where and why, in one line."""


def mount_of(path: str | os.PathLike) -> tuple[str, str]:
    """(mount point, device) of the file system holding ``path`` (from /proc/mounts when there is
    one; else the path's nearest existing folder and "?")."""
    path = os.path.realpath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    best = (path, "?")
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[:2] for line in f]
    except OSError:
        return best
    matches = [
        (point, device)
        for device, point in mounts
        if path == point or path.startswith(point.rstrip("/") + "/")
    ]
    if matches:
        point, device = max(matches, key=lambda m: len(m[0]))
        best = (point.replace("\\040", " "), device)
    return best


def no_space_error(path: str | os.PathLike, cause: OSError | None = None) -> OSError:
    """The one-line ENOSPC error for a failed write of ``path``."""
    point, device = mount_of(Path(path).parent)
    code = cause.errno if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT) else errno.ENOSPC
    what = "no space left" if code == errno.ENOSPC else "disk quota exceeded"
    return WriteError(code, f"{what} on {point} ({device}) while writing {path}", str(path))


def describe_os_error(err: OSError) -> str | None:
    """One line for an OSError the user can fix (full disk, read-only, permissions, a file where a
    folder should be); None for other OSErrors."""
    if isinstance(err, WriteError):
        return str(err.strerror)
    if err.errno not in WRITE_ERRNOS:
        return None
    what = WRITE_ERRNOS[err.errno]
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        if not err.filename:  # a write() into an open file: Python does not know its name
            return f"{what} on a device while writing a file of the run ({err})"
        point, device = mount_of(Path(err.filename).parent)
        return f"{what} on {point} ({device}) while writing {err.filename}"
    return f"{what}: {err.filename}" if err.filename else f"{what} ({err})"


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise a one-line OSError unless ``path`` is, or can be created as, a folder we can write in.

    Nothing is created: a missing folder is checked through its nearest existing ancestor. An
    existing folder is probed with a file created and removed at once (permission bits do not tell
    the whole story: read-only mounts, root, ACLs).
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink() or probe == probe.parent:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise WriteError(errno.ENOTDIR, f"{what} {path} cannot be a folder: {probe} is a file", str(probe))
    test = probe / f".sapiens-write-test-{uuid.uuid4().hex[:8]}"
    try:
        test.touch()
        test.unlink()
    except OSError as err:
        reason = WRITE_ERRNOS.get(err.errno, err.strerror or str(err))
        raise WriteError(
            err.errno, f"{what} {path} is not writable: {reason} in {probe}", str(probe)
        ) from None
