"""Property-based fuzzing: of every operation in the served OpenAPI document, of the
headers and paths around them, and of the console's forms and addresses.

Schemathesis reads /schema/openapi.json from a real server and sends requests
made from it, valid and invalid (bounded in number). Every answer must be free
of 5xx, match its documented status and schema, and, when it is a 4xx, carry
an `error`.

Hypothesis then sends what no schema describes: random and repeated headers,
huge values, random path segments, huge and foreign-script numbers and
percent-encodings, to the app in the test process (the quick tier) and to a
real server's sockets; and random text into each console form and admin
address. None may get a 5xx or cost a credit; the API answers JSON with an
`error`, the console its styled error page.
"""

from __future__ import annotations

import http.client
import json
import string
import uuid
from urllib.parse import quote, urlsplit

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from appliance.accounts import accounts, audit, keys
from appliance.accounts.accounts import MAX_CREDITS
from appliance.core.database import ConnectionPool

from .console_helpers import HTML, PASSWORD, csrf, sign_in
from .helpers import bearer, count_rows
from .raw_asgi import request as raw_request
from .serve_process import ServeProcess, write_config

EXAMPLES_PER_OPERATION = 30
# The quick tier's share: each example is one in-process request of a few milliseconds.
QUICK = settings(max_examples=100, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
requests_sent: list[str] = []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model, launcher):
    folder = tmp_path_factory.mktemp("fuzz")
    # Small bounds keep what valid requests cost the CPU small; few credits
    # mean most valid requests end at 402 once they are spent.
    config = write_config(folder, tiny_model,
                          generation={"max_size": 128, "max_steps": 4},
                          limits={"max_prompts_per_request": 3, "requests_per_minute_per_key": 0},
                          openai={"wait_timeout": 120.0})
    process = ServeProcess(config, folder / "serve.log", launcher).start()
    database = ConnectionPool(folder / "data" / "appliance.db")
    account = accounts.create_account(database.db(), "fuzz@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=12)
    key = keys.create_key(database.db(), account.id, "Fuzz", audit.Actor.cli())[1]
    yield process, key
    database.close()
    process.stop()
    print(f"\nfuzz: {len(requests_sent)} requests sent: "
          + ", ".join(f"{n} {op}" for op, n in sorted(_tally().items())))


def _tally() -> dict[str, int]:
    counts: dict[str, int] = {}
    for operation in requests_sent:
        counts[operation] = counts.get(operation, 0) + 1
    return counts


def every_4xx_has_an_error_sentence(ctx, response, case) -> None:
    if 400 <= response.status_code < 500:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"a {response.status_code} without a JSON body") from None
        error = body.get("error") if isinstance(body, dict) else None
        # The /v1 API answers in OpenAI's shape: error.message holds the sentence.
        sentence = error.get("message") if isinstance(error, dict) else error
        assert isinstance(sentence, str) and sentence.strip(), \
            f"a {response.status_code} without an `error` sentence: {body}"


@pytest.mark.system
def test_the_served_api_answers_every_generated_request_as_documented(fuzz_server):
    # Driven by hand rather than by schemathesis' pytest plugin, whose lazy
    # loading (needed for a schema served by a fixture) does not run on pytest 9.
    process, key = fuzz_server
    schema = schemathesis.openapi.from_url(f"{process.url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /api/playground/images", "GET /api/playground/images/{job_id}",
            "GET /api/playground/images/{job_id}/images/{index}"} <= labels, labels

    failures = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode, key, urlsplit(process.url).netloc)
            except Exception as failure:  # noqa: BLE001 - every operation gets its turn
                failures[f"{operation.label} ({mode.value})"] = failure
    assert not failures, "\n\n".join(f"{label}:\n{failure}" for label, failure in failures.items())


