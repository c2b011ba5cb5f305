"""The Broker contract between gateways and readers, and its implementations.

``embedded`` (default): the gateway is the broker; readers connect to its internal port over a WebSocket.
Frames only (``core.frames``), never pydantic models.
"""
