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
import threading
import time
from collections import deque
from dataclasses import dataclass, field

SESSION_COOKIE = "codsplat_session"
CSRF_HEADER = "x-csrf-token"
LOGIN_FAILURES = 5  # failed logins from one address within LOGIN_WINDOW before it must wait
LOGIN_BUDGET = 50  # failed logins from all addresses together within LOGIN_WINDOW before every one must wait
LOGIN_WINDOW = 60.0


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two strings of any characters (hmac.compare_digest refuses non-ASCII
    str, which a hostile cookie or header would otherwise turn into a 500)."""
    return a is not None and b is not None and hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def _wait(failures: deque, limit: int) -> float:
    """Seconds until the oldest of `limit` failures within LOGIN_WINDOW leaves it (0: fewer than `limit`)."""
    while failures and time.monotonic() - failures[0] > LOGIN_WINDOW:
        failures.popleft()
    return LOGIN_WINDOW - (time.monotonic() - failures[0]) if len(failures) >= limit else 0.0


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
    _ended: dict[str, float] = field(default_factory=dict)  # sessions logged out, until they would have expired
    _failures: dict[str, deque] = field(default_factory=dict)  # failed logins by client address
    _all_failures: deque = field(default_factory=lambda: deque(maxlen=LOGIN_BUDGET))  # by every address together
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _sign(self, text: str) -> str:
        mac = hmac.new(self.secret, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    # ------------------------------------------------------------------ login and sessions

    def token_matches(self, offered: str) -> bool:
        return self.token is None or same(offered, self.token)

    def login_wait(self, client: str) -> float:
        """Seconds this address must wait before trying again (0: it may try now): after LOGIN_FAILURES
        wrong tokens from it, or LOGIN_BUDGET from all addresses together (guesses spread over many
        addresses), within LOGIN_WINDOW."""
        with self._lock:
            return max(_wait(self._failures.get(client, deque()), LOGIN_FAILURES), _wait(self._all_failures, LOGIN_BUDGET))

    def login_failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:  # many addresses: forget the oldest rather than grow without end
                self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(client, deque(maxlen=LOGIN_FAILURES)).append(time.monotonic())
            self._all_failures.append(time.monotonic())

    def end_session(self, cookie: str | None) -> None:
        """Logout: the session stops working here and now, not when its cookie would expire."""
        if self.valid_session(cookie):
            with self._lock:
                now = time.time()
                for old in [k for k, until in self._ended.items() if until < now]:
                    del self._ended[old]
                self._ended[cookie] = now + self.session_seconds

    def new_session(self) -> str:
        payload = f"{int(time.time())}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._sign(payload)}"

    def valid_session(self, cookie: str | None) -> bool:
        if not cookie or cookie.count(".") != 2 or len(cookie) > 200:
            return False
        payload, _, signature = cookie.rpartition(".")
        if not same(signature, self._sign(payload)) or cookie in self._ended:
            return False
        issued = payload.split(".")[0]
        return issued.isdecimal() and issued.isascii() and time.time() - int(issued) < self.session_seconds

    def csrf_token(self, session: str) -> str:
        return self._sign("csrf:" + session)

    def valid_csrf(self, session: str | None, offered: str | None) -> bool:
        return bool(session and offered) and same(offered, self.csrf_token(session))

    def host_allowed(self, host_header: str | None) -> bool:
        return self.allowed_hosts is None or (host_header or "").lower() in self.allowed_hosts

    # ------------------------------------------------------------------ signed links

    def sign_path(self, path: str, seconds: int) -> str:
        expires = int(time.time()) + seconds
        return f"{path}?expires={expires}&sig={self._sign(f'{path}:{expires}')}"

    def valid_path_signature(self, path: str, expires: str | None, sig: str | None) -> bool:
        if not expires or not sig or not (expires.isascii() and expires.isdecimal()) or int(expires) < time.time():
            return False
        return same(sig, self._sign(f"{path}:{expires}"))
