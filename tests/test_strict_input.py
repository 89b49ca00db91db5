"""Strict, bounded input: every number that arrives is a real number of the right kind and
size, every body a JSON object sent as JSON, and nothing out of shape gets a 5xx or costs a
credit. Each finding of a hostile review has its regression test here."""

from __future__ import annotations

import logging

import pytest
from litestar import Request, Response

from appliance.accounts import accounts, audit
from appliance.accounts.accounts import MAX_CREDITS
from appliance.core.config import ConfigError, parse_assignment
from appliance.core.database import open_database
from appliance.core.errors import BadRequest, NotFound
from appliance.core.numbers import LARGEST_INTEGER, row_id, whole_number
from appliance.web.api.errors import guarded, unexpected_error

from .cli_helpers import invoke
from .console_helpers import HTML, PASSWORD, post_form, sign_in
from .helpers import bearer, count_rows
from .raw_asgi import request as raw_request

URL = "/api/playground/images"
OPENAI = "/v1/images/generations"
JSON = {"Content-Type": "application/json"}
# Digits int() takes but a person's "3" is not: Arabic-Indic and fullwidth three.
OTHER_DIGITS = ("\u0663", "\uff13")
HUGE = "99999999999999999999999"


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def assert_nothing_charged(client, account, credits: int) -> None:
    db = client.database.db()
    assert client.balance(account) == credits
    assert accounts.ledger_total(db, account.id) == credits
    assert count_rows(db, "jobs") == 0


def openai_sentence(response) -> str:
    return response.json()["error"]["message"]


# Numbers as text: whole_number and row_id.

@pytest.mark.parametrize("text", [*OTHER_DIGITS, " 7", "7 ", "+7", "1_000", "", "-", "7\n",
                                  "1e3", "0x10", "7.0"])
def test_only_ascii_digits_are_a_whole_number(text):
    with pytest.raises(ValueError, match="is not a whole number"):
        whole_number(text, -100, 100)


def test_whole_numbers_are_bounded_before_they_are_converted():
    assert [whole_number(t, -9, 9) for t in ("0", "-0", "007", "-9", "9")] == [0, 0, 7, -9, 9]
    for text in ("10", "-10", HUGE, "1" * 100_000, "-" + "0" * 5000 + "10"):
        with pytest.raises(ValueError, match="is out of range: it must be from -9 to 9"):
            whole_number(text, -9, 9)
    # Leading zeros do not count as digits: past 4300 of them int() itself would refuse.
    assert whole_number("0" * 5000 + "5", 0, 9) == 5


def test_an_address_names_a_row_only_with_an_id_sqlite_can_hold():
    assert row_id(str(LARGEST_INTEGER)) == LARGEST_INTEGER
    assert [row_id(t) for t in (str(LARGEST_INTEGER + 1), "-1", HUGE, *OTHER_DIGITS)] == [
        None] * 5


def test_integer_assignments_are_bounded_with_one_line():
    assert parse_assignment("engine.batch_size=+16")[2] == 16
    with pytest.raises(ConfigError) as caught:
        parse_assignment("engine.batch_size=" + "9" * 5000)
    assert "is out of range" in str(caught.value) and len(str(caught.value)) < 200
    with pytest.raises(ConfigError, match="must be an integer"):
        parse_assignment("engine.batch_size=\uff11\uff16")


# The JSON routes.

@pytest.mark.parametrize("path", [URL, OPENAI])
def test_json_nested_a_thousand_deep_gets_400_and_costs_nothing(instant_client, path):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    field = "prompts" if path == URL else "prompt"
    bodies = [deep(1000), f'{{"{field}": {deep(1000)}}}',
              f'{{"{field}": "a", "x": {deep(1000)}}}', deep(100_000),
              '{"a":' * 50_000 + "1" + "}" * 50_000]
    for body in bodies:
        response = client.http.post(path, content=body, headers={**bearer(key), **JSON})
        assert response.status_code == 400, (body[:30], response.text)
        sentence = response.json()["error"]
        sentence = sentence["message"] if path == OPENAI else sentence
        assert sentence and "\n" not in sentence, sentence
    assert len(bodies[1]) < 2100  # a 2 KB body was enough for a 500
    assert_nothing_charged(client, account, 6)


