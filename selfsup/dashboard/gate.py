"""The dashboard's front door: no request reaches Streamlit without the session token, except its
health check. Streamlit serves its own endpoints (the websocket, uploads, media, components,
static files) before any app script runs, so a check inside the script alone let a client with
no token open a session and upload 300 MB.

The token arrives once in the URL `selfsup dashboard` prints (`?token=...`); the answer to that
request sets it as an HttpOnly, SameSite=Strict cookie, which the page's later requests and its
websocket carry. The cookie's name holds the port: cookies are shared by every port of a host."""

from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

HEALTH = "/_stcore/health"


def cookie_name(port: int) -> str:
    return f"selfsup_token_{port}"


class TokenGate:
    """ASGI middleware (pure, so that it sees websockets as well as HTTP)."""

    def __init__(self, app, token: str, port: int):
        self.app, self.token, self.cookie = app, token.encode(), cookie_name(port)

    def _valid(self, given: str | None) -> bool:
        return bool(self.token) and given is not None and hmac.compare_digest(given.encode(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] == HEALTH:
            return await self.app(scope, receive, send)
        jar = SimpleCookie()
        try:
            jar.load("; ".join(v.decode("latin-1") for k, v in scope["headers"] if k == b"cookie"))
        except Exception:  # a malformed Cookie header counts as none
            jar = SimpleCookie()
        if self._valid(jar[self.cookie].value if self.cookie in jar else None):
            return await self.app(scope, receive, send)
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        if not self._valid(given):
            return await self._refuse(scope, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        cookie = f"{self.cookie}={given}; HttpOnly; SameSite=Strict; Path=/".encode()

        async def with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return await self.app(scope, receive, with_cookie)

    @staticmethod
    async def _refuse(scope, send):
        if scope["type"] == "websocket":  # closing before accepting answers the upgrade with 403
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"this dashboard needs its access token: open the address `selfsup dashboard` printed\n"
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
