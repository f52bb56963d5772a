"""Progress events shared by long operations.

Long operations are generators that yield :class:`Progress` and ``return`` their result;
the CLI, the tests and the widgets consume the same generator (see :func:`run`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of work finished; ``message`` says which."""

    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


def run(
    generator: Generator[Progress, None, T],
    callback: Callable[[Progress], None] | None = None,
) -> T:
    """Drive a progress generator to its end and return its result.

    ``callback`` receives every event (e.g. to update a tqdm bar).
    """
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)
