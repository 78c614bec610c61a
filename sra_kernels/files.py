"""Atomic file writes: new contents go to a temporary file beside the target, are flushed and fsynced, then
renamed onto it, so a crash or a kill leaves either the old file or the new one, never a truncated one."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file for ``path``'s new contents (``torch.save(obj, f)``, ``f.write(data)``, ...).

    They replace ``path`` in one rename when the block ends; on an exception ``path`` is left as it was
    and the temporary file is removed. An existing file keeps its permissions; a symlink is written through.
    """
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            if target.exists():
                os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path``'s contents with ``text`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as file:
        file.write(text.encode(encoding))


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform lets a folder be fsynced (not on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
