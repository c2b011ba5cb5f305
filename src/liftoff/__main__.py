"""``python -m liftoff`` runs the command-line interface."""

from __future__ import annotations

from liftoff.cli import main

if __name__ == "__main__":
    main()