def test_numbers_sent_as_strings_are_refused_naming_the_field(instant_client):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    native = {"width": "64", "seed": "7", "steps": "2", "guidanceScale": "7.5"}
    for field, text in native.items():
        response = client.http.post(URL, json={"prompts": ["a"], field: text},
                                    headers=bearer(key))
        assert response.status_code == 400
        assert response.json() == {"error": f"'{field}' must be a number, not a string"}
    for field, text in {"n": "1", "seed": "7", "steps": "2"}.items():
        response = client.http.post(OPENAI, json={"prompt": "a", field: text},
                                    headers=bearer(key))
        assert response.status_code == 400
        assert response.json()["error"]["param"] == field
        assert openai_sentence(response) == f"'{field}' must be a number, not a string"
    # A JSON number past 64 bits is a number, refused by its bound, not a crash.
    huge = client.http.post(URL, content=f'{{"prompts": ["a"], "seed": {HUGE}}}',
                            headers={**bearer(key), **JSON})
    assert huge.status_code == 400 and "'seed' is 99999999999999999999999" in huge.text
    assert_nothing_charged(client, account, 6)


@pytest.mark.parametrize("path", [URL, OPENAI])
def test_a_body_not_sent_as_json_gets_415_and_costs_nothing(instant_client, path):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    body = b'{"prompts": ["a"]}' if path == URL else b'{"prompt": "a"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "text/json",
                         "application/jsonx", None):
        headers = {**bearer(key), **({"Content-Type": content_type} if content_type else {})}
        response = client.http.post(path, content=body, headers=headers)
        assert response.status_code == 415, content_type
        sentence = openai_sentence(response) if path == OPENAI else response.json()["error"]
        assert sentence.startswith("the request body must be JSON, sent with Content-Type:"
                                   " application/json"), sentence
    assert_nothing_charged(client, account, 6)
    if path == URL:  # JSON spelled any of the ways JSON may be
        for content_type in ("application/json", "Application/JSON; charset=utf-8",
                             "application/merge-patch+json"):
            response = client.http.post(path, content=body,
                                        headers={**bearer(key), "Content-Type": content_type})
            assert response.status_code == 200, (content_type, response.text)
        assert client.balance(account) == 3


def test_the_openapi_document_names_415_and_shows_the_index_as_an_integer(instant_client):
    document = instant_client.http.get("/schema/openapi.json").json()
    paths = document["paths"]
    for route in (URL, OPENAI):
        assert "415" in paths[route]["post"]["responses"], route
    image = paths[f"{URL}/{{job_id}}/images/{{index}}"]["get"]
    index = next(p for p in image["parameters"] if p["name"] == "index")
    assert (index["in"], index["schema"]["type"]) == ("path", "integer")
    assert index["schema"]["minimum"] == 0


def test_two_authorization_headers_get_401_whatever_they_hold(instant_client):
    client = instant_client
    mine, theirs = client.account("me@example.com", 6), client.account("them@example.com", 6)
    my_key, their_key = client.key(mine), client.key(theirs)
    body = b'{"prompts": ["a"]}'
    content_type = (b"content-type", b"application/json")

    def post(*keys: str):
        auth = [(b"authorization", f"Bearer {key}".encode()) for key in keys]
        return raw_request(client, "POST", URL, [*auth, content_type], body)

    for keys in ((my_key, their_key), (my_key, my_key), ("junk", my_key), (my_key, "junk")):
        answer = post(*keys)
        assert answer.status == 401, answer.body
        assert answer.json() == {"error": "More than one Authorization header; send exactly one"}
    assert (client.balance(mine), client.balance(theirs)) == (6, 6)
    assert count_rows(client.database.db(), "jobs") == 0
    assert post(my_key).status == 200 and client.balance(mine) == 5


