"""``/docs``: Swagger UI from the vendored ``swagger-ui-dist`` (no CDN, works under the CSP)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.routes._web import templates

router = APIRouter(include_in_schema=False)


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "docs.html",
        {"title": request.app.title, "openapi_url": request.app.openapi_url or "/openapi.json"},
    )
