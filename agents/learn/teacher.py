"""Teachers: what answers a (conversation, question) pair for the labels table.

- an LLM engine spec (`models.llm.specs`): the "ground truth engine" of the original proposal. It
  reads the whole conversation with the seed's two prompts (`agents.learn.baseline`): a
  generation call that quotes the evidence, then a yes/no call over the transcript and that
  evidence. Slow and costly on purpose: it labels a few hundred pairs so that cheap heads can
  answer the rest. A batch of pairs goes to the engine as one call of each kind, which the
  engine runs concurrently (the `openai` engine keeps at most its `concurrency` in flight).
- ``gold:FILE``: an oracle that answers from a labelled file (labels JSONL or the shared answers
  format), for benchmarks and tests. It answers only pairs the file labels (`answerable`).

A teacher's labels are stored with source ``teacher:<model id>`` (`agents.store.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agents.chunking import transcript
from agents.learn.baseline import SeedBaseline
from agents.learn.labels_import import LabelRow, read_label_rows
from agents.questions import Question
from agents.types import Conversation
from models.llm.engine import YesNoEngine

GOLD_PREFIX = "gold:"


@dataclass(frozen=True, slots=True)
class TeacherCost:
    pairs: int  # (conversation, question) pairs answered
    calls: int  # model calls, one prompt each (the gold teacher: one per pair, free)
    prompt_tokens: int
    generated_tokens: int


class Teacher(Protocol):
    model_id: str

    def answerable(self, question: Question, convs: Sequence[Conversation]) -> list[bool]:
        """Which pairs this teacher can answer at all."""
        ...

    def answer(self, question: Question, convs: Sequence[Conversation]) -> list[str]:
        """"yes" or "no" per conversation (blocking: call it off the event loop)."""
        ...

    def cost(self) -> TeacherCost:
        """What the answers so far cost."""
        ...


class GoldTeacher:
    """Answers from a labelled file. A row matches a pair by conversation and question id, and by
    tenant, revision and question version when it names them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.model_id = GOLD_PREFIX + self.path.name
        self._rows: dict[tuple[str, str], list[LabelRow]] = {}
        for r in read_label_rows(self.path):
            self._rows.setdefault((r.conversation_id, r.question_id), []).append(r)
        self._pairs = 0

    def _lookup(self, question: Question, conv: Conversation) -> str | None:
        answers = {
            r.answer for r in self._rows.get((conv.conversation_id, question.id), ())
            if r.tenant_id in (None, conv.tenant_id) and r.revision in (None, conv.revision)
            and r.question_version in (None, question.version)
        }
        return answers.pop() if len(answers) == 1 else None

    def answerable(self, question: Question, convs: Sequence[Conversation]) -> list[bool]:
        return [self._lookup(question, c) is not None for c in convs]

    def answer(self, question: Question, convs: Sequence[Conversation]) -> list[str]:
        out = []
        for c in convs:
            a = self._lookup(question, c)
            if a is None:
                raise ValueError(f"{self.path} has no answer for {c.conversation_id} / {question.id}")
            out.append(a)
        self._pairs += len(out)
        return out

    def cost(self) -> TeacherCost:
        return TeacherCost(self._pairs, self._pairs, 0, 0)


class LLMTeacher:
    """The seed's two-step prompts over the whole conversation, one batch at a time."""

    def __init__(self, engine: YesNoEngine) -> None:
        self.engine = engine
        self.model_id = engine.model_id
        self._seed = SeedBaseline(engine)
        self._start = engine.stats.snapshot()
        self._pairs = 0

    def answerable(self, question: Question, convs: Sequence[Conversation]) -> list[bool]:
        return [True] * len(convs)

    def answer(self, question: Question, convs: Sequence[Conversation]) -> list[str]:
        if not convs:
            return []
        prompts = self._seed.prompts
        texts = [transcript(c.turns) for c in convs]
        found = self.engine.generate([prompts.baseline_evidence(question.text, t) for t in texts],
                                     self._seed.max_tokens)
        p = self.engine.score([prompts.baseline_validate(question.text, t, f) for t, f in zip(texts, found,
                                                                                               strict=True)])
        self._pairs += len(convs)
        return ["yes" if float(v) >= self._seed.threshold else "no" for v in p]

    def cost(self) -> TeacherCost:
        spent = self.engine.stats.snapshot() - self._start
        return TeacherCost(self._pairs, spent.prompts, spent.prompt_tokens, spent.generated_tokens)


# A teacher's request reads a whole conversation and generates up to 64 tokens, and a batch
# queues on the server: the LLM stage's 30 s per request timed out on a 2-core llama.cpp server.
HTTP_TIMEOUT_S = 300.0


def load_teacher(spec: str) -> Teacher:
    """``gold:FILE``, or any engine spec the LLM stage accepts."""
    if spec.startswith(GOLD_PREFIX):
        return GoldTeacher(spec.removeprefix(GOLD_PREFIX))
    from models.llm.specs import load_engine

    options = {"timeout_s": HTTP_TIMEOUT_S} if spec.strip().startswith("openai:") else {}
    return LLMTeacher(load_engine(spec, **options))
