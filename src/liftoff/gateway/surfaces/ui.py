"""The web UI on the inference port: pages at ``/``, ``/playground``, ``/chat``, ``/readers``, ``/dashboard`` and
``/api-docs``, their files under ``/ui/``, and ``/ui/config.json`` (the gateway's ports, which the pages call).

Plain HTML, CSS and JavaScript modules shipped in the package (``liftoff/gateway/ui``): no build step, nothing
fetched from another site, so it works offline. Each page is ``shell.html`` (head, navigation) around its own
``pages/<name>.html``. The pages call the management port (readers, metrics) and the OpenAI port (chat) from the
browser, which the gateway's CORS rules (gateway/cors.py) allow for its own pages only. The pages and their files
need no key (they hold no data); when the ports have keys, the pages ask for them and keep them in the browser's
session storage (gone when the tab closes), never anywhere on the server's side.
"""

from __future__ import annotations

import functools
from pathlib import Path
from string import Template

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from liftoff import __version__
from liftoff.core.errors import NotFoundError
from liftoff.gateway.errors import json_response
from liftoff.gateway.state import get_state

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

# route → (page file under ui/pages, title shown in the navigation)
PAGES: dict[str, tuple[str, str]] = {
    "/": ("index", "Home"),
    "/playground": ("playground", "Playground"),
    "/chat": ("chat", "Chat"),
    "/readers": ("readers", "Readers"),
    "/dashboard": ("dashboard", "Metrics"),
    "/api-docs": ("api-docs", "API docs"),
}

MEDIA_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
}

# Scripts and styles from the page's own origin only; the pages fetch from the gateway's other ports.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' http: https:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

router = APIRouter(tags=["web UI"], include_in_schema=False)


@functools.cache
def render_page(path: str) -> str:
    """The HTML of the page at ``path`` (a key of :data:`PAGES`): the shell around the page's own content, read
    from the package once."""
    name, title = PAGES[path]
    current = ' aria-current="page"'
    links = "".join(
        f'<a href="{href}"{current if href == path else ""}>{label}</a>'
        for href, (_, label) in PAGES.items()
        if href != "/"
    )
    shell = Template((UI_DIR / "shell.html").read_text(encoding="utf-8"))
    return shell.substitute(
        title="Liftoff" if path == "/" else f"{title} · Liftoff",
        page=name,
        nav=links,
        main=(UI_DIR / "pages" / f"{name}.html").read_text(encoding="utf-8"),
        version=__version__,
    )


def _page_route(path: str) -> None:
    def page() -> Response:
        return Response(render_page(path), media_type=MEDIA_TYPES[".html"], headers=SECURITY_HEADERS)

    page.__name__ = f"ui_page_{PAGES[path][0].replace('-', '_')}"
    router.add_api_route(path, page, methods=["GET"])


for _path in PAGES:
    _page_route(_path)


@router.get("/ui/config.json")
async def ui_config(request: Request) -> Response:
    """What the pages need to know: the gateway's ports (by name), whether metrics are served, and which ports need
    a key (whether, never which)."""
    config = get_state(request).config
    ports = {"inference" if key == "port" else key.removesuffix("_port"): getattr(config, key)
             for key in config.port_fields()}  # fmt: skip
    keys = {"inference": bool(config.api_keys), "management": bool(config.management_api_keys)}
    body = {"version": __version__, "ports": ports, "enable_metrics": config.enable_metrics, "keys": keys}
    return json_response(body, headers={"cache-control": "no-cache"})


@router.get("/ui/{path:path}")
def ui_file(path: str) -> Response:
    """A file of the UI (stylesheet, script, icon)."""
    file = (UI_DIR / path).resolve()
    media_type = MEDIA_TYPES.get(file.suffix)
    if media_type is None or not file.is_relative_to(UI_DIR) or not file.is_file():
        raise NotFoundError(f"the web UI has no file {path!r}")
    return FileResponse(file, media_type=media_type, headers=SECURITY_HEADERS)
