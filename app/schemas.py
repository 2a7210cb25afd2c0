"""Pydantic schemas for the API: XCreate / XRead / XUpdate. ORM models live in ``app.models``."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from app.models import DEFAULT_FLAGS, AnnotationStatus, JobStatus, Role

MAX_ID = 2**63 - 1
"""Largest database id (BIGINT); path and cursor ids above it are rejected, not overflowed."""


def _storable(value: str) -> str:
    """Reject what neither database can store: NUL characters and unpaired surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (unpaired surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]
Slug = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"),
    Field(description="Lower-case letters, digits and '-', 1–64 characters, e.g. 'helpful-v1'."),
]
Username = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"),
    Field(description="1–64 characters: letters, digits, '_', '.', '@', '-'."),
]
Flag = Annotated[Text, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


def _check_unique_flags(flags: list[str]) -> list[str]:
    if len(set(flags)) != len(flags):
        raise ValueError("flags must be unique")
    return flags


class _Orm(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectSettings(_Strict):
    guidelines: Text = Field("", max_length=200_000, description="Markdown shown to annotators.")
    completions_per_task: int = Field(4, ge=2, le=9, description="K completions ranked per task.")
    overlap: int = Field(3, ge=1, le=100, description="Annotations wanted per prompt.")
    allow_ties: bool = True
    likert: bool = Field(True, description="Ask for a 1–7 Likert score per completion.")
    flags: list[Flag] = Field(default_factory=lambda: list(DEFAULT_FLAGS), max_length=50)
    require_rationale: bool = False
    lease_seconds: int = Field(600, ge=30, le=86_400, description="How long a task is held.")
    system_prompt: Text = Field(
        "", max_length=20_000, description="Sent to the model before each prompt when generating."
    )
    instruction_template: Text = Field(
        "",
        max_length=20_000,
        description="Wraps the prompt for generation; '{prompt}' marks where it goes.",
    )

    @field_validator("flags")
    @classmethod
    def _unique_flags(cls, v: list[str]) -> list[str]:
        return _check_unique_flags(v)


class ProjectCreate(ProjectSettings):
    members_only: bool = Field(
        False, description="Only members (POST /projects/{slug}/members) may label."
    )
    name: Text = Field(min_length=1, max_length=200)
    slug: Slug


class ProjectUpdate(_Strict):
    name: Text | None = Field(None, min_length=1, max_length=200)
    guidelines: Text | None = Field(None, max_length=200_000)
    completions_per_task: int | None = Field(None, ge=2, le=9)
    overlap: int | None = Field(None, ge=1, le=100)
    allow_ties: bool | None = None
    likert: bool | None = None
    flags: list[Flag] | None = Field(None, max_length=50)
    require_rationale: bool | None = None
    lease_seconds: int | None = Field(None, ge=30, le=86_400)
    system_prompt: Text | None = Field(None, max_length=20_000)
    instruction_template: Text | None = Field(None, max_length=20_000)
    members_only: bool | None = None

    @field_validator("flags")
    @classmethod
    def _unique_flags(cls, v: list[str] | None) -> list[str] | None:
        return _check_unique_flags(v) if v is not None else v


class ProjectRead(_Orm):
    id: int
    name: str
    slug: str
    guidelines: str
    completions_per_task: int
    overlap: int
    allow_ties: bool
    likert: bool
    flags: list[str]
    require_rationale: bool
    lease_seconds: int
    system_prompt: str
    instruction_template: str
    members_only: bool
    created_at: datetime


class ProjectDetail(ProjectRead):
    prompt_count: int
    completion_count: int
    annotation_count: int


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class CompletionRead(_Orm):
    id: int
    external_id: str
    text: str
    model: str | None
    params: dict[str, Any]
    backend: str | None
    input_text: str | None
    job_id: int | None
    created_at: datetime


class AnnotationRead(_Orm):
    id: int
    user_id: int
    lease_id: int | None
    revision: int
    supersedes_id: int | None
    status: AnnotationStatus
    ranking: list[list[int]]
    likert: dict[str, int]
    flags: dict[str, list[str]]
    rationale: str
    display_order: list[int]
    duration_ms: int | None
    skip_reason: str | None
    strength: int | None
    both_bad: bool
    created_at: datetime


class PromptRead(_Orm):
    id: int
    project_id: int
    external_id: str
    messages: list[Message]
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    created_at: datetime


class PromptDetail(PromptRead):
    completions: list[CompletionRead]
    annotations: list[AnnotationRead]


class PromptPage(BaseModel):
    items: list[PromptRead]
    next: str | None = Field(description="Pass as ?after= for the next page; null at the end.")


class ImportResult(BaseModel):
    created: int = Field(description="Prompts created.")
    skipped: int = Field(description="Prompts already present (same id), left as they were.")
    completions_created: int
    completions_skipped: int


class UserCreate(_Strict):
    username: Username
    password: Text | None = Field(
        None, min_length=8, max_length=1024, description="Omit for a token-only account."
    )
    role: Role = Role.annotator


class UserRead(_Orm):
    id: int
    username: str
    role: Role
    active: bool
    created_at: datetime


class UserUpdate(_Strict):
    active: bool = Field(
        description="false deactivates the account: its browser sessions end at once and its "
        "tokens are refused until it is reactivated (true)."
    )


class TokenCreate(_Strict):
    name: Text = Field("api", min_length=1, max_length=100)


class TokenRead(_Orm):
    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenRead):
    token: str = Field(description="The secret. Shown once; only its hash is stored.")


class AuditEventRead(_Orm):
    """An admin action from the audit log (``GET /api/v1/audit``)."""

    id: int
    created_at: datetime
    actor: str = Field(description="The admin's username, or 'cli' for the command line.")
    actor_id: int | None
    action: str = Field(description="What was done, e.g. 'project.update' (docs/api.md).")
    target_type: Literal["project", "user"]
    target_id: int | None
    target_label: str = Field(description="The project's slug or the user's name.")
    details: dict[str, Any] = Field(
        description="Parameters and counts; never secrets nor prompt or annotation text."
    )


class AuditPage(BaseModel):
    items: list[AuditEventRead] = Field(description="Newest first.")
    next: str | None = Field(description="Pass as ?after= for the next page; null at the end.")


class ErrorItem(BaseModel):
    line: int | None = Field(None, description="1-based line of an imported file.")
    field: str | None = Field(description="Where, e.g. 'body.slug' or 'prompt[0].role'.")
    message: str


class ErrorBody(BaseModel):
    """Every error answer (4xx, 503)."""

    detail: str
    errors: list[ErrorItem] | None = Field(None, description="422: the problems, at most 100.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None
    database: str | None = None
    migration: str | None = None


ModelName = Annotated[Text, StringConstraints(min_length=1, max_length=500)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]


class GenerationParams(_Strict):
    temperature: Temperature | list[Temperature] = Field(
        0.7,
        description="One value, or one per completion slot (cycled): e.g. [0.3, 0.7, 1.0, 1.2] "
        "for diverse completions. 0 = greedy.",
    )
    top_p: TopP | list[TopP] = 0.95
    max_new_tokens: int = Field(256, ge=1, le=4096)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Completion slot i uses seed + i.")

    @field_validator("temperature", "top_p")
    @classmethod
    def _non_empty(cls, v: float | list[float]) -> float | list[float]:
        if isinstance(v, list) and not 1 <= len(v) <= 16:
            raise ValueError("give 1 to 16 values")
        return v


class JobCreate(_Strict):
    model: ModelName | list[ModelName] = Field(
        "smollm2-135m-instruct",
        description="The built-in 'smollm2-135m-instruct', a local model directory (e.g. a "
        "policy written by prefero-train), a hub name, or a model served by the openai backend. "
        "A list cycles over the completion slots.",
    )
    backend: Literal["transformers", "openai"] = "transformers"
    k: int | None = Field(
        None, ge=1, le=16, description="Completions per prompt (default: the project's K)."
    )
    params: GenerationParams = Field(default_factory=GenerationParams)
    prompt_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(
        None, max_length=100_000, description="Only these prompts (default: all of them)."
    )

    @field_validator("model")
    @classmethod
    def _models(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= 16:
            raise ValueError("give 1 to 16 models")
        return v

    def model_list(self) -> list[str]:
        return [self.model] if isinstance(self.model, str) else list(self.model)


class JobRead(_Orm):
    id: int
    project_id: int
    status: JobStatus
    backend: str
    models: list[str]
    k: int
    params: dict[str, Any]
    total: int = Field(description="Prompts to generate for.")
    done: int = Field(description="Prompts done so far.")
    completions_created: int
    duplicates_dropped: int
    errors: list[dict[str, Any]]
    message: str
    cancel_requested: bool
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


# --- labeling -------------------------------------------------------------------------------


def _not_bool(value: Any) -> Any:
    """JSON ``true`` is not a number (pydantic's lax mode would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


NotBool = BeforeValidator(_not_bool)
CompletionId = Annotated[int, Field(ge=1, le=MAX_ID), NotBool]


class TaskCompletion(BaseModel):
    id: int
    label: str = Field(description="A, B, C, … in display order.")
    text: str


class TaskPrompt(BaseModel):
    id: int
    messages: list[Message]


class Task(BaseModel):
    lease_id: int
    expires_at: datetime
    prompt: TaskPrompt
    completions: list[TaskCompletion] = Field(
        description="In this lease's display order (random per lease, stored with it)."
    )


class SubmitAnnotation(_Strict):
    ranking: list[list[CompletionId]] = Field(
        min_length=1,
        max_length=16,
        description="Groups of completion ids, best first; a group of several ids is a tie.",
    )
    likert: dict[str, Annotated[int, Field(ge=1, le=7), NotBool]] = Field(
        default_factory=dict, description="Completion id → 1–7 (when the project asks for it)."
    )
    flags: dict[str, list[Flag]] = Field(
        default_factory=dict, description="Completion id → flags from the project's list."
    )
    rationale: Text = Field("", max_length=20_000)
    duration_ms: Annotated[int | None, NotBool] = Field(None, ge=0, le=7 * 24 * 3600 * 1000)
    strength: Annotated[Literal[1, 2] | None, NotBool] = Field(
        None, description="Pairwise tasks (K = 2): 1 = slightly better, 2 = much better."
    )
    both_bad: bool = Field(
        False, description="Pairwise tasks: both completions are bad (ranking must be a tie)."
    )


class SkipTask(_Strict):
    reason: Text = Field("", max_length=2_000)
    duration_ms: int | None = Field(None, ge=0, le=7 * 24 * 3600 * 1000)


class AnnotationCreated(BaseModel):
    annotation_id: int
    lease_id: int


class LeaseRead(BaseModel):
    lease_id: int
    expires_at: datetime


class Members(_Strict):
    usernames: list[Username] = Field(min_length=1, max_length=10_000)


class ProjectProgress(BaseModel):
    """A project as an annotator sees it on their home page."""

    slug: str
    name: str
    prompt_count: int
    complete_count: int = Field(description="Prompts with all the annotations they need.")
    my_count: int = Field(description="Prompts this annotator has annotated or skipped.")
    available: bool = Field(description="There is at least one task left for this annotator.")


class LabelContext(BaseModel):
    """What the labeling page needs besides the task itself."""

    slug: str
    name: str
    guidelines: str
    completions_per_task: int
    allow_ties: bool
    likert: bool
    flags: list[str]
    require_rationale: bool
    lease_seconds: int
    prompt_count: int
    complete_count: int
    my_count: int
    pending_generation: int = Field(description="Prompts still waiting for their completions.")


class ExportParams(_Strict):
    """Query parameters of ``GET /api/v1/projects/{slug}/export`` (and ``prefero export``)."""

    format: Literal["pairs", "rankings", "consensus", "hh"] = Field(
        "pairs",
        description="pairs: one row per comparison; rankings: one per annotation; consensus: "
        "one per prompt; hh: Anthropic HH-RLHF {chosen, rejected} transcripts.",
    )
    file: Literal["jsonl", "parquet"] = Field(
        "jsonl", description="jsonl (streamed, application/x-ndjson) or parquet."
    )
    split: Literal["all", "train", "test"] = Field(
        "all", description="Prompts on this side of the split (by prompt id and seed)."
    )
    test_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of prompts in test.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the train/test split.")
    ties: Literal["drop", "keep"] = Field(
        "drop", description="pairs only: keep adds tied pairs with margin 0 and tie true."
    )
    min_agreement: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Keep prompts whose annotators agree on at least this fraction of pairs; "
        "above 0, prompts with a single annotator (no agreement) are left out.",
    )
    since: datetime | None = Field(
        None, description="Only annotations created after this time (ISO 8601; UTC if naive)."
    )
    prompt_format: Literal["auto", "chat"] = Field(
        "auto",
        description="auto: prompts are strings when every prompt of the project is one user "
        "message, else message lists; chat: always message lists.",
    )


# --- quality metrics (app/services/stats.py; definitions in docs/metrics.md) ----------------


class SkipReasonCount(BaseModel):
    reason: str | None = Field(description="Trimmed, lower-cased; null = no reason given.")
    count: int


class DayCount(BaseModel):
    day: date = Field(description="UTC day the (current) annotation was recorded.")
    submitted: int
    skipped: int


class ProgressStats(BaseModel):
    prompts: int
    complete: int = Field(description="Prompts with annotation_count ≥ overlap.")
    in_progress: int = Field(description="Started (an annotation or an open lease), not complete.")
    untouched: int
    submitted: int = Field(description="Current submitted annotations.")
    skipped: int = Field(description="Current skipped annotations.")
    skip_rate: float | None = Field(description="skipped / (submitted + skipped).")
    median_duration_ms: float | None = Field(description="Of current submitted annotations.")
    skip_reasons: list[SkipReasonCount]
    days: list[DayCount]


class PairwiseAgreementStats(BaseModel):
    agree: int
    compared: int = Field(description="(annotator pair, completion pair) both ranked strictly.")
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    prompts: int = Field(description="Prompts ranked by at least two annotators.")


class AgreementStats(BaseModel):
    pairwise: PairwiseAgreementStats
    ranking_alpha: float | None = Field(description="Krippendorff's alpha (ordinal), ranks.")
    likert_alpha: float | None = Field(description="Krippendorff's alpha (interval), Likert.")
    likert_pairs: int
    likert_exact: float | None
    likert_within_one: float | None
    resamples: int
    seed: int


class BiasStats(BaseModel):
    first_shown_wins: int
    first_shown_n: int
    position_rate: float | None = Field(description="Share where the first-shown one wins.")
    position_expected: float | None = Field(description="That share without any bias (≈ 1/K).")
    position_p: float | None = Field(description="Two-sided binomial p-value.")
    longer_wins: int
    length_pairs: int
    length_rate: float | None = Field(description="Strict pairs the longer completion won.")
    length_p: float | None


class AnnotatorStats(BiasStats):
    user_id: int
    username: str
    pseudonym: str = Field(description="The annotator's pseudonym in exports.")
    submitted: int
    skipped: int
    median_duration_ms: float | None
    agreement_agree: int
    agreement_compared: int
    agreement: float | None = Field(description="Pairwise agreement with the other annotators.")
    consensus_agree: int
    consensus_compared: int
    consensus: float | None = Field(description="Agreement with the others' majority (LOO).")
    flagged: int = Field(description="Submitted annotations with at least one flag.")
    flag_rate: float | None
    outlier: bool
    outlier_reasons: list[Literal["low_agreement", "position_bias"]]


class ModelStats(BaseModel):
    model: str
    rank: int
    strength: float = Field(description="Bradley–Terry log-strength (mean 0 over the models).")
    ci_low: float | None
    ci_high: float | None
    wins: int
    comparisons: int
    win_rate: float | None


class ModelPairStats(BaseModel):
    model: str
    opponent: str
    wins: int
    losses: int
    win_rate: float | None


class FlagCount(BaseModel):
    flag: str
    count: int


class OutlierRule(BaseModel):
    mads: float
    mad_floor: float
    min_pairs: int
    min_annotators: int
    bias_p: float
    median: float | None = Field(description="Median consensus agreement of eligible annotators.")
    threshold: float | None = Field(description="Below this consensus agreement: an outlier.")


class ProjectStats(BaseModel):
    slug: str
    name: str
    completions_per_task: int
    overlap: int
    generated_at: datetime
    progress: ProgressStats
    agreement: AgreementStats
    bias: BiasStats
    annotators: list[AnnotatorStats]
    models: list[ModelStats]
    model_pairs: list[ModelPairStats]
    flags: list[FlagCount]
    outlier_rule: OutlierRule
