"""``python -m orchestrator.cli`` (as ``semicon-sweep``)."""

from orchestrator.cli import main

main()
