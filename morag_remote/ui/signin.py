"""The dashboard's sign-in: an API key (producer or admin) exchanged for a signed cookie.

The app keeps no server-side sessions (``sessions.py``: Flask's session is off), so the dashboard
signs a cookie of its own with ``SECRET_KEY`` (itsdangerous, which Flask brings): it holds the
SHA-256 of the key (never the key itself), the key's name and a random CSRF token, and the time it
was signed, which bounds it to ``UI_SESSION_SECONDS``. It is HttpOnly, SameSite=Strict, limited to
``/ui``, and Secure when the request came over HTTPS (or always, with ``UI_COOKIE_SECURE``).

On every request the hash is looked up among the current keys, so a revoked key signs its cookie
out at once, and the role is the key's as it is now. Every state-changing form carries the
cookie's CSRF token; the sign-in form carries one of a short-lived cookie of its own (no one can
sign a browser in with their key from another site). Anything wrong (no cookie, a forged or
expired one, a revoked key, a missing or wrong token) is :class:`NotSignedIn`: the view is not
run, and the browser is sent to the sign-in form with the reason.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from flask import Response, current_app, request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from ..auth import ANONYMOUS_ADMIN, Principal
from ..context import key_store

COOKIE = "morag_remote_ui"
SIGNIN_COOKIE = "morag_remote_ui_signin"
SIGNIN_FORM_SECONDS = 3600
ROLES = ("producer", "admin")
CSRF_FIELD = "csrf_token"

# why the browser is back at the sign-in form: the reason travels as a code in the query string
REASONS = {
    "required": "Sign in with an API key to use the dashboard.",
    "expired": "Your sign-in has expired: sign in again.",
    "forged": "The sign-in cookie was not valid: sign in again.",
    "revoked": "The key you signed in with is no longer valid (revoked): sign in with another one.",
    "csrf": "The form was not sent by this dashboard (its CSRF token was missing or wrong): nothing was "
            "changed. Sign in again to go on.",
    "signed-out": "You are signed out.",
    "unknown": "That API key is not valid (unknown or revoked).",
    "role": "Worker keys cannot sign in to the dashboard: use a producer or admin key.",
}


class NotSignedIn(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class UiUser:
    principal: Principal
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.principal.role == "admin"


def _serializer(salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=salt)


def cookie_path() -> str:
    return (request.script_root or "") + "/ui"


def _secure() -> bool:
    forced = current_app.config.get("UI_COOKIE_SECURE")
    return bool(forced) if forced is not None else request.is_secure


def _set(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=cookie_path(), secure=_secure(), httponly=True,
                        samesite="Strict")


def clear(response: Response) -> None:
    response.delete_cookie(COOKIE, path=cookie_path(), secure=_secure(), httponly=True, samesite="Strict")


def session_seconds() -> int:
    return int(current_app.config.get("UI_SESSION_SECONDS") or 8 * 3600)


# -- the sign-in form ---------------------------------------------------------------------------

def signin_token(response_cookies: dict[str, str]) -> str:
    """The sign-in form's CSRF token: the one of this browser's sign-in cookie, or a new one (then
    ``response_cookies`` gets the cookie to set)."""
    raw = request.cookies.get(SIGNIN_COOKIE)
    if raw:
        try:
            return _serializer("ui-signin").loads(raw, max_age=SIGNIN_FORM_SECONDS)
        except BadSignature:
            pass
    token = secrets.token_urlsafe(24)
    response_cookies[SIGNIN_COOKIE] = _serializer("ui-signin").dumps(token)
    return token


def set_signin_cookies(response: Response, cookies: dict[str, str]) -> None:
    for name, value in cookies.items():
        _set(response, name, value, SIGNIN_FORM_SECONDS)


def signin_form_valid() -> bool:
    sent = request.form.get(CSRF_FIELD, "")
    raw = request.cookies.get(SIGNIN_COOKIE)
    if not sent or not raw:
        return False
    try:
        expected = _serializer("ui-signin").loads(raw, max_age=SIGNIN_FORM_SECONDS)
    except BadSignature:
        return False
    return isinstance(expected, str) and hmac.compare_digest(expected.encode(), sent.encode("utf-8", "replace"))


def sign_in(secret: str) -> tuple[Principal | None, str | None]:
    """The principal a key stands for and the cookie that signs it in, or None and the reason code
    (``forged``: no such key; ``role``: a worker key)."""
    if current_app.config["AUTH_DISABLED"]:
        principal, digest = ANONYMOUS_ADMIN, ""
    else:
        key = key_store().authenticate(secret.strip())
        if key is None:
            return None, "unknown"
        if key.role not in ROLES:
            return None, "role"
        principal, digest = Principal(name=key.name, role=key.role), key.key_hash
    value = _serializer("ui-session").dumps({"k": digest, "n": principal.name, "c": secrets.token_urlsafe(24)})
    return principal, value


def set_session(response: Response, value: str) -> None:
    _set(response, COOKIE, value, session_seconds())
    response.delete_cookie(SIGNIN_COOKIE, path=cookie_path(), secure=_secure(), httponly=True, samesite="Strict")


# -- every other request ------------------------------------------------------------------------

def current_user() -> UiUser:
    """The signed-in user of this request, or NotSignedIn with the reason."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        raise NotSignedIn("required")
    try:
        data = _serializer("ui-session").loads(raw, max_age=session_seconds())
    except SignatureExpired:
        raise NotSignedIn("expired") from None
    except BadSignature:
        raise NotSignedIn("forged") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in "knc"):
        raise NotSignedIn("forged")
    if current_app.config["AUTH_DISABLED"]:
        return UiUser(ANONYMOUS_ADMIN, data["c"])
    if not data["k"]:
        raise NotSignedIn("revoked")  # signed in while auth was disabled; it is on now
    found = None
    for key in key_store().list():  # every comparison runs, like authenticate's
        if hmac.compare_digest(key.key_hash, data["k"]):
            found = key
    if found is None:
        raise NotSignedIn("revoked")
    if found.role not in ROLES:
        raise NotSignedIn("role")
    return UiUser(Principal(name=found.name, role=found.role), data["c"])


def check_csrf(user: UiUser) -> None:
    sent = request.form.get(CSRF_FIELD, "")
    if not sent or not hmac.compare_digest(user.csrf.encode(), sent.encode("utf-8", "replace")):
        raise NotSignedIn("csrf")


