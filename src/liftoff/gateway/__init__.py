"""The gateway: one ASGI app per port, the surfaces (native, management, ...), translation, dispatch, and the
server runner that serves every port from one event loop."""
