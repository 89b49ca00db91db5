"""The web console over HTTP: sessions, CSRF, throttling, isolation and admin rights."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time

import pytest
from litestar.testing import TestClient

from appliance.accounts import accounts, audit, keys
from appliance.core.clock import utc_clock, utc_now
from appliance.services import Services
from appliance.web.app import create_app
from appliance.web.console.security import SECURITY_HEADERS
from appliance.web.console.sessions import COOKIE_NAME

from .console_helpers import (
    ADAPTER,
    HTML,
    PASSWORD,
    SECOND_MODEL,
    SECOND_PRICE,
    TIMES,
    post_form,
    session_id,
    set_session_cookie,
    sign_in,
    two_models,
)
from .helpers import InstantGenerator, bearer

API = "/api/playground/images"


def audit_rows(db, action: str) -> list[dict]:
    return list(db.query("SELECT * FROM audit_log WHERE action = ? ORDER BY id", [action]))


def session_rows(db) -> list[tuple]:
    return db.execute("SELECT key_hash, value, expires_at FROM console_sessions").fetchall()


def digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


def admin(client, email: str = "admin@example.com") -> accounts.Account:
    return accounts.create_account(client.database.db(), email, PASSWORD, audit.Actor.cli(),
                                   is_admin=True, credits=0)


def wait_for_console_job(http: TestClient, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/console/jobs/{job_id}/progress").json()
        if job["finished"]:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_sign_in_rotates_the_session_id_and_sign_out_ends_it_on_the_server(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    client.account("dev@example.com")

    # A visitor who is not signed in gets neither a stored session nor a cookie.
    assert http.get("/login").status_code == 200
    assert session_id(http) is None and session_rows(db) == []

    # An id planted in the browser beforehand (session fixation) is never adopted.
    set_session_cookie(http, "a" * 64)
    response = sign_in(http, "dev@example.com")
    assert response.status_code == 303 and response.headers["location"] == "/console"
    first = session_id(http)
    assert first and first != "a" * 64
    rows = session_rows(db)
    # Only the digest is stored: the raw id appears nowhere in the table.
    assert [row[0] for row in rows] == [digest(first)]
    assert first.encode() not in rows[0][1] and first not in rows[0][0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rows[0][2])
    assert http.get("/console").status_code == 200

    # Signing in again, over a live session, gives yet another id and drops the old one.
    assert sign_in(http, "dev@example.com").status_code == 303
    second = session_id(http)
    assert second not in (first, None)
    assert [row[0] for row in session_rows(db)] == [digest(second)]
    set_session_cookie(http, first)
    assert http.get("/console", headers=HTML, follow_redirects=False).status_code == 303
    set_session_cookie(http, second)

    assert post_form(http, "/logout").headers["location"] == "/login"
    assert session_rows(db) == []
    assert session_id(http) is None
    set_session_cookie(http, second)  # a copy of the cookie kept by an attacker
    refused = http.get("/console", headers=HTML, follow_redirects=False)
    assert refused.status_code == 303 and refused.headers["location"].startswith("/login")
    actions = [row["action"] for row in db.query("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["account.create", "login.success", "login.success", "logout"]


def test_a_session_survives_a_restart_of_the_service(config, database):
    accounts.create_account(database.db(), "dev@example.com", PASSWORD, audit.Actor.cli())
    with TestClient(create_app(Services.build(config, load_generator=InstantGenerator))) as http:
        assert sign_in(http, "dev@example.com").status_code == 303
        cookies = dict(http.cookies)
    with TestClient(create_app(Services.build(config, load_generator=InstantGenerator))) as http:
        http.cookies.update(cookies)
        page = http.get("/console", headers=HTML, follow_redirects=False)
        assert page.status_code == 200 and "dev@example.com" in page.text


def test_idle_and_absolute_timeouts_end_a_session(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    client.account("dev@example.com")
    console = client.services.config.console

    sign_in(http, "dev@example.com")
    key_hash = digest(session_id(http))
    idle_expiry = db.execute("SELECT expires_at FROM console_sessions").fetchone()[0]
    assert idle_expiry > utc_now()
    # Idle past the timeout: the stored expiry is in the past.
    db.execute("UPDATE console_sessions SET expires_at = '2000-01-01T00:00:00.000Z'")
    gone = http.get("/console", headers=HTML, follow_redirects=False)
    assert gone.status_code == 303 and gone.headers["location"] == "/login?next=%2Fconsole"
    # Deleted then, unless another writer held the lock at that moment (sessions.py: the
    # page never waits for it, and housekeeping sweeps what is left): never live again.
    assert [row for row in session_rows(db) if row[2] > utc_now()] == []

    sign_in(http, "dev@example.com")
    # Busy, but signed in longer ago than the absolute timeout.
    value = json.loads(session_rows(db)[0][1])
    value["signed_in_at"] -= console.absolute_timeout_hours * 3600 + 1
    db.execute("UPDATE console_sessions SET value = ?", [json.dumps(value).encode()])
    expired = http.get("/console/api-keys", follow_redirects=False)
    assert expired.status_code == 401
    assert expired.json() == {"error": "Your sign-in has expired; sign in again"}
    assert session_rows(db) == []
    assert key_hash not in {row[0] for row in session_rows(db)}


def test_forms_without_a_valid_csrf_token_are_refused_and_change_nothing(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    account = client.account("dev@example.com")
    http.get("/login")

    no_token = http.post("/login", data={"email": "dev@example.com", "password": PASSWORD})
    assert no_token.status_code == 403
    assert no_token.json() == {"error": "CSRF token verification failed"}
    assert audit_rows(db, "login.success") == []

    sign_in(http, "dev@example.com")
    forged = http.post("/console/api-keys", data={"name": "Evil", "_csrf_token": "0" * 128})
    assert forged.status_code == 403
    page = http.post("/console/api-keys", data={"name": "Evil"}, headers=HTML)
    assert page.status_code == 403 and "came from another site" in page.text
    assert keys.list_keys(db, account.id) == []
    # The page's own token works.
    assert post_form(http, "/console/api-keys", name="Good").status_code == 201
    assert [k.name for k in keys.list_keys(db, account.id)] == ["Good"]


def test_failed_sign_ins_are_throttled_per_account_and_per_address_and_audited(make_client,
                                                                               make_config):
    client = make_client(load_generator=InstantGenerator, app_config=make_config(
        console={"max_failed_signins_per_account_and_address": 2,
                 "max_failed_signins_per_address": 4}))
    # The throttle's clock stands still, so that no wait runs out during the test.
    now = utc_clock()
    client.services.signin.clock = lambda: now
    http, db = client.http, client.database.db()
    account = client.account("dev@example.com")
    client.account("other@example.com")

    # Two free failures, and a third that makes the next attempt wait.
    for _ in range(3):
        wrong = sign_in(http, "dev@example.com", "wrong password")
        assert wrong.status_code == 401
        assert "The email or password is not right" in wrong.text
    # Even the right password is refused now, without being checked.
    throttled = sign_in(http, "dev@example.com")
    assert throttled.status_code == 429
    assert "Too many failed sign-ins; try again in 1 second" in throttled.text
    assert throttled.headers["retry-after"] == "1"
    assert session_id(http) is None
    failed = audit_rows(db, "login.failed")
    assert {(r["account_id"], r["ip_address"]) for r in failed} == {(account.id, "testclient")}
    assert json.loads(failed[0]["details"]) == {"email": "dev@example.com",
                                                "reason": "wrong password"}
    assert len(audit_rows(db, "login.throttled")) == 1

    # Another account from the same address is not held up by this one's failures...
    assert sign_in(http, "other@example.com").status_code == 303
    assert audit_rows(db, "login.success")[0]["ip_address"] == "testclient"
    post_form(http, "/logout")
    # ...until the address itself has failed too often, whatever the emails tried.
    for email in ("a@example.com", "b@example.com"):
        assert sign_in(http, email, "guessing").status_code == 401
    assert sign_in(http, "other@example.com").status_code == 429
    unknown = audit_rows(db, "login.failed")[-1]
    assert unknown["account_id"] is None
    assert json.loads(unknown["details"]) == {"email": "b@example.com", "reason": "unknown account"}
    assert len(audit_rows(db, "login.throttled")) == 2


def test_a_disabled_account_cannot_sign_in_and_is_signed_out(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    account = client.account("dev@example.com")
    sign_in(http, "dev@example.com")
    accounts.set_disabled(db, account.id, True, audit.Actor.cli())
    assert http.get("/console", follow_redirects=False).status_code == 401
    refused = sign_in(http, "dev@example.com")
    assert refused.status_code == 403 and "This account is disabled" in refused.text


def test_another_accounts_jobs_and_images_are_never_reachable(instant_client):
    client = instant_client
    http = client.http
    owner = client.account("owner@example.com")
    key = client.key(owner)
    job_id = http.post(API, json={"prompts": ["a red square"]}, headers=bearer(key)).json()["jobId"]
    client.wait_for_job(key, job_id)

    sign_in(http, "owner@example.com")
    assert http.get(f"/console/jobs/{job_id}").status_code == 200
    own = http.get(f"/console/jobs/{job_id}/images/0")
    assert own.status_code == 200 and own.headers["content-type"] == "image/png"
    download = http.get(f"/console/jobs/{job_id}/images/0?download=true")
    assert download.headers["content-disposition"].startswith("attachment")
    assert job_id in http.get("/console/jobs").text
    post_form(http, "/logout")

    client.account("other@example.com")
    sign_in(http, "other@example.com")
    for path in (f"/console/jobs/{job_id}", f"/console/jobs/{job_id}/progress",
                 f"/console/jobs/{job_id}/images/0",
                 f"/console/jobs/{job_id}/images/0?download=true"):
        response = http.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"error": "Job not found"}
    assert http.get(f"/console/jobs/{job_id}", headers=HTML).status_code == 404
    assert job_id not in http.get("/console/jobs").text
    assert job_id not in http.get("/console").text


def test_the_playground_charges_like_the_api_and_refuses_bad_input_for_free(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    account = client.account("dev@example.com", credits=3)
    sign_in(http, "dev@example.com")

    empty = post_form(http, "/console/playground", prompts="\n  \n")
    assert empty.status_code == 400 and "&#39;prompts&#39; is empty" in empty.text
    too_many = post_form(http, "/console/playground", prompts="a\nb\nc\nd")
    assert too_many.status_code == 402 and "Insufficient credits" in too_many.text
    assert "a\nb\nc\nd" in too_many.text  # the prompts are kept for another try
    assert client.balance(account) == 3

    submitted = post_form(http, "/console/playground", prompts="a cat\n\na dog\n")
    assert submitted.status_code == 303
    job_id = submitted.headers["location"].rsplit("/", 1)[1]
    job = wait_for_console_job(http, job_id)
    assert (job["status"], job["completedImages"], job["totalImages"]) == ("completed", 2, 2)
    assert client.balance(account) == 1
    stored = db.execute("SELECT api_key_id, credits_used FROM jobs WHERE id = ?",
                        [job_id]).fetchone()
    assert stored == (None, 2)
    dashboard = http.get("/console").text
    assert job_id[:8] in dashboard and "image job" in dashboard
    page = http.get(f"/console/jobs/{job_id}").text
    assert page.count(f'src="/console/jobs/{job_id}/images/') == 2


def between(text: str, start: str, end: str) -> str:
    """The part of a page from `start` to the next `end`."""
    begin = text.index(start)
    return text[begin:text.index(end, begin)]


@pytest.fixture
def two_model_playground(make_client, make_config, tiny_model, tmp_path):
    """Signed in, with 10 credits, to a console serving two models and an adapter."""
    config = two_models(make_config, tiny_model, tmp_path)
    client = make_client(load_generator=InstantGenerator, app_config=config)
    account = client.account("dev@example.com", credits=10)
    sign_in(client.http, "dev@example.com")
    return client, account


def test_the_playground_offers_each_model_at_its_price_and_charges_it(two_model_playground):
    client, account = two_model_playground
    http, db = client.http, client.database.db()

    page = http.get("/console/playground").text
    picker = between(page, '<select name="model"', "</select>")
    assert re.findall(r'<option value="([^"]+)"', picker) == [SECOND_MODEL, "tiny"]
    assert f"{SECOND_MODEL} — 64{TIMES}64, {SECOND_PRICE} credits/image</option>" in picker
    # The default model is chosen, and the sentence under the form tells its figures.
    assert (f'<option value="tiny" data-size="64{TIMES}64" data-steps="2" data-price="1 credit"'
            f" selected>tiny — 64{TIMES}64, 1 credit/image<") in picker
    assert 'Each costs <span data-field="price">1 credit</span>' in page
    assert '<script src="/console/static/playground.js" defer></script>' in page
    assert http.get("/console/static/playground.js").status_code == 200
    assert "<script>" not in page and "style=" not in page

    unknown = post_form(http, "/console/playground", prompts="a cat\na dog", model="nope")
    assert unknown.status_code == 400
    assert "&#39;model&#39; is &#39;nope&#39;, which is not installed here" in unknown.text
    assert "a cat\na dog</textarea>" in unknown.text
    assert client.balance(account) == 10
    # Refused for another reason, the form keeps the model asked for.
    too_many = post_form(http, "/console/playground", model=SECOND_MODEL,
                         prompts="\n".join(["a cat"] * 4))
    assert too_many.status_code == 402 and client.balance(account) == 10
    assert f'data-price="{SECOND_PRICE} credits" selected>' in too_many.text
    assert f'data-field="price">{SECOND_PRICE} credits</span>' in too_many.text

    submitted = post_form(http, "/console/playground", prompts="a cat\na dog",
                          model=SECOND_MODEL)
    assert submitted.status_code == 303, submitted.text
    job_id = submitted.headers["location"].rsplit("/", 1)[1]
    assert wait_for_console_job(http, job_id)["status"] == "completed"
    assert client.balance(account) == 10 - 2 * SECOND_PRICE
    settings = json.loads(db.execute("SELECT settings FROM jobs WHERE id = ?",
                                     [job_id]).fetchone()[0])
    assert (settings["model"], settings["loras"]) == (SECOND_MODEL, [])
    assert f'<dt>Model</dt><dd data-field="model">{SECOND_MODEL}</dd>' in http.get(
        f"/console/jobs/{job_id}").text
    # A form from before the picker (prompts alone) still makes the default model's images.
    plain = post_form(http, "/console/playground", prompts="a fox")
    assert plain.status_code == 303 and client.balance(account) == 10 - 2 * SECOND_PRICE - 1


def test_the_playground_applies_an_adapter_only_to_the_models_it_fits(two_model_playground):
    client, account = two_model_playground
    http, db = client.http, client.database.db()

    page = http.get("/console/playground").text
    adapters = between(page, '<select name="lora"', "</select>")
    assert re.findall(r'<option value="([^"]*)"', adapters) == ["", ADAPTER]
    assert '<option value="">none</option>' in adapters
    assert f"{ADAPTER} (for {SECOND_MODEL})</option>" in adapters
    assert 'name="lora_scale" value="1.0"' in page and 'min="-4.0" max="4.0"' in page

    refusals = [
        ({"model": "tiny", "lora": ADAPTER},
         f"&#39;lora&#39; is &#39;{ADAPTER}&#39;, which fits {SECOND_MODEL}, not the model"
         " &#39;tiny&#39;"),
        ({"model": SECOND_MODEL, "lora": "oils"},
         "&#39;lora&#39; is &#39;oils&#39;, which is not installed here"),
        ({"model": SECOND_MODEL, "lora": ADAPTER, "lora_scale": "9"},
         "&#39;lora_scale&#39; is 9.0; it must be from -4.0 to 4.0"),
        ({"model": SECOND_MODEL, "lora": ADAPTER, "lora_scale": "much"},
         "&#39;lora_scale&#39; is &#39;much&#39;; it must be a number"),
    ]
    for fields, said in refusals:
        refused = post_form(http, "/console/playground", prompts="a boat", **fields)
        assert refused.status_code == 400 and said in refused.text, (fields, refused.text)
        assert 'class="alert error"' in refused.text and "a boat</textarea>" in refused.text
    assert client.balance(account) == 10

    submitted = post_form(http, "/console/playground", prompts="a boat", model=SECOND_MODEL,
                          lora=ADAPTER, lora_scale="0.5")
    assert submitted.status_code == 303, submitted.text
    job_id = submitted.headers["location"].rsplit("/", 1)[1]
    assert wait_for_console_job(http, job_id)["status"] == "completed"
    assert client.balance(account) == 10 - SECOND_PRICE
    settings = json.loads(db.execute("SELECT settings FROM jobs WHERE id = ?",
                                     [job_id]).fetchone()[0])
    assert settings["loras"] == [[ADAPTER, 0.5]]
    job_page = http.get(f"/console/jobs/{job_id}").text
    assert f'<dt>LoRA</dt><dd data-field="loras">{ADAPTER} {TIMES} 0.5</dd>' in job_page


def test_console_key_management_is_audited_with_the_browser_address(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    account = client.account("dev@example.com")
    sign_in(http, "dev@example.com")

    nameless = post_form(http, "/console/api-keys", name="  ")
    assert nameless.status_code == 400 and "the key needs a name" in nameless.text
    created = post_form(http, "/console/api-keys", name="Production")
    raw = re.search(r'value="(wi_live_[0-9a-f]{64})"', created.text)[1]
    listing = http.get("/console/api-keys").text
    assert raw not in listing and raw[:12] in listing and "Production" in listing
    assert created.headers["cache-control"] == "no-store"
    # Just made: the form is closed again and the new key's row is marked; an error
    # keeps the form open with the message beside it.
    assert 'class="add-key inline-form"' in created.text
    assert created.text.count('class="just-made"') == 1
    unnamed = post_form(http, "/console/api-keys", name="")
    assert unnamed.status_code == 400 and 'class="add-key inline-form open"' in unnamed.text

    info = keys.list_keys(db, account.id)[0]
    deleted = post_form(http, f"/console/api-keys/{info.id}/delete")
    assert deleted.status_code == 303
    assert "Deleted key “Production”" in http.get("/console/api-keys").text
    assert keys.list_keys(db, account.id) == []
    refused = http.get(f"{API}/00000000-0000-0000-0000-000000000000", headers=bearer(raw))
    assert refused.status_code == 401 and refused.json() == {"error": "Invalid API key"}
    for action in ("key.create", "key.delete"):
        (row,) = audit_rows(db, action)
        assert (row["account_id"], row["ip_address"], row["user_agent"]) == (
            account.id, "testclient", "testclient")
    # Another account's key id cannot be deleted through this account.
    other = client.account("other@example.com")
    theirs = keys.create_key(db, other.id, "Theirs", audit.Actor.cli())[0]
    assert post_form(http, f"/console/api-keys/{theirs.id}/delete").status_code == 404
    assert keys.list_keys(db, other.id) == [theirs]


def test_admin_pages_are_refused_to_non_admins(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    user = client.account("dev@example.com")
    sign_in(http, "dev@example.com")
    for path in ("/console/admin/accounts", "/console/admin/audit",
                 "/console/admin/audit/export?format=csv"):
        response = http.get(path)
        assert response.status_code == 403, path
        assert response.json() == {"error": "Only administrators can open this page"}
    assert post_form(http, f"/console/admin/accounts/{user.id}/admin").status_code == 403
    assert post_form(http, f"/console/admin/accounts/{user.id}/credits", amount="100",
                     reason="free").status_code == 403
    assert accounts.get_account(db, user.id) == user
    assert "Audit log" not in http.get("/console").text


def test_admins_manage_accounts_and_credits_and_export_the_audit_log(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    admin(client)
    sign_in(http, "admin@example.com")

    made = post_form(http, "/console/admin/accounts", email="new@example.com",
                     password="a long password", credits="4")
    assert made.status_code == 303
    new = accounts.find_account(db, "new@example.com")
    assert (new.credits, new.is_admin, new.disabled) == (4, False, False)
    duplicate = post_form(http, "/console/admin/accounts", email="new@example.com",
                          password="a long password", credits="0")
    assert duplicate.status_code == 409

    assert post_form(http, f"/console/admin/accounts/{new.id}/credits", amount="-3",
                     reason="compliance request 7").status_code == 303
    too_much = post_form(http, f"/console/admin/accounts/{new.id}/credits", amount="-9",
                         reason="oops")
    assert too_much.status_code == 400 and "has only 1" in too_much.text
    no_reason = post_form(http, f"/console/admin/accounts/{new.id}/credits", amount="5", reason="")
    assert no_reason.status_code == 400
    assert accounts.ledger(db, new.id)[0].reason == "compliance request 7"
    assert post_form(http, f"/console/admin/accounts/{new.id}/disable").status_code == 303
    assert post_form(http, f"/console/admin/accounts/{new.id}/admin").status_code == 303
    new = accounts.get_account(db, new.id)
    assert (new.credits, new.is_admin, new.disabled) == (1, True, True)
    me = accounts.find_account(db, "admin@example.com")
    assert post_form(http, f"/console/admin/accounts/{me.id}/disable").status_code == 400

    grant = audit_rows(db, "credits.grant")[0]
    assert json.loads(grant["details"]) == {"amount": -3, "balance": 1, "by": "admin@example.com",
                                            "reason": "compliance request 7"}
    assert grant["ip_address"] == "testclient"

    page = http.get("/console/admin/audit", params={"account": "new@", "action": "account.disable"})
    assert page.status_code == 200 and page.text.count('<span class="badge">account.disable') == 1
    # The details read as name: value fields; the exports below keep the JSON.
    grants = http.get("/console/admin/audit", params={"action": "credits.grant"}).text
    assert "<dt>reason:</dt> <dd>compliance request 7</dd>" in grants
    assert "<dt>amount:</dt> <dd>-3</dd>" in grants
    assert "amount&#34;" not in grants and '"amount"' not in grants
    today = grant["created_at"][:10]
    exported = http.get("/console/admin/audit/export",
                        params={"format": "csv", "account": "new@example.com", "since": today,
                                "until": today})
    assert exported.headers["content-disposition"].startswith('attachment; filename="audit-')
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["action"] for r in rows] == ["account.admin", "account.disable", "credits.grant",
                                           "account.create"]
    assert {r["account"] for r in rows} == {"new@example.com"}
    as_json = http.get("/console/admin/audit/export",
                       params={"format": "json", "action": "credits.grant"}).json()
    assert [(r["account"], r["details"]["by"]) for r in as_json] == [
        ("new@example.com", "admin@example.com")]
    nothing = http.get("/console/admin/audit/export",
                       params={"format": "json", "until": "2000-01-01"}).json()
    assert nothing == []
    bad_date = http.get("/console/admin/audit", params={"since": "yesterday"})
    assert bad_date.status_code == 400 and "must be a date" in bad_date.text


def test_pages_carry_security_headers_and_cookies_are_httponly_and_samesite(instant_client):
    client = instant_client
    http = client.http
    client.account("dev@example.com")
    login = http.get("/login")
    for name, value in SECURITY_HEADERS.items():
        assert login.headers[name] == value
    assert "frame-ancestors 'none'" in login.headers["content-security-policy"]
    csrf_cookie = login.headers["set-cookie"]
    assert "HttpOnly" in csrf_cookie and "SameSite=lax" in csrf_cookie
    assert "Secure" not in csrf_cookie

    signed_in = sign_in(http, "dev@example.com")
    session_cookie = signed_in.headers["set-cookie"]
    assert session_cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in session_cookie and "SameSite=lax" in session_cookie
    assert "Secure" not in session_cookie  # plain HTTP here
    error_page = http.get("/console/jobs/nope", headers=HTML)
    assert error_page.status_code == 404
    assert error_page.headers["x-content-type-options"] == "nosniff"
    policy = SECURITY_HEADERS["Content-Security-Policy"]
    assert error_page.headers["content-security-policy"] == policy
    # Pages have no inline script or style for the policy to block.
    for path in ("/console", "/console/api-keys", "/console/playground", "/console/jobs"):
        text = http.get(path).text
        assert "<script>" not in text and "style=" not in text and "<style" not in text

    # Over HTTPS the session cookie is Secure too.
    https = TestClient(http.app, base_url="https://testserver.local")
    over_https = sign_in(https, "dev@example.com")
    assert over_https.status_code == 303 and "Secure" in over_https.headers["set-cookie"]


def test_no_get_request_changes_state(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    user = client.account("dev@example.com")
    admin(client)
    key = keys.create_key(db, user.id, "Live", audit.Actor.cli())[0]
    sign_in(http, "admin@example.com")

    def snapshot():
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("accounts", "api_keys", "jobs", "credit_ledger", "audit_log")}

    before = snapshot()
    for path in ("/", "/login", "/console", "/console/api-keys", "/console/playground",
                 "/console/jobs", "/console/admin/accounts", "/console/admin/audit",
                 "/console/admin/audit/export?format=json",
                 f"/console/api-keys/{key.id}/delete", "/logout",
                 f"/console/admin/accounts/{user.id}/disable",
                 f"/console/admin/accounts/{user.id}/admin",
                 f"/console/admin/accounts/{user.id}/credits?amount=5&reason=x",
                 "/console/playground?prompts=a"):
        status = http.get(path).status_code
        assert status in (200, 405), (path, status)
    assert snapshot() == before
    assert http.get("/console").status_code == 200  # still signed in


def test_api_keys_and_console_sessions_are_kept_apart(instant_client):
    client = instant_client
    http = client.http
    account = client.account("dev@example.com")
    key = client.key(account)

    # An API key does not open the console...
    for path in ("/console", "/console/api-keys", "/console/jobs"):
        response = http.get(path, headers=bearer(key), follow_redirects=False)
        assert response.status_code == 401, path
    page = http.get("/console", headers={**bearer(key), **HTML}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")

    # ...and a console session does not call the key API.
    sign_in(http, "dev@example.com")
    assert http.get("/console").status_code == 200
    refused = http.post(API, json={"prompts": ["a"]})
    assert refused.status_code == 401
    assert refused.json() == {"error": "Missing or invalid Authorization header"}
    assert client.balance(account) == 6
    # The bearer API needs no CSRF token, even from a client that holds console cookies.
    assert http.post(API, json={"prompts": ["a"]}, headers=bearer(key)).status_code == 200
