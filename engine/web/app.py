"""The annotation page's web app: HTTP over an :class:`~engine.web.session.AnnotationSession`.

Endpoints (JSON in and out; every POST must be ``Content-Type: application/json``, which a
cross-site form cannot send without a CORS preflight this app never grants)::

    GET  /                                  the page (engine/web/static/annotate.html)
    GET  /login?token=...                   with accounts: sets the session cookie, goes to /
    GET  /api/next                          state: the person's image being annotated, its
                                             masks, the object being drawn, the store's
                                             categories; ``user`` and ``csrf`` (accounts)
    POST /api/heartbeat                     {} -> renews the person's claim on their image
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
    GET  /static/masks.js                   the mask helpers both pages share (static/masks.js)
    GET  /review                            the review page (engine/web/static/review.html)
    GET  /api/review/next                   review state: an image with another person's masks
                                             waiting for a verdict (engine.web.review)
    POST /api/review/{image_id}/verdicts    {verdicts: [{mask_id, verdict, reason, seconds,
                                             correction | strokes}, ...]} -> next review state

Coordinates are XY pixels of the stored image; boxes XYXY; a stroke's points are integers (its
pixels, the object's masks and working time: :mod:`engine.web.session`). Errors are
``{"error": message}`` with a 4xx status: 400 malformed JSON (nested too deeply included), 404
unknown image or path, 409 a request out of turn, 413 a body over 64 KiB (known from
``Content-Length`` before reading, else once that much has streamed in), 415 not JSON, 422 a
value out of range. With accounts in the store (:mod:`storage.accounts`): 401 no valid token,
403 a cookie session's POST without its ``X-CSRF-Token`` (:class:`AuthMiddleware`); a 409 with
``"reload": true`` tells the page its image went to someone else (its claim expired). Nothing on
disk is named by request input: images are looked up by id in the store's images table, and the
page is one packaged file.
"""

from __future__ import annotations

import hmac
import html as html_escape
import ipaddress
import json
import logging
import re
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
from starlette.types import ASGIApp, Receive, Scope, Send

from maskmill.engine.web.review import ReviewDesk, reviewer_id
from maskmill.engine.web.session import (
    MAX_POINTS,
    AnnotationSession,
    ImageLostError,
    SessionError,
    finite,
)
from maskmill.storage import StorageError, WriterConflictError
from maskmill.storage.accounts import Account, Accounts, csrf_token

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024  # a prompt is a few hundred bytes
SESSION_COOKIE = "maskmill_session"
CSRF_HEADER = "X-CSRF-Token"
_TOKEN_QUERY = re.compile(r"token=[^&\s]*")


def static_text(name: str) -> str:
    """A file the server ships as package data under ``engine/web/static/``: the annotation
    page, the review page and the script they share."""
    return resources.files("maskmill.engine.web").joinpath("static", name).read_text("utf-8")


def page_html() -> str:
    """The annotation page (plain HTML + canvas + JS)."""
    return static_text("annotate.html")


# ------------------------------------------------------------------------------- identity


def _person(request: Request) -> str | None:
    """The session's key of the request's person: the account name, or None without accounts
    (the session's own annotator, ``maskmill serve --annotator``)."""
    return request.scope.get("maskmill.user")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, accounts: Accounts) -> None:
    """Refuse (ValueError) to serve on an address other machines reach while the store has no
    accounts: anybody there could write to it."""
    if not is_loopback(host) and not accounts.exist():
        url = accounts.store.url
        raise ValueError(
            f"refusing to serve {url} on {host} without accounts: add one per person first "
            f"(maskmill users add NAME --store {url}), or bind 127.0.0.1"
        )


def _identify(accounts: Accounts, token: str | None) -> tuple[bool, Account | None]:
    """(whether the store has accounts, so a login is needed; the active account of
    ``token``, None when there is none)."""
    if not accounts.exist():
        return False, None
    return True, accounts.authenticate(token) if token else None


