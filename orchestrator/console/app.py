"""The web console's HTTP side: pages, a small JSON API and the files, behind a login.

    GET  /                      jobs and the new-job form      GET /jobs/{id}       one job
    GET  /jobs/{id}/view        the splat in the browser       GET /files/{id}/...  its export files
    GET  /api/schema            the job JSON Schema the form is built from
    GET  /api/jobs[/{id}]       records, progress, metrics     POST /api/jobs       submit
    POST /api/jobs/check        settings, before the upload     POST /api/uploads[/complete]
    POST /api/jobs/{id}/cancel  POST /api/jobs/{id}/resubmit
    PUT  /api/local-upload/{upload}/{part}   an upload part in embedded mode (a signed link)

Every request passes `GuardMiddleware`: the Host header must be one the console serves (DNS
rebinding), pages and the API need a session (after the token login), and every state change needs
the session's CSRF token in `X-CSRF-Token` and a same-origin browser. Errors are JSON
`{"error", "hint"}` naming the field at fault, never a traceback.
"""

from __future__ import annotations

import html
import logging
import mimetypes
import os
import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

from codsplat.pipeline.config import parse_document
from codsplat.pipeline.contract import MEDIA_SUFFIXES
from codsplat.pipeline.errors import PipelineError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..blobs import Refused, open_beneath
from ..job import JOB_ID, json_schema
from .auth import CSRF_HEADER, SESSION_COOKIE, Guard
from .service import ConsoleService, NotFound
from .uploads import FolderUploads

log = logging.getLogger("codsplat.console")
STATIC = Path(__file__).with_name("static")
VIEWER_BUNDLE = STATIC / "dist" / "viewer.js"
FILE_SECONDS = 3600  # how long a presigned download or viewer link works
PUBLIC = ("/login", "/static/", "/health", "/api/local-upload/")  # the last is checked by its signature
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_BODY = 2 * 2**20  # a JSON request (10,000 upload parts fit); upload parts stream to disk with their own bound
STREAMED = "/api/local-upload/"


def problem(status: int, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status)


def security_headers(response: Response, connect_src: str) -> Response:
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        f"connect-src 'self' blob: data: {connect_src}; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"  # never to S3 (links), and Origin stays set on our own forms
    response.headers["X-Frame-Options"] = "DENY"
    return response


class GuardMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, guard: Guard, connect_src: str):
        super().__init__(app)
        self.guard, self.connect_src = guard, connect_src

    async def dispatch(self, request: Request, call_next) -> Response:
        return security_headers(await self._checked(request, call_next), self.connect_src)

    async def _checked(self, request: Request, call_next) -> Response:
        guard, path = self.guard, request.url.path
        if not guard.host_allowed(request.headers.get("host")):
            return PlainTextResponse("This console does not serve that host name.", status_code=400)
        length = request.headers.get("content-length", "0")
        if not path.startswith(STREAMED) and "transfer-encoding" in request.headers:  # a body of no stated length
            return problem(411, "A request body must state its length (Content-Length); chunked bodies are refused.",
                           "Send the body whole, as a browser's form or fetch does.")
        if not path.startswith(STREAMED) and (not (length.isascii() and length.isdecimal()) or int(length) > MAX_BODY):
            return problem(413, f"The request body is over {MAX_BODY // 2**20} MiB (or its length is not stated).",
                           "Send a smaller JSON object; media go through the upload links.")
        state_change = request.method not in SAFE_METHODS
        if state_change and not self._same_origin(request):
            return problem(403, "Cross-site request refused.", "Use the console's own pages.")
        if path.startswith(PUBLIC):
            return await call_next(request)
        session = request.cookies.get(SESSION_COOKIE)
        if not guard.valid_session(session):
            if guard.token is None:  # no login (loopback only): every visitor gets a session for CSRF
                session = guard.new_session()
                request.state.new_session = session
            elif path.startswith(("/api/", "/files/")):
                return problem(401, "Log in first.", "Open /login and enter the console's token.")
            else:
                return RedirectResponse(f"/login?next={path}", status_code=303)
        request.state.session = session
        if state_change and not guard.valid_csrf(session, request.headers.get(CSRF_HEADER)):
            return problem(403, "Missing or wrong CSRF token.", "Reload the page and try again.")
        response = await call_next(request)
        if getattr(request.state, "new_session", None):
            set_session(response, session, guard)
        return response

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """Browsers say where a request comes from; a page of another site may not change anything."""
        if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def served(root: Path, key: str, name: str) -> Response:
    """A file the pipeline wrote beneath the embedded folder, read from the descriptor that was checked:
    no link on the way or at the end (a folder link would reach the database), and one name only (a
    hard link made to another file, such as codsplat.db, has two)."""
    try:
        fd = open_beneath(root, key)
    except (Refused, OSError):
        raise NotFound(name) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise NotFound(name)

    def chunks():
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(chunks(), media_type=kind, headers={"Content-Length": str(info.st_size)})


