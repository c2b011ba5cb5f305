"""``POST /embed`` and ``POST /classify`` on the inference port (takeoff-spec §2.1.5-6).

They need embedding and classification readers. No backend serves those kinds of model yet, so both validate the
body and answer a 400 that says so (``not_supported``), rather than being missing routes (404) or hanging.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from liftoff.core.errors import NotSupportedError
from liftoff.gateway.http import json_body, read_model
from liftoff.protocol.native import ERROR_RESPONSES, ClassifyRequest, EmbedRequest

router = APIRouter(tags=["inference"])


@router.post("/embed", responses=ERROR_RESPONSES, openapi_extra=json_body(EmbedRequest))
async def embed(request: Request) -> Response:
    """Embeddings of texts; needs an embedding reader (none can be created yet: 400)."""
    await read_model(request, EmbedRequest)
    raise NotSupportedError(
        "/embed needs an embedding reader, and no Liftoff backend serves embedding models yet", param="consumer_group"
    )


@router.post("/classify", responses=ERROR_RESPONSES, openapi_extra=json_body(ClassifyRequest))
async def classify(request: Request) -> Response:
    """Scores of texts or text pairs; needs a classification reader (none can be created yet: 400)."""
    await read_model(request, ClassifyRequest)
    raise NotSupportedError(
        "/classify needs a classification reader, and no Liftoff backend serves classification models yet",
        param="consumer_group",
    )
