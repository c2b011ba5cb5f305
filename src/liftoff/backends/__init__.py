"""Model backends: echo (no dependencies), and real engines added later.

Backends see ``core`` types and ``config`` only; never a wire schema, never the gateway. Heavy libraries are
imported lazily, from the backend's own module, only when that backend is selected.
"""
