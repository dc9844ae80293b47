"""The console's web app: server-rendered pages, server-sent events, forms with CSRF tokens.

Access: every page but the login needs a session (a random cookie; the database keeps only
its SHA-256); the analyst actions (acknowledge, verdict) need the analyst role; every form
carries the session's CSRF token, compared in constant time; every analyst action, login and
export goes to the audit log, and so does every play of flagged audio (analysts only, never
cached by the browser). Pages escape everything they show (Jinja2 autoescape; the
JavaScript sets ``textContent`` only), and a strict Content-Security-Policy allows scripts
and styles from this origin only, so a call id or note carrying HTML stays text.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import delete, select

from console.db import (
    LABELS,
    AlertRow,
    Audit,
    Call,
    FlaggedClip,
    LoginSession,
    Score,
    Store,
    Verdict,
    alert_dict,
    call_dict,
    clip_for,
    clips_of,
    verdict_dict,
)
from console.feed import Broadcaster, FeedThread
from console.users import User, check_login

HERE = Path(__file__).resolve().parent
log = structlog.get_logger("callshield.console")
COOKIE = "callshield_console"
LOGIN_CSRF_COOKIE = "callshield_login_csrf"
MAX_NOTE_CHARS = 2000
MAX_FORM_BYTES = 64 * 1024
CALLS_SHOWN = 500
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@dataclass
class ConsoleSettings:
    """What ``create_app`` needs (``console.__main__`` builds it from flags)."""

    db: str = "sqlite:///callshield.db"
    servers: list[str] = field(default_factory=lambda: ["127.0.0.1:50051"])
    admin_token: str = ""
    users: dict[str, User] = field(default_factory=dict)
    tls: bool = False
    root_certificates: str | None = None
    session_hours: float = 12.0
    secure_cookies: bool = False  # set when served over HTTPS (behind a TLS proxy)
    retry_seconds: float = 1.0
    keep_flagged_audio: float = 0.0  # seconds of each alert's audio kept; 0: none
    flagged_audio_retention_days: float = 30.0
    purge_every_seconds: float = 3600.0  # the retention purge's schedule (and at start)


@dataclass
class Auth:
    user: User
    csrf: str


class LoginFailures:
    """Failed logins per user name in a sliding window: past ``limit`` of them the name is
    refused (429) until the oldest leaves the window, so a password is not guessed online
    (scrypt alone makes each guess cost ~50 ms, not enough)."""

    def __init__(self, limit: int = 5, window_seconds: float = 300.0) -> None:
        self.limit = limit
        self.window = window_seconds
        self.times: dict[str, list[float]] = {}

    def _recent(self, name: str) -> list[float]:
        now = time.monotonic()
        recent = [t for t in self.times.get(name, ()) if now - t < self.window]
        if recent:
            self.times[name] = recent
        else:
            self.times.pop(name, None)
        return recent

    def blocked(self, name: str) -> bool:
        return len(self._recent(name)) >= self.limit

    def add(self, name: str) -> None:
        self._recent(name)
        self.times.setdefault(name, []).append(time.monotonic())


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def create_app(settings: ConsoleSettings, start_feed: bool = True) -> FastAPI:
    store = Store(settings.db)
    broadcaster = Broadcaster()
    feeds = [FeedThread(store, broadcaster, target, settings.admin_token, tls=settings.tls,
                        root_certificates=settings.root_certificates,
                        retry_seconds=settings.retry_seconds,
                        keep_audio_seconds=settings.keep_flagged_audio)
             for target in settings.servers]
    retention = settings.flagged_audio_retention_days * 86400

    def purge() -> int:
        """The retention: flagged audio older than the retention goes (kept or not now:
        a console restarted without --keep-flagged-audio still deletes what it kept)."""
        count = store.purge_clips(time.time() - retention)
        if count:
            log.info("flagged audio purged", clips=count)
        return count

    async def purging() -> None:
        while True:
            await asyncio.sleep(settings.purge_every_seconds)
            try:
                await asyncio.to_thread(purge)
            except Exception:  # a busy database: the next round retries
                log.exception("flagged audio purge failed")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        broadcaster.bind(asyncio.get_running_loop())
        await asyncio.to_thread(purge)  # at start, before anything is served
        purger = asyncio.create_task(purging())
        if start_feed:
            for feed in feeds:
                feed.start()
        try:
            yield
        finally:
            purger.cancel()
            for feed in feeds:
                feed.stop()
            for q in list(broadcaster.queues):  # end the browsers' streams
                q.put_nowait(None)

    app = FastAPI(title="callshield console", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.feeds = feeds
    app.state.broadcaster = broadcaster
    failures = LoginFailures()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.autoescape = True
    templates.env.filters["when"] = lambda t: (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "")
    templates.env.globals["LABELS"] = LABELS
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def headers(request: Request,
                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_FORM_BYTES:
            return PlainTextResponse("request too large", status_code=413)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def current(request: Request) -> Auth | None:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        with store.session() as s:
            row = s.get(LoginSession, _token_hash(token))
            if row is None or row.expires_at < time.time():
                return None
            user = settings.users.get(row.user)
            if user is None:  # removed from the users file since
                return None
            return Auth(user, row.csrf)

    def need(request: Request, role: str = "viewer") -> Auth:
        """The session's user, holding ``role``: else 401 (no session) or 403."""
        auth = current(request)
        if auth is None:
            raise HTTPException(401, "log in first")
        if not auth.user.can(role):
            raise HTTPException(403, f"needs the {role} role")
        return auth

    async def form_of(request: Request, auth: Auth | None, csrf_expected: str | None = None
                      ) -> dict[str, str]:
        """The posted form, after its CSRF token is checked (403 if missing or wrong)."""
        form = await request.form(max_files=0, max_fields=20)
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        expected = csrf_expected if csrf_expected is not None else (auth.csrf if auth else "")
        given = data.get("csrf", "")
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(403, "missing or invalid CSRF token: reload the page")
        return data

    def page(request: Request, name: str, auth: Auth | None, **context: Any) -> HTMLResponse:
        feeds_state = [{"server": f.target, **f.state.message()} for f in feeds]
        return templates.TemplateResponse(request, name, {
            "user": auth.user if auth else None, "csrf": auth.csrf if auth else "",
            "feeds": feeds_state, **context})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 401 and request.method == "GET" and not request.url.path.startswith(
                ("/api/", "/events", "/export/")):
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code)

    # --- login -------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        response = page(request, "login.html", None, login_csrf=token, error="")
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                            secure=settings.secure_cookies, max_age=3600)
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        data = await form_of(request, None, csrf_expected=expected)
        name, password = data.get("username", "")[:64], data.get("password", "")[:256]
        if failures.blocked(name):
            with store.session() as s:
                store.audit(s, name or "-", "login_blocked")
            raise HTTPException(429, "too many failed logins for this user: wait a few "
                                "minutes")
        user = await asyncio.to_thread(check_login, settings.users, name, password)
        if user is None:
            failures.add(name)
            with store.session() as s:
                store.audit(s, name or "-", "login_failed")
            token = secrets.token_urlsafe(24)
            response = page(request, "login.html", None, login_csrf=token,
                            error="Wrong user name or password.")
            response.status_code = 401
            response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                                secure=settings.secure_cookies, max_age=3600)
            return response
        token = secrets.token_urlsafe(32)
        with store.session() as s:
            s.execute(delete(LoginSession).where(LoginSession.expires_at < time.time()))
            s.add(LoginSession(token_hash=_token_hash(token), user=user.name,
                               csrf=secrets.token_urlsafe(32),
                               expires_at=time.time() + settings.session_hours * 3600))
            store.audit(s, user.name, "login")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                            secure=settings.secure_cookies,
                            max_age=int(settings.session_hours * 3600))
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        auth = need(request)
        await form_of(request, auth)
        with store.session() as s:
            s.execute(delete(LoginSession).where(
                LoginSession.token_hash == _token_hash(request.cookies.get(COOKIE, ""))))
            store.audit(s, auth.user.name, "logout")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    # --- pages -------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def calls_page(request: Request) -> Response:
        auth = need(request)
        with store.session() as s:
            rows = s.scalars(select(Call).order_by(Call.opened_at.desc())
                             .limit(CALLS_SHOWN)).all()
            calls = [call_dict(s, c) for c in rows]
        return page(request, "calls.html", auth, calls=calls)

    @app.get("/calls/{key}", response_class=HTMLResponse)
    async def call_page(request: Request, key: str) -> Response:
        auth = need(request)
        with store.session() as s:
            call = s.get(Call, key)
            if call is None:
                raise HTTPException(404, "no such call")
            data = call_dict(s, call)
            clips = clips_of(s, key)
            alerts = []
            for a in s.scalars(select(AlertRow).where(AlertRow.call == key)
                               .order_by(AlertRow.id)):
                row = alert_dict(a, call)
                clip = clip_for(a, clips)
                row["clip"] = ({"id": clip.id, "start": round(clip.start, 2),
                                "end": round(clip.end, 2)} if clip else None)
                alerts.append(row)
            history = [verdict_dict(v) for v in s.scalars(
                select(Verdict).where(Verdict.call == key).order_by(Verdict.id.desc()))]
        return page(request, "call.html", auth, call=data, alerts=alerts, history=history,
                    max_note=MAX_NOTE_CHARS,
                    keep_audio=settings.keep_flagged_audio > 0 or any(a["clip"] for a in alerts))

    @app.get("/calls/{key}/audio/{clip_id}.wav")
    async def flagged_audio(request: Request, key: str, clip_id: int) -> Response:
        """An alert's kept audio, for the call page's player: analysts only, audit-logged,
        never cached."""
        auth = need(request, "analyst")
        with store.session() as s:
            clip = s.get(FlaggedClip, clip_id)
            if clip is None or clip.call != key:
                raise HTTPException(404, "no such audio (none kept, or purged)")
            store.audit(s, auth.user.name, "listen", f"{key} {clip.speaker}",
                        f"{clip.start:.2f}-{clip.end:.2f} s")
            wav = clip.wav
        return Response(wav, media_type="audio/wav",
                        headers={"Cache-Control": "no-store, private"})

    @app.get("/api/calls/{key}")
    async def call_json(request: Request, key: str) -> Response:
        need(request)
        with store.session() as s:
            call = s.get(Call, key)
            if call is None:
                raise HTTPException(404, "no such call")
            data = call_dict(s, call)
            data["scores"] = [
                {"speaker": r.speaker, "start": r.start, "end": r.end, "p": r.probability,
                 "running": r.running}
                for r in s.scalars(select(Score).where(Score.call == key).order_by(Score.id))]
            data["alerts"] = [alert_dict(a, call) for a in s.scalars(
                select(AlertRow).where(AlertRow.call == key).order_by(AlertRow.id))]
            data["clips"] = [{"id": c.id, "speaker": c.speaker, "start": c.start,
                              "end": c.end} for c in clips_of(s, key)]
        return JSONResponse(data)

    @app.post("/calls/{key}/verdict")
    async def post_verdict(request: Request, key: str) -> Response:
        auth = need(request, "analyst")
        data = await form_of(request, auth)
        speaker, label, note = data.get("speaker", ""), data.get("label", ""), data.get("note", "")
        if label not in LABELS:
            raise HTTPException(400, f"label must be one of {', '.join(LABELS)}")
        if len(note) > MAX_NOTE_CHARS:
            raise HTTPException(413, f"note longer than {MAX_NOTE_CHARS} characters")
        with store.session() as s:
            call = s.get(Call, key)
            if call is None:
                raise HTTPException(404, "no such call")
            if speaker not in {sp["name"] for sp in call_dict(s, call)["speakers"]}:
                raise HTTPException(400, "no such speaker in this call")
            s.add(Verdict(call=key, speaker=speaker, label=label, note=note,
                          user=auth.user.name, created_at=time.time()))
            store.audit(s, auth.user.name, "verdict", f"{key} {speaker}",
                        json.dumps({"label": label, "note": note}))
            message = {"type": "call", "call": call_dict(s, call)}
        broadcaster.publish(message)
        return RedirectResponse(f"/calls/{key}", status_code=303)

    @app.get("/alerts", response_class=HTMLResponse)
    async def alerts_page(request: Request) -> Response:
        auth = need(request)
        with store.session() as s:
            rows = s.execute(select(AlertRow, Call).join(Call, AlertRow.call == Call.id)
                             .order_by(AlertRow.id.desc()).limit(CALLS_SHOWN)).all()
            alerts = [alert_dict(a, c) for a, c in rows]
        return page(request, "alerts.html", auth, alerts=alerts)

    @app.post("/alerts/{alert_id}/ack")
    async def ack(request: Request, alert_id: int) -> Response:
        auth = need(request, "analyst")
        data = await form_of(request, auth)
        with store.session() as s:
            alert = s.get(AlertRow, alert_id)
            if alert is None:
                raise HTTPException(404, "no such alert")
            if alert.acknowledged_by is None:
                alert.acknowledged_by = auth.user.name
                alert.acknowledged_at = time.time()
                store.audit(s, auth.user.name, "acknowledge", f"alert {alert_id}",
                            f"{alert.call} {alert.speaker}")
            message = {"type": "alert", "alert": alert_dict(alert, s.get(Call, alert.call))}
        broadcaster.publish(message)
        back = f"/calls/{alert.call}" if data.get("next") == "call" else "/alerts"
        return RedirectResponse(back, status_code=303)

    @app.get("/audit", response_class=HTMLResponse)
    async def audit_page(request: Request) -> Response:
        auth = need(request, "analyst")
        with store.session() as s:
            rows = s.scalars(select(Audit).order_by(Audit.id.desc()).limit(1000)).all()
            entries = [{"at": r.at, "user": r.user, "action": r.action, "target": r.target,
                        "detail": r.detail} for r in rows]
        return page(request, "audit.html", auth, entries=entries)

    # --- export ------------------------------------------------------------------------

    def export_rows(what: str) -> list[dict[str, Any]]:
        with store.session() as s:
            if what == "calls":
                rows = []
                for c in s.scalars(select(Call).order_by(Call.opened_at)):
                    d = call_dict(s, c)
                    d["speakers"] = ";".join(
                        f"{sp['name']}={sp['state']}:{sp['probability']}" for sp in d["speakers"])
                    rows.append(d)
                return rows
            if what == "alerts":
                return [alert_dict(a, c) for a, c in s.execute(
                    select(AlertRow, Call).join(Call, AlertRow.call == Call.id)
                    .order_by(AlertRow.id))]
            return [verdict_dict(v) for v in s.scalars(select(Verdict).order_by(Verdict.id))]

    @app.get("/export/{what}.{fmt}")
    async def export(request: Request, what: str, fmt: str) -> Response:
        auth = need(request)
        if what not in ("calls", "alerts", "verdicts") or fmt not in ("csv", "json"):
            raise HTTPException(404, "export calls, alerts or verdicts as csv or json")
        rows = export_rows(what)
        with store.session() as s:
            store.audit(s, auth.user.name, "export", f"{what}.{fmt}", f"{len(rows)} rows")
        disposition = {"Content-Disposition": f'attachment; filename="callshield-{what}.{fmt}"'}
        if fmt == "json":
            return JSONResponse(rows, headers=disposition)
        out = io.StringIO()
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_cell(v) for k, v in row.items()})
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers=disposition)

    # --- live events -------------------------------------------------------------------

    @app.get("/events")
    async def events(request: Request) -> Response:
        need(request)
        queue = broadcaster.subscribe()

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 1000\n\n"
                for f in feeds:
                    yield f"data: {json.dumps({'server': f.target, **f.state.message()})}\n\n"
                while queue in broadcaster.queues:
                    try:
                        text = await asyncio.wait_for(queue.get(), 5)
                    except TimeoutError:  # now and then: the browser gone, or logged out
                        if await request.is_disconnected() or current(request) is None:
                            return
                        yield ": keepalive\n\n"
                        continue
                    if text is None:
                        return
                    yield f"data: {text}\n\n"
            finally:
                broadcaster.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"feeds": [{"server": f.target, **f.state.message()}
                                       for f in feeds]})

    return app