def test_image_indices_that_name_no_row_get_404(instant_client):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    job_id = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key)).json()["jobId"]
    job = client.wait_for_job(key, job_id)
    assert job["images"][0]["url"].endswith(f"/{job_id}/images/0")
    assert client.http.get(f"{URL}/{job_id}/images/0", headers=bearer(key)).status_code == 200
    for index in (HUGE, str(LARGEST_INTEGER + 1), str(LARGEST_INTEGER), "-1", "1_0", "+0",
                  "%200", "0%0A", *OTHER_DIGITS, "x" * 10_000):
        answer = raw_request(client, "GET", f"{URL}/{job_id}/images/{index}",
                             [(b"authorization", f"Bearer {key}".encode())])
        assert answer.status == 404, (index[:30], answer.body)
        assert answer.json()["error"].startswith("image ")


def hostile_request(path: str = "/api/x") -> Request:
    """A request whose `request.url` cannot be made: its Host header's port is no number."""
    return Request({"type": "http", "method": "GET", "path": path, "query_string": b"",
                    "headers": [(b"host", b"example.com:port")], "scheme": "http",
                    "server": None})


def test_an_error_handler_never_reads_the_request_url():
    request = hostile_request()
    with pytest.raises(ValueError):
        _ = request.url
    answer = unexpected_error(request, RuntimeError("boom"))
    assert (answer.status_code, answer.content) == (500, {"error": "Internal server error"})


def test_a_handler_that_fails_still_answers_with_one_log_line(caplog):
    request = hostile_request("/api/x\nforged line")

    def reads_the_url(request: Request, exc: Exception) -> Response:
        return Response({"error": f"failed on {request.url.path}"}, status_code=400)

    with caplog.at_level(logging.INFO, logger="appliance.web.api.errors"):
        refused = guarded(reads_the_url)(request, NotFound("Job not found"))
        failed = guarded(reads_the_url)(request, RuntimeError("boom"))
    assert (refused.status_code, refused.content) == (404, {"error": "Job not found"})
    assert (failed.status_code, failed.content) == (500, {"error": "Internal server error"})
    assert len(caplog.records) == 2
    for record in caplog.records:
        assert record.exc_info is None and "\n" not in record.getMessage()
        assert "GET '/api/x\\nforged line'" in record.getMessage()


# Credits: one ceiling, integers, and a ledger that sums to the balance.

def assert_exact_balance(db, account_id: int, credits: int) -> None:
    # Each database returns a value as the type it stored it with (SQLite's columns
    # take any type): an int here is an integer in the database.
    (balance,) = db.execute("SELECT credits FROM accounts WHERE id = ?", [account_id]).fetchone()
    assert (type(balance), balance) == (int, credits)
    assert accounts.ledger_total(db, account_id) == credits
    kinds = {type(row[0]) for row in db.execute(
        "SELECT delta FROM credit_ledger WHERE account_id = ?", [account_id])}
    assert kinds <= {int}


def test_the_service_holds_grants_and_first_credits_to_the_ceiling(database):
    db = database.db()
    with pytest.raises(BadRequest, match="initial credits must be from 0 to 1000000000000"):
        accounts.create_account(db, "x@example.com", PASSWORD, audit.Actor.cli(),
                                credits=MAX_CREDITS + 1)
    account = accounts.create_account(db, "x@example.com", PASSWORD, audit.Actor.cli(),
                                      credits=MAX_CREDITS - 1)
    assert accounts.grant_credits(db, "x@example.com", 1, audit.Actor.cli()) == MAX_CREDITS
    for amount in (1, 2**63 - 1, 2**63, 10**30):
        with pytest.raises(BadRequest):
            accounts.grant_credits(db, "x@example.com", amount, audit.Actor.cli())
    with pytest.raises(BadRequest, match="past the limit"):
        accounts.change_credits(db, account.id, -(2**64), "charge")
    assert_exact_balance(db, account.id, MAX_CREDITS)




