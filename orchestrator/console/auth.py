"""Who may use the console: a login token, signed session cookies, CSRF tokens and signed links.

Nothing is stored server-side. A session cookie is `issued.nonce.signature` (HMAC-SHA256 with the
console's secret); its CSRF token is the HMAC of the session, sent back by the page in the
`X-CSRF-Token` header on every state change. Links the console hands out for its own files and
upload parts are signed and expire, like S3's presigned URLs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field

SESSION_COOKIE = "codsplat_session"
CSRF_HEADER = "x-csrf-token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Guard:
    token: str | None  # None: no login (only allowed when the console listens on loopback)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    allowed_hosts: frozenset[str] | None = None  # Host headers accepted; None accepts any
    session_seconds: int = 12 * 3600
    secure_cookies: bool = False  # set behind HTTPS (a load balancer): cookies never go over plain HTTP

    def _sign(self, text: str) -> str:
        mac = hmac.new(self.secret, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    # ------------------------------------------------------------------ login and sessions

    def token_matches(self, offered: str) -> bool:
        return self.token is None or hmac.compare_digest(offered.encode(), self.token.encode())

    def new_session(self) -> str:
        payload = f"{int(time.time())}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._sign(payload)}"

    def valid_session(self, cookie: str | None) -> bool:
        if not cookie or cookie.count(".") != 2:
            return False
        payload, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return False
        issued = payload.split(".")[0]
        return issued.isdigit() and time.time() - int(issued) < self.session_seconds

    def csrf_token(self, session: str) -> str:
        return self._sign("csrf:" + session)

    def valid_csrf(self, session: str | None, offered: str | None) -> bool:
        return bool(session and offered) and hmac.compare_digest(offered, self.csrf_token(session))

    def host_allowed(self, host_header: str | None) -> bool:
        return self.allowed_hosts is None or (host_header or "").lower() in self.allowed_hosts

    # ------------------------------------------------------------------ signed links

    def sign_path(self, path: str, seconds: int) -> str:
        expires = int(time.time()) + seconds
        return f"{path}?expires={expires}&sig={self._sign(f'{path}:{expires}')}"

    def valid_path_signature(self, path: str, expires: str | None, sig: str | None) -> bool:
        if not expires or not sig or not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(sig, self._sign(f"{path}:{expires}"))
