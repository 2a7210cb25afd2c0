"""Streaming parser and validator for prompt imports (pure: no database access).

Accepted input, optionally gzip-compressed:
- JSON Lines: one record per line (blank lines ignored);
- a JSON array of records, read incrementally.

A record is ``{"id"?, "prompt", "completions"?, "metadata"?}`` or an Anthropic HH-RLHF record
``{"chosen", "rejected"}``. Problems are reported as :class:`RecordError` with 1-based line
numbers; memory use is bounded by the largest single record, not by the file size.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from app.errors import PayloadTooLarge, RecordError

MAX_RECORD_BYTES = 16 * 1024 * 1024
MAX_ID_CHARS = 200
MAX_TEXT_CHARS = 500_000
MAX_MODEL_CHARS = 200
MAX_METADATA_BYTES = 64 * 1024
ROLES = ("system", "user", "assistant")
RECORD_FIELDS = frozenset({"id", "prompt", "completions", "metadata"})
COMPLETION_FIELDS = frozenset({"id", "text", "model", "params"})
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # an escaped NUL in orjson output
_CHUNK = 1 << 20


@dataclass(slots=True)
class CompletionIn:
    external_id: str
    text: str
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PromptIn:
    line: int
    external_id: str
    explicit_id: bool
    messages: list[dict[str, str]]
    metadata: dict[str, Any]
    completions: list[CompletionIn]


class _Invalid(Exception):
    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- byte streams


class _LimitedReader(io.RawIOBase):
    """Reads from ``raw`` and raises :class:`PayloadTooLarge` past ``limit`` bytes."""

    def __init__(self, raw: IO[bytes], limit: int, what: str) -> None:
        self._raw, self._limit, self._what, self.count = raw, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._raw.read(len(b))
        n = len(data)
        self.count += n
        if self.count > self._limit:
            raise PayloadTooLarge(f"{self._what} is larger than the limit of {self._limit} bytes")
        b[:n] = data
        return n


def open_source(raw: IO[bytes], *, max_bytes: int) -> io.BufferedReader:
    """A buffered, size-limited byte stream; gzip is detected by its magic bytes."""
    stream = io.BufferedReader(_LimitedReader(raw, max_bytes, "the upload"), _CHUNK)
    if stream.peek(2)[:2] == b"\x1f\x8b":
        unzipped = gzip.GzipFile(fileobj=stream, mode="rb")
        stream = io.BufferedReader(
            _LimitedReader(unzipped, max_bytes, "the decompressed upload"), _CHUNK
        )
    return stream


# --------------------------------------------------------------------------- JSON framing


def iter_json_records(stream: io.BufferedReader) -> Iterator[tuple[int, Any, RecordError | None]]:
    """Yield ``(line, value, error)`` for each record of a JSONL or JSON-array stream."""
    head = stream.peek(64)[:64]
    if head.startswith(b"\xef\xbb\xbf"):
        stream.read(3)
        head = head[3:]
    first = head.lstrip()[:1]
    if first == b"[":
        yield from _iter_array(stream)
    else:
        yield from _iter_lines(stream)


def _iter_lines(stream: io.BufferedReader) -> Iterator[tuple[int, Any, RecordError | None]]:
    for line_no, raw in enumerate(stream, start=1):
        if len(raw) > MAX_RECORD_BYTES:
            yield line_no, None, RecordError(line_no, None, "record larger than 16 MiB")
            continue
        if not raw.strip():
            continue
        try:
            yield line_no, orjson.loads(raw), None
        except orjson.JSONDecodeError as e:
            yield line_no, None, RecordError(line_no, None, _json_message(raw, e))


def _json_message(raw: bytes, e: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as u:
        return f"invalid UTF-8 at byte {u.start + 1} of the line"
    return f"invalid JSON: {e.msg} (column {e.colno})"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # as orjson does for JSON Lines: 1e400 must not become Infinity
        raise ValueError("number is infinity when parsed as double")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_WS = re.compile(r"[ \t\r\n]*")


def _iter_array(stream: io.BufferedReader) -> Iterator[tuple[int, Any, RecordError | None]]:
    """Incrementally decode ``[v, v, …]`` keeping only the unread tail in memory."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buf, pos, line, eof = "", 0, 1, False

    def fill() -> bool:
        nonlocal buf, pos, line, eof
        if eof:
            return False
        data = stream.read(_CHUNK)
        try:
            chunk = decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            # Report the line of the bad byte, not the line the parser had reached.
            line += buf.count("\n", pos) + e.object[: e.start].count(b"\n")
            raise _Invalid(None, "invalid UTF-8") from None
        if not data:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos, line
        while True:
            m = _WS.match(buf, pos)
            assert m is not None
            line += buf.count("\n", pos, m.end())
            pos = m.end()
            if pos < len(buf) or not fill():
                return

    def error(message: str) -> RecordError:
        return RecordError(line, None, message)

    try:
        fill()
        skip_ws()
        if buf[pos : pos + 1] != "[":
            yield line, None, error("expected '[' to start a JSON array")
            return
        pos += 1
        skip_ws()
        if buf[pos : pos + 1] == "]":
            pos += 1
        else:
            while True:
                start_line = line
                while True:
                    try:
                        value, end = _DECODER.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as e:
                        if len(buf) - pos <= MAX_RECORD_BYTES and fill():
                            continue
                        yield (
                            start_line,
                            None,
                            RecordError(
                                line + buf.count("\n", pos, e.pos), None, f"invalid JSON: {e.msg}"
                            ),
                        )
                        return
                    except (ValueError, RecursionError) as e:
                        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                        yield start_line, None, error(f"invalid JSON: {msg}")
                        return
                line += buf.count("\n", pos, end)
                pos = end
                yield start_line, value, None
                skip_ws()
                sep = buf[pos : pos + 1]
                pos += 1
                if sep == "]":
                    break
                if sep != ",":
                    yield line, None, error("expected ',' or ']' after an array element")
                    return
                skip_ws()
        skip_ws()
        if pos < len(buf):
            yield line, None, error("unexpected data after the JSON array")
    except _Invalid as e:
        yield line, None, error(e.message)