@pytest.mark.usefixtures("root_handlers_restored")
def test_the_grant_overflow_sequence_is_refused_by_the_command(config_file, tmp_path):
    assert invoke(config_file, "accounts", "create", "x@example.com", "--password-stdin",
                  stdin="correct horse battery\n").exit_code == 0
    # The reported sequence: a grant of 2**63 - 1, then one more credit.
    huge = invoke(config_file, "credits", "grant", "x@example.com", str(2**63 - 1))
    assert huge.exit_code == 2 and huge.stdout == ""
    assert ("argument AMOUNT: '9223372036854775807' is out of range: it must be from"
            " -1000000000000 to 1000000000000") in huge.stderr
    assert len(huge.stderr.strip().splitlines()) == 1
    assert invoke(config_file, "credits", "grant", "x@example.com", "1").stdout == (
        "x@example.com now has 1 credits\n")
    full = invoke(config_file, "credits", "grant", "x@example.com", str(MAX_CREDITS - 1))
    assert full.stdout == f"x@example.com now has {MAX_CREDITS} credits\n"
    past = invoke(config_file, "credits", "grant", "x@example.com", "1")
    assert past.exit_code == 1 and past.stderr == (
        "appliance: cannot grant 1 credits: x@example.com has 1000000000000, and a balance"
        " may be at most 1000000000000\n")
    for digit in OTHER_DIGITS:
        refused = invoke(config_file, "credits", "grant", "x@example.com", f"-{digit}")
        assert refused.exit_code == 2 and "is not a whole number" in refused.stderr
        made = invoke(config_file, "accounts", "create", "y@example.com", "--credits", digit,
                      "--password-stdin", stdin="correct horse battery\n")
        assert made.exit_code == 2 and "argument --credits:" in made.stderr
    too_many = invoke(config_file, "accounts", "create", "y@example.com", "--credits",
                      str(MAX_CREDITS + 1), "--password-stdin", stdin="correct horse battery\n")
    assert too_many.exit_code == 2 and "is out of range" in too_many.stderr
    db = open_database(tmp_path / "state" / "app.db")
    assert count_rows(db, "accounts") == 1
    assert_exact_balance(db, 1, MAX_CREDITS)