class AuthMiddleware:
    """Who makes each request, when the store has accounts (checked on each request, so
    accounts added while the server runs count at once).

    A request carries its token as ``Authorization: Bearer <token>`` (API clients) or in the
    ``maskmill_session`` cookie that ``/login?token=`` sets (the page). No token, an unknown or
    a revoked one: 401. A cookie-carried request that changes anything (not GET or HEAD) must
    also send ``X-CSRF-Token`` (:func:`storage.accounts.csrf_token` of the cookie's token, which
    ``GET /api/next`` gives the page), else 403: a cross-site page makes the browser send the
    cookie but can neither read nor derive that value. Bearer requests need none: a browser
    adds an ``Authorization`` header only when a page's script sets it, and a cross-site script
    cannot without the CORS preflight this app never grants. ``/login`` passes through (it checks
    its own token). Sets ``scope["maskmill.user"]``, ``["maskmill.role"]`` and
    ``["maskmill.csrf"]`` for the app.
    """

    def __init__(self, app: ASGIApp, accounts: Accounts) -> None:
        self.app = app
        self.accounts = accounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/login":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        token, bearer = None, False
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token, bearer = value.strip(), True
        else:
            token = request.cookies.get(SESSION_COOKIE)
        try:  # a stat of the accounts object, a read when it changed: off the event loop
            needed, account = await run_in_threadpool(_identify, self.accounts, token)
        except StorageError as error:
            log.exception("accounts unreadable")
            await _error(500, f"storage error: {error}")(scope, receive, send)
            return
        if needed:
            refusal = None
            if account is None:
                refusal = _error(
                    401,
                    "log in first: open your login link (maskmill users add prints it), or send "
                    "Authorization: Bearer <token>"
                    if token is None
                    else "invalid or revoked token: ask for a new login link",
                )
                refusal.headers["WWW-Authenticate"] = "Bearer"
            elif not bearer and scope["method"] not in ("GET", "HEAD"):
                sent = request.headers.get(CSRF_HEADER, "")
                if not hmac.compare_digest(sent.encode(), csrf_token(token).encode()):
                    refusal = _error(
                        403,
                        f"missing or wrong {CSRF_HEADER} header (the page sends the csrf value "
                        "GET /api/next gives it)",
                    )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            scope["maskmill.user"] = account.name
            scope["maskmill.role"] = account.role
            scope["maskmill.csrf"] = csrf_token(token)
        await self.app(scope, receive, send)


