"""The Host header read strictly before anything uses it, URLs made from the checked host,
and what a request over HTTPS gets: Secure cookies and Strict-Transport-Security."""

from __future__ import annotations

import http.client
import json
import logging
import uuid

import pytest
from litestar.testing import TestClient

from appliance.web.api.limits import BadHost, Host, request_host
from appliance.web.console import CSRF_COOKIE
from appliance.web.console.security import STRICT_TRANSPORT_SECURITY
from appliance.web.console.sessions import COOKIE_NAME

from .console_helpers import HTML, PASSWORD
from .helpers import InstantGenerator, bearer
from .serve_process import ServeProcess, write_config

URL = "/api/playground/images"
HTTPS = "https://testserver.local"
BAD_HOSTS = ["localhost:abc", "127.0.0.1:99999", "[::1]:x", "[::1]@evil.example",
             "[localhost]", "", "exa_mple.com", "127.1"]


def assert_no_trouble_logged(caplog) -> None:
    trouble = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert trouble == []


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_a_malformed_host_gets_400_on_every_kind_of_route_and_logs_nothing(
        shared_instant_client, caplog, host):
    client = shared_instant_client
    account = client.fresh_account(credits=6)
    key = client.key(account)
    caplog.set_level(logging.DEBUG)
    for method, path, headers in (
            ("GET", "/healthz", {}),                                  # no authentication
            ("GET", f"{URL}/{uuid.uuid4()}", bearer(key)),            # the native API
            ("POST", URL, bearer(key)),                               # ...that would charge
            ("POST", "/v1/images/generations", bearer(key)),          # the OpenAI API
            ("GET", "/console", HTML),                                # the console
            ("GET", "/login", HTML)):
        response = client.http.request(method, path, json={"prompts": ["a"], "prompt": "a"},
                                       headers={**headers, "Host": host})
        assert response.status_code == 400, (path, response.text)
        assert response.headers["content-type"] == "application/json"
        assert "Host header" in response.json()["error"], path
        assert "set-cookie" not in response.headers
    assert_no_trouble_logged(caplog)
    assert client.balance(account) == 6 and client.jobs_of(account) == 0


def test_the_refusal_says_what_is_wrong_with_the_host(instant_client):
    def error(host: str) -> str:
        return instant_client.http.get("/healthz", headers={"Host": host}).json()["error"]

    assert error("localhost:abc") == ("the Host header 'localhost:abc' has a bad port: it must"
                                      " be a number from 1 to 65535")
    assert error("[::1]@evil.example") == ("the Host header '[::1]@evil.example' names a user"
                                           " ('@'); it may name only a host and a port")
    assert error("[localhost]") == ("the Host header '[localhost]' has brackets around something"
                                    " other than an IPv6 address")


def test_more_than_one_host_header_is_refused():
    # The test client joins repeated headers into one, and uvicorn's h11 parser refuses
    # them; the check stands for a server whose parser passes them on.
    scope = {"headers": [(b"host", b"testserver.local"), (b"host", b"evil.example")]}
    with pytest.raises(BadHost, match="more than one Host header"):
        request_host(scope)
    assert request_host({"headers": [(b"host", b"Example.com:80")]}) == Host("example.com", 80,
                                                                            False)
    assert request_host({"headers": []}) is None  # HTTP/1.0


def test_a_well_formed_host_is_answered_and_names_are_compared_without_case_or_final_dot(
        instant_client):
    for host in ("localhost:8000", "10.1.2.3:65535", "[::1]:8000", "[::1]", "TestServer.Local.",
                 "127.0.0.1:1"):
        assert instant_client.http.get("/healthz", headers={"Host": host}).status_code == 200, host


# URLs in answers.

@pytest.mark.parametrize(("base", "host", "origin"), [
    ("http://testserver.local", "192.168.1.5:8000", "http://192.168.1.5:8000"),
    ("http://testserver.local", "[::1]:8000", "http://[::1]:8000"),
    ("http://testserver.local", "TESTSERVER.local.", "http://testserver.local"),
    (HTTPS, "testserver.local", "https://testserver.local"),
])
def test_image_urls_in_job_answers_name_the_checked_host(instant_client, base, host, origin):
    client = instant_client
    key = client.key(client.account(credits=6))
    headers = {**bearer(key), "Host": host}
    job_id = client.http.post(f"{base}{URL}", json={"prompts": ["a", "b"]},
                              headers=headers).json()["jobId"]
    client.wait_for_job(key, job_id)

    job = client.http.get(f"{base}{URL}/{job_id}", headers=headers).json()
    assert [image["url"] for image in job["images"]] == [
        f"{origin}{URL}/{job_id}/images/{index}" for index in (0, 1)]
    linked = client.http.post(f"{base}/v1/images/generations", headers=headers,
                              json={"prompt": "a fox", "response_format": "url"}).json()
    assert linked["data"][0]["url"].startswith(f"{origin}{URL}/")


# Cookies and HSTS by the request's scheme.

