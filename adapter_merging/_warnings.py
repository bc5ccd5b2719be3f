"""Warnings that point at the user's line, not at the library's."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside adapter_merging, as seen from the caller of this."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


class MergeWarning(UserWarning):
    """A merge that goes on but costs something the user should know (a measured error, an ignored
    option): adapter_merging's warnings are of this class."""


def warn(message: str) -> None:
    """``warnings.warn(message, MergeWarning)`` attributed to the user's code that called adapter_merging."""
    warnings.warn(message, MergeWarning, stacklevel=user_stacklevel())
