"""app.services.audit: every admin-mutating service writes exactly one audit event, with the
actor, action and target, in the action's own transaction (both commit or neither does); a
failed action writes none; details hold no secrets nor prompt text; the keyset query and its
filters (on SQLite and PostgreSQL)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from functools import partial

import orjson
import pytest
from sqlalchemy import select

from app.errors import Conflict, DomainError, ImportRejected, InvalidInput, NotFound
from app.models import AuditEvent, JobStatus, Project, Role, User
from app.schemas import ExportParams, JobCreate, ProjectCreate, ProjectUpdate
from app.services import audit, exports, generation, imports, members, projects, users
from tests.factories import count, make_project, make_prompt, make_user

SECRET = "export-test-secret"
PROMPT_TEXT = "A very private prompt about the quarterly numbers"


def events(session) -> list[AuditEvent]:
    session.expire_all()
    return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


class Log:
    """Asserts that each step adds exactly one event, and returns it."""

    def __init__(self, session) -> None:
        self.session = session
        self.seen = len(events(session))

    def one(self) -> AuditEvent:
        now = events(self.session)
        new = now[self.seen :]
        self.seen = len(now)
        assert len(new) == 1, [(e.action, e.target_label) for e in new]
        return new[0]

    def none(self) -> None:
        assert len(events(self.session)) == self.seen


def jsonl(*records: dict) -> io.BytesIO:
    return io.BytesIO(b"".join(orjson.dumps(r) + b"\n" for r in records))


def assert_event(event, *, actor, action, target_type, target, target_id=None):
    assert (event.actor, event.action, event.target_type, event.target_label) == (
        actor,
        action,
        target_type,
        target,
    )
    if target_id is not None:
        assert event.target_id == target_id
    assert event.created_at.tzinfo is not None
    assert abs(datetime.now(UTC) - event.created_at) < timedelta(minutes=5)


def test_record_joins_the_callers_transaction_and_never_commits(session):
    admin = make_user(session, role=Role.admin, username="root")
    event = audit.record(
        session,
        actor=admin,
        action="user.create",
        target_type="user",
        target_id=admin.id,
        target_label=admin.username,
        details={"role": "admin"},
    )
    assert event in session.new  # added, not flushed nor committed
    session.rollback()
    assert count(session, AuditEvent) == 0
    audit.record(
        session,
        actor=None,
        action="user.create",
        target_type="user",
        target_id=None,
        target_label="x",
    )
    session.commit()
    (saved,) = events(session)
    assert (saved.actor, saved.actor_id, saved.details) == ("cli", None, {})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"action": "project.delete"}, "unknown audit action"),
        ({"target_type": "prompt"}, "unknown audit target type"),
        ({"details": {"token": "pf_x"}}, "must not hold secrets"),
        ({"details": {"password": "hunter22"}}, "must not hold secrets"),
    ],
)
def test_record_refuses_unknown_actions_and_secret_keys(session, fields, message):
    args = {
        "actor": None,
        "action": "user.create",
        "target_type": "user",
        "target_id": None,
        "target_label": "x",
    }
    with pytest.raises(ValueError, match=message):
        audit.record(session, **(args | fields))
    assert not session.new


def test_every_admin_action_writes_exactly_one_event(session):
    admin = make_user(session, role=Role.admin, username="root")
    log = Log(session)

    project = projects.create_project(
        session,
        data=ProjectCreate(slug="audited", name="Audited", guidelines="Be kind. " * 10),
        actor=admin,
    )
    e = log.one()
    assert_event(
        e,
        actor="root",
        action="project.create",
        target_type="project",
        target="audited",
        target_id=project.id,
    )
    assert e.actor_id == admin.id
    assert e.details["name"] == "Audited"
    assert e.details["guidelines"] == {"chars": 90}  # the text itself stays out

    projects.update_project(
        session, slug="audited", data=ProjectUpdate(overlap=5, guidelines="Short."), actor=admin
    )
    e = log.one()
    assert_event(e, actor="root", action="project.update", target_type="project", target="audited")
    assert e.details == {
        "changes": {
            "overlap": {"from": 3, "to": 5},
            "guidelines": {"from_chars": 90, "to_chars": 6},
        }
    }

    ann = make_user(session, username="ann")
    members.add_members(session, slug="audited", usernames=["ann", "ann"], actor=admin)
    e = log.one()
    assert_event(e, actor="root", action="member.add", target_type="project", target="audited")
    assert e.details == {"usernames": ["ann"]}
    members.remove_members(session, slug="audited", usernames=["ann"], actor=admin)
    assert log.one().action == "member.remove"

    result = imports.import_prompts(
        session,
        project_slug="audited",
        source=jsonl(
            {
                "id": "p1",
                "prompt": PROMPT_TEXT,
                "completions": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}],
            }
        ),
        max_bytes=10**6,
        actor=admin,
    )
    e = log.one()
    assert_event(e, actor="root", action="prompts.import", target_type="project", target="audited")
    assert (
        e.details
        == result.model_dump()
        == {
            "created": 1,
            "skipped": 0,
            "completions_created": 2,
            "completions_skipped": 0,
        }
    )

    job = generation.create_job(
        session, project_slug="audited", data=JobCreate(model="fake", k=2), actor=admin
    )
    assert job.created_by_id == admin.id
    e = log.one()
    assert_event(e, actor="root", action="job.create", target_type="project", target="audited")
    assert e.details["job_id"] == job.id
    assert e.details["prompts"] == 1
    generation.cancel_job(session, job_id=job.id, actor=admin)
    e = log.one()
    assert (e.action, e.details) == ("job.cancel", {"job_id": job.id, "status": "cancelled"})

    export = exports.open_export(
        session,
        project_slug="audited",
        params=ExportParams(format="rankings", split="train", seed=7),
        secret=SECRET,
        actor=admin,
    )
    list(export.rows())  # the snapshot rolls back; the audit row was committed before it
    e = log.one()
    assert_event(e, actor="root", action="project.export", target_type="project", target="audited")
    assert e.details["format"] == "rankings"
    assert e.details["seed"] == 7

    created = users.create_user(
        session, username="carl", role=Role.annotator, password="long enough", actor=admin
    )
    e = log.one()
    assert_event(
        e,
        actor="root",
        action="user.create",
        target_type="user",
        target="carl",
        target_id=created.id,
    )
    assert e.details == {"role": "annotator", "can_log_in": True}

    users.set_user_active(session, username="carl", active=False, actor=admin)
    e = log.one()
    assert (e.action, e.target_label, e.details["was_active"]) == ("user.deactivate", "carl", True)
    users.set_user_active(session, username="carl", active=True, actor=admin)
    assert log.one().action == "user.activate"

    token, secret = users.create_token(session, username="carl", name="laptop", actor=admin)
    e = log.one()
    assert_event(e, actor="root", action="token.create", target_type="user", target="carl")
    assert e.details == {"token_id": token.id, "name": "laptop"}
    users.revoke_token(session, token_id=token.id, actor=admin)
    e = log.one()
    assert (e.action, e.target_label, e.details["already_revoked"]) == (
        "token.revoke",
        "carl",
        False,
    )
    other, _ = users.create_token(session, username="ann", name="phone", actor=admin)
    log.one()
    users.revoke_user_token(session, username="ann", token_id=other.id, actor=admin)
    e = log.one()
    assert (e.action, e.target_label, e.target_id) == ("token.revoke", "ann", ann.id)

    # Nothing secret nor prompt text anywhere in the log.
    dumped = orjson.dumps([e.details for e in events(session)]).decode()
    assert secret not in dumped
    assert "long enough" not in dumped
    assert PROMPT_TEXT not in dumped
    assert "Be kind" not in dumped


def test_the_command_line_is_recorded_as_cli(session):
    log = Log(session)
    projects.create_project(session, data=ProjectCreate(slug="from-cli", name="CLI"))
    users.create_user(session, username="cli-made", role=Role.admin)
    assert [(e.actor, e.actor_id) for e in events(session)[log.seen :]] == [
        ("cli", None),
        ("cli", None),
    ]


def test_failed_actions_write_no_event(session):
    admin = make_user(session, role=Role.admin, username="root")
    make_project(session, slug="taken")
    make_project(session, slug="empty")
    log = Log(session)
    as_admin = {"actor": admin}
    export = partial(exports.open_export, session, secret=SECRET, **as_admin)
    upload = partial(imports.import_prompts, session, max_bytes=10**6, **as_admin)
    failures = [
        (Conflict, partial(projects.create_project, session,
                           data=ProjectCreate(slug="taken", name="x"), **as_admin)),
        (NotFound, partial(projects.update_project, session, slug="nope",
                           data=ProjectUpdate(overlap=2), **as_admin)),
        (InvalidInput, partial(members.add_members, session, slug="taken",
                               usernames=["ghost"], **as_admin)),
        (NotFound, partial(members.remove_members, session, slug="nope",
                           usernames=["root"], **as_admin)),
        (ImportRejected, partial(upload, project_slug="taken", source=jsonl({"id": "p"}))),
        (InvalidInput, partial(upload, project_slug="taken", source=io.BytesIO(b"\x00\xff{"))),
        (NotFound, partial(upload, project_slug="nope", source=jsonl({"prompt": "x"}))),
        (InvalidInput, partial(generation.create_job, session, project_slug="empty",
                               data=JobCreate(model="fake"), **as_admin)),
        (NotFound, partial(generation.cancel_job, session, job_id=10**9, **as_admin)),
        (InvalidInput, partial(export, project_slug="taken",
                               params=ExportParams(format="rankings", ties="keep"))),
        (NotFound, partial(export, project_slug="nope", params=ExportParams())),
        (Conflict, partial(users.create_user, session, username="root", role=Role.admin,
                           **as_admin)),
        (Conflict, partial(users.set_user_active, session, username="root", active=False,
                           **as_admin)),
        (NotFound, partial(users.set_user_active, session, username="nobody", active=False,
                           **as_admin)),
        (NotFound, partial(users.create_token, session, username="nobody", **as_admin)),
        (NotFound, partial(users.revoke_token, session, token_id=10**9, **as_admin)),
        (NotFound, partial(users.revoke_user_token, session, username="root", token_id=10**9,
                           **as_admin)),
    ]  # fmt: skip
    for error, action in failures:
        with pytest.raises(error):
            action()
        session.rollback()
        log.none()


def test_a_finished_job_cannot_be_cancelled_and_writes_no_event(session):
    admin = make_user(session, role=Role.admin)
    project = make_project(session)
    make_prompt(session, project)
    job = generation.create_job(
        session, project_slug=project.slug, data=JobCreate(model="fake"), actor=admin
    )
    generation.cancel_job(session, job_id=job.id, actor=admin)
    log = Log(session)
    with pytest.raises(Conflict):
        generation.cancel_job(session, job_id=job.id, actor=admin)
    log.none()
    assert session.get(type(job), job.id).status == JobStatus.cancelled


def test_an_action_rolls_back_with_its_audit_row(session, monkeypatch):
    """The audit row is written in the action's transaction: if it cannot be written, the
    action is not committed either."""
    admin = make_user(session, role=Role.admin)

    def broken(*args, **kwargs):
        raise RuntimeError("audit log unavailable")

    monkeypatch.setattr(audit, "record", broken)
    with pytest.raises(RuntimeError):
        projects.create_project(session, data=ProjectCreate(slug="ghost", name="G"), actor=admin)
    session.rollback()
    with pytest.raises(RuntimeError):
        users.create_user(session, username="ghost", role=Role.admin, actor=admin)
    session.rollback()
    project = make_project(session)
    with pytest.raises(RuntimeError):
        imports.import_prompts(
            session,
            project_slug=project.slug,
            source=jsonl({"id": "p", "prompt": "x", "completions": []}),
            max_bytes=10**6,
            actor=admin,
        )
    session.rollback()
    session.expire_all()
    assert session.scalar(select(Project).where(Project.slug == "ghost")) is None
    assert session.scalar(select(User).where(User.username == "ghost")) is None
    assert projects.project_detail(session, slug=project.slug).prompt_count == 0
    assert count(session, AuditEvent) == 0


# --------------------------------------------------------------------------- the query


def _seed(session):
    root = make_user(session, role=Role.admin, username="root")
    eve = make_user(session, role=Role.admin, username="eve")
    for i in range(4):
        projects.create_project(session, data=ProjectCreate(slug=f"p{i}", name="P"), actor=root)
    users.create_user(session, username="u1", role=Role.annotator, actor=eve)
    users.create_token(session, username="u1", actor=eve)
    members.add_members(session, slug="p1", usernames=["u1"], actor=eve)
    users.create_user(session, username="u2", role=Role.annotator)  # the CLI
    return root, eve


def test_keyset_pages_newest_first_without_gaps_or_repeats(session):
    _seed(session)
    seen, after, pages = [], None, 0
    while True:
        page = audit.list_events(session, after=after, limit=3)
        pages += 1
        seen += [e.id for e in page.items]
        if page.next is None:
            break
        after = page.next
    assert pages == 3
    assert seen == sorted(seen, reverse=True)
    assert seen == [e.id for e in reversed(events(session))]


def test_filters(session):
    _seed(session)

    def actions(**filters):
        return [
            (e.actor, e.action, e.target_label) for e in audit.list_events(session, **filters).items
        ]

    assert [a for _, a, _ in actions(actor="eve")] == [
        "member.add",
        "token.create",
        "user.create",
    ]
    assert actions(actor="cli") == [("cli", "user.create", "u2")]
    assert [t for _, _, t in actions(action="user.create")] == ["u2", "u1"]
    assert [a for _, a, _ in actions(action="user")] == ["user.create", "user.create"]
    assert actions(action="token") == [("eve", "token.create", "u1")]
    assert [a for _, a, _ in actions(target_type="user", target="u1")] == [
        "token.create",
        "user.create",
    ]
    assert [a for _, a, _ in actions(target="p1")] == ["member.add", "project.create"]
    assert len(actions(target_type="project")) == 5
    assert actions(actor="eve", action="project") == []
    assert len(actions(since=datetime.now(UTC) - timedelta(minutes=5))) == 8
    assert actions(since=datetime.now(UTC) + timedelta(minutes=5)) == []
    naive_past = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=5)
    assert len(actions(since=naive_past)) == 8  # naive = UTC


@pytest.mark.parametrize(
    "bad",
    [
        {"limit": 0},
        {"limit": audit.MAX_PAGE + 1},
        {"after": "abc"},
        {"after": "-1"},
        {"after": str(2**63)},
        {"action": "project.delete"},
        {"action": "%"},
        {"target_type": "prompt"},
        {"actor": "root\x00"},
        {"target": "\x00"},
        {"since": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-23)))},
        {"since": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))},
    ],
)
def test_bad_query_parameters_are_rejected(session, bad):
    with pytest.raises(DomainError) as info:
        audit.list_events(session, **bad)
    assert info.value.status == 422
