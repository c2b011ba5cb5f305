"""Liftoff: an open-source LLM inference server that speaks Titan Takeoff's APIs.

The package is layered (see docs/architecture.md): ``core`` < ``config`` < ``broker``/``backends`` <
``reader``/``management`` < ``gateway`` < ``cli``. Importing this package imports nothing heavy.
"""

from __future__ import annotations

__version__ = "0.1.0"
