"""Prompt templates: versioned files, fixed instructions first, quoted evidence, question last.

Layout of every prompt (templates/NAME.vN.txt):
1. a fixed instruction prefix, identical for every prompt of a template, so the engine's
   prefix / KV-block reuse applies across a batch;
2. the conversation material, quoted between tags. Evidence excerpts lose the sentences that
   address the model (``guard.strip_instructions``; the seed baseline's transcript is kept raw,
   as the seed sent it). Conversation text is data: ``quote`` turns
   "<" and ">" into "‹" and "›" (one character each, so offsets are kept), so no text from a
   conversation can close the quote or open a tag of its own;
3. the question, last, then the cue for a one-word answer ("Answer (yes or no):").

``PromptLibrary`` reloads a template file when its modification time changes and keeps the
previous template when the new file is invalid (missing or unknown placeholder, question not
last, empty instruction prefix). This module knows only strings: no Kafka, Postgres or agents.
"""

from __future__ import annotations

import logging
import re
import string
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.llm.guard import strip_instructions

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).with_name("templates")
# Placeholders each template must have (and no others); "question" must come last.
REQUIRED: dict[str, frozenset[str]] = {
    "yes_no": frozenset({"evidence", "question"}),
    "baseline_evidence": frozenset({"transcript", "question"}),
    "baseline_validate": frozenset({"transcript", "evidence", "question"}),
}
NO_EVIDENCE = "(no evidence excerpts were found)"
_FILE_RE = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.txt$")


class TemplateError(ValueError):
    """A template file is unusable."""


def quote(text: str) -> str:
    """Conversation text made safe to place between tags: no "<" or ">" survives."""
    return text.replace("<", "\u2039").replace(">", "\u203a")


def format_evidence(evidence: Sequence[str]) -> str:
    """Each excerpt, without sentences that address the model (``guard``), quoted and enclosed
    in its own <evidence> block."""
    texts = [strip_instructions(e)[0].strip() for e in evidence]
    blocks = [f"<evidence>\n{quote(t)}\n</evidence>" for t in texts if t]
    return "\n".join(blocks) if blocks else NO_EVIDENCE


def _clean_question(question: str) -> str:
    return " ".join(quote(question).split())


@dataclass(frozen=True)
class Template:
    name: str
    version: int
    text: str
    path: Path
    mtime_ns: int

    @property
    def template_id(self) -> str:
        return f"{self.name}.v{self.version}"

    @property
    def prefix(self) -> str:
        """The fixed instructions: everything before the first placeholder."""
        match = string.Template.pattern.search(self.text)
        return self.text[: match.start()] if match else self.text

    def render(self, **values: str) -> str:
        return string.Template(self.text).substitute(values)


def _placeholders(text: str) -> list[str]:
    names = []
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            raise TemplateError(f"invalid '$' at offset {match.start()} (write $$ for a dollar sign)")
        name = match.group("named") or match.group("braced")
        if name:
            names.append(name)
    return names


def parse_template(path: Path) -> Template:
    """Read and validate one template file; raises TemplateError."""
    match = _FILE_RE.match(path.name)
    if not match:
        raise TemplateError(f"{path.name}: template files are named NAME.vN.txt")
    name, version = match["name"], int(match["version"])
    if name not in REQUIRED:
        raise TemplateError(f"{path.name}: unknown template {name!r} (known: {', '.join(sorted(REQUIRED))})")
    try:
        stat = path.stat()
        text = path.read_text(encoding="utf-8").rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path.name}: {e}") from e
    found = _placeholders(text)
    missing, unknown = REQUIRED[name] - set(found), set(found) - REQUIRED[name]
    if missing or unknown:
        raise TemplateError(f"{path.name}: missing placeholders {sorted(missing)}, unknown {sorted(unknown)}")
    if found[-1] != "question" or found.count("question") != 1:
        raise TemplateError(f"{path.name}: ${{question}} must appear once, after all other placeholders")
    template = Template(name, version, text, path, stat.st_mtime_ns)
    if not template.prefix.strip():
        raise TemplateError(f"{path.name}: the template must start with fixed instructions")
    return template


class PromptLibrary:
    """Templates by name, reloaded on change; thread-safe.

    ``versions`` pins a version per name (default: the highest NAME.vN.txt in ``directory``).
    Files are checked at most every ``check_interval_s`` seconds.
    """

    def __init__(
        self,
        directory: Path | str = TEMPLATE_DIR,
        *,
        versions: dict[str, int] | None = None,
        check_interval_s: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.versions = dict(versions or {})
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._templates: dict[str, Template] = {}
        self._checked_at: dict[str, float] = {}

    def _path(self, name: str) -> Path:
        if name in self.versions:
            return self.directory / f"{name}.v{self.versions[name]}.txt"
        candidates = [
            (int(m["version"]), p)
            for p in self.directory.glob(f"{name}.v*.txt")
            if (m := _FILE_RE.match(p.name)) and m["name"] == name
        ]
        if not candidates:
            raise TemplateError(f"no template {name!r} in {self.directory}")
        return max(candidates)[1]

    def get(self, name: str) -> Template:
        if name not in REQUIRED:
            raise TemplateError(f"unknown template {name!r}")
        with self._lock:
            current = self._templates.get(name)
            now = time.monotonic()
            if current is not None and now - self._checked_at.get(name, 0.0) < self.check_interval_s:
                return current
            self._checked_at[name] = now
            try:
                path = self._path(name)
                if current is not None and path == current.path and path.stat().st_mtime_ns == current.mtime_ns:
                    return current
                fresh = parse_template(path)
            except (TemplateError, OSError) as e:
                if current is None:
                    raise TemplateError(str(e)) from e
                log.warning("keeping prompt template %s: the new file is invalid: %s", current.template_id, e)
                return current
            if current is not None:
                log.info("reloaded prompt template %s from %s", fresh.template_id, fresh.path)
            self._templates[name] = fresh
            return fresh

    def yes_no(self, question: str, evidence: Sequence[str]) -> str:
        """The LLM-stage prompt: question + its top-k evidence excerpts."""
        return self.get("yes_no").render(evidence=format_evidence(evidence), question=_clean_question(question))

    def baseline_evidence(self, question: str, transcript: str) -> str:
        """Seed baseline, step 1: the whole conversation; the model copies the evidence."""
        return self.get("baseline_evidence").render(transcript=quote(transcript), question=_clean_question(question))

    def baseline_validate(self, question: str, transcript: str, evidence: str) -> str:
        """Seed baseline, step 2: the whole conversation and the evidence found; a yes/no answer."""
        return self.get("baseline_validate").render(
            transcript=quote(transcript), evidence=quote(evidence.strip()) or "none", question=_clean_question(question)
        )


_default: PromptLibrary | None = None
_default_lock = threading.Lock()


def default_library() -> PromptLibrary:
    global _default
    with _default_lock:
        if _default is None:
            _default = PromptLibrary()
        return _default


def build_yes_no(question: str, evidence: Sequence[str]) -> str:
    return default_library().yes_no(question, evidence)


def build_baseline_evidence(question: str, transcript: str) -> str:
    return default_library().baseline_evidence(question, transcript)


def build_baseline_validate(question: str, transcript: str, evidence: str) -> str:
    return default_library().baseline_validate(question, transcript, evidence)
