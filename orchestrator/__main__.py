"""``python -m orchestrator``: the same as the ``semicon-sweep`` console script."""

from orchestrator.cli import main

main()
