"""orchestrator.worker pieces that need no Ray: which epochs are reported to Ray Train."""

from __future__ import annotations

import pytest

from orchestrator.worker import ReportThrottle


def _epochs(
    throttle: ReportThrottle, seconds: list[float], checkpoint_at: frozenset[int] = frozenset()
) -> list[int]:
    reported = []
    for epoch, s in enumerate(seconds, start=1):
        metrics = {"epoch": epoch, "loss": 1.0, "seconds": s}
        if throttle.due(metrics, epoch in checkpoint_at):
            reported.append(epoch)
    return reported


def test_short_epochs_are_reported_once_per_interval() -> None:
    # 0.2 s epochs, 0.5 s interval: a report once 0.5 s of training has accumulated
    assert _epochs(ReportThrottle(0.5), [0.2] * 10) == [3, 6, 9]


def test_checkpoint_epochs_are_always_reported() -> None:
    # epochs 4 and 9 checkpoint; 0.5 s accumulates again by epoch 9 after the report at 4
    reported = _epochs(ReportThrottle(0.5), [0.1] * 12, checkpoint_at=frozenset({4, 9}))
    assert reported == [4, 9]
    assert _epochs(ReportThrottle(0.5), [0.2] * 6, checkpoint_at=frozenset({2})) == [2, 5]


def test_long_epochs_and_zero_interval_report_every_epoch() -> None:
    assert _epochs(ReportThrottle(0.5), [3.0] * 4) == [1, 2, 3, 4]
    assert _epochs(ReportThrottle(0.0), [0.01] * 4) == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_rejects_a_bad_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="report_interval_s"):
        ReportThrottle(bad)