def sign_in_cookies(http: TestClient, base: str) -> tuple[str, str]:
    """The Set-Cookie headers of the console's CSRF cookie and of a new sign-in's session."""
    page = http.get(f"{base}/login")
    csrf_cookie = page.headers["set-cookie"]
    token = page.cookies[CSRF_COOKIE]
    # The token goes back by hand: a cookie jar keeps a Secure cookie off plain HTTP.
    signed_in = http.post(f"{base}/login", follow_redirects=False,
                          headers={"Cookie": f"{CSRF_COOKIE}={token}"},
                          data={"email": "dev@example.com", "password": PASSWORD,
                                "_csrf_token": token})
    assert signed_in.status_code == 303, signed_in.text
    session_cookie = signed_in.headers["set-cookie"]
    assert csrf_cookie.startswith(f"{CSRF_COOKIE}=")
    assert session_cookie.startswith(f"{COOKIE_NAME}=")
    return csrf_cookie, session_cookie


def is_secure(set_cookie: str) -> bool:
    return "secure" in {part.strip().lower() for part in set_cookie.split(";")[1:]}


def test_console_cookies_are_secure_over_https_and_not_over_http(instant_client):
    instant_client.account("dev@example.com")
    app = instant_client.http.app
    for base, secure in (("http://testserver.local", False), (HTTPS, True)):
        # A client of its own: the app is already started by instant_client's.
        http = TestClient(app, base_url=base)
        cookies = sign_in_cookies(http, base)
        assert [is_secure(cookie) for cookie in cookies] == [secure, secure], base
        # Signing out clears the session cookie with the same flags.
        out = http.post("/logout", follow_redirects=False,
                        data={"_csrf_token": http.cookies[CSRF_COOKIE]})
        assert out.status_code == 303
        assert out.headers["set-cookie"].startswith(f'{COOKIE_NAME}=""')
        assert is_secure(out.headers["set-cookie"]) == secure


def test_the_secure_cookies_setting_marks_both_cookies_secure_over_http(make_client, make_config):
    client = make_client(load_generator=InstantGenerator,
                         app_config=make_config(console={"secure_cookies": True}))
    client.account("dev@example.com")
    cookies = sign_in_cookies(client.http, "http://testserver.local")
    assert all(is_secure(cookie) for cookie in cookies), cookies
    assert all(cookie.count("Secure") == 1 for cookie in cookies)


def test_hsts_is_sent_over_https_only_on_every_kind_of_answer(instant_client):
    http = instant_client.http
    for path, host in (("/healthz", "testserver.local"), ("/login", "testserver.local"),
                       (f"{URL}/x", "testserver.local"),     # 401: no key
                       ("/no/such/page", "testserver.local"),  # 404
                       ("/healthz", "localhost:abc"),        # a malformed host
                       ("/healthz", "evil.example")):        # a host not answered to
        for base in ("http://testserver.local", HTTPS):
            response = http.get(f"{base}{path}", headers={"Host": host})
            assert response.status_code in (200, 400, 401, 404)
            expected = STRICT_TRANSPORT_SECURITY if base == HTTPS else None
            assert response.headers.get("strict-transport-security") == expected, (base, path)
    assert STRICT_TRANSPORT_SECURITY == "max-age=31536000"


# Through uvicorn, as deployed.

def raw_get(url: str, path: str, headers: dict[str, str] | list[tuple[str, str]],
            source: str = "127.0.0.1") -> tuple[http.client.HTTPResponse, bytes]:
    """A GET with exactly these headers (Host included), from the loopback address `source`:
    the response and its body."""
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                            source_address=(source, 0))
    connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items() if isinstance(headers, dict) else headers:
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response, body


@pytest.mark.system
def test_a_real_server_refuses_bad_hosts_and_trusts_only_a_local_proxy_about_https(
        tmp_path, tiny_model, launcher):
    server = ServeProcess(write_config(tmp_path, tiny_model), tmp_path / "serve.log",
                          launcher).start()
    try:
        for host in ("localhost:abc", "127.0.0.1:99999", "[::1]:x", "[::1]@evil.example"):
            response, body = raw_get(server.url, "/healthz", {"Host": host})
            assert response.status == 400, host
            assert "Host header" in json.loads(body)["error"]
        # uvicorn's HTTP parser (h11) refuses this one itself; the app would too.
        twice, _ = raw_get(server.url, "/healthz",
                           [("Host", "localhost"), ("Host", "evil.example")])
        assert twice.status == 400
        local = "localhost"
        # uvicorn believes X-Forwarded-Proto from 127.0.0.1 (its forwarded_allow_ips): a
        # TLS proxy on this machine.
        proxied, _ = raw_get(server.url, "/login", {"Host": local, "X-Forwarded-Proto": "https"})
        assert proxied.status == 200
        assert is_secure(proxied.getheader("set-cookie"))
        assert proxied.getheader("strict-transport-security") == STRICT_TRANSPORT_SECURITY
        # From any other address the header is ignored: the request stays plain HTTP.
        spoofed, _ = raw_get(server.url, "/login", {"Host": local, "X-Forwarded-Proto": "https"},
                          source="127.0.0.2")
        plain, _ = raw_get(server.url, "/login", {"Host": local})
        for response in (spoofed, plain):
            assert response.status == 200
            assert not is_secure(response.getheader("set-cookie"))
            assert response.getheader("strict-transport-security") is None
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log
