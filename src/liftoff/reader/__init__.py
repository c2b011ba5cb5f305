"""The reader process: load a backend, register with a gateway, pull work for its consumer groups, stream results.

``engine`` drives the backend on its own thread (admit → step → evict); ``process`` is the asyncio side that
talks to the broker, sends heartbeats and shuts down cleanly.
"""
