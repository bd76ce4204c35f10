"""``motionforge review serve``: the MotionBench manual check (appendix 9.4) and a read-only dataset explorer,
served over HTTP from one output root.

Pages are plain HTML + JavaScript under ``dashboards/static`` (nothing to build); the JSON API below is what
they call. Videos are served as files with HTTP Range support (Starlette's ``FileResponse``) so the browser
can seek to a clip's seconds. Bound to 127.0.0.1 by default; any other address needs a token, given once as
``?token=...`` (it is then kept in a cookie) or as ``Authorization: Bearer ...``.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from dashboards import review_data as rd
from storage.root import OutputRoot

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "motionforge_token"
PAGE_ROWS = 500  # explorer rows per page (the browser lists them all; a large root has millions)
VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
               ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> str | None:
    """The token to require: none on a loopback address unless given; a new random one elsewhere if none."""
    if token:
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(18)


def create_app(out: str, token: str | None = None, claim_s: float = 600.0) -> FastAPI:
    root = OutputRoot(out)
    queue = rd.ReviewQueue(root, claim_s=claim_s)
    tables = rd.Tables(root)
    app = FastAPI(title="motionforge review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.root, app.state.queue, app.state.token = root, queue, token

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if not token:
            return await call_next(request)
        given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            given = bearer[7:]
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "this server needs its access token: open the URL printed by "
                                          "`motionforge review serve` (it ends in ?token=...)"}, status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(rd.RequestError)
    async def _request_error(request: Request, exc: rd.RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def page(name: str) -> HTMLResponse:
        return HTMLResponse((STATIC / name).read_text(encoding="utf-8"))

    # -- pages -------------------------------------------------------------------------------------------
    @app.get("/")
    def _index():
        return RedirectResponse("/review")

    @app.get("/review")
    def _review_page():
        return page("review.html")

    @app.get("/review/{qid}")
    def _review_one(qid: str):
        return page("review.html")

    @app.get("/explore/imove")
    def _explore_imove():
        return page("explore_imove.html")

    @app.get("/explore/motionbench")
    def _explore_mb():
        return page("explore_motionbench.html")

    @app.get("/static/{name}")
    def _static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise rd.RequestError(f"no static file {name!r}", 404)
        return FileResponse(path, media_type={".js": "text/javascript", ".css": "text/css"}.get(path.suffix))

    @app.get("/report")
    def _report():
        from dashboards.report import collect, render_html

        return HTMLResponse(render_html(collect(root.url)))

    # -- review API ---------------------------------------------------------------------------------------
    @app.get("/api/review/next")
    def _next(reviewer: str = "", after: str | None = None):
        if not reviewer.strip():
            raise rd.RequestError("no reviewer id: enter your name in the reviewer box")
        qid = queue.next_pending(reviewer.strip(), after)
        return {"question_id": qid, "held_by_others": 0 if qid else queue.held_by_others(reviewer.strip())}

    @app.get("/api/review/questions/{qid}")
    def _question(qid: str):
        return queue.question(qid)

    @app.get("/api/review/progress")
    def _progress():
        return queue.progress()

    @app.post("/api/review/decisions")
    async def _decide(request: Request):
        # JSON only: a page on another site can send a plain form or text/plain POST to 127.0.0.1 without
        # asking, but not application/json (that needs a CORS preflight this server never grants)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise rd.RequestError("send the decision as JSON (Content-Type: application/json)", 415)
        try:
            payload = await request.json()
        except ValueError:
            raise rd.RequestError("the request body is not JSON") from None
        # the store write blocks; run it off the event loop so reviewers' requests proceed side by side
        return JSONResponse(await run_in_threadpool(queue.decide, payload), status_code=201)

    # -- explorer API -------------------------------------------------------------------------------------
    @app.get("/api/imove/instances")
    def _instances(status: str | None = None, reason: str | None = None, offset: int = Query(0, ge=0),
                   limit: int = Query(PAGE_ROWS, ge=1, le=10 * PAGE_ROWS)):
        """One page of the (filtered) instances, with their total and the facets of all of them."""
        import pyarrow.compute as pc

        table = rd.instance_table(tables)  # columns: only the page becomes row dicts
        facets = {"status": _column_counts(table["status"]), "reason": _column_counts(table["reason"])}
        for name, value in (("status", status), ("reason", reason)):
            if value:
                table = table.filter(pc.equal(table[name], value))
        return {"instances": rd.instance_rows(table.slice(offset, limit)), "total": table.num_rows,
                "offset": offset, "limit": limit, "facets": facets}

    @app.get("/api/imove/instances/{iid}")
    def _instance(iid: str):
        return rd.imove_instance(tables, iid)

    @app.get("/api/motionbench/questions")
    def _mb_questions(category: str | None = None, split: str | None = None):
        rows = rd.motionbench_questions(tables)
        facets = {"category": _counts(r["category"] for r in rows), "split": _counts(r["split"] for r in rows)}
        rows = [r for r in rows if (not category or r["category"] == category) and (not split or r["split"] == split)]
        return {"questions": rows, "facets": facets}

    # -- media --------------------------------------------------------------------------------------------
    @app.get("/media/review/{qid}/video")
    def _review_video(qid: str):
        return _video(queue.video_path(qid))

    @app.get("/media/review/{qid}/first_frame.jpg")
    def _first_frame(qid: str):
        path = queue.first_frame_path(qid)
        if path is None:
            raise rd.RequestError(f"question {qid}: the first frame could not be decoded from its video", 404)
        if root.is_local:
            return FileResponse(path, media_type="image/jpeg")
        return Response(root.read_bytes(root.path(*rd.rv.FRAMES_DIR, Path(path).name)), media_type="image/jpeg")

    @app.get("/media/imove/{iid}/video")
    def _imove_video(iid: str):
        return _video(rd.imove_instance(tables, iid)["video_path"])

    @app.get("/media/motionbench/{qid}/video")
    def _mb_video(qid: str):
        return _video(rd.motionbench_video(tables, qid)[0])

    return app


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _column_counts(column) -> dict[str, int]:
    """:func:`_counts` of an Arrow column's non-null values (most frequent first, ties in order of first sight)."""
    import pyarrow.compute as pc

    counts = pc.value_counts(column.drop_null()).to_pylist()
    return dict(sorted(((c["values"], c["counts"]) for c in counts), key=lambda kv: -kv[1]))


def _video(path: str) -> Response:
    """A video named by a table (never by the request), with Range support so the player can seek."""
    if path.startswith(("http://", "https://")):
        return RedirectResponse(path)
    if "://" in path:
        raise rd.RequestError(f"{path}: videos on remote storage are not served; run the server where the "
                              "videos are local or give http(s) URLs", 501)
    p = Path(path)
    if not p.is_file():
        raise rd.RequestError(f"video {path} does not exist on this machine", 404)
    return FileResponse(p, media_type=VIDEO_TYPES.get(p.suffix.lower(), "application/octet-stream"))


def serve(out: str, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    import uvicorn

    token = check_bind(host, token)
    app = create_app(out, token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/review" + (f"?token={token}" if token else "")
    print(f"motionforge review: {url}  (explorer: /explore/imove, /explore/motionbench; report: /report)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
