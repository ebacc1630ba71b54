"""Writing files so that a killed job never leaves a half-written one behind."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing and rename it onto ``path`` when the
    block ends without error (the old file, if any, stays whole until then). The file gets the
    usual permissions (0666 minus the umask), not mkstemp's 0600. Folders are created."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            # name the file being written, not the temporary one beside it
            raise type(e)(e.errno, e.strerror, path) from None
        raise
