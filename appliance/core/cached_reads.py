"""Reading a small file on the event loop when, and only when, that cannot wait for a disk.

An image download used to read its PNG on a worker thread: the hand-over to
the thread and back cost more than the rest of the request. An image is
usually downloaded just after it was written, while its pages are still in
the kernel's cache; a read with RWF_NOWAIT then copies them at once, and is
refused (EAGAIN) where it would have to wait for the disk. The caller reads on
a thread then, as before.

Only on local filesystems: on NFS or CephFS (a cluster's shared images folder)
even opening a file asks the server, which may be slow or gone, so reads there
always go to a thread. Opening a file on a local disk may, rarely, read its
inode from the disk: a single small read, like SQLite's own on the event loop.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Filesystems on this machine's own memory or disks.
LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "tmpfs", "ramfs",
    "overlay",
})

# Larger files go to a thread whatever the cache holds: copying them would hold the loop.
MOST_BYTES = 16 * 1024 * 1024

MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field


def filesystem_type(folder: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the filesystem that holds `folder` (which need not exist yet);
    None where the system does not say (no /proc, not Linux)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(folder)
    best, best_type = "", None
    for line in lines:
        fields, _, after = line.partition(" - ")
        parts = fields.split(" ")
        if len(parts) < 5 or not after:
            continue
        mount_point = _unescape(parts[4])
        inside = (target == mount_point
                  or target.startswith(mount_point.rstrip("/") + "/"))
        # The longest mount point holding it wins; a later mount over the same point too.
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, after.split(" ")[0]
    return best_type


def on_local_disk(folder: Path, mountinfo: Path = MOUNTINFO) -> bool:
    return filesystem_type(folder, mountinfo) in LOCAL_FILESYSTEMS


_WOULD_WAIT = frozenset({errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})


def read_if_cached(path: Path) -> bytes | None:
    """The whole file when the kernel has all of it in memory; None when reading it would
    wait for a disk, or it is larger than MOST_BYTES, or the system cannot tell.

    Errors of the file itself (missing, not permitted) are raised as a plain read raises them.
    """
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > MOST_BYTES:
            return None
        content = bytearray(size + 1)  # one byte more: a file that grew is not read short
        try:
            read = os.preadv(fd, [content], 0, nowait)
        except OSError as error:
            if error.errno in _WOULD_WAIT:
                return None
            raise
    finally:
        os.close(fd)
    # Part of it cached (a short read), or it changed size meanwhile: let a thread read it.
    return bytes(content[:size]) if read == size else None
