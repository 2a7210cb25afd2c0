"""/api/v1/projects/{slug}/prompts (import, list) and /api/v1/prompts/{id}."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.config import Settings
from app.importer import content_id
from app.main import create_app
from app.models import Role
from tests.conftest import migrate
from tests.factories import (
    auth,
    make_admin_headers,
    make_annotation,
    make_project,
    make_prompt,
    make_token,
    make_user,
    row_counts,
)

LIMIT = 1000
NDJSON = {"Content-Type": "application/x-ndjson"}


def jsonl(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def url(slug: str) -> str:
    return f"/api/v1/projects/{slug}/prompts"


def records(n: int = 3) -> list[dict[str, Any]]:
    return [
        {"id": f"p{i}", "prompt": f"Prompt {i}", "completions": [f"a{i}", {"id": "b", "text": "b"}]}
        for i in range(n)
    ]


CREATED_3 = {"created": 3, "skipped": 0, "completions_created": 6, "completions_skipped": 0}


@pytest.fixture
def h(session) -> dict[str, str]:
    return make_admin_headers(session)


@pytest.fixture
def small_limit(settings) -> int:
    """The app reads ``settings.max_import_bytes`` per request from the same object."""
    settings.max_import_bytes = LIMIT
    return LIMIT


# --------------------------------------------------------------------------- importing


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/json; charset=utf-8",
        "text/plain",
        "application/octet-stream",
        None,
    ],
)
def test_ndjson_body_imports(client, session, h, content_type):
    project = make_project(session)
    headers = {**h, "Content-Type": content_type} if content_type else h
    r = client.post(url(project.slug), content=jsonl(*records()), headers=headers)
    assert r.status_code == 201, r.text
    assert r.json() == CREATED_3


def test_json_array_body_imports(client, session, h):
    project = make_project(session)
    r = client.post(url(project.slug), json=records(), headers=h)
    assert r.status_code == 201, r.text
    assert r.json() == CREATED_3


def test_a_single_json_object_body_imports(client, session, h):
    project = make_project(session)
    r = client.post(url(project.slug), json={"prompt": "just one"}, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["created"] == 1


@pytest.mark.parametrize("array", [False, True])
@pytest.mark.parametrize("content_type", ["application/gzip", "application/x-gzip", None])
def test_gzip_body_imports(client, session, h, array, content_type):
    project = make_project(session)
    plain = json.dumps(records()).encode() if array else jsonl(*records())
    headers = {**h, "Content-Type": content_type} if content_type else h
    r = client.post(url(project.slug), content=gzip.compress(plain), headers=headers)
    assert r.status_code == 201, r.text
    assert r.json() == CREATED_3


@pytest.mark.parametrize("compress", [False, True])
def test_multipart_upload_imports(client, session, h, compress):
    project = make_project(session)
    data = jsonl(*records())
    if compress:
        data = gzip.compress(data)
    files = {"file": ("prompts.jsonl", data, "application/octet-stream")}
    r = client.post(url(project.slug), files=files, data={"note": "x"}, headers=h)
    assert r.status_code == 201, r.text
    assert r.json() == CREATED_3


def test_reimport_skips(client, session, h):
    project = make_project(session)
    data = jsonl(*records())
    assert client.post(url(project.slug), content=data, headers={**h, **NDJSON}).status_code == 201
    counts = row_counts(session)
    r = client.post(url(project.slug), content=data, headers={**h, **NDJSON})
    assert r.status_code == 201
    assert r.json() == {
        "created": 0,
        "skipped": 3,
        "completions_created": 0,
        "completions_skipped": 6,
    }
    assert row_counts(session) == counts


# --------------------------------------------------------------------------- rejected imports

BAD_INPUTS = [
    pytest.param(
        b'{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n',
        [(2, None, "invalid JSON")],
        id="invalid-json",
    ),
    pytest.param(
        jsonl({"prompt": "a"}, {"prompt": "b", "completions": "c"}, {"prompt": 5}),
        [
            (2, "completions", "must be a list, not a string"),
            (3, "prompt", "must be a string or a list of messages, not a number"),
        ],
        id="wrong-types",
    ),
    pytest.param(
        jsonl({"prompt": "a"}, {"id": "x", "completions": ["c"]}),
        [(2, "prompt", "is required")],
        id="missing-prompt",
    ),
    pytest.param(
        b'{"prompt": "a"}\n\n{"prompt": "   "}\n',
        [(3, "prompt", "must not be empty")],
        id="empty-prompt",
    ),
    pytest.param(
        jsonl({"prompt": "a", "completions": ["ok", {"text": ""}]}),
        [(1, "completions[1].text", "must not be empty")],
        id="empty-completion-text",
    ),
    pytest.param(
        jsonl({"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, {"id": "a", "prompt": "3"}),
        [(3, "id", "duplicate id 'a' (first on line {first})")],
        id="duplicate-ids",
    ),
    pytest.param(
        b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n',
        [(2, None, "invalid UTF-8 at byte 16 of the line")],
        id="invalid-utf8",
    ),
    pytest.param(
        b'[\n{"prompt": "a"},\n\n{"prompt": "caf\xe9"}\n]',
        [(4, None, "invalid UTF-8")],
        id="invalid-utf8-array",
    ),
    pytest.param(
        b'[\n {"prompt": "a"},\n {"prompt": "b", "extra": 1},\n {"prompt": NaN}\n]',
        [(3, "extra", "unknown field"), (4, None, "invalid JSON: NaN is not valid JSON")],
        id="array-errors",
    ),
    pytest.param(
        jsonl({"prompt": "a", "completions": [{"text": "x", "params": {"s": "\u0000"}}]}),
        [(1, "completions[0].params", "contains a NUL character")],
        id="nul-in-params",
    ),
]


def check_rejection(r: Any, expected: list[tuple[int, str | None, str]]) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"detail", "errors"}
    n = len(expected)
    assert (
        body["detail"] == f"import rejected: {n} error{'s' if n > 1 else ''}; nothing was written"
    )
    assert len(body["errors"]) == n
    for error, (line, field, message) in zip(body["errors"], expected, strict=True):
        assert set(error) == {"line", "field", "message"}
        assert (error["line"], error["field"]) == (line, field), body
        assert error["message"].startswith(message), body


@pytest.mark.parametrize(("data", "expected"), BAD_INPUTS)
@pytest.mark.parametrize("how", ["ndjson", "gzip", "multipart"])
def test_bad_input_is_rejected_whole(client, session, h, data, expected, how):
    project = make_project(session)
    make_prompt(session, project)
    before = row_counts(session)
    body = jsonl(*records(5)) + data if data.startswith(b"{") else data
    shift = 5 if data.startswith(b"{") else 0
    if how == "multipart":
        r = client.post(url(project.slug), files={"file": ("f", body)}, headers=h)
    else:
        content = gzip.compress(body) if how == "gzip" else body
        r = client.post(url(project.slug), content=content, headers={**h, **NDJSON})
    check_rejection(r, [(n + shift, f, m.format(first=1 + shift)) for n, f, m in expected])
    assert row_counts(session) == before


def test_exact_error_body(client, session, h):
    project = make_project(session)
    data = jsonl({"prompt": "ok"}, {"prompt": ""}, {"nope": 1})
    r = client.post(url(project.slug), content=data, headers={**h, **NDJSON})
    assert r.status_code == 422
    assert r.json() == {
        "detail": "import rejected: 2 errors; nothing was written",
        "errors": [
            {"line": 2, "field": "prompt", "message": "must not be empty"},
            {
                "line": 3,
                "field": "nope",
                "message": "unknown field (put extra data under 'metadata')",
            },
        ],
    }


def test_only_the_first_100_errors_are_listed(client, session, h):
    project = make_project(session)
    data = jsonl(*({"prompt": i} for i in range(150)))
    r = client.post(url(project.slug), content=data, headers={**h, **NDJSON})
    assert r.status_code == 422
    body = r.json()
    assert body["detail"] == "import rejected: 150 errors (first 100 shown); nothing was written"
    assert [e["line"] for e in body["errors"]] == list(range(1, 101))


@pytest.mark.parametrize("data", [b"", b"\n\n", b"[]"])
def test_empty_upload_is_rejected(client, session, h, data):
    project = make_project(session)
    r = client.post(url(project.slug), content=data, headers={**h, **NDJSON})
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {"line": 1, "field": None, "message": "the upload contains no records"}
    ]


def test_truncated_gzip_is_rejected(client, session, h):
    project = make_project(session)
    before = row_counts(session)
    packed = gzip.compress(jsonl(*records(200)))
    r = client.post(url(project.slug), content=packed[:-20], headers=h)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][-1]["message"].startswith("unreadable compressed data")
    assert row_counts(session) == before


# --------------------------------------------------------------------------- limits and types


def too_large(r: Any, what: str = "upload") -> None:
    assert r.status_code == 413, r.text
    assert r.json() == {"detail": f"the {what} is larger than the limit of {LIMIT} bytes"}


def body_of(size: int) -> bytes:
    """A valid JSONL body of exactly ``size`` bytes."""
    head = b'{"prompt": "'
    tail = b'"}\n'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_raw_body_at_the_limit_is_accepted(client, session, h, small_limit):
    project = make_project(session)
    r = client.post(url(project.slug), content=body_of(small_limit), headers={**h, **NDJSON})
    assert r.status_code == 201, r.text


def test_raw_body_over_the_limit_is_413(client, session, h, small_limit):
    project = make_project(session)
    before = row_counts(session)
    too_large(client.post(url(project.slug), content=body_of(small_limit + 1), headers=h))
    assert row_counts(session) == before


def chunks(data: bytes, size: int = 100) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_streamed_body_without_length_over_the_limit_is_413(client, session, h, small_limit):
    project = make_project(session)
    before = row_counts(session)
    data = jsonl(*records(40))
    assert len(data) > small_limit
    r = client.post(url(project.slug), content=chunks(data), headers={**h, **NDJSON})
    too_large(r)
    assert row_counts(session) == before
    # Under the limit, the same streaming works.
    r = client.post(url(project.slug), content=chunks(jsonl(*records(3))), headers=h)
    assert r.status_code == 201, r.text


def test_multipart_over_the_limit_is_413(client, session, h, small_limit):
    project = make_project(session)
    before = row_counts(session)
    files = {"file": ("f.jsonl", body_of(small_limit + 1), "application/x-ndjson")}
    too_large(client.post(url(project.slug), files=files, headers=h))
    assert row_counts(session) == before


def multipart(data: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="f.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_streamed_multipart_over_the_limit_is_413(client, session, h, small_limit):
    project = make_project(session)
    before = row_counts(session)
    body, ctype = multipart(jsonl(*records(40)))
    headers = {**h, "Content-Type": ctype}
    too_large(client.post(url(project.slug), content=chunks(body), headers=headers))
    assert row_counts(session) == before
    body, ctype = multipart(jsonl(*records(3)))
    r = client.post(url(project.slug), content=chunks(body), headers=headers)
    assert r.status_code == 201, r.text
    assert r.json() == CREATED_3


def test_gzip_that_decompresses_beyond_the_limit_is_413(client, session, h, small_limit):
    project = make_project(session)
    before = row_counts(session)
    packed = gzip.compress(jsonl(*({"prompt": "same"} for _ in range(500))))
    assert len(packed) < small_limit
    too_large(client.post(url(project.slug), content=packed, headers=h), "decompressed upload")
    files = {"file": ("f.jsonl.gz", packed, "application/gzip")}
    too_large(client.post(url(project.slug), files=files, headers=h), "decompressed upload")
    assert row_counts(session) == before


@pytest.mark.parametrize("content_type", ["application/xml", "text/csv", "image/png"])
def test_unsupported_content_type_is_415(client, session, h, content_type):
    project = make_project(session)
    before = row_counts(session)
    r = client.post(
        url(project.slug), content=jsonl(*records()), headers={**h, "Content-Type": content_type}
    )
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith(f"unsupported content type '{content_type}'")
    assert row_counts(session) == before


@pytest.mark.parametrize(
    "form",
    [
        {"files": {"upload": ("f.jsonl", b'{"prompt": "a"}\n')}},
        {"files": {"upload": ("f.jsonl", b'{"prompt": "a"}\n')}, "data": {"file": "not a file"}},
    ],
    ids=["other-field", "text-field"],
)
def test_multipart_without_a_file_field_is_422(client, session, h, form):
    project = make_project(session)
    before = row_counts(session)
    r = client.post(url(project.slug), headers=h, **form)
    assert r.status_code == 422, r.text
    assert r.json() == {"detail": "multipart upload needs the file in a field named 'file'"}
    assert row_counts(session) == before


def test_unknown_project_is_404(client, session, h):
    before = row_counts(session)
    r = client.post(url("nope"), content=jsonl(*records()), headers={**h, **NDJSON})
    assert r.status_code == 404
    assert r.json() == {"detail": "project 'nope' not found"}
    assert client.get(url("nope"), headers=h).status_code == 404
    assert row_counts(session) == before


def test_import_needs_an_admin(client, session):
    project = make_project(session)
    data = jsonl(*records())
    assert client.post(url(project.slug), content=data).status_code == 401
    annotator = auth(make_token(session, make_user(session, role=Role.annotator)))
    assert client.post(url(project.slug), content=data, headers=annotator).status_code == 403
    assert client.get(url(project.slug), headers=annotator).status_code == 403


@pytest.fixture
def sqlite_app(tmp_path) -> Iterator[tuple[Any, dict[str, str]]]:
    """An app on its own SQLite file with real, committing sessions (no shared test session)."""
    url = f"sqlite:///{tmp_path / 'concurrent.db'}"
    migrate(url)
    app = create_app(Settings(data_dir=tmp_path, database_url=url, secret_key="test-secret"))
    with app.state.session_factory() as s:
        headers = make_admin_headers(s)
        make_project(s, slug="p")
    yield app, headers
    app.state.engine.dispose()


def test_sqlite_import_over_http_takes_the_write_lock_up_front(sqlite_app):
    app, headers = sqlite_app
    seen: list[str] = []
    event.listen(app.state.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    with TestClient(app) as c:
        r = c.post(url("p"), content=jsonl(*records()), headers=headers)
    assert r.status_code == 201, r.text
    begins = [q for q in seen if q.startswith(("BEGIN", "INSERT"))]
    first_insert = next(i for i, q in enumerate(begins) if q.startswith("INSERT"))
    assert begins[first_insert - 1] == "BEGIN IMMEDIATE", begins


def test_concurrent_sqlite_imports_over_http_all_succeed(sqlite_app):
    app, headers = sqlite_app
    statuses: list[int] = []

    def worker(k: int) -> None:
        with TestClient(app) as c:
            for j in range(2):
                data = jsonl(*({"prompt": f"{k}-{j}-{i}"} for i in range(1000)))
                statuses.append(c.post(url("p"), content=data, headers=headers).status_code)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [201] * 8


# --------------------------------------------------------------------------- listing


def test_keyset_pagination_walks_every_prompt_once(client, session, h):
    project = make_project(session)
    other = make_project(session)
    ids = []
    for _ in range(5):
        ids.append(make_prompt(session, project).id)
        make_prompt(session, other)  # interleaved ids that must not appear
    seen, pages, after = [], [], None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after is not None:
            params["after"] = after
        r = client.get(url(project.slug), params=params, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "next"}
        pages.append(len(body["items"]))
        seen += [p["id"] for p in body["items"]]
        after = body["next"]
        if after is None:
            break
        assert after == str(body["items"][-1]["id"])
    assert pages == [2, 2, 1]
    assert seen == ids
    # Past the end: empty, no next.
    r = client.get(url(project.slug), params={"after": str(ids[-1])}, headers=h)
    assert r.json() == {"items": [], "next": None}


def test_exact_last_page_has_no_next(client, session, h):
    project = make_project(session)
    ids = [make_prompt(session, project).id for _ in range(4)]
    r1 = client.get(url(project.slug), params={"limit": 2}, headers=h).json()
    r2 = client.get(url(project.slug), params={"limit": 2, "after": r1["next"]}, headers=h).json()
    assert [p["id"] for p in r1["items"] + r2["items"]] == ids
    assert r2["next"] is None


def test_listing_shows_imported_prompts(client, session, h):
    project = make_project(session)
    data = jsonl({"id": "x", "prompt": "Hello", "metadata": {"k": "v"}}, {"prompt": "no id"})
    assert client.post(url(project.slug), content=data, headers=h).status_code == 201
    body = client.get(url(project.slug), headers=h).json()
    assert body["next"] is None
    first, second = body["items"]
    assert first["external_id"] == "x"
    assert first["project_id"] == project.id
    assert first["messages"] == [{"role": "user", "content": "Hello"}]
    assert first["metadata"] == {"k": "v"}
    assert second["external_id"] == content_id([{"role": "user", "content": "no id"}])


@pytest.mark.parametrize(
    "params", [{"after": "abc"}, {"after": "-1"}, {"after": "1.5"}, {"after": "9" * 20}]
)
def test_bad_cursor_is_422(client, session, h, params):
    project = make_project(session)
    r = client.get(url(project.slug), params=params, headers=h)
    assert r.status_code == 422, r.text
    assert "detail" in r.json()


@pytest.mark.parametrize("limit", ["0", "-1", "501", "x"])
def test_bad_limit_is_422(client, session, h, limit):
    project = make_project(session)
    r = client.get(url(project.slug), params={"limit": limit}, headers=h)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["query.limit"]


# --------------------------------------------------------------------------- one prompt


def test_get_prompt_with_completions_and_annotations(client, session, h):
    project = make_project(session)
    prompt = make_prompt(session, project, k=3, text="What is 2+2?")
    annotator = make_user(session)
    annotation = make_annotation(session, prompt, annotator)
    r = client.get(f"/api/v1/prompts/{prompt.id}", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == prompt.id
    assert body["project_id"] == project.id
    assert body["external_id"] == prompt.external_id
    assert body["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert [c["external_id"] for c in body["completions"]] == ["c0", "c1", "c2"]
    assert [c["id"] for c in body["completions"]] == [c.id for c in prompt.completions]
    assert {c["model"] for c in body["completions"]} == {"m0", "m1"}
    (a,) = body["annotations"]
    assert a["id"] == annotation.id
    assert a["user_id"] == annotator.id
    assert a["status"] == "submitted"
    assert a["ranking"] == [[c.id] for c in prompt.completions]
    assert a["display_order"] == [c.id for c in prompt.completions]


def test_get_imported_prompt(client, session, h):
    project = make_project(session)
    data = jsonl(
        {"id": "x", "prompt": "q", "completions": [{"id": "a", "text": "A", "params": {"t": 1}}]}
    )
    assert client.post(url(project.slug), content=data, headers=h).status_code == 201
    (item,) = client.get(url(project.slug), headers=h).json()["items"]
    body = client.get(f"/api/v1/prompts/{item['id']}", headers=h).json()
    assert body["annotations"] == []
    (c,) = body["completions"]
    assert (c["external_id"], c["text"], c["model"], c["params"]) == ("a", "A", None, {"t": 1})


def test_missing_prompt_is_404(client, session, h):
    r = client.get("/api/v1/prompts/987654321", headers=h)
    assert r.status_code == 404
    assert r.json() == {"detail": "prompt 987654321 not found"}