@pytest.mark.usefixtures("root_handlers_restored")
@pytest.mark.parametrize(("args", "message"), [
    (("serve", "--port", "\u0668\u0660"), "argument --port: '\u0668\u0660' is not a whole number"),
    (("serve", "--port", "65536"), "argument --port: '65536' is out of range"),
    (("generate", "a", "--seed", str(2**32)), "argument --seed: '4294967296' is out of range"),
    (("generate", "a", "--width", HUGE), "argument --width: '99999999999999999999999' is out"),
    (("models", "synth", "x", "--seed", "\uff11"), "argument --seed: '\uff11' is not a whole"),
])
def test_commands_refuse_numbers_that_are_not_ascii_or_in_range(config_file, args, message):
    result = invoke(config_file, *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


# The console.

def signed_in_admin(client):
    accounts.create_account(client.database.db(), "admin@example.com", PASSWORD,
                            audit.Actor.cli(), is_admin=True)
    assert sign_in(client.http, "admin@example.com").status_code == 303
    client.http.headers.update(HTML)  # a person's browser, which gets the styled pages


def assert_styled_refusal(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert 'class="alert error" role="alert"' in response.text
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_grant_overflow_sequence_is_refused_by_the_console(instant_client):
    client = instant_client
    db = client.database.db()
    signed_in_admin(client)
    user = client.account("x@example.com", credits=0)
    grants = f"/console/admin/accounts/{user.id}/credits"

    huge = post_form(client.http, grants, amount=str(2**63 - 1), reason="overflow")
    assert_styled_refusal(huge, 400)
    assert "The amount: &#39;9223372036854775807&#39; is out of range" in huge.text
    assert post_form(client.http, grants, amount="1", reason="one").status_code == 303
    assert post_form(client.http, grants, amount=str(MAX_CREDITS - 1),
                     reason="fill").status_code == 303
    past = post_form(client.http, grants, amount="1", reason="past")
    assert_styled_refusal(past, 400)
    assert "a balance may be at most 1000000000000" in past.text
    first = post_form(client.http, "/console/admin/accounts", email="y@example.com",
                      password="a long password", credits=str(MAX_CREDITS + 1))
    assert_styled_refusal(first, 400)
    assert "Credits: &#39;1000000000001&#39; is out of range" in first.text
    assert_exact_balance(db, user.id, MAX_CREDITS)
    assert count_rows(db, "accounts") == 2


@pytest.mark.parametrize("text", [*OTHER_DIGITS, "1_0", "+3", "3.0", "1e3", "--3", ""])
def test_console_number_fields_take_only_ascii_digits(instant_client, text):
    client = instant_client
    db = client.database.db()
    signed_in_admin(client)
    user = client.account("x@example.com", credits=5)
    refused = post_form(client.http, f"/console/admin/accounts/{user.id}/credits", amount=text,
                        reason="typo")
    assert_styled_refusal(refused, 400)
    assert "is not a whole number" in refused.text
    made = post_form(client.http, "/console/admin/accounts", email="y@example.com",
                     password="a long password", credits=text or "x")
    assert_styled_refusal(made, 400)
    assert_exact_balance(db, user.id, 5)
    assert count_rows(db, "accounts") == 2


def test_console_addresses_with_ids_that_name_no_row_get_the_404_page(instant_client):
    client = instant_client
    db = client.database.db()
    signed_in_admin(client)
    user = client.account("x@example.com", credits=5)
    for bad in (HUGE, str(LARGEST_INTEGER + 1), "-1", "1_0", *OTHER_DIGITS, f"{user.id}.0"):
        for action in ("credits", "disable", "enable", "admin", "unlock"):
            response = post_form(client.http, f"/console/admin/accounts/{bad}/{action}",
                                 amount="1", reason="x")
            assert_styled_refusal(response, 404)
        assert_styled_refusal(post_form(client.http, f"/console/api-keys/{bad}/delete"), 404)
        assert_styled_refusal(client.http.get(f"/console/jobs/nope/images/{bad}"), 404)
    for page in ("0", "-1", HUGE, *OTHER_DIGITS, "1_0"):
        assert_styled_refusal(client.http.get("/console/jobs", params={"page": page}), 400)
    assert client.http.get("/console/jobs", params={"page": "1"}).status_code == 200
    assert_exact_balance(db, user.id, 5)
    assert accounts.get_account(db, user.id).disabled is False


def test_audit_dates_at_the_ends_of_the_calendar_are_answered(instant_client):
    client = instant_client
    signed_in_admin(client)
    ends = [("0001-01-01", "9999-12-31"), ("9999-12-31", "9999-12-31"), ("", "9999-12-31")]
    for since, until in ends:
        for path in ("/console/admin/audit", "/console/admin/audit/export"):
            response = client.http.get(path, params={"since": since, "until": until},
                                       headers=HTML)
            assert response.status_code == 200, (path, since, until, response.text[:200])
    refused = client.http.get("/console/admin/audit", params={"until": "10000-01-01"},
                              headers=HTML)
    assert refused.status_code == 400 and "must be a date" in refused.text


def test_console_addresses_no_route_matches_get_the_styled_404_page(instant_client):
    client = instant_client
    signed_in_admin(client)
    for path in ("/console/nothing-here", "/console/admin/accounts//credits",
                 "/console/jobs/x/images/0/more"):
        assert_styled_refusal(client.http.get(path, headers=HTML), 404)
    # Outside the console, an unknown address stays a JSON answer.
    unknown = client.http.get("/nothing-here", headers=HTML)
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}
