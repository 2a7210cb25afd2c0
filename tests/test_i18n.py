"""The UI translations: English and Simplified Chinese have the same messages, every string
the templates, page routes and page script use is in both, and placeholders match."""

from __future__ import annotations

import re

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

from app.config import ROOT
from app.web import (
    ADMIN_JS_MESSAGES,
    JS_MESSAGES,
    LANGUAGES,
    TRANSLATIONS_DIR,
    js_catalog,
    translations,
)

JS_DIR = ROOT / "app" / "static" / "js"
PAGE_SCRIPTS = [("label.js", JS_MESSAGES), ("admin.js", ADMIN_JS_MESSAGES)]
"""Each page script with the strings handed to it (``app.web``)."""
PY_FORMAT = re.compile(r"%\((\w+)\)[sd]")
BRACE_FORMAT = re.compile(r"\{(\w+)\}")


def catalog(lang: str):
    with (TRANSLATIONS_DIR / lang / "LC_MESSAGES" / "messages.po").open("rb") as f:
        return read_po(f, locale=lang)


def keys(lang: str) -> set[str | tuple[str, ...]]:
    return {m.id if isinstance(m.id, str) else tuple(m.id) for m in catalog(lang) if m.id}


def extracted() -> set[str | tuple[str, ...]]:
    """What `pybabel extract -F app/translations/babel.cfg` finds in the code."""
    with (TRANSLATIONS_DIR / "babel.cfg").open() as f:
        method_map, options_map = parse_mapping_cfg(f)
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        ROOT, method_map, options_map
    ):
        found.add(message if isinstance(message, str) else tuple(message))
    return found


def test_both_languages_have_the_same_keys():
    assert set(LANGUAGES) == {"en", "zh_CN"}
    assert keys("en") == keys("zh_CN")


def test_every_string_in_the_code_is_in_the_catalogs_and_nothing_else():
    code = extracted()
    in_catalog = keys("en")
    assert code - in_catalog == set(), "untranslated: run pybabel update (see README)"
    assert in_catalog - code == set(), "stale messages in the catalogs"


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_every_message_is_translated_with_the_same_placeholders(lang):
    for message in catalog(lang):
        if not message.id:
            continue
        ids = [message.id] if isinstance(message.id, str) else list(message.id)
        strings = [message.string] if isinstance(message.string, str) else list(message.string)
        assert all(s.strip() for s in strings), f"{lang}: no translation for {ids[0]!r}"
        assert not message.fuzzy, f"{lang}: fuzzy translation of {ids[0]!r}"
        for pattern in (PY_FORMAT, BRACE_FORMAT):
            wanted = set(pattern.findall(ids[0]))
            for s in strings:
                assert set(pattern.findall(s)) == wanted, f"{lang}: placeholders of {ids[0]!r}"


def test_catalogs_compile_and_translate():
    assert translations("zh_CN").gettext("Submit") == "提交"
    assert translations("en").gettext("Submit") == "Submit"
    assert translations("zh_CN").ngettext("You have labeled %(count)s task.", "x", 3) == (
        "你已标注 %(count)s 个任务。"
    )
    with pytest.raises(KeyError):
        translations("fr")


@pytest.mark.parametrize(("script", "messages"), PAGE_SCRIPTS, ids=[s for s, _ in PAGE_SCRIPTS])
def test_the_page_script_uses_exactly_its_js_catalog(script, messages):
    source = (JS_DIR / script).read_text(encoding="utf-8")
    used = set(re.findall(r'\bt\(\s*"((?:[^"\\]|\\.)*)"', source))
    assert used, f'no t("…") calls found in {script}'
    assert used - set(messages) == set(), f"{script} strings missing from its list in app.web"
    unused = {m for m in messages if f'"{m}"' not in source}
    assert unused == set(), f"entries of its list in app.web that {script} never uses"
    assert len(set(messages)) == len(messages)


@pytest.mark.parametrize(("script", "messages"), PAGE_SCRIPTS, ids=[s for s, _ in PAGE_SCRIPTS])
def test_js_catalog_is_complete_in_both_languages(script, messages):
    en, zh = js_catalog("en", messages), js_catalog("zh_CN", messages)
    assert set(en) == set(zh) == set(messages)
    assert all(en[m] == m for m in messages)
    translated = [m for m in messages if zh[m] != m]
    assert len(translated) == len(messages), set(messages) - set(translated)


def test_the_default_js_catalog_is_the_labeling_pages():
    assert set(js_catalog("en")) == set(JS_MESSAGES)
    assert js_catalog("zh_CN", ADMIN_JS_MESSAGES)["Queued"] == "排队中"
