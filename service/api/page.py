"""The web page: `GET /` and its assets under `/static/`, shipped in the package (service/static).

HTTP only. The page is a client of the /v1 API like any other: no templating, no build step, and
a Content-Security-Policy that lets it load nothing from anywhere but this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFound, shown

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Scripts, styles and requests only to this origin; images also from canvases (blob:, data:).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag), so a new release shows at once
}

router = APIRouter(include_in_schema=False)


def static_files() -> list[str]:
    """The names served under /static/: the page's own files, nothing else."""
    return sorted(p.name for p in STATIC_DIR.iterdir() if p.suffix in MEDIA_TYPES)


def _asset(name: str) -> FileResponse:
    path = STATIC_DIR / name
    if name.startswith(".") or path.suffix not in MEDIA_TYPES or not _is_file(path):
        raise NotFound(
            f"no static file {shown(name)}; the page's files are {', '.join(static_files())}"
        )
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; False for a name the filesystem refuses (too long, say)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    """The page: try a model, compare folded with unfolded, read the model card."""
    return _asset("index.html")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(name: str) -> FileResponse:
    return _asset(name)
