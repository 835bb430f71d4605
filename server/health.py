"""GET /health: 200 while the engine thread runs and accepts work, 503 otherwise (for load balancers)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .serving import Serving

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    serving: Serving = request.app.state.serving
    if serving.client.accepting and serving.client.alive:
        return JSONResponse({"status": "ok", "model": serving.model_name})
    return JSONResponse({"status": "unavailable"}, status_code=503)
