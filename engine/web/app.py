"""The annotation page's web app: HTTP over an :class:`~engine.web.session.AnnotationSession`.

Endpoints (JSON in and out; every POST must be ``Content-Type: application/json``, which a
cross-site form cannot send without a CORS preflight this app never grants)::

    GET  /                                  the page (engine/web/static/annotate.html)
    GET  /api/next                          state: the image being annotated, its masks, the
                                             object being drawn, the store's categories
    GET  /api/images/{image_id}             the image (PNG, or JPEG when large); store ids only
    POST /api/images/{image_id}/predict     {points: [[x, y, label], ...], box: [x0, y0, x1, y1]
                                             | null, mask_input_from_previous: bool,
                                             previous_index: int | null, multimask: bool | null}
    POST /api/images/{image_id}/stroke      {mode: "brush" | "eraser", radius: int,
                                             points: [[x, y], ...]}    -> the object
    POST /api/images/{image_id}/accept      {mask: int | null, category: str | null} -> state
    POST /api/images/{image_id}/undo        {}                        -> state
    POST /api/images/{image_id}/delete      {index: int}              -> state
    POST /api/images/{image_id}/edit        {index: int}              -> state
    POST /api/images/{image_id}/clear       {}                        -> state
    POST /api/images/{image_id}/next        {}                        -> state of the next image

Coordinates are XY pixels of the stored image; boxes XYXY; a stroke's points are integers (its
pixels, the object's masks and working time: :mod:`engine.web.session`). Errors are
``{"error": message}`` with a 4xx status: 400 malformed JSON (nested too deeply included), 404
unknown image or path, 409 a request out of turn, 413 a body over 64 KiB (known from
``Content-Length`` before reading, else once that much has streamed in), 415 not JSON, 422 a
value out of range. Nothing on
disk is named by request input: images are looked up by id in the store's images table, and the
page is one packaged file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from maskmill.engine.web.session import MAX_POINTS, AnnotationSession, SessionError, finite
from maskmill.storage import StorageError, WriterConflictError

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024  # a prompt is a few hundred bytes


def page_html() -> str:
    """The annotation page (plain HTML + canvas + JS, shipped as package data)."""
    return (
        resources.files("maskmill.engine.web").joinpath("static/annotate.html").read_text("utf-8")
    )


def create_app(session: AnnotationSession, allowed_hosts: list[str] | None = None) -> Starlette:
    """The web app over ``session``.

    Args:
        session: an entered session (it holds the writer lease).
        allowed_hosts: ``Host`` header values to answer (guards a localhost server against DNS
            rebinding); None answers any.
    """
    html = page_html()

    def endpoint(
        handler: Callable[[Request, Any], Any],
    ) -> Callable[[Request], Awaitable[Response]]:
        # Each handler runs in the thread pool (inference is CPU work); its SessionError and
        # storage errors become JSON answers, and any other error a 500 with its message.
        async def run(request: Request) -> Response:
            try:
                body = await _json_body(request) if request.method == "POST" else None
                result = await run_in_threadpool(handler, request, body)
            except SessionError as error:
                return _error(error.status, error.message)
            except WriterConflictError as error:
                return _error(409, str(error))
            except StorageError as error:
                log.exception("storage error")
                return _error(500, f"storage error: {error}")
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the page
                log.exception("request failed")
                return _error(500, f"internal error: {type(error).__name__}: {error}")
            if isinstance(result, Response):
                return result
            return JSONResponse(result)

        return run

    async def index(request: Request) -> Response:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def next_state(request: Request, body: Any) -> dict[str, Any]:
        return session.state()

    def image(request: Request, body: Any) -> Response:
        data, media_type = session.image_bytes(request.path_params["image_id"])
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})

    def predict(request: Request, body: Any) -> dict[str, Any]:
        prompt = _prompt(body)
        return session.predict(request.path_params["image_id"], **prompt)

    def stroke(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"mode", "radius", "points"})
        missing = sorted({"mode", "radius", "points"} - set(body))
        if missing:
            raise SessionError(422, f"stroke: {missing} required")
        return session.stroke(
            request.path_params["image_id"], body["mode"], body["radius"], body["points"]
        )

    def accept(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"mask", "category"})
        mask = body.get("mask")
        if mask is not None:
            _int(mask, "mask")
        return session.accept(request.path_params["image_id"], mask, body.get("category"))

    def undo(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, set())
        return session.undo(request.path_params["image_id"])

    def delete(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"index"})
        if "index" not in body:
            raise SessionError(422, "index: required (which mask to delete)")
        return session.delete(request.path_params["image_id"], _int(body["index"], "index"))

    def edit(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"index"})
        if "index" not in body:
            raise SessionError(422, "index: required (which mask to edit)")
        return session.edit(request.path_params["image_id"], _int(body["index"], "index"))

    def clear(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, set())
        return session.clear(request.path_params["image_id"])

    def next_image(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, set())
        return session.next_image(request.path_params["image_id"])

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        message = {404: f"not found: {request.url.path}", 405: "method not allowed"}.get(
            error.status_code, str(error.detail)
        )
        return _error(error.status_code, message)

    image_path = "/api/images/{image_id}"
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/next", endpoint(next_state), methods=["GET"]),
        Route(image_path, endpoint(image), methods=["GET"]),
        Route(f"{image_path}/predict", endpoint(predict), methods=["POST"]),
        Route(f"{image_path}/stroke", endpoint(stroke), methods=["POST"]),
        Route(f"{image_path}/accept", endpoint(accept), methods=["POST"]),
        Route(f"{image_path}/undo", endpoint(undo), methods=["POST"]),
        Route(f"{image_path}/delete", endpoint(delete), methods=["POST"]),
        Route(f"{image_path}/edit", endpoint(edit), methods=["POST"]),
        Route(f"{image_path}/clear", endpoint(clear), methods=["POST"]),
        Route(f"{image_path}/next", endpoint(next_image), methods=["POST"]),
    ]
    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error}
    )


# ------------------------------------------------------------------------------ validation


def _error(status: int, message: str) -> JSONResponse:
    # After a 413 the rest of the body is never read: closing the connection stops the server
    # from draining it (uvicorn would otherwise read and discard it all to reuse the connection).
    headers = {"Connection": "close"} if status == 413 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _reject_constant(name: str) -> float:
    raise SessionError(422, f"numbers must be finite: {name} is not allowed")


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (an empty body reads as ``{}``)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise SessionError(415, "send the request body as Content-Type: application/json")
    raw = await _read_body(request)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise SessionError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:  # json recurses once per nested [ or {
        raise SessionError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise SessionError(422, f"request body must be a JSON object, got {type(body).__name__}")
    return body


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) as soon as it is known to be over MAX_BODY_BYTES: by its
    ``Content-Length`` before anything is read, else while it streams in (chunked bodies)."""
    too_big = SessionError(413, f"request body over {MAX_BODY_BYTES} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed)) or "none"
        raise SessionError(422, f"unknown field(s) {unknown}; expected: {expected}")


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SessionError(422, f"{name} must be an integer, got {value!r}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise SessionError(422, f"{name} must be true or false, got {value!r}")
    return value


def _prompt(body: dict[str, Any]) -> dict[str, Any]:
    """The predict body checked: points ``[[x, y, label], ...]`` (finite XY, label 0/1), box
    XYXY or null, the previous-mask options. Range checks against the image are the
    predictor's (its ValueError becomes a 422 naming the argument)."""
    _fields(body, {"points", "box", "mask_input_from_previous", "previous_index", "multimask"})
    points = body.get("points") or []
    if not isinstance(points, list):
        raise SessionError(422, "points must be a list of [x, y, label]")
    if len(points) > MAX_POINTS:
        raise SessionError(422, f"points: at most {MAX_POINTS} per object, got {len(points)}")
    for i, point in enumerate(points):
        if (
            not isinstance(point, list)
            or len(point) != 3
            or not finite(point[0])
            or not finite(point[1])
        ):
            raise SessionError(
                422, f"points[{i}] must be [x, y, label] with finite x, y: {point!r}"
            )
        if point[2] not in (0, 1) or isinstance(point[2], bool):
            raise SessionError(
                422,
                f"points[{i}]: label must be 1 (foreground) or 0 (background), got {point[2]!r}",
            )
    box = body.get("box")
    if box is not None and (
        not isinstance(box, list) or len(box) != 4 or not all(finite(v) for v in box)
    ):
        raise SessionError(
            422, f"box must be [x0, y0, x1, y1] (finite XYXY pixels) or null: {box!r}"
        )
    if not points and box is None:
        raise SessionError(422, "no prompt: give points and/or a box")
    previous = body.get("previous_index")
    multimask = body.get("multimask")
    return {
        "points": [[float(p[0]), float(p[1]), int(p[2])] for p in points],
        "box": None if box is None else [float(v) for v in box],
        "mask_input_from_previous": _bool(
            body.get("mask_input_from_previous", False), "mask_input_from_previous"
        ),
        "previous_index": None if previous is None else _int(previous, "previous_index"),
        "multimask": None if multimask is None else _bool(multimask, "multimask"),
    }


def serve(
    session: AnnotationSession, host: str = "127.0.0.1", port: int = 8765, log_level: str = "info"
) -> None:
    """Run the app on ``host:port`` with uvicorn until interrupted (Ctrl-C or SIGTERM).

    uvicorn shuts down gracefully on either signal, then raises it again for the handler it
    replaced: Ctrl-C's ``KeyboardInterrupt``, or the exception of the caller's SIGTERM handler
    (``maskmill serve`` installs one), so the caller's ``with session`` gives the lease back.
    """
    import uvicorn

    allowed = None if host in ("0.0.0.0", "::") else ["127.0.0.1", "localhost", host]
    app = create_app(session, allowed_hosts=allowed)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
