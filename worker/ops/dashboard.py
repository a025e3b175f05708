"""The ops dashboard: one static page (HTML, vanilla JS, CSS) served at ``/`` and ``/dashboard``.

The page reads the same routes an operator's ``curl`` does — ``/health/*`` openly and
``/admin/reliability/*`` with the bearer token typed into it — so it holds no logic of
its own about the fleet. No build step and no CDN: the files are package data under
``worker/ops/static`` and the charts are SVG drawn by the page's script. The page is
sent with a Content-Security-Policy that allows only its own script and style (no
inline script, no other origin): DLQ entries hold hostile text, and the script inserts
every value as text, never as markup; the policy is the second fence.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/dashboard")
def page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", headers=SECURITY_HEADERS)


def mount(app: FastAPI) -> None:
    """Serve the page and its files (``/static/dashboard.js``, ``/static/dashboard.css``)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