# --------------------------------------------------------------------------- record validation


def _text(value: Any, fld: str, *, max_chars: int = MAX_TEXT_CHARS, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise _Invalid(fld, f"must be a string, not {_type_name(value)}")
    if not empty_ok and not value.strip():
        raise _Invalid(fld, "must not be empty")
    if len(value) > max_chars:
        raise _Invalid(fld, f"is longer than {max_chars} characters")
    if "\x00" in value:
        raise _Invalid(fld, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(fld, "contains an unpaired surrogate (invalid Unicode)") from None
    return value


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _ident(value: Any, fld: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Invalid(fld, f"must be a string or an integer, not {_type_name(value)}")
    return _text(str(value), fld, max_chars=MAX_ID_CHARS)


def content_id(payload: Any) -> str:
    """Deterministic id for records without one, so retried imports skip instead of repeating."""
    digest = hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return "h:" + digest[:32]


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, "prompt")}]
    if not isinstance(value, list):
        raise _Invalid("prompt", f"must be a string or a list of messages, not {_type_name(value)}")
    if not value:
        raise _Invalid("prompt", "must not be an empty list")
    out = []
    for i, m in enumerate(value):
        fld = f"prompt[{i}]"
        if not isinstance(m, dict):
            raise _Invalid(fld, "must be an object with 'role' and 'content'")
        extra = set(m) - {"role", "content"}
        if extra:
            raise _Invalid(f"{fld}.{sorted(extra)[0]}", "unknown field")
        role = m.get("role")
        if role not in ROLES:
            raise _Invalid(f"{fld}.role", f"must be one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _text(m.get("content"), f"{fld}.content")})
    if out[-1]["role"] != "user":
        raise _Invalid(f"prompt[{len(out) - 1}].role", "the last message must be from the user")
    return out


def _json_object(value: Any, fld: str) -> dict[str, Any]:
    """``metadata`` / ``params``: an object both databases can store (PostgreSQL JSONB refuses
    NUL characters and unpaired surrogates)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(fld, f"must be an object, not {_type_name(value)}")
    try:
        encoded = orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError) as e:
        raise _Invalid(fld, f"cannot be stored: {e}") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise _Invalid(fld, f"is larger than {MAX_METADATA_BYTES} bytes")
    if _NUL_ESCAPE.search(encoded):
        raise _Invalid(fld, "contains a NUL character")
    return value


def _completions(value: Any) -> list[CompletionIn]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid("completions", f"must be a list, not {_type_name(value)}")
    out: list[CompletionIn] = []
    seen: set[str] = set()
    for i, c in enumerate(value):
        fld = f"completions[{i}]"
        if isinstance(c, str):
            c = {"text": c}
        elif not isinstance(c, dict):
            raise _Invalid(fld, "must be an object with 'text' (or a string)")
        extra = set(c) - COMPLETION_FIELDS
        if extra:
            raise _Invalid(f"{fld}.{sorted(extra)[0]}", "unknown field")
        if "text" not in c:
            raise _Invalid(f"{fld}.text", "is required")
        text = _text(c["text"], f"{fld}.text")
        cid = _ident(c["id"], f"{fld}.id") if "id" in c else content_id(text)
        if cid in seen:
            what = "id" if "id" in c else "text"
            raise _Invalid(f"{fld}.{what}", f"duplicate completion {what} in this record")
        seen.add(cid)
        model = c.get("model")
        if model is not None:
            model = _text(model, f"{fld}.model", max_chars=MAX_MODEL_CHARS)
        params = _json_object(c.get("params"), f"{fld}.params")
        out.append(CompletionIn(cid, text, model, params))
    return out


def split_hh(transcript: str, fld: str) -> tuple[list[dict[str, str]], str]:
    """Split an HH-RLHF transcript at its last Assistant turn: (prompt messages, completion)."""
    _text(transcript, fld, max_chars=MAX_TEXT_CHARS * 4)
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Invalid(fld, "has no '\\n\\nAssistant:' turn")
    head, answer = transcript[:cut], transcript[cut + len(HH_ASSISTANT) :]
    parts = _HH_TURN.split(head)
    if parts[0].strip():
        raise _Invalid(fld, "must start with '\\n\\nHuman:'")
    messages = [
        {"role": "user" if who == "Human" else "assistant", "content": body.removeprefix(" ")}
        for who, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if not messages or messages[-1]["role"] != "user":
        raise _Invalid(fld, "the turn before the last Assistant turn must be a Human turn")
    for m in messages:
        if not m["content"].strip():
            raise _Invalid(fld, "has an empty turn")
    return messages, answer.removeprefix(" ")


def _hh_record(obj: dict[str, Any]) -> tuple[list[dict[str, str]], list[CompletionIn]]:
    extra = set(obj) - {"chosen", "rejected"}
    if extra:
        raise _Invalid(sorted(extra)[0], "unknown field in an HH-RLHF record")
    chosen_msgs, chosen = split_hh(obj["chosen"], "chosen")
    rejected_msgs, rejected = split_hh(obj["rejected"], "rejected")
    if chosen_msgs != rejected_msgs:
        raise _Invalid(
            "rejected", "the conversation before the last Assistant turn differs from 'chosen'"
        )
    out = []
    for fld, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _Invalid(fld, "the last Assistant turn is empty")
        cid = content_id(text)
        if out and out[0].external_id == cid:
            raise _Invalid("rejected", "is identical to 'chosen'")
        out.append(CompletionIn(cid, text))
    return chosen_msgs, out


def validate_record(line: int, obj: Any) -> PromptIn:
    """Turn one decoded record into a :class:`PromptIn`, or raise ``_Invalid``."""
    if not isinstance(obj, dict):
        raise _Invalid(None, f"a record must be a JSON object, not {_type_name(obj)}")
    if "chosen" in obj and "rejected" in obj and "prompt" not in obj:
        messages, completions = _hh_record(obj)
        return PromptIn(line, content_id(messages), False, messages, {}, completions)
    extra = set(obj) - RECORD_FIELDS
    if extra:
        name = sorted(extra)[0]
        raise _Invalid(name, "unknown field (put extra data under 'metadata')")
    if "prompt" not in obj:
        raise _Invalid("prompt", "is required")
    messages = _messages(obj["prompt"])
    explicit = "id" in obj and obj["id"] is not None
    ext = _ident(obj["id"], "id") if explicit else content_id(messages)
    return PromptIn(
        line,
        ext,
        explicit,
        messages,
        _json_object(obj.get("metadata"), "metadata"),
        _completions(obj.get("completions")),
    )


def parse_records(stream: io.BufferedReader) -> Iterator[PromptIn | RecordError]:
    """Validated records or errors, in file order; duplicate explicit ids are errors."""
    first_line: dict[str, int] = {}
    for line, value, err in iter_json_records(stream):
        if err is not None:
            yield err
            continue
        try:
            rec = validate_record(line, value)
        except _Invalid as e:
            yield RecordError(line, e.field, e.message)
            continue
        if rec.explicit_id:
            seen = first_line.setdefault(rec.external_id, line)
            if seen != line:
                yield RecordError(
                    line, "id", f"duplicate id {rec.external_id!r} (first on line {seen})"
                )
                continue
        yield rec
