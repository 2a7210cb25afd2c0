"""app.importer: framing, gzip, HH-RLHF, validation and size limits (pure: no database)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import zlib
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app import importer
from app.errors import PayloadTooLarge, RecordError
from app.importer import (
    CompletionIn,
    PromptIn,
    content_id,
    iter_json_records,
    open_source,
    parse_records,
    split_hh,
)

BIG = 64 * 1024 * 1024
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# What app.services.imports catches around parse_records for corrupt or truncated gzip.
GZIP_ERRORS = (OSError, EOFError, zlib.error)


def parse(data: bytes, *, max_bytes: int = BIG) -> list[PromptIn | RecordError]:
    return list(parse_records(open_source(io.BytesIO(data), max_bytes=max_bytes)))


def errors_of(data: bytes, **kw: Any) -> list[RecordError]:
    return [r for r in parse(data, **kw) if isinstance(r, RecordError)]


def records_of(data: bytes, **kw: Any) -> list[PromptIn]:
    out = parse(data, **kw)
    assert all(isinstance(r, PromptIn) for r in out), out
    return out  # type: ignore[return-value]


def jsonl(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def one_error(data: bytes) -> RecordError:
    errs = errors_of(data)
    assert len(errs) == 1, errs
    return errs[0]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


# --------------------------------------------------------------------------- JSON Lines


def test_jsonl_lines_are_numbered_from_one_and_blank_lines_are_skipped():
    data = (
        b'{"prompt": "a"}\n'
        b"\n"
        b"   \t \n"
        b'{"prompt": "b"}\r\n'
        b"\n"
        b'{"prompt": "c"}'  # no final newline
    )
    recs = records_of(data)
    assert [(r.line, r.messages[0]["content"]) for r in recs] == [(1, "a"), (4, "b"), (6, "c")]


def test_jsonl_errors_do_not_stop_parsing_and_keep_their_lines():
    data = b'{"prompt": "a"}\n{oops\n\n{"prompt": ""}\n{"prompt": "d"}\n'
    out = parse(data)
    assert [type(r).__name__ for r in out] == ["PromptIn", "RecordError", "RecordError", "PromptIn"]
    assert [r.line for r in out] == [1, 2, 4, 5]
    assert out[1].field is None
    assert out[1].message.startswith("invalid JSON: ")
    assert "(column " in out[1].message
    assert (out[2].field, out[2].message) == ("prompt", "must not be empty")


def test_record_fields_are_parsed():
    (rec,) = records_of(
        jsonl(
            {
                "id": "p-1",
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Haiku?"},
                ],
                "completions": [
                    "plain string",
                    {"text": "with id", "id": 7, "model": "m1", "params": {"t": 0.7}},
                ],
                "metadata": {"source": "demo", "tags": ["a", 1, None]},
            }
        )
    )
    assert rec.line == 1
    assert (rec.external_id, rec.explicit_id) == ("p-1", True)
    assert [m["role"] for m in rec.messages] == ["system", "user", "assistant", "user"]
    assert rec.metadata == {"source": "demo", "tags": ["a", 1, None]}
    assert rec.completions == [
        CompletionIn(content_id("plain string"), "plain string"),
        CompletionIn("7", "with id", "m1", {"t": 0.7}),
    ]


def test_null_id_metadata_and_completions_mean_absent():
    (rec,) = records_of(jsonl({"id": None, "prompt": "x", "metadata": None, "completions": None}))
    assert rec.explicit_id is False
    assert rec.external_id == content_id(user("x"))
    assert (rec.metadata, rec.completions) == ({}, [])


def test_integer_ids_become_strings():
    (rec,) = records_of(jsonl({"id": 42, "prompt": "x", "completions": [{"id": 0, "text": "t"}]}))
    assert rec.external_id == "42"
    assert rec.completions[0].external_id == "0"


# --------------------------------------------------------------------------- JSON arrays


def test_array_items_spanning_several_lines_get_their_first_line():
    data = (
        b"[\n"  # 1
        b"  {\n"  # 2  <- first record
        b'    "prompt": "a",\n'  # 3
        b'    "completions": ["x", "y"]\n'  # 4
        b"  },\n"  # 5
        b"\n"  # 6
        b'  {"prompt": "b"},\n'  # 7  <- second
        b"\n"  # 8
        b"  {\n"  # 9  <- third
        b'    "prompt": "c"\n'  # 10
        b"  }\n"  # 11
        b"]\n"  # 12
    )
    recs = records_of(data)
    assert [(r.line, r.messages[0]["content"]) for r in recs] == [(2, "a"), (7, "b"), (9, "c")]
    assert len(recs[0].completions) == 2


def test_array_on_one_line_and_leading_whitespace():
    recs = records_of(b'  \n\n [{"prompt": "a"}, {"prompt": "b"},{"prompt":"c"}]  \n')
    assert [r.line for r in recs] == [3, 3, 3]
    assert [r.messages[0]["content"] for r in recs] == ["a", "b", "c"]


def test_array_and_jsonl_give_the_same_records():
    objs = [
        {"id": "a", "prompt": "one", "completions": ["x"]},
        {"prompt": user("two"), "metadata": {"k": [1, 2]}},
        {
            "chosen": hh(("Human", "q"), ("Assistant", "good")),
            "rejected": hh(("Human", "q"), ("Assistant", "bad")),
        },
    ]
    from_lines = records_of(jsonl(*objs))
    from_array = records_of(json.dumps(objs, indent=4).encode())
    assert [dataclasses.replace(r, line=0) for r in from_lines] == [
        dataclasses.replace(r, line=0) for r in from_array
    ]


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"[]", b" [ \n ] \n"])
def test_empty_inputs_yield_nothing(data):
    assert parse(data) == []


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (b'[{"prompt": "a"}\n{"prompt": "b"}]', 2, "expected ',' or ']' after an array element"),
        (b'[{"prompt": "a"},\n\n{"prompt": "b"}]\n[]', 4, "unexpected data after the JSON array"),
        (b'[{"prompt": "a"},\n', 2, "invalid JSON: Expecting value"),
        (b'[{"prompt": "a"}', 1, "expected ',' or ']' after an array element"),
        (
            b'[\n{"prompt": "a"},\n{"prompt":\n\n "b" x}]',
            5,
            "invalid JSON: Expecting ',' delimiter",
        ),
        (b'[\n{"prompt": "a",}]', 2, "invalid JSON: Expecting property name"),
    ],
)
def test_array_syntax_errors_stop_with_the_right_line(data, line, message):
    errs = errors_of(data)
    assert len(errs) == 1, errs
    assert errs[0].line == line
    assert errs[0].field is None
    assert errs[0].message.startswith(message), errs[0].message


def test_array_validation_errors_do_not_stop_parsing():
    data = b'[\n{"prompt": 1},\n{"prompt": "ok"},\n{"nope": 1}\n]'
    out = parse(data)
    assert [(type(r).__name__, r.line) for r in out] == [
        ("RecordError", 2),
        ("PromptIn", 3),
        ("RecordError", 4),
    ]


@pytest.mark.parametrize("chunk", [3, 7, 64, 1000])
def test_array_parsing_does_not_depend_on_chunk_size(monkeypatch, chunk):
    objs = [
        {"id": f"r{i}", "prompt": "é€𝄞 " * (i + 1) + "\n", "completions": [f"c{i}" * 9]}
        for i in range(20)
    ]
    data = "[\n" + ",\n".join(json.dumps(o, ensure_ascii=False, indent=1) for o in objs) + "\n]"
    data = data.encode()
    expected = records_of(data)
    monkeypatch.setattr(importer, "_CHUNK", chunk)
    assert records_of(data) == expected
    assert records_of(gzip.compress(data)) == expected
    assert [r.external_id for r in expected] == [f"r{i}" for i in range(20)]


# --------------------------------------------------------------------------- gzip and BOM


@pytest.mark.parametrize("array", [False, True])
def test_gzip_is_detected_by_magic_bytes(array):
    objs = [{"prompt": "a"}, {"prompt": "b"}]
    plain = json.dumps(objs).encode() if array else jsonl(*objs)
    assert records_of(gzip.compress(plain)) == records_of(plain)
    assert len(records_of(plain)) == 2


def test_multi_member_gzip_is_read_whole():
    data = gzip.compress(jsonl({"prompt": "a"})) + gzip.compress(jsonl({"prompt": "b"}))
    assert [r.line for r in records_of(data)] == [1, 2]


def test_gzip_magic_alone_is_not_enough():
    with pytest.raises(GZIP_ERRORS):
        parse(b"\x1f\x8bnot really gzip")


def test_truncated_gzip_raises_what_the_service_catches():
    data = gzip.compress(jsonl(*({"prompt": f"p{i}"} for i in range(200))))
    with pytest.raises(GZIP_ERRORS):
        parse(data[: len(data) // 2])


@pytest.mark.parametrize("array", [False, True])
@pytest.mark.parametrize("compress", [False, True])
def test_utf8_bom_is_skipped(array, compress):
    objs = [{"prompt": "a"}, {"prompt": "b"}]
    plain = b"\xef\xbb\xbf" + (json.dumps(objs).encode() if array else jsonl(*objs))
    data = gzip.compress(plain) if compress else plain
    recs = records_of(data)
    assert [r.messages[0]["content"] for r in recs] == ["a", "b"]
    assert recs[0].line == 1


# --------------------------------------------------------------------------- content ids


def test_content_id_is_deterministic_and_order_insensitive():
    a = content_id({"x": 1, "y": [1, "é"]})
    assert a == content_id({"y": [1, "é"], "x": 1})
    assert a != content_id({"x": 1, "y": [1, "e"]})
    assert a.startswith("h:")
    assert len(a) == 34
    int(a[2:], 16)
    # A fixed value: ids stored in databases must never change between releases.
    assert content_id("hi") == "h:" + "b49177e05868b7af8e82a644c1ce20e5"


def test_records_without_id_get_ids_from_their_conversation():
    recs = records_of(
        jsonl(
            {"prompt": "same"},
            {"prompt": user("same"), "metadata": {"differs": True}, "completions": ["x"]},
            {"prompt": "other"},
        )
    )
    assert recs[0].external_id == recs[1].external_id == content_id(user("same"))
    assert recs[2].external_id == content_id(user("other"))
    assert not any(r.explicit_id for r in recs)
    assert recs[1].completions[0].external_id == content_id("x")
    # Same ids on every parse.
    assert [r.external_id for r in records_of(jsonl({"prompt": "same"}))] == [recs[0].external_id]


# --------------------------------------------------------------------------- HH-RLHF


def test_split_hh_single_turn():
    messages, answer = split_hh(hh(("Human", "Hi there"), ("Assistant", "Hello!")), "chosen")
    assert messages == [{"role": "user", "content": "Hi there"}]
    assert answer == "Hello!"


def test_split_hh_multi_turn_splits_at_the_last_assistant_turn():
    transcript = hh(
        ("Human", "Q1"),
        ("Assistant", "A1\nwith a second line"),
        ("Human", "Q2"),
        ("Assistant", "final answer"),
    )
    messages, answer = split_hh(transcript, "chosen")
    assert messages == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1\nwith a second line"},
        {"role": "user", "content": "Q2"},
    ]
    assert answer == "final answer"


def test_hh_record_becomes_a_prompt_with_two_completions():
    convo = (("Human", "Q1"), ("Assistant", "A1"), ("Human", "Q2"))
    (rec,) = records_of(
        jsonl(
            {
                "chosen": hh(*convo, ("Assistant", "good")),
                "rejected": hh(*convo, ("Assistant", "bad")),
            }
        )
    )
    assert rec.explicit_id is False
    assert rec.messages == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert rec.external_id == content_id(rec.messages)
    assert rec.completions == [
        CompletionIn(content_id("good"), "good"),
        CompletionIn(content_id("bad"), "bad"),
    ]
    # An HH record and a plain record with the same conversation share the id.
    (plain,) = records_of(jsonl({"prompt": rec.messages}))
    assert plain.external_id == rec.external_id


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        (
            {"chosen": "no turns at all", "rejected": hh(("Human", "q"), ("Assistant", "a"))},
            "chosen",
            "has no '\\n\\nAssistant:' turn",
        ),
        (
            {"chosen": "Preamble" + hh(("Human", "q"), ("Assistant", "a")), "rejected": "x"},
            "chosen",
            "must start with '\\n\\nHuman:'",
        ),
        (
            {
                "chosen": hh(("Human", "q"), ("Assistant", "a"), ("Assistant", "b")),
                "rejected": "x",
            },
            "chosen",
            "the turn before the last Assistant turn must be a Human turn",
        ),
        (
            {"chosen": hh(("Assistant", "a")), "rejected": "x"},
            "chosen",
            "the turn before the last Assistant turn must be a Human turn",
        ),
        (
            {"chosen": hh(("Human", "  "), ("Assistant", "a")), "rejected": "x"},
            "chosen",
            "has an empty turn",
        ),
        (
            {
                "chosen": hh(("Human", "q"), ("Assistant", " ")),
                "rejected": hh(("Human", "q"), ("Assistant", "b")),
            },
            "chosen",
            "the last Assistant turn is empty",
        ),
        (
            {
                "chosen": hh(("Human", "q"), ("Assistant", "a")),
                "rejected": hh(("Human", "q"), ("Assistant", "")),
            },
            "rejected",
            "the last Assistant turn is empty",
        ),
        (
            {
                "chosen": hh(("Human", "q"), ("Assistant", "a")),
                "rejected": hh(("Human", "other"), ("Assistant", "b")),
            },
            "rejected",
            "the conversation before the last Assistant turn differs from 'chosen'",
        ),
        (
            {
                "chosen": hh(("Human", "q"), ("Assistant", "a")),
                "rejected": hh(("Human", "q"), ("Assistant", "a")),
            },
            "rejected",
            "is identical to 'chosen'",
        ),
        (
            {"chosen": hh(("Human", "q"), ("Assistant", "a")), "rejected": 5},
            "rejected",
            "must be a string, not a number",
        ),
        (
            {"chosen": "a", "rejected": "b", "extra": 1},
            "extra",
            "unknown field in an HH-RLHF record",
        ),
        ({"chosen": hh(("Human", "q"), ("Assistant", "a"))}, "chosen", "unknown field"),
    ],
)
def test_hh_errors(record, field, message):
    err = one_error(b"\n" + jsonl(record))
    assert (err.line, err.field) == (2, field)
    assert err.message.startswith(message), err.message


# --------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        # not an object
        (1, None, "a record must be a JSON object, not a number"),
        ("text", None, "a record must be a JSON object, not a string"),
        (None, None, "a record must be a JSON object, not null"),
        ([{"prompt": "x"}], None, "a record must be a JSON object, not an array"),
        (True, None, "a record must be a JSON object, not a boolean"),
        # missing / empty prompt
        ({}, "prompt", "is required"),
        ({"id": "x", "completions": ["a"]}, "prompt", "is required"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": " \n\t "}, "prompt", "must not be empty"),
        ({"prompt": []}, "prompt", "must not be an empty list"),
        ({"prompt": None}, "prompt", "must be a string or a list of messages, not null"),
        # wrong types
        ({"prompt": 5}, "prompt", "must be a string or a list of messages, not a number"),
        ({"prompt": {"role": "user"}}, "prompt", "must be a string or a list of messages"),
        ({"prompt": ["hi"]}, "prompt[0]", "must be an object with 'role' and 'content'"),
        ({"prompt": [{"role": "user", "content": 1}]}, "prompt[0].content", "must be a string"),
        ({"prompt": [{"role": "user"}]}, "prompt[0].content", "must be a string, not null"),
        ({"prompt": "x", "id": True}, "id", "must be a string or an integer, not a boolean"),
        ({"prompt": "x", "id": 1.5}, "id", "must be a string or an integer, not a number"),
        ({"prompt": "x", "id": ["a"]}, "id", "must be a string or an integer, not an array"),
        ({"prompt": "x", "id": ""}, "id", "must not be empty"),
        ({"prompt": "x", "metadata": []}, "metadata", "must be an object, not an array"),
        ({"prompt": "x", "metadata": "m"}, "metadata", "must be an object, not a string"),
        ({"prompt": "x", "completions": "a"}, "completions", "must be a list, not a string"),
        ({"prompt": "x", "completions": {"text": "a"}}, "completions", "must be a list"),
        ({"prompt": "x", "completions": [5]}, "completions[0]", "must be an object with 'text'"),
        ({"prompt": "x", "completions": [{"text": 5}]}, "completions[0].text", "must be a string"),
        ({"prompt": "x", "completions": ["a", {"id": 1}]}, "completions[1].text", "is required"),
        (
            {"prompt": "x", "completions": [{"text": "a", "model": 3}]},
            "completions[0].model",
            "must be a string, not a number",
        ),
        (
            {"prompt": "x", "completions": [{"text": "a", "params": "p"}]},
            "completions[0].params",
            "must be an object, not a string",
        ),
        (
            {"prompt": "x", "completions": [{"text": "a", "id": {}}]},
            "completions[0].id",
            "must be a string or an integer, not an object",
        ),
        # empty completion text
        ({"prompt": "x", "completions": [""]}, "completions[0].text", "must not be empty"),
        ({"prompt": "x", "completions": ["a", {"text": "  "}]}, "completions[1].text", "must not"),
        # unknown fields
        ({"prompt": "x", "extra": 1}, "extra", "unknown field (put extra data under 'metadata')"),
        ({"prompt": "x", "b": 1, "a": 2}, "a", "unknown field"),
        (
            {"prompt": [{"role": "user", "content": "x", "name": "n"}]},
            "prompt[0].name",
            "unknown field",
        ),
        (
            {"prompt": "x", "completions": [{"text": "a", "score": 1}]},
            "completions[0].score",
            "unknown field",
        ),
        # roles
        (
            {"prompt": [{"role": "bot", "content": "x"}]},
            "prompt[0].role",
            "must be one of system, user, assistant",
        ),
        ({"prompt": [{"role": ["user"], "content": "x"}]}, "prompt[0].role", "must be one of"),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "prompt[1].role",
            "the last message must be from the user",
        ),
        (
            {"prompt": [{"role": "system", "content": "s"}]},
            "prompt[0].role",
            "the last message must be from the user",
        ),
        # NUL characters: PostgreSQL cannot store them
        ({"prompt": "a\u0000b"}, "prompt", "contains a NUL character"),
        (
            {"prompt": [{"role": "user", "content": "\u0000x"}]},
            "prompt[0].content",
            "contains a NUL character",
        ),
        ({"prompt": "x", "completions": ["a\u0000"]}, "completions[0].text", "contains a NUL"),
        ({"prompt": "x", "id": "a\u0000"}, "id", "contains a NUL character"),
        ({"prompt": "x", "metadata": {"k": "\u0000"}}, "metadata", "contains a NUL character"),
        ({"prompt": "x", "metadata": {"\u0000": 1}}, "metadata", "contains a NUL character"),
        ({"prompt": "x", "metadata": {"k": "\\\u0000"}}, "metadata", "contains a NUL character"),
        (
            {"prompt": "x", "completions": [{"text": "a", "params": {"stop": ["\u0000"]}}]},
            "completions[0].params",
            "contains a NUL character",
        ),
        # duplicate completions within a record
        (
            {"prompt": "x", "completions": [{"id": "a", "text": "1"}, {"id": "a", "text": "2"}]},
            "completions[1].id",
            "duplicate completion id in this record",
        ),
        (
            {"prompt": "x", "completions": [{"id": 1, "text": "1"}, {"id": "1", "text": "2"}]},
            "completions[1].id",
            "duplicate completion id in this record",
        ),
        (
            {"prompt": "x", "completions": ["same", {"text": "same"}]},
            "completions[1].text",
            "duplicate completion text in this record",
        ),
        # lengths
        ({"prompt": "x", "id": "i" * 201}, "id", "is longer than 200 characters"),
        (
            {"prompt": "x", "completions": [{"text": "a", "model": "m" * 201}]},
            "completions[0].model",
            "is longer than 200 characters",
        ),
        ({"prompt": "x" * 500_001}, "prompt", "is longer than 500000 characters"),
        ({"prompt": "x", "metadata": {"k": "v" * 70_000}}, "metadata", "is larger than 65536"),
        (
            {"prompt": "x", "completions": [{"text": "a", "params": {"k": "v" * 70_000}}]},
            "completions[0].params",
            "is larger than 65536",
        ),
    ],
)
@pytest.mark.parametrize("framing", ["jsonl", "array"])
def test_validation_errors(framing, record, field, message):
    good = {"prompt": "fine"}
    if framing == "jsonl":
        data = jsonl(good) + b"\n" + json.dumps(record).encode() + b"\n" + jsonl(good)
        line = 3
    else:
        data = b"[\n" + json.dumps(good).encode() + b",\n\n"
        data += json.dumps(record).encode() + b",\n" + json.dumps(good).encode() + b"\n]"
        line = 4
    out = parse(data)
    assert [type(r).__name__ for r in out] == ["PromptIn", "RecordError", "PromptIn"], out
    err = out[1]
    assert (err.line, err.field) == (line, field), err
    assert err.message.startswith(message), err.message


def test_literal_backslash_u0000_text_is_not_a_nul_character():
    (rec,) = records_of(
        jsonl(
            {
                "prompt": "x",
                "metadata": {"code": "\\u0000", "more": "\\\\u0000"},
                "completions": [{"text": "t", "params": {"escape": "\\u0000"}}],
            }
        )
    )
    assert rec.metadata == {"code": "\\u0000", "more": "\\\\u0000"}
    assert rec.completions[0].params == {"escape": "\\u0000"}


def test_metadata_that_cannot_be_stored():
    # 65-bit integers parse in array mode (Python's json) but orjson cannot store them.
    err = one_error(b'[{"prompt": "x", "metadata": {"n": ' + b"1" * 30 + b"}}]")
    assert (err.line, err.field) == (1, "metadata")
    assert err.message.startswith("cannot be stored")


def test_lone_surrogates_are_rejected_in_both_framings():
    line = b'{"prompt": "bad \\ud800 surrogate"}'
    err = one_error(b'{"prompt": "ok"}\n' + line + b"\n")
    assert (err.line, err.field) == (2, None)
    assert err.message.startswith("invalid JSON")
    err = one_error(b'[{"prompt": "ok"},\n' + line + b"]")
    assert (err.line, err.field) == (2, "prompt")
    assert err.message == "contains an unpaired surrogate (invalid Unicode)"
    # In metadata (array framing decodes it; orjson refuses to encode it).
    err = one_error(b'[{"prompt": "ok", "metadata": {"k": "\\udfff"}}]')
    assert (err.line, err.field) == (1, "metadata")
    # A correctly paired surrogate escape is fine.
    (rec,) = records_of(b'[{"prompt": "clef \\ud834\\udd1e"}]')
    assert rec.messages[0]["content"] == "clef 𝄞"


def test_invalid_utf8_in_jsonl_is_reported_on_its_line():
    data = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "\xc3\xa9 fine"}\n'
    out = parse(data)
    assert isinstance(out[0], PromptIn)
    assert out[1] == RecordError(2, None, "invalid UTF-8 at byte 16 of the line")
    assert isinstance(out[2], PromptIn)
    assert out[2].messages[0]["content"] == "é fine"


@pytest.mark.parametrize("chunk", [None, 5])
def test_invalid_utf8_in_an_array_is_reported_on_its_line(monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(importer, "_CHUNK", chunk)
    data = b'[\n{"prompt": "ok"},\n{"prompt": "ok \xc3\xa9"},\n\n{"prompt": "caf\xe9"}\n]'
    out = parse(data)
    # Records decoded before the bad chunk are yielded; the error names the bad byte's line.
    assert all(isinstance(r, PromptIn) for r in out[:-1])
    assert out[-1] == RecordError(5, None, "invalid UTF-8")
    # A truncated multi-byte character at the very end is invalid too.
    assert parse(b'[{"prompt": "ok"},\n\xc3')[-1] == RecordError(2, None, "invalid UTF-8")


@pytest.mark.parametrize(
    "value", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b"1" * 5000]
)
@pytest.mark.parametrize("framing", ["jsonl", "array"])
def test_non_finite_and_huge_numbers_are_rejected(framing, value):
    rec = b'{"prompt": "x", "metadata": {"n": ' + value + b"}}"
    data = (
        b'{"prompt": "ok"}\n' + rec if framing == "jsonl" else b'[{"prompt": "ok"},\n' + rec + b"]"
    )
    out = parse(data)
    assert isinstance(out[0], PromptIn)
    assert len(out) == 2
    err = out[1]
    assert isinstance(err, RecordError)
    assert err.line == 2
    assert err.field is None
    assert err.message.startswith("invalid JSON"), err.message


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'[{"prompt": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]",
        b'{"prompt": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "x", "metadata": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    ],
)
def test_deeply_nested_json_is_an_error_not_a_crash(data):
    err = one_error(data)
    assert err.line == 1
    assert err.message.startswith("invalid JSON"), err.message


def test_moderately_nested_metadata_beyond_what_can_be_stored():
    # Parses (depth 300 < the decoders' limits) but orjson cannot serialise it.
    nested = b"[" * 300 + b"]" * 300
    err = one_error(b'[{"prompt": "x", "metadata": {"a": ' + nested + b"}}]")
    assert (err.field, err.message[:17]) == ("metadata", "cannot be stored:")


# --------------------------------------------------------------------------- duplicate ids


def test_duplicate_explicit_ids_point_at_the_first_line():
    data = jsonl(
        {"id": "a", "prompt": "1"},
        {"id": "b", "prompt": "2"},
        {"id": "a", "prompt": "3"},
        {"id": "a", "prompt": "4"},
        {"id": 7, "prompt": "5"},
        {"id": "7", "prompt": "6"},
    )
    out = parse(data)
    assert [r.line for r in out if isinstance(r, PromptIn)] == [1, 2, 5]
    assert [e for e in out if isinstance(e, RecordError)] == [
        RecordError(3, "id", "duplicate id 'a' (first on line 1)"),
        RecordError(4, "id", "duplicate id 'a' (first on line 1)"),
        RecordError(6, "id", "duplicate id '7' (first on line 5)"),
    ]


def test_duplicate_ids_in_an_array():
    data = b'[\n{"id": "x", "prompt": "1"},\n\n{\n "id": "x",\n "prompt": "2"}\n]'
    assert errors_of(data) == [RecordError(4, "id", "duplicate id 'x' (first on line 2)")]


def test_an_invalid_record_does_not_claim_its_id():
    data = jsonl({"id": "a", "prompt": ""}, {"id": "a", "prompt": "ok"})
    out = parse(data)
    assert isinstance(out[0], RecordError)
    assert isinstance(out[1], PromptIn)


def test_records_without_ids_may_repeat():
    recs = records_of(jsonl({"prompt": "same"}, {"prompt": "same"}))
    assert recs[0].external_id == recs[1].external_id


# --------------------------------------------------------------------------- sizes


def test_record_larger_than_16_mib_is_an_error():
    big = b'{"prompt": "' + b"x" * importer.MAX_RECORD_BYTES + b'"}\n'
    out = parse(jsonl({"prompt": "a"}) + big + jsonl({"prompt": "b"}))
    assert [type(r).__name__ for r in out] == ["PromptIn", "RecordError", "PromptIn"]
    assert out[1] == RecordError(2, None, "record larger than 16 MiB")


def test_record_size_limit_in_arrays(monkeypatch):
    monkeypatch.setattr(importer, "MAX_RECORD_BYTES", 100)
    monkeypatch.setattr(importer, "_CHUNK", 16)
    big = json.dumps({"prompt": "x" * 500}).encode()
    out = parse(b'[{"prompt": "a"},\n\n' + big + b"]")
    assert isinstance(out[0], PromptIn)
    assert len(out) == 2
    assert isinstance(out[1], RecordError)
    assert out[1].line == 3


def test_size_limit_on_the_raw_upload():
    data = jsonl(*({"prompt": f"p{i}"} for i in range(50)))
    assert len(records_of(data, max_bytes=len(data))) == 50
    with pytest.raises(PayloadTooLarge) as exc:
        parse(data, max_bytes=len(data) - 1)
    assert exc.value.status == 413
    assert exc.value.message == f"the upload is larger than the limit of {len(data) - 1} bytes"


def test_size_limit_on_a_large_raw_upload_is_hit_while_streaming():
    data = jsonl(*({"prompt": "x" * 1000, "id": i} for i in range(3000)))  # ~3 MiB
    seen: list[PromptIn | RecordError] = []
    stream = parse_records(open_source(io.BytesIO(data), max_bytes=2 * 1024 * 1024))
    with pytest.raises(PayloadTooLarge):
        seen.extend(stream)
    assert 0 < len(seen) < 3000
    assert all(isinstance(r, PromptIn) for r in seen)


def test_size_limit_on_decompressed_gzip():
    plain = jsonl(*({"prompt": "same text " * 20} for _ in range(500)))
    packed = gzip.compress(plain)
    assert len(packed) < 2000 < len(plain)
    assert len(records_of(packed, max_bytes=len(plain))) == 500
    with pytest.raises(PayloadTooLarge) as exc:
        parse(packed, max_bytes=len(plain) - 1)
    assert exc.value.message.startswith("the decompressed upload is larger than the limit")
    with pytest.raises(PayloadTooLarge) as exc:
        parse(packed, max_bytes=len(packed) - 1)
    assert exc.value.message.startswith("the upload is larger than the limit")


def test_gzip_bomb_stops_at_the_limit():
    packed = gzip.compress(b"\n" * (50 * 1024 * 1024), compresslevel=9)
    assert len(packed) < 100_000
    with pytest.raises(PayloadTooLarge):
        parse(packed, max_bytes=1024 * 1024)


def test_iter_json_records_reports_start_lines():
    stream = open_source(io.BytesIO(b'\n{"a": 1}\n\n[2]\n'), max_bytes=BIG)
    assert [(line, value, err) for line, value, err in iter_json_records(stream)] == [
        (2, {"a": 1}, None),
        (4, [2], None),
    ]


# --------------------------------------------------------------------------- properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Record-shaped objects whose field values are random: reach the deeper validation code.
record_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "prompt": json_values
        | st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "bot"])},
                optional={"content": json_values},
            ),
            max_size=3,
        ),
        "completions": json_values
        | st.lists(
            json_values
            | st.fixed_dictionaries(
                {},
                optional={
                    "id": json_values,
                    "text": json_values,
                    "model": json_values,
                    "params": json_values,
                },
            ),
            max_size=3,
        ),
        "metadata": json_values,
        "chosen": json_values | st.text(alphabet="\nHumanAssistant: x", max_size=40),
        "rejected": json_values | st.text(alphabet="\nHumanAssistant: x", max_size=40),
    },
)


def check_never_crashes(data: bytes, max_bytes: int, *, allow: tuple[type, ...] = ()) -> None:
    try:
        out = parse(data, max_bytes=max_bytes)
    except PayloadTooLarge:
        return
    except allow:
        assert data.startswith(b"\x1f\x8b")
        return
    for item in out:
        assert isinstance(item, PromptIn | RecordError)
        assert item.line >= 1
        if isinstance(item, RecordError):
            assert item.message
            assert item.line <= data.count(b"\n") + 1 or data.startswith(b"\x1f\x8b")


@PROPERTY
@given(data=st.binary(max_size=300), max_bytes=st.integers(min_value=0, max_value=400))
def test_random_bytes_never_crash(data, max_bytes):
    assume(not data.startswith(b"\x1f\x8b"))
    check_never_crashes(data, max_bytes)


@PROPERTY
@given(
    prefix=st.sampled_from(
        [b"", b"\xef\xbb\xbf", b"[", b"[\n", b'{"prompt": ', b'[{"prompt": "a"},']
    ),
    data=st.binary(max_size=200),
)
def test_random_bytes_after_plausible_prefixes_never_crash(prefix, data):
    check_never_crashes(prefix + data, BIG, allow=GZIP_ERRORS)  # b'' + gzip magic


@PROPERTY
@given(
    plain=st.binary(max_size=300),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), max_size=3),
)
def test_corrupt_gzip_raises_only_what_the_service_catches(plain, cut, flips):
    packed = bytearray(gzip.compress(plain)[: max(cut, 2)])
    for pos, xor in flips:
        i = pos % len(packed)
        if i >= 2:  # keep the magic bytes so the stream is treated as gzip
            packed[i] ^= xor
    check_never_crashes(bytes(packed), BIG, allow=GZIP_ERRORS)


@PROPERTY
@given(
    values=st.lists(json_values | record_like, min_size=1, max_size=5),
    ascii_only=st.booleans(),
    array=st.booleans(),
    max_bytes=st.sampled_from([BIG, 200]),
)
def test_random_json_values_never_crash(values, ascii_only, array, max_bytes):
    if array:
        text = json.dumps(values, ensure_ascii=ascii_only, indent=1)
    else:
        text = "\n".join(json.dumps(v, ensure_ascii=ascii_only) for v in values)
    # Lone surrogates (ensure_ascii=False) become invalid UTF-8.
    check_never_crashes(text.encode("utf-8", "surrogatepass"), max_bytes)


# Valid records, built so the expected PromptIn is known.
safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip())
safe_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | safe_text
)
safe_json = st.recursive(
    safe_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": safe_text}
    ),
    max_size=3,
).flatmap(lambda ms: st.just([*ms, {"role": "user", "content": "last"}]))


@st.composite
def valid_record(draw: Any, index: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"prompt": draw(safe_text | messages)}
    if draw(st.booleans()):
        rec["id"] = draw(st.sampled_from([f"id-{index}", index]))
    texts = draw(st.lists(safe_text, max_size=3, unique=True))
    completions: list[Any] = []
    for j, t in enumerate(texts):
        kind = draw(st.sampled_from(["str", "dict", "full"]))
        if kind == "str":
            completions.append(t)
        elif kind == "dict":
            completions.append({"text": t})
        else:
            completions.append(
                {
                    "id": f"c{j}",
                    "text": t,
                    "model": draw(st.none() | safe_text),
                    "params": draw(st.dictionaries(safe_text, safe_json, max_size=2)),
                }
            )
    if completions or draw(st.booleans()):
        rec["completions"] = completions
    if draw(st.booleans()):
        rec["metadata"] = draw(st.dictionaries(safe_text, safe_json, max_size=3))
    return rec


valid_records = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(*(valid_record(i) for i in range(n)))
)


def expected_prompt(rec: dict[str, Any]) -> tuple[str, list[dict[str, str]], Any, list[Any]]:
    msgs = user(rec["prompt"]) if isinstance(rec["prompt"], str) else rec["prompt"]
    ext = str(rec["id"]) if "id" in rec else content_id(msgs)
    comps = [
        (
            str(c["id"])
            if isinstance(c, dict) and "id" in c
            else content_id(c if isinstance(c, str) else c["text"])
        )
        for c in rec.get("completions", [])
    ]
    return ext, msgs, rec.get("metadata", {}), comps


@PROPERTY
@given(
    recs=valid_records,
    indent=st.sampled_from([None, 0, 2]),
    blank=st.integers(min_value=0, max_value=2),
    ascii_only=st.booleans(),
    compress=st.booleans(),
    chunk=st.sampled_from([16, 1 << 20]),
)
def test_valid_records_round_trip_in_both_framings(
    recs, indent, blank, ascii_only, compress, chunk
):
    sep = "\n" * (blank + 1)
    lines = sep.join(json.dumps(r, ensure_ascii=ascii_only) for r in recs) + "\n"
    items = [json.dumps(r, ensure_ascii=ascii_only, indent=indent) for r in recs]
    array = "[\n" + (",\n" + "\n" * blank).join(items) + "\n]"
    expected_array_lines, line = [], 2
    for item in items:
        expected_array_lines.append(line)
        line += item.count("\n") + 1 + blank

    def load(text: str) -> list[PromptIn]:
        data = text.encode()
        with mock.patch.object(importer, "_CHUNK", chunk):
            return records_of(gzip.compress(data) if compress else data)

    from_lines, from_array = load(lines), load(array)
    assert [r.line for r in from_lines] == [1 + i * (blank + 1) for i in range(len(recs))]
    assert [r.line for r in from_array] == expected_array_lines
    assert [dataclasses.replace(r, line=0) for r in from_lines] == [
        dataclasses.replace(r, line=0) for r in from_array
    ]
    for rec, got in zip(recs, from_lines, strict=True):
        ext, msgs, metadata, comp_ids = expected_prompt(rec)
        assert (got.external_id, got.explicit_id) == (ext, "id" in rec)
        assert got.messages == msgs
        assert got.metadata == metadata
        assert [c.external_id for c in got.completions] == comp_ids
