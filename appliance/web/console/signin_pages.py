"""Sign in at /login, sign out at /logout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from litestar import Request, get, post
from litestar.params import FromQuery
from litestar.response import Redirect, Template

from appliance.core.errors import ApplianceError
from appliance.web.console.pages import Form
from appliance.web.console.rendering import page, safe_next
from appliance.web.console.security import actor, start_session
from appliance.web.console.sessions import rotate_session_id
from appliance.web.dependencies import SignIn


@dataclass
class SignInForm:
    email: str = ""
    password: str = ""
    next: str = ""


def _signed_in_id(request: Request) -> int | None:
    session = request.session
    return session.get("account_id") if isinstance(session, dict) else None


@get("/", include_in_schema=False, sync_to_thread=False)
def home() -> Redirect:
    return Redirect("/console", status_code=303)


@get("/login", name="console.login", include_in_schema=False, sync_to_thread=False)
def login_page(request: Request, next: FromQuery[str] = "") -> Template | Redirect:
    if _signed_in_id(request):
        return Redirect(safe_next(next), status_code=303)
    return page(request, "login.html", next=safe_next(next), email="")


@post("/login", include_in_schema=False, sync_to_thread=True)
def login(request: Request, data: Annotated[SignInForm, Form],
          signin: SignIn) -> Template | Redirect:
    try:
        account = signin.sign_in(data.email, data.password, actor(request))
    except ApplianceError as exc:
        response = page(request, "login.html", status_code=exc.status, error=exc.message,
                        next=safe_next(data.next), email=data.email)
        response.headers.update(exc.headers)
        return response
    # A fresh id at every sign-in: an id planted in the browser before it
    # (session fixation) never becomes a signed-in one.
    rotate_session_id(request)
    start_session(request, account)
    return Redirect(safe_next(data.next), status_code=303)


@post("/logout", include_in_schema=False, sync_to_thread=True)
def logout(request: Request, signin: SignIn) -> Redirect:
    account_id = _signed_in_id(request)
    if account_id:
        signin.sign_out(account_id, actor(request))
    # An empty session makes the session middleware delete the stored row and the cookie.
    request.clear_session()
    return Redirect("/login", status_code=303)
