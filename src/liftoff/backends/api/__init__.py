"""The API backend (``device: api``): a reader that forwards requests to an OpenAI-compatible server.

Nothing is imported here: the registry imports :mod:`.backend` when a reader uses it.
"""
