"""The viewer's web application (Starlette): a JSON API and the static pages that use it.

Pages: ``/`` (gallery, evaluation summary, upload) and ``/item/<id>`` (one image, recomputed on demand).
API, all JSON unless it is a picture:

\b
  GET  /api/info                       what is shown: mode, sources, presets, limits
  GET  /api/summary?source=            counts and classes of one source (for the filters)
  GET  /api/items?source&offset&limit&sort&order&label&q&status&min_score&max_score&min_iou&max_iou
                   &min_confidence&max_confidence   (sort: index, name, class, score, confidence, iou)
  GET  /api/items/<id>                 one item with its full JSON line
  GET  /api/items/<id>/thumb?size=     a cached JPEG thumbnail (sizes 160, 320, 640, 1280)
  GET  /api/items/<id>/explain?cls=&preset=&mode=&layer=&kmax=&k=&percentile=&rescoring=&level=&similarity=&refine=
  GET  /api/explain/<key>/<picture>    mask, density, map<j>, blob<j> of a computed result (PNG)
  GET  /api/classes?q=                 class names for the class box
  GET  /api/metrics, /api/cases?source (evaluation folders)
  POST /api/upload                     an image (multipart field ``file``, or the raw bytes)
  GET  /files/<path>                   a file under the evaluation folder (plots), nothing else

Safety: no file is served by a path from the request except under the evaluation folder (resolved,
symlinks included, dot-files and unknown suffixes refused); result images are served by item id only,
and always decoded and re-encoded. Uploads are capped in bytes and read with the CLI's
:func:`neuroloc.imageio.load_image`. Every page is static; data is inserted by the browser as text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from neuroloc.classes import imagenet_classes
from neuroloc.config import PRESETS, preset_for
from neuroloc.imageio import ImageError, load_image
from neuroloc.options import MIN_FIT_IMAGES
from neuroloc.viewer.compute import KNOBS, ComputeError, Explainer, build_config, knob_fields, parse_knobs, record_for, resolve_target
from neuroloc.viewer.images import THUMB_SIZES, ThumbnailCache, user_cache_dir
from neuroloc.viewer.index import SORTS, STATUSES, UPLOAD_SOURCE, QueryError, ResultsIndex, Source, load_results

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # form boundaries and fields around the file
MAX_PAGE = 500
MAX_INTEGER = 2**63 - 1  # SQLite's
RANGE_PARAMETERS = ("min_score", "max_score", "min_iou", "max_iou", "min_confidence", "max_confidence")
SERVED_SUFFIXES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
    ".json": "application/json", ".jsonl": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8", ".csv": "text/plain; charset=utf-8",
}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


class JSONResponse(StarletteJSONResponse):
    """JSON with every character past ASCII escaped: a line's file name can hold lone surrogates (the bytes
    of a name that is not UTF-8, as ``localize`` writes it), which UTF-8 cannot encode but a ``\\uXXXX``
    escape carries to the page's ``JSON.parse``."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class SecurityHeaders:
    """Adds a strict Content-Security-Policy and friends to every response (pure ASGI middleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HostCheck:
    """Answers 400 to a request whose Host header is not one of ``allowed`` (ports ignored, IPv6 aware):
    a loopback server checks it so that a web page cannot reach it through DNS rebinding."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").lower()
            name = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]
            if name not in self.allowed:
                if scope["type"] == "http":
                    await error(f"invalid host header {host[:80]!r}", 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SameSiteOnly:
    """Answers 403 to a request for data or computing (``/api/``, ``/files/``) that a browser says another web
    site made (``Sec-Fetch-Site: cross-site`` or ``same-site``), or whose ``Origin`` is another host: a page
    elsewhere that knows the port could otherwise keep the model busy through ``<img>`` requests. Links from
    elsewhere to the viewer's pages still open (they are navigations of ``/`` and ``/item/N``)."""

    GUARDED = ("/api/", "/files/")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.GUARDED):
            headers = dict(scope.get("headers") or [])
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
            origin = headers.get(b"origin", b"").decode("latin-1").lower()
            host = headers.get(b"host", b"").decode("latin-1").lower()
            foreign_origin = origin not in ("", "null") and origin.split("://", 1)[-1] != host
            if site in ("cross-site", "same-site") or foreign_origin:
                await error("requests from other web sites are refused; open the viewer's own page", 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Viewer:
    """The state behind the routes: the index, the thumbnail cache, the model and its results."""

    def __init__(self, index: ResultsIndex, explainer: Explainer, cache_dir: Path, max_upload_bytes: int,
                 model_name: str, model_options: dict[str, Any] | None = None, intensity: str = "range") -> None:
        self.index = index
        self.intensity = intensity  # how images of more than 8 bits per sample are read
        self.model_options = model_options or {}  # the backbone's own settings of the default preset
        self.explainer = explainer
        self.cache_dir = cache_dir
        self.thumbs = ThumbnailCache(cache_dir, intensity)
        self.uploads = cache_dir / "uploads"
        self.max_upload_bytes = max_upload_bytes
        self.model_name = model_name
        self.upload_ids: dict[str, int] = {}
        self.upload_lock = threading.Lock()  # two uploads of one picture make one item
        # recomputes wait for the model here, not in the thread pool's threads, which browsing needs
        self.computing = asyncio.Lock()
        self.files_root = index.root.resolve() if index.mode == "evaluation" else None

    # --- helpers -------------------------------------------------------------------------------------------

    def row_or_404(self, request: Request) -> dict[str, Any]:
        row = self.index.row(int(request.path_params["item_id"]))
        if row is None:
            raise HTTPException(404, "no such item")
        return row

    def image_key(self, path: Path) -> str:
        try:
            stat = os.stat(path)
            return f"{os.path.realpath(path)}|{stat.st_mtime_ns}|{stat.st_size}"
        except (OSError, ValueError):  # ValueError: a NUL in the path (reading it then says what is wrong)
            return str(path)

    def explain_row(self, row: dict[str, Any], params: Any) -> dict[str, Any]:
        """Compute (or find cached) the result of an item for the class and knobs in ``params``."""
        preset_name, options = parse_knobs(params)
        config = build_config(preset_name, options, self.model_options)
        class_text = params.get("cls")
        label = row["label"] if class_text in (None, "") else resolve_target(class_text, self.explainer.model.classes)
        path = self.index.image_path(row)
        explained = self.explainer.explain(self.image_key(path), lambda: load_image(path, intensity=self.intensity), label, config)
        return self.explained_json(explained, row["id"])

    def explained_json(self, explained: Any, item_id: int) -> dict[str, Any]:
        base = f"/api/explain/{explained.key}"
        count = len(explained.result["neurons"])
        has_maps = explained.result["has_maps"]
        return {
            "item": item_id,
            "key": explained.key,
            "result": explained.result,
            "pictures": {
                "mask": f"{base}/mask",
                "density": f"{base}/density" if explained.result["has_density"] else None,
                "maps": [f"{base}/map{j}" for j in range(count)] if has_maps else [],
                "blobs": [f"{base}/blob{j}" for j in range(count)] if has_maps else [],
            },
        }

    # --- routes --------------------------------------------------------------------------------------------

    async def index_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def item_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "item.html", media_type="text/html; charset=utf-8")

    async def info(self, request: Request) -> JSONResponse:
        index = self.index
        sources = [{"name": s.name, "count": s.count} for s in index.sources.values()]
        default = next((s["name"] for s in sources if s["name"] != UPLOAD_SOURCE), UPLOAD_SOURCE)
        return JSONResponse({
            "mode": index.mode,
            "results": str(index.results_path),
            "dataset": str(index.dataset) if index.dataset else None,
            "sources": sources,
            "default_source": default,
            "model": self.model_name,
            "presets": {name: {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in preset_for(name, self.model_options).to_dict().items()}
                        for name in sorted(PRESETS)},
            "knobs": list(KNOBS),
            "statuses": list(STATUSES),
            "sorts": list(SORTS),
            "thumb_sizes": list(THUMB_SIZES),
            "max_upload_bytes": self.max_upload_bytes,
            "warnings": index.warnings,
        })

    async def summary(self, request: Request) -> JSONResponse:
        source = request.query_params.get("source") or next(iter(self.index.sources), "")
        if source not in self.index.sources:
            return error(f"unknown source {source[:80]!r}", 404)
        out = self.index.summary(source)
        method = self.index.sources[source].method
        out["source"] = source
        out.update(knob_fields(method, self.model_options))
        return JSONResponse(out)

    async def items(self, request: Request) -> JSONResponse:
        q = request.query_params
        source = q.get("source") or next(iter(self.index.sources), "")
        if source not in self.index.sources:
            return error(f"unknown source {source[:80]!r}", 404)
        try:
            offset = _int(q.get("offset"), "offset", 0)
            limit = min(_int(q.get("limit"), "limit", 60), MAX_PAGE)
            label = _int(q.get("label"), "label", None)
            numbers = {name: _float(q.get(name), name) for name in RANGE_PARAMETERS}
            total, page = await run_in_threadpool(
                self.index.query, source, offset, limit, q.get("sort") or "index", q.get("order") or "asc", label,
                (q.get("q") or "")[:200] or None, q.get("status") or "all", **numbers,
            )
        except QueryError as exc:
            return error(str(exc))
        return JSONResponse({"source": source, "total": total, "offset": offset, "limit": limit, "items": page})

    async def item(self, request: Request) -> JSONResponse:
        row = self.row_or_404(request)
        out = await run_in_threadpool(self.index.item, row["id"])
        if out is None:
            raise HTTPException(404, "no such item")
        source = self.index.sources.get(row["source"])
        out.update(knob_fields(source.method if source else None, self.model_options))
        out["image_found"] = self.index.image_path(row).is_file()
        return JSONResponse(out)

    def thumb(self, request: Request) -> Response:  # sync: runs in the thread pool
        row = self.row_or_404(request)
        size_text = request.query_params.get("size") or "320"
        if not size_text.isascii() or not size_text.isdigit():
            return error(f"size must be a number of pixels, not {size_text[:20]!r}")
        try:
            path = self.thumbs.get(self.index.image_path(row), int(size_text))
        except ValueError as exc:  # also ImageError
            return error(str(exc), 404 if isinstance(exc, ImageError) else 400)
        except OSError as exc:
            return error(f"cannot write the thumbnail to the cache folder {self.thumbs.folder}: {exc.strerror or exc}", 500)
        # An item's address names a row of this server's results, another image after a restart with other
        # results: the browser asks again every time (no-cache) and gets 304 while the thumbnail is the same.
        stat = os.stat(path)
        etag = f'"{hashlib.sha256(os.fsencode(f"{path}|{stat.st_mtime_ns}|{stat.st_size}")).hexdigest()[:24]}"'
        headers = {"Cache-Control": "private, no-cache", "ETag": etag}
        asked = {tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")}
        if etag in asked or "*" in asked:
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    async def explain(self, request: Request) -> JSONResponse:
        row = self.row_or_404(request)
        try:
            async with self.computing:
                if await request.is_disconnected():  # its page closed, or asked anew, while it waited its turn
                    return error("the page no longer waits for this result", 499)
                return JSONResponse(await run_in_threadpool(self.explain_row, row, request.query_params))
        except ComputeError as exc:
            return error(exc.message, exc.status)
        except ImageError as exc:
            return error(str(exc), 422)

    def explain_picture(self, request: Request) -> Response:  # sync: renders PNGs in the thread pool
        explained = self.explainer.cached(request.path_params["key"])
        if explained is None:
            return error("this result is no longer cached; reload the page", 404)
        data = explained.picture(request.path_params["picture"])
        if data is None:
            return error("no such picture", 404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    def classes(self, request: Request) -> JSONResponse:  # sync: may load the model, in the thread pool
        wanted = (request.query_params.get("q") or "").strip().lower()[:100]
        try:
            known = self.explainer.model.classes
        except ComputeError:  # the model cannot be loaded: ImageNet's names still help to read the results
            known = imagenet_classes()
        found = [
            {"label": c.index, "synset": c.synset, "name": c.short_name}
            for c in known
            if not wanted or wanted in c.name.lower() or wanted == c.synset or wanted == str(c.index)
        ]
        return JSONResponse({"classes": found[:30], "total": len(found)})

    async def metrics(self, request: Request) -> JSONResponse:
        root = self.files_root  # set in evaluation mode only
        if root is None:
            return error("not an evaluation folder", 404)
        from neuroloc.evaluation.report import TABLE_COLUMNS

        plots = sorted(p.name for p in (root / "plots").glob("*.png")
                       if p.resolve().is_relative_to(root) and not p.name.startswith("."))
        metrics = self.index.metrics or {}
        return JSONResponse({
            "run": metrics.get("run") or {},
            "methods": metrics.get("methods") or {},
            "halves": metrics.get("halves") or {},
            "columns": [list(c) for c in TABLE_COLUMNS],
            "plots": [f"/files/plots/{quote(name)}" for name in plots],
            "report": "/files/report.md" if (root / "report.md").is_file() else None,
            "per_class": "/files/per_class.csv" if (root / "per_class.csv").is_file() else None,
        })

    async def cases(self, request: Request) -> JSONResponse:
        source = request.query_params.get("source") or next(iter(self.index.sources), "")
        if source not in self.index.sources:
            return error(f"unknown source {source[:80]!r}", 404)
        try:
            n = min(_int(request.query_params.get("n"), "n", 8), 50)
        except QueryError as exc:
            return error(str(exc))
        return JSONResponse(await run_in_threadpool(self.index.cases, source, n))

    async def files(self, request: Request) -> Response:
        """A file under the evaluation folder, by its relative path; anything else is refused."""
        if self.files_root is None:
            return error("no files are served for a JSONL result", 404)
        relative = request.path_params["path"]
        parts = Path(relative).parts
        if (not relative or "\x00" in relative or "\\" in relative or Path(relative).is_absolute()
                or any(part in ("..", ".") or part.startswith(".") for part in parts)):
            return error("path refused", 403)
        try:
            real = (self.files_root / relative).resolve(strict=True)
        except (OSError, RuntimeError):
            return error("no such file", 404)
        if not real.is_relative_to(self.files_root):  # a symlink leading out of the folder
            return error("path refused", 403)
        media = SERVED_SUFFIXES.get(real.suffix.lower())
        if media is None:
            return error("this kind of file is not served", 403)
        if not real.is_file():
            return error("no such file", 404)
        return FileResponse(real, media_type=media)

    async def upload(self, request: Request) -> JSONResponse:
        if request.headers.get("x-neuroloc") != "1":  # a cross-site form cannot set it
            return error("uploads must come from the viewer page (header X-Neuroloc: 1)", 403)
        limit = self.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            return error(f"upload too large: {int(length):,} bytes, the limit is {limit:,}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit + MULTIPART_SLACK:
                return error(f"upload too large: the limit is {limit:,} bytes", 413)
        params: dict[str, Any] = dict(request.query_params)
        filename = request.headers.get("x-filename") or params.pop("filename", None) or "upload"
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, form_name, fields = await _read_form(request, bytes(body))
            if data is None:
                return error(form_name or "send the image as the form field 'file'")
            filename = form_name or filename
            params.update(fields)
        else:
            data = bytes(body)
        if len(data) > limit:
            return error(f"upload too large: {len(data):,} bytes, the limit is {limit:,}", 413)
        filename = _display_name(filename)
        if not data:
            return error(f"{filename}: empty file")
        try:
            return JSONResponse(await run_in_threadpool(self._localize_upload, data, filename, params))
        except ImageError as exc:
            return error(str(exc), 400)
        except ComputeError as exc:
            return error(exc.message, exc.status)
        except OSError as exc:
            return error(f"cannot keep the upload in the cache folder {self.uploads}: {exc.strerror or exc}", 500)

    def _localize_upload(self, data: bytes, filename: str, params: dict[str, Any]) -> dict[str, Any]:
        preset_name, options = parse_knobs(params)  # bad knobs or class: refused before the picture is kept
        config = build_config(preset_name, options, self.model_options)
        wanted = params.get("cls")
        label = resolve_target(wanted, self.explainer.model.classes) if wanted and str(wanted).strip() else None
        digest = hashlib.sha256(data).hexdigest()[:40]
        self.uploads.mkdir(parents=True, exist_ok=True)
        path = self.uploads / f"{digest}.img"
        if not path.is_file():
            handle, tmp = tempfile.mkstemp(dir=self.uploads, suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as f:
                    f.write(data)
                try:
                    load_image(tmp, intensity=self.intensity)  # the CLI's validation: a bad upload is refused before it is kept
                except ImageError as exc:
                    raise ImageError(str(exc).replace(tmp, filename)) from None
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        image = load_image(path, intensity=self.intensity)
        explained = self.explainer.explain(self.image_key(path), lambda: image, label, config)
        record = record_for(path, image.width, image.height, explained)
        record["upload_name"] = filename
        with self.upload_lock:
            item_id = self.upload_ids.get(digest)
            if item_id is None:
                item_id = self.index.add_upload(path, filename, record)
                self.upload_ids[digest] = item_id
            else:  # the same picture again: this upload's name and result
                self.index.update_upload(item_id, filename, record)
        out = self.explained_json(explained, item_id)
        out["id"] = item_id
        # the item page recomputes with the knobs in its address: the ones this upload was localized with
        knobs = {k: str(v) for k, v in params.items() if (k in KNOBS or k in ("density_layers", "cls")) and str(v).strip()}
        out["url"] = f"/item/{item_id}" + (f"?{urlencode(knobs)}" if knobs else "")
        return out


async def _read_form(request: Request, body: bytes) -> tuple[bytes | None, str | None, dict[str, str]]:
    """(file bytes, file name, other text fields) of a multipart body already read (and size-checked)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=32) as form:
            upload = form.get("file")
            fields = {k: v for k, v in form.items() if isinstance(v, str) and len(v) <= 200}
            if not isinstance(upload, UploadFile):
                return None, None, fields
            return await upload.read(), upload.filename, fields
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several kinds for a malformed body
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        return None, f"malformed upload: {' '.join(str(detail).split())[:200]}", {}


def _display_name(name: str) -> str:
    """A file name fit for display: its last part, printable, at most 120 characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:120].strip()
    return name or "upload"


def _int(text: str | None, name: str, default: int | None) -> Any:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise QueryError(f"{name} must be a whole number, got {text[:40]!r}") from None
    if value < 0:
        raise QueryError(f"{name} must not be negative")
    if value > MAX_INTEGER:
        raise QueryError(f"{name} is too large")
    return value


def _float(text: str | None, name: str) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise QueryError(f"{name} must be a number, got {text[:40]!r}")
    return value


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    return error(str(getattr(exc, "detail", "")) or "error", status)


def create_app(
    results: str | Path | ResultsIndex,
    model: Any = None,
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    allowed_hosts: list[str] | None = None,
    directions: Any = None,
    class_names: str | Path | None = None,
    intensity: str = "range",
) -> Starlette:
    """The viewer for RESULTS (a localize JSONL file, an evaluate folder, or an index already made).

    Args:
        model: a loaded model, a model name or a function returning a model (loaded on first use), or
            None for the results' own model (when neuroloc knows it; else efficientnet_lite0).
        weights: weights file for a model given by name.
        cache_dir: where thumbnails and uploads go (default: the user cache folder).
        max_upload_bytes: uploads larger than this are refused (413).
        allowed_hosts: Host header values accepted (None: any); a loopback server should pass
            LOOPBACK_HOSTS so a web page cannot reach it through DNS rebinding.
        directions: feature directions (``neuroloc.directions.FeatureDirections``) for the default's
            objectness map, given to a model named or loaded here (a loading function brings its own).
        class_names: a file naming the outputs of a model given by name (one name per line), for a model of
            its own classes.
        intensity: how images of more than 8 bits per sample are read (:data:`neuroloc.imageio.INTENSITIES`),
            as ``neuroloc localize --intensity`` read them.
    """
    index = results if isinstance(results, ResultsIndex) else load_results(results)
    if model is None or isinstance(model, str):
        name = model or _known_model(index.model_name) or "efficientnet_lite0"
        if model is None and index.model_name and name != index.model_name:
            index.warnings.append(f"the results were made with model {index.model_name!r}, which is not loaded from a "
                                  f"results file; recomputing uses {name} (give the results' model with --model)")

        def load() -> Any:
            from neuroloc.models import load_model

            return load_model(name, weights, class_names=class_names).with_directions(directions)

        explainer = Explainer(load)
        model_name = name
        from neuroloc.models import model_default_options

        model_options = model_default_options(name)
    else:
        if directions is not None and hasattr(model, "with_directions"):
            model = model.with_directions(directions)
        explainer = Explainer(model)  # a LoadedModel, or a function that loads one
        model_name = getattr(model, "name", None) or index.model_name or "custom"
        spec = getattr(model, "spec", None)
        model_options = dict(spec.default_options) if spec is not None else {}
    index.warnings.extend(_recompute_differences(index, _has_directions(model, directions), intensity))
    viewer = Viewer(index, explainer, Path(cache_dir) if cache_dir else user_cache_dir() / "viewer",
                    max_upload_bytes, model_name, model_options, intensity)
    routes = [
        Route("/", viewer.index_page),
        Route("/item/{item_id:int}", viewer.item_page),
        Route("/api/info", viewer.info),
        Route("/api/summary", viewer.summary),
        Route("/api/items", viewer.items),
        Route("/api/items/{item_id:int}", viewer.item),
        Route("/api/items/{item_id:int}/thumb", viewer.thumb),
        Route("/api/items/{item_id:int}/explain", viewer.explain),
        Route("/api/explain/{key:str}/{picture:str}", viewer.explain_picture),
        Route("/api/classes", viewer.classes),
        Route("/api/metrics", viewer.metrics),
        Route("/api/cases", viewer.cases),
        Route("/api/upload", viewer.upload, methods=["POST"]),
        Route("/files/{path:path}", viewer.files),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SameSiteOnly), Middleware(SecurityHeaders)]
    if allowed_hosts:
        middleware.insert(0, Middleware(HostCheck, allowed=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})
    app.state.viewer = viewer
    return app


def _recompute_differences(index: ResultsIndex, has_directions: bool, intensity: str) -> list[str]:
    """What makes the viewer's recomputed boxes differ from the recorded ones, beyond the knobs: feature directions
    the run used and the viewer lacks, high-bit images read another way."""
    notes = []
    used = sorted(name for name, source in index.sources.items() if _used_directions(source))
    if used and not has_directions:
        notes.append(f"the results ({', '.join(used)}) were localized with feature directions for the objectness map, "
                     "and the viewer has none: its recomputed boxes can differ from the recorded ones (give it the "
                     "run's directions: neuroloc calibrate over the run's images, then neuroloc view --directions FILE)")
    if index.intensity is not None and index.intensity != intensity:
        notes.append(f"the run read high-bit images with --intensity {index.intensity}, the viewer with {intensity}: "
                     f"images of more than 8 bits come out otherwise (neuroloc view --intensity {index.intensity})")
    return notes


def _used_directions(source: Source) -> bool:
    """Whether the run behind ``source`` localized with feature directions: named, or fitted by ``auto``, which
    fits none over fewer than MIN_FIT_IMAGES images (a tiled run fits over tiles, many per image)."""
    directions = (source.method or {}).get("directions")
    too_few = directions == "auto" and not source.tiled and source.count < MIN_FIT_IMAGES
    return directions not in (None, "none") and not too_few


def _has_directions(model: Any, directions: Any) -> bool:
    if directions is not None:
        return True
    if model is None or isinstance(model, str):
        return False
    if hasattr(model, "module"):  # a LoadedModel
        return getattr(model, "directions", None) is not None
    return True  # a loading function: what it brings is not known before it runs, and no warning is better than a wrong one


def _known_model(name: str | None) -> str | None:
    """The results' model when it is one of neuroloc's registered models.

    A ``package.module:factory`` name read from a results file is never used: loading it would run
    code named by the input. Such a model must be given with ``--model``.
    """
    if not name:
        return None
    from neuroloc.models import available_models

    return name if ":" not in name and name in available_models() else None

