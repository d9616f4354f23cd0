"""The spec's errors: ``SpecError`` for every spec that cannot be run, ``GridTooLarge`` for a grid
over the trial limit ``MAX_TRIALS``."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec that cannot be run; the message reads ``"<file>: <dotted.key>: <message>"``."""


# A grid of more trials than this is refused before any point is built (each point is checked
# and planned one by one, about 15 ms each); the CLI's --allow-large-grid lifts the limit.
MAX_TRIALS = 10_000


class GridTooLarge(SpecError):
    """The grid has more than ``max_trials`` points; ``trials`` is the count, ``axes`` the
    (name, number of values) pairs. Raised before any grid point is built."""

    def __init__(self, message: str, trials: int, axes: tuple[tuple[str, int], ...]) -> None:
        super().__init__(message)
        self.trials = trials
        self.axes = axes
