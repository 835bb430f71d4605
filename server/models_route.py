"""GET /v1/models: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .serving import Serving

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    serving: Serving = request.app.state.serving
    card = {
        "id": serving.model_name,
        "object": "model",
        "created": int(serving.client.started_at),
        "owned_by": "diffulex",
        "max_model_len": serving.max_model_len,
        "strategy": serving.strategy,
    }
    return {"object": "list", "data": [card]}
