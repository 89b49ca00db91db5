"""Admin pages: accounts, credits and the audit log (with its exports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from appliance.accounts.accounts import Account
from appliance.accounts.audit import Actor, AuditFilter, to_csv, to_json
from appliance.accounts.service import AccountService
from appliance.core.clock import utc_now
from appliance.core.errors import ApplianceError, BadRequest
from appliance.core.numbers import whole_number
from appliance.web.console.pages import Form, flash, take_flash
from appliance.web.console.rendering import page
from appliance.web.console.security import actor, admins_only
from appliance.web.dependencies import Accounts, Audit

AUDIT_PAGE_ROWS = 200


@dataclass
class NewAccountForm:
    email: str = ""
    password: str = ""
    credits: str = "0"
    admin: str = ""  # a checkbox: "on" when ticked


@dataclass
class CreditsForm:
    amount: str = ""
    reason: str = ""


def form_number(text: str, what: str) -> int:
    try:
        return whole_number(text.strip())
    except ValueError:
        raise BadRequest(f"{what} must be a whole number, not {text!r}") from None


def admin_actor(request: Request[Account, Any, Any]) -> Actor:
    return actor(request, by=request.user.email)


class AdminPages(Controller):
    path = "/admin"
    guards = [admins_only]
    include_in_schema = False

    @get("/accounts", name="console.admin.accounts", sync_to_thread=True)
    def account_list(self, request: Request[Account, Any, Any],
                     accounts: Accounts) -> Template:
        return self._accounts_page(request, accounts, flash=take_flash(request))

    @post("/accounts", sync_to_thread=True)
    def create_account(self, request: Request[Account, Any, Any],
                       data: Annotated[NewAccountForm, Form],
                       accounts: Accounts) -> Template | Redirect:
        try:
            created = accounts.create(
                data.email, data.password, admin_actor(request), is_admin=data.admin == "on",
                credits=form_number(data.credits or "0", "Credits"))
        except ApplianceError as exc:
            return self._accounts_page(request, accounts, status_code=exc.status,
                                       error=exc.message, form=data)
        flash(request, f"Created {'admin ' if created.is_admin else ''}account {created.email}"
                       f" with {created.credits} credits.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:int}/disable", sync_to_thread=True)
    def disable(self, request: Request[Account, Any, Any], account_id: FromPath[int],
                accounts: Accounts) -> Redirect:
        if account_id == request.user.id:
            raise BadRequest("You cannot disable your own account")
        account = accounts.set_disabled(account_id, True, admin_actor(request))
        flash(request, f"Disabled {account.email}: its keys and sign-ins stop working.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:int}/enable", sync_to_thread=True)
    def enable(self, request: Request[Account, Any, Any], account_id: FromPath[int],
               accounts: Accounts) -> Redirect:
        account = accounts.set_disabled(account_id, False, admin_actor(request))
        flash(request, f"Enabled {account.email} again.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:int}/admin", sync_to_thread=True)
    def make_admin(self, request: Request[Account, Any, Any], account_id: FromPath[int],
                   accounts: Accounts) -> Redirect:
        account = accounts.make_admin(account_id, admin_actor(request))
        flash(request, f"{account.email} is now an administrator.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:int}/credits", sync_to_thread=True)
    def credits(self, request: Request[Account, Any, Any], account_id: FromPath[int],
                data: Annotated[CreditsForm, Form], accounts: Accounts) -> Template | Redirect:
        try:
            account = accounts.get(account_id)
            amount = form_number(data.amount, "The amount")
            reason = data.reason.strip()
            if not reason:
                raise BadRequest("Say why, for the ledger: the reason is required")
            balance = accounts.grant_credits(account.email, amount, admin_actor(request),
                                             reason=reason)
        except ApplianceError as exc:
            return self._accounts_page(request, accounts, status_code=exc.status,
                                       error=exc.message)
        verb = "Granted" if amount > 0 else "Removed"
        flash(request, f"{verb} {abs(amount)} credits {'to' if amount > 0 else 'from'}"
                       f" {account.email}; the balance is now {balance}.")
        return Redirect("/console/admin/accounts", status_code=303)

    @staticmethod
    def _accounts_page(request: Request[Account, Any, Any], accounts: AccountService,
                       status_code: int = 200, **context: Any) -> Template:
        return page(request, "admin_accounts.html", status_code=status_code,
                    accounts=accounts.all(), form=context.pop("form", NewAccountForm()),
                    **context)

    @get("/audit", name="console.admin.audit", sync_to_thread=True)
    def audit_log(self, request: Request[Account, Any, Any], audit: Audit,
                  account: FromQuery[str] = "", action: FromQuery[str] = "",
                  since: FromQuery[str] = "", until: FromQuery[str] = "") -> Template:
        where = AuditFilter(account=account, action=action, since=since, until=until)
        try:
            entries = audit.query(where, limit=AUDIT_PAGE_ROWS + 1)
            error = None
        except ApplianceError as exc:
            entries, error = [], exc.message
        return page(request, "admin_audit.html", status_code=400 if error else 200,
                    entries=entries[:AUDIT_PAGE_ROWS], more=len(entries) > AUDIT_PAGE_ROWS,
                    where=where, actions=audit.actions(), error=error,
                    query=request.url.query)

    @get("/audit/export", sync_to_thread=True)
    def audit_export(self, request: Request[Account, Any, Any], audit: Audit,
                     format: FromQuery[Literal["csv", "json"]] = "csv",
                     account: FromQuery[str] = "", action: FromQuery[str] = "",
                     since: FromQuery[str] = "", until: FromQuery[str] = "") -> Response[str]:
        where = AuditFilter(account=account, action=action, since=since, until=until)
        entries = audit.query(where)
        stamp = utc_now()[:19].replace(":", "").replace("-", "")
        if format == "json":
            body, media_type = to_json(entries), "application/json"
        else:
            body, media_type = to_csv(entries), "text/csv; charset=utf-8"
        return Response(body, media_type=media_type, headers={
            "Content-Disposition": f'attachment; filename="audit-{stamp}.{format}"'})
