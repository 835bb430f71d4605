"""GET /health: 200 while the engine serves and accepts work, 503 with the reason otherwise (for load
balancers): shutting down, the engine thread stopped, or (data parallel) a replica died."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .serving import Serving

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    serving: Serving = request.app.state.serving
    reason = serving.client.unhealthy_reason()
    if reason is None:
        return JSONResponse({"status": "ok", "model": serving.model_name})
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
