"""Progress over the modules of a merge: a tqdm bar on stderr, or the caller's callback."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Tuple, Union

#: ``progress(modules done, modules in all)``
ProgressCallback = Callable[[int, int], None]
#: what the merge functions accept: None (a bar if the merge takes longer than `AUTO_DELAY` seconds),
#: True (a bar), False (nothing) or a callback
Progress = Union[bool, ProgressCallback, None]

#: seconds a merge runs before the bar of ``progress=None`` appears (short merges stay silent)
AUTO_DELAY = 2.0


class ProgressBar:
    """A tqdm bar over modules on stderr, made when the first report gives the total; it appears after
    ``delay`` seconds (tqdm's ``delay``) and is removed when closed."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="module", desc="merging", file=sys.stderr, leave=False, delay=self.delay)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _nothing() -> None:
    pass


def progress_reporter(progress: Progress) -> Tuple[Optional[ProgressCallback], Callable[[], None]]:
    """(the callback to hand the engine, the function to call when the merge ends) for ``progress``."""
    if progress is None or progress is True:
        bar = ProgressBar(delay=AUTO_DELAY if progress is None else 0.0)
        return bar, bar.close
    if progress is False:
        return None, _nothing
    if callable(progress):
        return progress, _nothing
    raise TypeError(
        f"progress must be True (a progress bar), False (none), None (a bar for merges longer than "
        f"{AUTO_DELAY:g} s) or a callable progress(done, total), got {progress!r}."
    )
