"""One ASGI app per port, each composed of the surfaces that port serves, sharing one :class:`GatewayState`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp

from liftoff import __version__
from liftoff.gateway.auth import KEYS_OF_PORT, guard
from liftoff.gateway.cors import CrossOriginMiddleware
from liftoff.gateway.errors import Renderer, install_error_handlers, render_native, render_openai
from liftoff.gateway.fastpath import FastRoutes, Handler
from liftoff.gateway.hosts import HostGuard, HostNames
from liftoff.gateway.http import BodyLimitMiddleware
from liftoff.gateway.observe import ObserveMiddleware, PathNames
from liftoff.gateway.state import GatewayState
from liftoff.gateway.surfaces import (
    encoders,
    health,
    internal,
    management,
    native,
    openai,
    sagemaker,
    snowflake,
    tokens,
    ui,
    vertex,
)

# config key of the port → (title, routers)
PORT_SURFACES: dict[str, tuple[str, list[APIRouter]]] = {
    "port": ("inference", [native.router, tokens.router, encoders.router, health.router, ui.router]),
    "management_port": ("management", [management.router, health.router]),
    "vertex_port": ("vertex", [vertex.router, health.router]),
    "openai_port": ("openai", [openai.router, encoders.openai_router, health.router]),
    "snowflake_port": ("snowflake", [snowflake.router, health.router]),
    "sagemaker_port": ("sagemaker", [sagemaker.router, health.router]),
    "internal_port": ("internal", [internal.router, health.router]),
}

# config key of the port → its hottest routes, served past FastAPI's routing (see gateway/fastpath.py)
HOT_ROUTES: dict[str, dict[tuple[str, str], Handler]] = {
    "port": {
        ("POST", "/generate"): native.generate,
        ("POST", "/generate_stream"): native.generate_stream,
        ("POST", "/embed"): encoders.embed,
    },
    "openai_port": {("POST", "/v1/embeddings"): openai.embeddings},
}

# config key of the port → how its errors look (native JSON unless listed)
RENDERERS: dict[str, Renderer] = {"openai_port": render_openai}


def port_keys(port_key: str, state: GatewayState) -> tuple[str, ...]:
    """The keys the port ``port_key`` requires (none: it is open)."""
    config = state.config
    keys = getattr(config, KEYS_OF_PORT.get(port_key, "api_keys"))
    return (keys,) if isinstance(keys, str) else tuple(keys or ())


def open_paths(port_key: str, state: GatewayState) -> list[str]:
    """Paths of this port served without a key beyond the usual ones (auth.OPEN_PATHS), from the configuration."""
    config = state.config
    if port_key == "management_port" and config.public_metrics:
        return ["/metrics"]
    if port_key == "vertex_port" and config.vertex_health_route:
        return [config.vertex_health_route]
    return []


def build_app(port_key: str, state: GatewayState, names: HostNames | None = None) -> ASGIApp:
    """The app of one port (``port_key`` is its config key, e.g. ``management_port``).

    From the outside in: observation (metrics, the request log), the ``Host`` check, CORS, the key check, the body
    limit, the hot routes, FastAPI. A refusal by any layer is rendered in the port's error shape, observed, and
    (from CORS inwards) readable by the gateway's own pages."""
    title, routers = PORT_SURFACES[port_key]
    app = FastAPI(
        title=f"Liftoff {title} API",
        version=__version__,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.liftoff = state
    for router in routers:
        app.include_router(router)
    if port_key == "vertex_port":
        vertex.add_aip_routes(app, state.config.vertex_health_route, state.config.vertex_predict_route, health.healthz)
    render = RENDERERS.get(port_key, render_native)
    install_error_handlers(app, render)
    asgi: ASGIApp = app
    hot = HOT_ROUTES.get(port_key)
    if hot:
        asgi = FastRoutes(app, hot, render)
    asgi = BodyLimitMiddleware(asgi, state.config.body_size_limit_bytes, render)
    asgi = guard(asgi, port_key, port_keys(port_key, state), render, open_paths(port_key, state))
    asgi = CrossOriginMiddleware(asgi, state.ports(), render)  # outside the limit and keys: their errors get CORS
    asgi = HostGuard(asgi, names or HostNames.of(state.config), render)
    return ObserveMiddleware(asgi, port=getattr(state.config, port_key), paths=PathNames(app.routes),
                             metrics=state.metrics, request_log=state.request_log)  # fmt: skip
