"""Protocol-agnostic vocabulary shared by every Liftoff process: types, frames, errors, ids.

This layer imports nothing internal.
"""
