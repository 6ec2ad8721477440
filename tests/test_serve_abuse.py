"""`nanoqwen serve` against hostile or careless clients: web pages of other sites, and request bodies that are
no JSON the parser can read. The app in this process (FastAPI's TestClient), over a tiny random checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from nanoqwen.checkpoint import load_checkpoint
from nanoqwen.serve.app import create_app
from tests.serve_helpers import make_checkpoint

EVIL = "http://evil.example"
PAGE = "http://localhost:3000"  # a front-end the user runs, named with --allow-origin
BODY = b'{"prompt": "Once", "max_tokens": 2, "temperature": 0}'


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("abuse") / "tiny"))


@pytest.fixture(scope="module")
def http(local) -> Iterator[TestClient]:
    """The server as `nanoqwen serve` starts it (no key), allowing the front-end on PAGE."""
    with TestClient(create_app(*local, "tiny", allow_origins=[PAGE])) as client:
        yield client


def generated(http: TestClient) -> int:
    return http.get("/health").json()["tokens_generated"]


@pytest.mark.parametrize("headers", [
    # What a page's fetch() sends without a CORS preflight: a text/plain body, or a Blob's with no type at all
    # (FastAPI before 0.132 read an untyped body as JSON, and ran it).
    {"Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain;charset=UTF-8"},
    {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
    {"Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
    {"Origin": "http://localhost:8080", "Sec-Fetch-Site": "same-site", "Content-Type": "application/json"},
    {"Origin": EVIL, "Content-Type": "application/json"},  # a browser without Sec-Fetch-Site: its Origin is no Host
    {"Origin": "null", "Content-Type": "application/json"},  # a sandboxed frame, or a file:// page
], ids=["text-plain", "untyped-blob", "json", "same-site-other-port", "origin-only", "null-origin"])
def test_a_page_on_another_origin_cannot_make_the_server_generate(http: TestClient, headers: dict[str, str]) -> None:
    # No key (the default) on 127.0.0.1: without this refusal, any web page the user visits could burn the machine's
    # GPU on generations it never reads, as browsers send such POSTs without asking the server first.
    before = generated(http)
    r = http.post("/v1/completions", content=BODY, headers=headers)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "cross_origin_refused" and "--allow-origin" in error["message"]
    assert http.post("/tokenize", content=b'{"prompt": "hi"}', headers=headers).status_code == 403
    assert generated(http) == before


@pytest.mark.parametrize("headers", [
    {},  # curl, the openai client: no browser
    {"Content-Type": "application/json", "Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"},  # own page
    {"Content-Type": "application/json", "Origin": "http://testserver"},  # own page, a browser without Sec-Fetch-Site
    {"Content-Type": "application/json", "Sec-Fetch-Site": "none"},  # typed into the browser by the user
    {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site", "Origin": PAGE},  # named with --allow-origin
], ids=["no-browser", "own-page", "own-page-old-browser", "user-initiated", "allowed-page"])
def test_the_servers_own_page_other_clients_and_allowed_pages_still_generate(http: TestClient,
                                                                          headers: dict[str, str]) -> None:
    r = http.post("/v1/completions", content=BODY, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_reads_and_preflights_from_other_pages_are_answered_as_before(local, http: TestClient) -> None:
    # A GET runs nothing, and without CORS headers the browser keeps its answer from the page.
    models = http.get("/v1/models", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
    assert models.status_code == 200 and "access-control-allow-origin" not in models.headers
    preflight = {"Origin": PAGE, "Access-Control-Request-Method": "POST", "Sec-Fetch-Site": "same-site"}
    assert http.options("/v1/completions", headers=preflight).headers["access-control-allow-origin"] == PAGE
    with TestClient(create_app(*local, "tiny", allow_origins=["*"])) as anyone:
        r = anyone.post("/v1/completions", content=BODY, headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                                                                  "Content-Type": "application/json"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(("host", "answered"), [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST", True), ("[::1]:8000", True),
    ("chat.localhost:8000", True), ("localhost.:8000", True), ("192.168.1.20:8000", True),
    ("evil.example:8000", False), ("127.0.0.1.evil.example", False), ("localhost.evil.example:8000", False),
    ("evillocalhost:8000", False),
])
def test_a_loopback_server_answers_requests_addressed_to_this_machine_alone(local, host: str, answered: bool) -> None:
    # DNS rebinding: a page at evil.example whose name the attacker then resolves to 127.0.0.1 is the server's own
    # origin to the browser, so it could call the API and read the answers; its requests carry its name as Host.
    with TestClient(create_app(*local, "tiny", local_hosts_only=True)) as client:
        for r in (client.get("/v1/models", headers={"Host": host}),
                  client.post("/v1/completions", content=BODY, headers={"Host": host, "Origin": f"http://{host}",
                                                                        "Content-Type": "application/json"})):
            assert r.status_code == (200 if answered else 403), r.text
            if not answered:
                assert r.json()["error"]["code"] == "host_not_allowed" and host in r.json()["error"]["message"]


def test_only_a_server_on_the_loopback_alone_checks_the_host() -> None:
    from nanoqwen.serve.app import listens_on_loopback_only

    assert listens_on_loopback_only("127.0.0.1") and listens_on_loopback_only("::1")
    assert listens_on_loopback_only("localhost")
    assert not listens_on_loopback_only("0.0.0.0") and not listens_on_loopback_only("::")


@pytest.mark.parametrize(("body", "says"), [
    (b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),  # past the parser
    (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "at most 4300 digits"),  # past Python's int conversion
], ids=["nested-100000-deep", "5000-digit-number"])
def test_json_the_parser_cannot_read_is_refused_in_a_line_that_says_why(http: TestClient, body: bytes,
                                                                        says: str) -> None:
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text  # not "an error parsing the body"


def test_more_prompts_than_a_request_may_ask_for_are_refused_before_any_is_read(http: TestClient) -> None:
    # 150,000 one-token prompts fit in the 1 MiB body; reading them all before counting them held every other request
    # and stream up for seconds (Python's lock), for a 400 the count alone decides. Each prompt here is also bad, so
    # only a refusal that comes first names the count.
    for prompts, n in (([[10**9]] * 129, 1), ([[10**9]] * 65, 2)):
        body = {"prompt": prompts, "n": n, "max_tokens": 1}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith("at most 128 completions per request"), r.text
