"""The Redis broker (``--broker redis://...``): gateways and readers on many hosts share queues, replies and the
reader registry through Redis Streams. :mod:`.gateway` is the gateway's half, :mod:`.link` the reader's.

Nothing is imported here: the redis client loads only when this broker is chosen.
"""
