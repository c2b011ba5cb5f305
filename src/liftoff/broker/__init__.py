"""The Broker contract between gateways and readers (:mod:`.base`), and its implementations.

``embedded`` (default): the gateway is the broker; readers connect to its internal port over a WebSocket.
``redis``: gateways and readers share Redis Streams. Frames only (``core.frames``), never pydantic models.
"""
