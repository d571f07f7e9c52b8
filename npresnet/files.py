"""What every file npresnet writes shares: the permissions a new file gets."""
from __future__ import annotations

import os


def new_file_mode() -> int:
    """The mode open() gives a new file here: 0o666 less the process's umask.

    The atomic writer's temporary files come from tempfile.mkstemp, which makes them 0600 (private
    scratch space); the file renamed into place must have the usual permissions instead. The umask
    can only be read by setting it, so it is set back at once (a moment no other thread writes files in).
    """
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask
