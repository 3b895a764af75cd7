"""Question registry: questions are data (YAML), versioned, validated, hot-reloaded.

A bad edit never replaces a good registry: `QuestionRegistry.reload()` keeps the previous
version and reports why the new file was refused.

A question's (id, version) names what it asks: the version is part of every event_id (so
consumers that dedupe on event_id see a changed answer as new) and of the cache keys of what
is derived from the question. So a reload that changes a question's meaning (`MEANING_FIELDS`)
under the same version is refused, with a line that says to bump the version. How the answer is
decided (`threshold`, `band`, `top_k`, `head`) and which revisions answer it (`on`) may change in
place, and the log says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

OPEN = "open"  # the status of a chat still going; its revisions answer only real-time questions
# What a question asks: a change needs a new version.
MEANING_FIELDS = ("text", "query", "examples", "speakers", "applies_to")


class Examples(BaseModel):
    model_config = ConfigDict(extra="forbid")
    yes: list[str] = Field(default_factory=list)
    no: list[str] = Field(default_factory=list)


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    version: int = Field(ge=1)
    text: str = Field(min_length=5, max_length=500)
    # Text used to retrieve evidence; defaults to the question text.
    query: str | None = None
    top_k: int = Field(default=3, ge=1, le=20)
    # Only chunks containing a turn by one of these speakers are evidence (empty = any).
    speakers: list[str] = Field(default_factory=list)
    # Metadata selector: every key must match (a value or a list of accepted values).
    applies_to: dict[str, str | list[str]] = Field(default_factory=dict)
    examples: Examples = Field(default_factory=Examples)
    # Decision threshold on p_yes, and the uncertain band [low, high) sent to the LLM stage.
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    band: tuple[float, float] = (0.35, 0.65)
    # Trained head id (a directory name under the heads dir); None = zero-shot path.
    head: str | None = None
    # Which revisions answer it: closed ones only (the default), or open ones too (a real-time
    # question). The closing revision answers every question.
    on: list[Literal["open", "closed"]] = Field(default_factory=lambda: ["closed"])

    @field_validator("on")
    @classmethod
    def _on_closed(cls, v: list[str]) -> list[str]:
        if "closed" not in v:
            raise ValueError("on must include closed: the closing revision answers every question")
        return sorted(set(v), key=["open", "closed"].index)

    @field_validator("band")
    @classmethod
    def _band_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError("band must be [low, high] with 0 <= low <= high <= 1")
        return v

    def asked_at(self, status: str) -> bool:
        """Whether a revision with this status answers the question: an open revision answers only
        real-time questions; any other status (closed, or one this service does not know) all."""
        return status != OPEN or OPEN in self.on

    @property
    def retrieval_text(self) -> str:
        return self.query or self.text

    @property
    def meaning(self) -> str:
        """A digest of `MEANING_FIELDS`: two questions with the same one ask the same thing."""
        data = self.model_dump(include=set(MEANING_FIELDS), mode="json")
        key = yaml.safe_dump(data, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def applies(self, metadata: Mapping[str, Any]) -> bool:
        for key, accepted in self.applies_to.items():
            value = metadata.get(key)
            if isinstance(accepted, list):
                if value not in accepted:
                    return False
            elif value != accepted:
                return False
        return True


class QuestionSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    questions: list[Question] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> QuestionSet:
        ids = [q.id for q in self.questions]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate question ids: {', '.join(dupes)}")
        return self

    @property
    def version(self) -> str:
        """Changes whenever any question's id or version changes: part of every event_id."""
        key = ",".join(f"{q.id}@{q.version}" for q in sorted(self.questions, key=lambda q: q.id))
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def by_id(self) -> dict[str, Question]:
        return {q.id: q for q in self.questions}

    def applicable(self, metadata: Mapping[str, Any]) -> list[Question]:
        return [q for q in self.questions if q.applies(metadata)]


class QuestionFileError(ValueError):
    pass


def load_questions(path: str | Path) -> QuestionSet:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuestionFileError(f"questions file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QuestionFileError(f"questions file {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise QuestionFileError(f"questions file {path} is not valid YAML: {e}".splitlines()[0]) from None
    if isinstance(raw, list):
        raw = {"questions": raw}
    # YAML 1.1 reads unquoted `yes:` / `no:` / `on:` keys as booleans; accept them as written.
    for q in raw["questions"] if isinstance(raw, dict) and isinstance(raw.get("questions"), list) else []:
        if isinstance(q, dict) and True in q and "on" not in q:
            q["on"] = q.pop(True)
        ex = q.get("examples") if isinstance(q, dict) else None
        if isinstance(ex, dict):
            q["examples"] = {{True: "yes", False: "no"}.get(k, k): v for k, v in ex.items()}
    try:
        return QuestionSet.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise QuestionFileError(f"questions file {path}: {where}: {first['msg']}") from None


def changed_meaning(old: Question, new: Question) -> str | None:
    """The first meaning field that differs between two questions, or None."""
    return next((f for f in MEANING_FIELDS if getattr(old, f) != getattr(new, f)), None)


class QuestionRegistry:
    """Holds the current QuestionSet; `maybe_reload()` picks up edits by mtime (and SIGHUP calls reload).

    Every (id, version) loaded by this process is remembered with its meaning, so a question
    removed and brought back changed under its old version is refused too. (A restart starts
    afresh: the check is against what this process has served.)"""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._current = load_questions(self.path)
        self._mtime = self._stat()
        self.last_error: str | None = None
        self._served: dict[tuple[str, int], Question] = {(q.id, q.version): q for q in self._current.questions}
        self._lock = threading.Lock()  # reload runs in worker threads (a batch's check, SIGHUP)

    def _stat(self) -> float:
        try:
            return os.stat(self.path).st_mtime
        except FileNotFoundError:
            return -1.0

    @property
    def current(self) -> QuestionSet:
        return self._current

    def reload(self) -> bool:
        """Load the file again; on any error keep the previous set and remember why. True if it changed."""
        with self._lock:
            self._mtime = self._stat()
            try:
                new = load_questions(self.path)
                self._check_identity(new)
            except QuestionFileError as e:
                self.last_error = str(e)
                log.error("questions reload refused, keeping version %s: %s", self._current.version, e)
                return False
            self.last_error = None
            changed = new != self._current
            if changed:
                self._log_in_place(new)
                log.info("questions reloaded: version %s -> %s", self._current.version, new.version)
                self._current = new
                self._served.update({(q.id, q.version): q for q in new.questions})
            return changed

    def maybe_reload(self) -> bool:
        if self._stat() != self._mtime:
            return self.reload()
        return False

    def _check_identity(self, new: QuestionSet) -> None:
        for q in new.questions:
            old = self._served.get((q.id, q.version))
            field = changed_meaning(old, q) if old is not None else None
            if field is not None:
                raise QuestionFileError(
                    f"questions file {self.path}: question {q.id} changed its {field} but kept version "
                    f"{q.version}: bump its version to change what it asks (answers and event_ids depend on it)"
                )

    def _log_in_place(self, new: QuestionSet) -> None:
        current = self._current.by_id()
        for q in new.questions:
            old = current.get(q.id)
            if old is None or old.version != q.version:
                continue
            for f in ("threshold", "band", "top_k", "head", "on"):
                if getattr(old, f) != getattr(q, f):
                    log.info("question %s@%d: %s %r -> %r, applied in place (same version and event_ids)",
                             q.id, q.version, f, getattr(old, f), getattr(q, f))


def questions_from_sequence(items: Sequence[Question]) -> QuestionSet:
    return QuestionSet(questions=list(items))