def set_session(response: Response, session: str, guard: Guard) -> None:
    response.set_cookie(SESSION_COOKIE, session, max_age=guard.session_seconds, httponly=True,
                        samesite="strict", secure=guard.secure_cookies, path="/")


async def body(request: Request) -> dict:
    """The request's JSON object, read no further than MAX_BODY and bounded as any document."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise PipelineError(f"The request body is over {MAX_BODY // 2**20} MiB.", hint="Send a smaller JSON object.")
    return parse_document(raw, "The request body", max_bytes=MAX_BODY)


def create_app(service: ConsoleService, guard: Guard, *, title: str = "codsplat", connect_src: str = "https:") -> Starlette:
    shell = (STATIC / "index.html").read_text()

    def page(request: Request, name: str, job: str = "") -> HTMLResponse:
        values = {"csrf": guard.csrf_token(request.state.session), "page": name, "job": job, "title": title,
                  "login": "1" if guard.token else "", "media": ",".join(MEDIA_SUFFIXES)}
        text = shell
        for key, value in values.items():  # every value escaped: ids and titles come from outside
            text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
        return HTMLResponse(text, headers={"Cache-Control": "no-store"})

    def job_id(request: Request) -> str:
        value = request.path_params["job_id"]
        if not re.fullmatch(JOB_ID.strip("^$"), value):
            raise NotFound(value)
        return value

    async def home(request: Request):
        return page(request, "jobs")

    async def job_page(request: Request):
        return page(request, "job", job_id(request))

    async def viewer_page(request: Request):
        if not VIEWER_BUNDLE.is_file():
            return HTMLResponse("The splat viewer is not built: run <code>npm ci && npm run build</code> "
                                "in the codsplat checkout, then reload.", status_code=503)
        return page(request, "viewer", job_id(request))

    async def login(request: Request):
        def login_page(target: str, error: str = "", status: int = 200) -> HTMLResponse:
            text = (STATIC / "login.html").read_text().replace("{{next}}", html.escape(_local(target)))
            return HTMLResponse(text.replace("<!--error-->", error), status_code=status)

        if request.method == "GET":
            return login_page(request.query_params.get("next", "/"))
        client = request.client.host if request.client else "?"  # the peer, or what a --trusted-proxy says
        wait = guard.login_wait(client)
        if wait:
            return login_page("/", f'<p class="error">Too many wrong tokens; try again in {wait:.0f} s.</p>', 429)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            return login_page("/", '<p class="error">The login is a form (application/x-www-form-urlencoded).</p>', 415)
        form = await request.form()
        if not guard.token_matches(str(form.get("token", ""))):
            guard.login_failed(client)
            log.warning("failed console login from %s", client)
            return login_page(str(form.get("next", "/")), '<p class="error">That token is not right.</p>', 401)
        response = RedirectResponse(_local(str(form.get("next", "/"))), status_code=303)
        set_session(response, guard.new_session(), guard)
        return response

    async def logout(request: Request):
        guard.end_session(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def schema(request: Request):
        return JSONResponse(json_schema())

    async def jobs(request: Request):
        if request.method == "GET":
            limit = request.query_params.get("limit", "100")
            if not (limit.isascii() and limit.isdecimal() and len(limit) <= 6):
                return problem(422, f"limit: must be a whole number from 1 to 1000, got {limit[:20]!r}.")
            return JSONResponse({"jobs": service.list(max(1, min(int(limit), 1000)))})
        data = await body(request)
        job = service.submit(str(data.get("input", "")), data.get("settings") or {}, data.get("name"))
        return JSONResponse({"id": job.id, "url": f"/jobs/{job.id}"}, status_code=201)

    async def check(request: Request):
        service.check((await body(request)).get("settings") or {})
        return JSONResponse({"ok": True})

    async def job(request: Request):
        return JSONResponse(service.detail(job_id(request)))

    async def cancel(request: Request):
        record = service.cancel(job_id(request))
        return JSONResponse(service.summary(record))

    async def resubmit(request: Request):
        data = await body(request)
        job = await run_in_threadpool(service.resubmit, job_id(request), data.get("settings") or {})
        return JSONResponse({"id": job.id, "url": f"/jobs/{job.id}"}, status_code=201)

    async def uploads(request: Request):
        data = await body(request)
        files = data.get("files")
        # a folder upload writes a few files per photo: off the event loop, so the console keeps answering
        started = await run_in_threadpool(service.start_upload, files if isinstance(files, list) else [])
        return JSONResponse(started, status_code=201)

    async def upload_complete(request: Request):
        data = await body(request)
        parts = data.get("parts")
        # joining the parts is disk work: off the event loop, so the console keeps answering meanwhile
        await run_in_threadpool(service.complete_upload, str(data.get("key", "")), str(data.get("upload_id", "")),
                                parts if isinstance(parts, list) else [])
        return JSONResponse({"key": data["key"]})

    async def local_part(request: Request):
        if not isinstance(service.uploads, FolderUploads):  # on AWS the parts go to S3
            return problem(404, "Not found.")
        q = request.query_params
        if not guard.valid_path_signature(request.url.path, q.get("expires"), q.get("sig")):
            return problem(403, "This upload link is wrong or has expired.", "Start the upload again.")
        etag = await service.uploads.receive_part(request.path_params["upload_id"], request.path_params["part"], request.stream())
        return Response(status_code=200, headers={"ETag": etag, "Access-Control-Expose-Headers": "ETag"})

    async def files(request: Request):
        key = service.file_key(job_id(request), request.path_params["name"])
        if service.blobs.local_path(key) is None:
            return RedirectResponse(service.blobs.link(key, FILE_SECONDS), status_code=302)
        return served(service.blobs.root, key, request.path_params["name"])

    async def health(request: Request):
        return JSONResponse({"ok": True})

    async def on_pipeline_error(request: Request, exc: PipelineError):
        return problem(422, exc.message, exc.hint)

    async def on_not_found(request: Request, exc: NotFound):
        return problem(404, f"No job or file {str(exc.args[0])[:80]!r}.", "The job list shows the ids.")

    async def on_refused(request: Request, exc: Refused):
        return problem(404, "No such file here.", "Only a job's own export files are served.")

    routes = [
        Route("/", home), Route("/jobs/{job_id}", job_page), Route("/jobs/{job_id}/view", viewer_page),
        Route("/login", login, methods=["GET", "POST"]), Route("/logout", logout, methods=["POST"]),
        Route("/health", health),
        Route("/api/schema", schema), Route("/api/jobs", jobs, methods=["GET", "POST"]),
        Route("/api/jobs/check", check, methods=["POST"]),
        Route("/api/jobs/{job_id}", job), Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id}/resubmit", resubmit, methods=["POST"]),
        Route("/api/uploads", uploads, methods=["POST"]), Route("/api/uploads/complete", upload_complete, methods=["POST"]),
        Route("/api/local-upload/{upload_id}/{part:int}", local_part, methods=["PUT"]),
        Route("/files/{job_id}/{name:path}", files),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, guard=guard, connect_src=connect_src)],
                     exception_handlers={PipelineError: on_pipeline_error, NotFound: on_not_found, Refused: on_refused})


def _local(target: str) -> str:
    """Only paths of this site after login (no open redirect to another site)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"
