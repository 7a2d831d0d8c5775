"""The ``corrflow`` command line: the main app (:mod:`.app`) and its sub-apps, one module each."""

from corrflow.cli.app import app, main

__all__ = ["app", "main"]
