"""The embedded broker (the default): the gateway itself queues requests and pushes them to readers connected to
its internal port over a WebSocket. :mod:`.gateway` is the gateway's half, :mod:`.link` the reader's.
"""
