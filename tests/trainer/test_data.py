"""trainer/data.py: every source kind read the same way, pairs regrouped, ties kept out of the
loss, left truncation counted, splits that never leak a prompt."""

from __future__ import annotations

import gzip
import http.server
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tests.trainer.conftest import marker_rankings, write_jsonl
from trainer import data as D


def test_rankings_fixture_groups_ties_and_margins(fixtures_dir):
    ds = D.load_source(str(fixtures_dir / "export_rankings.jsonl"))
    assert ds.kind == "rankings"
    assert ds.rows == 4
    first = ds.comparisons[0]  # [[c], [a, b], [d]] with Likert c=7, a=5, b=5, d=1
    assert first.k == 4
    assert first.ties == 1
    assert first.ranks == [0, 1, 1, 2]
    assert len(first.pairs) == 5  # C(4,2) = 6 minus the tie a~b
    margins = {(first.completions[w][:5], first.completions[lo][:5]): m for w, lo, m in first.pairs}
    assert margins[("Chlor", "It is")] == 6.0  # Likert 7 − 1
    assert ds.ties_dropped == 1 + 0 + 1 + 2  # one tie, none, one, two (two tied groups of 2)


def test_rankings_chat_strength_and_all_tie_rows(fixtures_dir):
    ds = D.load_source(str(fixtures_dir / "export_rankings_chat.jsonl"))
    assert [c.pairs[0][2] for c in ds.comparisons] == [2.0, 1.0]  # K = 2 strengths
    assert ds.comparisons[0].prompt[0] == {
        "role": "system",
        "content": "You are a terse assistant.",
    }
    assert ds.no_strict_pair == 1  # the "both bad" tie: counted, never trained on


def test_pairs_regrouped_into_rankings(fixtures_dir):
    """The C(K,2) rows of one annotation become one comparison: each completion scored once,
    the same pairs and margins as the rankings export."""
    pairs = D.load_source(str(fixtures_dir / "export_pairs.jsonl"))
    ranks = D.load_source(str(fixtures_dir / "export_rankings.jsonl"))
    assert pairs.kind == "pairs"
    assert pairs.rows == 20
    assert [c.k for c in pairs.comparisons] == [4, 4, 4, 4]
    for p, r in zip(pairs.comparisons, ranks.comparisons, strict=True):
        as_text = lambda c: sorted(  # noqa: E731
            (c.completions[w], c.completions[lo], m) for w, lo, m in c.pairs
        )
        assert as_text(p) == as_text(r)


def test_pairs_tie_rows_are_dropped_and_counted(tmp_path, fixtures_dir):
    rows = [json.loads(line) for line in (fixtures_dir / "export_pairs.jsonl").open()]
    tie = {**rows[0], "margin": 0.0, "tie": True, "rejected_id": "x", "rejected": "tied"}
    ds = D.load_source(str(write_jsonl(tmp_path / "p.jsonl", [*rows[:5], tie])))
    assert ds.ties_dropped == 1
    assert len(ds.comparisons[0].pairs) == 5
    # margin 0 without the tie flag is a strict pair (ranked higher, same Likert)
    strict = {**tie, "tie": False}
    ds = D.load_source(str(write_jsonl(tmp_path / "q.jsonl", [*rows[:5], strict])))
    assert ds.ties_dropped == 0
    assert len(ds.comparisons[0].pairs) == 6


def test_chat_pairs_are_message_lists(fixtures_dir):
    ds = D.load_source(str(fixtures_dir / "export_pairs_chat.jsonl"))
    c = ds.comparisons[0]
    assert c.prompt[-1]["role"] == "user"
    assert c.completions == ["4", "Four, because two and two make four."]


def test_parquet_and_gzip_read_like_jsonl(tmp_path, fixtures_dir):
    rows = [json.loads(line) for line in (fixtures_dir / "export_pairs.jsonl").open()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress((fixtures_dir / "export_pairs.jsonl").read_bytes()))
    reference = D.load_source(str(fixtures_dir / "export_pairs.jsonl")).comparisons
    for source in (tmp_path / "pairs.parquet", gz):
        got = D.load_source(str(source)).comparisons
        assert [(c.completions, c.pairs) for c in got] == [
            (c.completions, c.pairs) for c in reference
        ]


def test_hh_gzip(tmp_path, fixtures_dir):
    gz = tmp_path / "hh.jsonl.gz"
    gz.write_bytes(gzip.compress((fixtures_dir / "export_hh.jsonl").read_bytes()))
    ds = D.load_source(str(gz))
    assert ds.kind == "hh"
    assert len(ds.comparisons) == 20
    c = ds.comparisons[0]
    assert c.prompt == [{"role": "user", "content": "Explain photosynthesis in one sentence."}]
    assert c.completions[0].startswith("Chlorophyll")
    assert c.pairs == [(0, 1, 1.0)]