def fuzz(operation, mode: GenerationMode, key: str, host: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        requests_sent.append(f"{case.method} {case.path}")
        # The Host header as a client sends it: a generated one may be malformed, which
        # every route refuses with 400 before routing (test_host_and_cookies.py).
        case.call_and_validate(headers={"Authorization": f"Bearer {key}",
                                        "Host": host},
                               timeout=150,
                               additional_checks=[every_4xx_has_an_error_sentence],
                               # Schema-valid requests may rightly be refused: the limits
                               # come from config.toml and the balance from the account.
                               excluded_checks=[positive_data_acceptance])

    run()


# Headers and paths no schema describes.

URL = "/api/playground/images"
# A header name is a token (RFC 9110); these names matter to the app, the others are noise.
TOKEN = st.text(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1,
                max_size=24)
KNOWN_NAMES = ["authorization", "content-type", "idempotency-key", "accept", "cookie",
               "x-forwarded-proto", "x-forwarded-for", "origin", "user-agent",
               "accept-encoding", "range", "if-none-match"]
# Host and Content-Length are the HTTP server's: it refuses a bad one before the app sees it.
HEADER_NAMES = st.one_of(st.sampled_from(KNOWN_NAMES), TOKEN).filter(
    lambda name: name.lower() not in ("host", "content-length", "transfer-encoding"))
# A value: visible ASCII, spaces, tabs and obs-text bytes, as HTTP allows. "{key}" stands
# for the account's real key in an Authorization header; elsewhere (X-Forwarded-For, say,
# which a server may log as the client's address) a real key would be a leak the suite's
# secret search rightly reports.
VALUE_TEXT = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)) | st.just("\t"),
                     max_size=60).map(str.strip)