def create_app(session: AnnotationSession, allowed_hosts: list[str] | None = None) -> Starlette:
    """The web app over ``session``.

    Args:
        session: an entered session.
        allowed_hosts: ``Host`` header values to answer (guards a localhost server against DNS
            rebinding); None answers any.

    When the session's store has accounts (:mod:`storage.accounts`), every request but
    ``/login`` needs a valid token (:class:`AuthMiddleware`).
    """
    html = page_html()
    accounts = Accounts(session.store)

    def endpoint(
        handler: Callable[[Request, Any], Any],
    ) -> Callable[[Request], Awaitable[Response]]:
        # Each handler runs in the thread pool (inference is CPU work); its SessionError and
        # storage errors become JSON answers, and any other error a 500 with its message.
        async def run(request: Request) -> Response:
            try:
                body = await _json_body(request) if request.method == "POST" else None
                result = await run_in_threadpool(handler, request, body)
            except ImageLostError as error:  # the page asks for its (next) state again
                return _error(error.status, error.message, reload=True)
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

    async def login(request: Request) -> Response:
        # The token travels in the link once; from here on it is an HttpOnly cookie. The answer
        # is a page that moves on to / by itself rather than a 30x: after a redirect the browser
        # would still count the navigation as coming from the site that linked here (a mail or
        # chat page) and leave the SameSite=Strict cookie off the request for /.
        token = request.query_params.get("token", "")
        needed, account = await run_in_threadpool(_identify, accounts, token)
        if not needed:
            return _error(404, "this server's store has no accounts: open / (no login needed)")
        if account is None:
            return _error(401, "invalid or revoked token: ask for a new login link")
        name = html_escape.escape(account.name)
        page = (
            '<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url=/">'
            f'<title>maskmill</title><p>Logged in as {name}. <a href="/">Continue</a></p>'
        )
        response = HTMLResponse(
            page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        )
        response.set_cookie(
            SESSION_COOKIE,
            token,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    def next_state(request: Request, body: Any) -> dict[str, Any]:
        # The person's name and the CSRF value the page sends back on its POSTs (None for both
        # without accounts).
        return {
            **session.state(user=_person(request)),
            "user": request.scope.get("maskmill.user"),
            "csrf": request.scope.get("maskmill.csrf"),
        }

    def heartbeat(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, set())
        return session.heartbeat(user=_person(request))

    def image(request: Request, body: Any) -> Response:
        data, media_type = session.image_bytes(
            request.path_params["image_id"], user=_person(request)
        )
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})

    def predict(request: Request, body: Any) -> dict[str, Any]:
        prompt = _prompt(body)
        return session.predict(request.path_params["image_id"], **prompt, user=_person(request))

    def stroke(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"mode", "radius", "points"})
        missing = sorted({"mode", "radius", "points"} - set(body))
        if missing:
            raise SessionError(422, f"stroke: {missing} required")
        return session.stroke(
            request.path_params["image_id"],
            body["mode"],
            body["radius"],
            body["points"],
            user=_person(request),
        )

    def accept(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"mask", "category"})
        mask = body.get("mask")
        if mask is not None:
            _int(mask, "mask")
        return session.accept(
            request.path_params["image_id"], mask, body.get("category"), user=_person(request)
        )

    def undo(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, set())
        return session.undo(request.path_params["image_id"], user=_person(request))

    def delete(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"index"})
        if "index" not in body:
            raise SessionError(422, "index: required (which mask to delete)")
        index = _int(body["index"], "index")
        return session.delete(request.path_params["image_id"], index, user=_person(request))

    def edit(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, {"index"})
        if "index" not in body:
            raise SessionError(422, "index: required (which mask to edit)")
        index = _int(body["index"], "index")
        return session.edit(request.path_params["image_id"], index, user=_person(request))

    def clear(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, set())
        return session.clear(request.path_params["image_id"], user=_person(request))

    def next_image(request: Request, body: Any) -> dict[str, Any]:
        _fields(body, set())
        return session.next_image(request.path_params["image_id"], user=_person(request))

    # Review mode (engine.web.review): the masks of the session's round and stage.
    desk = ReviewDesk(session.store, session.round, session.stage, session.images)
    review_html = static_text("review.html")
    masks_js = static_text("masks.js")

    async def script(request: Request) -> Response:
        return Response(
            masks_js, media_type="text/javascript", headers={"Cache-Control": "no-store"}
        )

    def reviewer(request: Request) -> str:
        return reviewer_id(_person(request), session.annotator.source)

    async def review_page(request: Request) -> Response:
        return HTMLResponse(review_html, headers={"Cache-Control": "no-store"})

    def review_next(request: Request, body: Any) -> dict[str, Any]:
        # csrf: what the page sends back as X-CSRF-Token on its POSTs (AuthMiddleware)
        return {**desk.next(reviewer(request)), "csrf": request.scope.get("maskmill.csrf")}

    def review_verdicts(request: Request, body: Any) -> dict[str, Any]:
        state = desk.submit(reviewer(request), request.path_params["image_id"], body)
        return {**state, "csrf": request.scope.get("maskmill.csrf")}

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        message = {404: f"not found: {request.url.path}", 405: "method not allowed"}.get(
            error.status_code, str(error.detail)
        )
        return _error(error.status_code, message)

    image_path = "/api/images/{image_id}"
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/login", login, methods=["GET"]),
        Route("/api/next", endpoint(next_state), methods=["GET"]),
        Route("/api/heartbeat", endpoint(heartbeat), methods=["POST"]),
        Route(image_path, endpoint(image), methods=["GET"]),
        Route(f"{image_path}/predict", endpoint(predict), methods=["POST"]),
        Route(f"{image_path}/stroke", endpoint(stroke), methods=["POST"]),
        Route(f"{image_path}/accept", endpoint(accept), methods=["POST"]),
        Route(f"{image_path}/undo", endpoint(undo), methods=["POST"]),
        Route(f"{image_path}/delete", endpoint(delete), methods=["POST"]),
        Route(f"{image_path}/edit", endpoint(edit), methods=["POST"]),
        Route(f"{image_path}/clear", endpoint(clear), methods=["POST"]),
        Route(f"{image_path}/next", endpoint(next_image), methods=["POST"]),
        Route("/static/masks.js", script, methods=["GET"]),
        Route("/review", review_page, methods=["GET"]),
        Route("/api/review/next", endpoint(review_next), methods=["GET"]),
        Route("/api/review/{image_id}/verdicts", endpoint(review_verdicts), methods=["POST"]),
    ]
    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    middleware.append(Middleware(AuthMiddleware, accounts=accounts))
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error}
    )


# ------------------------------------------------------------------------------ validation


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    # After a 413 the rest of the body is never read: closing the connection stops the server
    # from draining it (uvicorn would otherwise read and discard it all to reuse the connection).
    headers = {"Connection": "close"} if status == 413 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


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


class _HideLoginTokens(logging.Filter):
    """Keeps login tokens out of the access log, which shows each request's path and query
    (``GET /login?token=...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_QUERY.sub("token=<hidden>", a) if isinstance(a, str) else a
                for a in record.args
            )
        return True


def serve(
    session: AnnotationSession, host: str = "127.0.0.1", port: int = 8765, log_level: str = "info"
) -> None:
    """Run the app on ``host:port`` with uvicorn until interrupted (Ctrl-C or SIGTERM).

    uvicorn shuts down gracefully on either signal, then raises it again for the handler it
    replaced: Ctrl-C's ``KeyboardInterrupt``, or the exception of the caller's SIGTERM handler
    (``maskmill serve`` installs one), so the caller's ``with session`` gives its claims back.
    An address other machines reach needs accounts in the store (:func:`check_bind`).
    """
    import uvicorn

    check_bind(host, Accounts(session.store))
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _HideLoginTokens) for f in access.filters):
        access.addFilter(_HideLoginTokens())  # kept through uvicorn's logging set-up
    allowed = None if host in ("0.0.0.0", "::") else ["127.0.0.1", "localhost", host]
    app = create_app(session, allowed_hosts=allowed)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