def test_split_hh_multi_turn():
    messages, response = D.split_hh(
        "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: and?\n\nAssistant: bye"
    )
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "and?"},
    ]
    assert response == "bye"


class _ExportHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer secret-token":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"detail": "not authenticated"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_export_url_with_token(fixtures_dir, monkeypatch):
    _ExportHandler.body = (fixtures_dir / "export_rankings.jsonl").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ExportHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/api/v1/projects/p/export?format=rankings"
        with pytest.raises(D.DataError, match="HTTP 401"):
            D.load_source(url, token="wrong")
        ds = D.load_source(url, token="secret-token")
        assert ds.kind == "rankings"
        assert len(ds.comparisons) == 4
        monkeypatch.setenv("PREFERO_TOKEN", "secret-token")
        assert len(D.load_source(url).comparisons) == 4
    finally:
        server.shutdown()
        server.server_close()


def test_bad_rows_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n', "utf-8")
    with pytest.raises(D.DataError, match="line 2"):
        D.load_source(str(bad))
    with pytest.raises(D.DataError, match="unknown row format"):
        D.load_source(str(write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}])))


def test_reward_input_text_template_and_hh(tiny_model, tiny_model_plain):
    messages = [{"role": "user", "content": "hi"}]
    chat = AutoTokenizer.from_pretrained(tiny_model)
    plain = AutoTokenizer.from_pretrained(tiny_model_plain)
    assert D.reward_input_text(chat, messages, "yo") == (
        "<|begin|><|user|>hi<|end|><|assistant|>yo<|end|>"
    )
    assert D.reward_input_text(plain, messages, "yo") == "\n\nHuman: hi\n\nAssistant: yo"


def test_left_truncation_keeps_the_end_and_is_counted(tiny_model_plain):
    tok = AutoTokenizer.from_pretrained(tiny_model_plain)
    text = "The quick brown fox jumps over the lazy dog. " * 20 + "FINAL"
    full, cut = D.encode(tok, text, 10_000)
    assert not cut
    assert full[-1] == tok.eos_token_id
    short, cut = D.encode(tok, text, 16)
    assert cut
    assert len(short) == 16
    assert short == full[-16:]  # the start went, the end and EOS stayed
    comparisons = [
        D.Comparison([{"role": "user", "content": "x " * 200}], ["a", "b"], [(0, 1, 1.0)], "k1"),
        D.Comparison([{"role": "user", "content": "short"}], ["a", "b"], [(0, 1, 1.0)], "k2"),
    ]
    encoded = D.encode_comparisons(tok, comparisons, 32)
    assert [e.truncated for e in encoded] == [True, False]
    assert all(len(r) <= 32 for e in encoded for r in e.rows)


def test_split_by_prompt_never_leaks():
    rows = marker_rankings(60, k=3)
    for r in rows[:30]:  # several annotations per prompt
        r["prompt_id"] = f"p{int(r['prompt_id'][1:]) % 7}"
    comparisons = D.comparisons_from_rankings(rows).comparisons
    split = D.split_comparisons(comparisons, eval_fraction=0.3, seed=1)
    train_keys = {c.prompt_key for c in split.train}
    test_keys = {c.prompt_key for c in split.test}
    assert split.train
    assert split.test
    assert not train_keys & test_keys
    assert len(split.train) + len(split.test) == len(comparisons)
    exact = D.split_comparisons(comparisons, eval_fraction=0.0, test_size=10)
    assert len(exact.test) >= 10
    assert not {c.prompt_key for c in exact.train} & {c.prompt_key for c in exact.test}


def test_split_holds_out_annotators():
    rows = marker_rankings(80, k=2)
    for i, r in enumerate(rows):
        r["annotator"] = f"ann-{i % 5}"
    comparisons = D.comparisons_from_rankings(rows).comparisons
    split = D.split_comparisons(comparisons, eval_fraction=0.2, seed=0)
    assert len(split.heldout_annotators) == 1
    held = set(split.heldout_annotators)
    assert not any(c.annotator in held for c in split.train + split.test)
    assert split.test_annotators
    assert all(c.annotator in held for c in split.test_annotators)
    test_keys = {c.prompt_key for c in split.test + split.test_annotators}
    assert not test_keys & {c.prompt_key for c in split.train}
    total = len(split.train) + len(split.test) + len(split.test_annotators) + split.unused
    assert total == len(comparisons)


def test_length_grouped_batches_cover_everything_once():
    lengths = [5, 100, 7, 98, 6, 99, 8, 97] * 4
    batches = D.length_grouped_batches(lengths, 4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spreads) <= 3  # short and long never share a batch
    assert batches == D.length_grouped_batches(lengths, 4, seed=0)  # seeded