HEADER_VALUES = st.one_of(
    VALUE_TEXT,
    st.sampled_from(["Bearer {key}", "Bearer {key}, Bearer {key}", "bearer {key}", "Bearer",
                     "Bearer  {key}", "Basic Zm9vOmJhcg==", "wi_live_" + "0" * 64,
                     "application/json", "application/json; charset=latin-1", "text/plain",
                     "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                     "text/html", "*/*", "https", "bytes=0-1", "9" * 40]),
    st.builds(lambda char, count: char * count, st.sampled_from("a0%,;= \xe9"),
              st.integers(1_000, 8_000)),
)
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)

# Path segments: any text as a client encodes it, raw (and broken) percent-encodings,
# numbers of any size, and the numbers int() would take but a person's digits are not.
SEGMENTS = st.one_of(
    st.text(max_size=40).map(lambda text: quote(text, safe="")),
    st.text("%0123456789abcdefABCDEF.-_~xyz+", min_size=1, max_size=20),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    # Around and past what SQLite's 64-bit integers hold.
    st.integers(min_value=2**63 - 2).map(str), st.integers(max_value=-(2**63)).map(str),
    st.sampled_from([str(2**63 - 1), str(2**63), str(2**64), "-0", "007", "1_0", "+1", "%201",
                     "%D9%A3", "%EF%BC%93", "%2e%2e", "..", "%00", "%ff", "%", "%2F", "{job}"]),
)
QUERIES = st.one_of(st.just(""), st.text(string.ascii_letters + string.digits + "%=&+-_.",
                                         max_size=40).map(lambda query: "?" + query))
ROUTES = [("POST", URL, b'{"prompts": ["a"]}'), ("GET", f"{URL}/{{job}}", b""),
          ("DELETE", f"{URL}/{{job}}", b""), ("GET", f"{URL}/{{job}}/images/0", b""),
          ("GET", "/v1/models", b""), ("POST", "/v1/images/generations", b'{"prompt": "a"}')]
PATHS = [f"{URL}/{{a}}", f"{URL}/{{a}}/images/{{b}}", f"{URL}/{{job}}/images/{{b}}",
         f"{URL}/{{a}}/events", f"{URL}/{{a}}/{{b}}", "/v1/{a}", "/v1/images/{a}", "/api/{a}",
         "/{a}"]
# Bodies that charge nothing: refused, or sent where no route takes them.
PATH_METHODS = st.sampled_from([("GET", b""), ("DELETE", b""), ("PUT", b"{}"),
                                ("POST", b'{"prompts": []}')])


def with_key_in(name: str, value: str, key: str) -> str:
    return value.replace("{key}", key) if name.lower() == "authorization" else value


def fill(template: str, a: str, b: str, job: str) -> str:
    """The address: `a` and `b` in their places, and {job} (in the template or drawn as a
    segment) the id of a row that exists."""
    return template.replace("{a}", a).replace("{b}", b).replace("{job}", job)


def assert_api_answer(status: int, body: bytes, what: str) -> None:
    assert status < 500, f"{status} for {what}: {body[:300]!r}"
    if status >= 400:
        try:
            answer = json.loads(body)
        except ValueError:
            raise AssertionError(f"a {status} without JSON for {what}: {body[:300]!r}") from None
        error = answer.get("error") if isinstance(answer, dict) else None
        # The /v1 API answers in OpenAI's shape: error.message holds the sentence.
        sentence = error.get("message") if isinstance(error, dict) else error
        assert isinstance(sentence, str) and sentence.strip(), f"{what}: {answer}"


def finished_job(client) -> tuple[accounts.Account, str, str]:
    """An account whose only credit made one finished job: (account, key, job id)."""
    account = client.account(credits=1)
    key = client.key(account)
    job_id = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key)).json()["jobId"]
    client.wait_for_job(key, job_id)
    return account, key, job_id


def assert_nothing_more_charged(client, account: accounts.Account) -> None:
    db = client.database.db()
    assert client.balance(account) == 0
    assert accounts.ledger_total(db, account.id) == 0
    assert count_rows(db, "jobs") == 1


def test_no_headers_get_a_5xx_or_cost_a_credit(instant_client):
    client = instant_client
    account, key, job_id = finished_job(client)

    @QUICK
    @given(route=st.sampled_from(ROUTES), headers=HEADERS, with_key=st.booleans(),
           as_json=st.booleans())
    def run(route, headers, with_key, as_json) -> None:
        method, path, body = route
        sent = [(b"authorization", f"Bearer {key}".encode())] if with_key else []
        sent += [(b"content-type", b"application/json")] if as_json else []
        sent += [(name.lower().encode("latin-1"), with_key_in(name, value, key).encode("latin-1"))
                 for name, value in headers]
        answer = raw_request(client, method, path.replace("{job}", job_id), sent, body)
        assert_api_answer(answer.status, answer.body, f"{method} {path} {headers}")

    run()
    assert_nothing_more_charged(client, account)


def test_no_path_gets_a_5xx_or_costs_a_credit(instant_client):
    client = instant_client
    account, key, job_id = finished_job(client)

    @QUICK
    @given(template=st.sampled_from(PATHS), a=SEGMENTS, b=SEGMENTS, query=QUERIES,
           method=PATH_METHODS)
    def run(template, a, b, query, method) -> None:
        verb, body = method
        path = fill(template, a, b, job_id) + query
        answer = raw_request(client, verb, path, [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json")], body)
        assert_api_answer(answer.status, answer.body, f"{verb} {path}")

    run()
    assert_nothing_more_charged(client, account)


@pytest.mark.system
def test_the_served_api_takes_any_headers_and_paths_over_its_socket(fuzz_server):
    process, _ = fuzz_server
    database = ConnectionPool(process.config.parent / "data" / "appliance.db")
    broke = accounts.create_account(database.db(), f"broke-{uuid.uuid4().hex[:8]}@example.com",
                                    "correct horse battery", audit.Actor.cli(), credits=0)
    key = keys.create_key(database.db(), broke.id, "Broke", audit.Actor.cli())[1]
    host, port = process.url.removeprefix("http://").split(":")

    def send(method: str, target: str, headers: list[tuple[str, str]], body: bytes):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(ROUTES), headers=HEADERS, template=st.sampled_from(PATHS),
           a=SEGMENTS, b=SEGMENTS, query=QUERIES, method=PATH_METHODS)
    def run(route, headers, template, a, b, query, method) -> None:
        verb, path, body = route
        sent = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
        sent += [(name, with_key_in(name, value, key)) for name, value in headers]
        # uvicorn's HTTP parser refuses a header block past 16 KiB itself, in plain text,
        # before the app sees the request.
        assume(sum(len(name) + len(value) + 4 for name, value in sent) < 15_000)
        status, answer = send(verb, path.replace("{job}", str(uuid.uuid4())), sent, body)
        assert_api_answer(status, answer, f"{verb} {path} {headers}")
        verb, body = method
        target = fill(template, a, b, str(uuid.uuid4())) + query
        status, answer = send(verb, target, sent[:2], body)
        assert_api_answer(status, answer, f"{verb} {target}")

    try:
        run()
        assert accounts.get_account(database.db(), broke.id).credits == 0
        assert accounts.ledger_total(database.db(), broke.id) == 0
    finally:
        database.close()


# The console's forms and addresses.

# What a person might type where a number goes: numbers of any size and sign, other
# scripts' digits, and any text at all.
NUMBERISH = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.text(st.characters(categories=["Nd"]), min_size=1, max_size=6),
    st.sampled_from([str(MAX_CREDITS), str(MAX_CREDITS + 1), str(-MAX_CREDITS), str(2**63 - 1),
                     str(2**63), "1_0", " 5 ", "+5", "5.0", "1e3", "0x10", "", "-", "--5"]),
    st.text(max_size=30),
)
FORM_TEXT = st.text(max_size=300)
EMAILS = st.one_of(st.emails(), FORM_TEXT)


def console_session(client) -> tuple[accounts.Account, accounts.Account]:
    """An admin signed in with the client (as a browser, taking pages) and a user with 5
    credits: (admin, user). The admin has no credits, so a playground job cannot start."""
    db = client.database.db()
    admin = accounts.create_account(db, "admin@example.com", PASSWORD, audit.Actor.cli(),
                                    is_admin=True)
    user = client.account("user@example.com", credits=5)
    assert sign_in(client.http, "admin@example.com").status_code == 303
    client.http.headers.update(HTML)
    return admin, user


def assert_console_answer(status: int, content_type: str, text: str, what: str) -> None:
    """Every refusal under /console is its styled page, addresses no route matches included."""
    assert status < 500, f"{status} for {what}: {text[:300]}"
    if status >= 400:
        assert content_type.startswith("text/html"), f"{what}: {content_type} {text[:300]}"
        assert 'class="alert error" role="alert"' in text, f"{what}: {text[:300]}"


def assert_every_balance_is_its_ledger(client) -> None:
    db = client.database.db()
    # Each database returns a value as the type it stored it with.
    for account_id, balance in db.execute("SELECT id, credits FROM accounts").fetchall():
        assert type(balance) is int and 0 <= balance <= MAX_CREDITS
        assert accounts.ledger_total(db, account_id) == balance


def test_console_forms_never_fail_and_grant_only_what_they_say(instant_client):
    client = instant_client
    http = client.http
    admin, user = console_session(client)
    expected = {"user": 5}

    forms = st.one_of(
        st.tuples(st.just("grant"), st.fixed_dictionaries({"amount": NUMBERISH,
                                                           "reason": FORM_TEXT})),
        # The suite's own password: an account made with a drawn one would put that text
        # among the secrets the suite's leak search looks for, and "00000000" is everywhere.
        st.tuples(st.just("account"), st.fixed_dictionaries({
            "email": EMAILS, "password": st.just(PASSWORD), "credits": NUMBERISH,
            "admin": st.sampled_from(["", "on", "yes"])})),
        st.tuples(st.just("key"), st.fixed_dictionaries({"name": FORM_TEXT})),
        st.tuples(st.just("playground"), st.fixed_dictionaries({"prompts": FORM_TEXT})),
    )
    paths = {"grant": f"/console/admin/accounts/{user.id}/credits",
             "account": "/console/admin/accounts", "key": "/console/api-keys",
             "playground": "/console/playground"}

    @QUICK
    @given(form=forms)
    def run(form) -> None:
        kind, fields = form
        response = http.post(paths[kind], data={**fields, "_csrf_token": csrf(http)},
                             follow_redirects=False)
        assert_console_answer(response.status_code, response.headers.get("content-type", ""),
                              response.text, f"{kind} {fields}")
        if kind == "grant" and response.status_code == 303:
            expected["user"] += int(fields["amount"])

    run()
    assert client.balance(user) == expected["user"]
    assert client.balance(admin) == 0 and count_rows(client.database.db(), "jobs") == 0
    assert_every_balance_is_its_ledger(client)


def test_console_addresses_never_fail(instant_client):
    client = instant_client
    admin, user = console_session(client)
    jar = client.http.cookies
    cookie = "; ".join(f"{name}={jar[name]}" for name in jar)
    token = csrf(client.http)
    posts = [f"/console/admin/accounts/{{a}}/{action}"
             for action in ("credits", "disable", "enable", "admin", "unlock")] + [
        "/console/api-keys/{a}/delete"]
    gets = ["/console/jobs/{a}", "/console/jobs/{a}/images/{b}", "/console/jobs/{a}/progress",
            "/console/jobs?page={a}", "/console/admin/{a}", "/console/{a}"]

    @QUICK
    @given(template=st.sampled_from(posts + gets), a=SEGMENTS, b=SEGMENTS)
    def run(template, a, b) -> None:
        # The user's real id now and then, so that a valid address is among them.
        path = fill(template, a, b, str(user.id))
        headers = [(b"cookie", cookie.encode()), (b"accept", b"text/html")]
        if template in posts:
            headers.append((b"content-type", b"application/x-www-form-urlencoded"))
            body = f"_csrf_token={token}&amount=1&reason=fuzz".encode()
            answer = raw_request(client, "POST", path, headers, body)
        else:
            answer = raw_request(client, "GET", path, headers)
        assert_console_answer(answer.status, answer.header("content-type") or "",
                              answer.body.decode("utf-8", "replace"), path)

    run()
    assert client.balance(admin) == 0
    assert_every_balance_is_its_ledger(client)
