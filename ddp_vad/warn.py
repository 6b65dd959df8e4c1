"""The one way the toolkit warns the user: ``warning: <what>`` on one line on stderr, like its errors.

Python's ``warnings.warn`` would print a category and the source line that raised it (``video.py:193: UserWarning:
...``), which tells a user nothing; a warning here names the file or value it is about, first.
"""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """Print ``warning: <message>`` on one line on stderr (newlines in the message become spaces).

    Start the message with the path or value it is about: ``warn(f"{path}: decoding stopped after 12 frames")``.
    """
    line = " ".join(str(message).split())
    print(f"warning: {line}", file=sys.stderr, flush=True)
