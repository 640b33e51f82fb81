"""Atomic file writes: a temporary file beside the target, renamed onto it only when complete.

A reader of the target sees the old file or the whole new one, never part of either; a failed
write leaves no temporary file behind. The new file gets mode 0644.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Tuple


@contextlib.contextmanager
def replaced_atomically(target: Path) -> Iterator[Tuple[int, str]]:
    """Yield ``(fd, tmp)``: an open descriptor and path of a new temporary file beside ``target``.

    The caller writes through ``fd`` (and closes it, e.g. with ``os.fdopen``). When the block
    ends normally the file is made 0644 and renamed onto ``target`` (a hard link at ``target``
    is replaced, not written through); when it raises, the temporary file is deleted.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        yield fd, tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; the parent folder must exist."""
    with replaced_atomically(Path(path)) as (fd, _):
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
