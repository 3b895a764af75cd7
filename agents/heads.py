"""Trained question heads: artifacts on disk, and the stage-1 `HeadScorer` the cascade uses.

A head has up to three linear parts whose scores are added, each divided by its cross-validated
spread over its stacking weight (`agents.learn.train._part_divisors`):
- conversation part: standardise -> logistic regression over `agents.features` rows;
- chunk part (multiple-instance): a logistic regression over single chunk embeddings, trained
  with every chunk carrying its conversation's label, scored as the mean of the conversation's
  two best chunks. It finds an intent that is only one of several in a conversation, where
  pooled features blur it;
- lexical part: a logistic regression over the TF-IDF rows of `agents.lexical` (the words each
  side used), which embeddings of whole chunks blur.
A monotone calibration map fitted on cross-validated scores makes ``p_yes`` a probability. A
head carries its own decision threshold and uncertain band. A few-shot head has the same three
parts, each a class-mean direction over its K yes and K no rows, except that its chunk part is
the question's zero-shot direction (`agents.learn.train.fit_few_shot`).

Layout of a heads directory (no pickles: numpy arrays and JSON only)::

    DIR/manifest.json          embedder id, feature version, one entry per question
    DIR/lexicon.json           TF-IDF vocabulary and IDF per side (when heads have a lexical part)
    DIR/<head id>/head.json    question, kind (head | few-shot), threshold, band, calibration, metrics
    DIR/<head id>/weights.npz  mean, scale, coef, intercept, calibration points, chunk and lexical coefs

The head id is ``<question id>`` and questions.yaml points a question at it with ``head:``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from agents.features import FEATURE_VERSION, FeatureExtractor
from agents.lexical import LEXICON_FILE, Lexicon
from agents.questions import Question
from agents.scoring import Plan, Stage1Result
from agents.stacked import StackedChunks, rowwise
from agents.types import EmbeddedConversation
from models.embedder import Embedder

log = logging.getLogger(__name__)

ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"


class HeadMismatch(ValueError):
    pass


@dataclass
class Calibration:
    """Monotone map from the linear score to P(yes): isotonic points or a sigmoid (a*s + b)."""

    method: str  # "isotonic" | "sigmoid"
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    a: float = 1.0
    b: float = 0.0

    def __call__(self, s: np.ndarray) -> np.ndarray:
        s = np.asarray(s, np.float64)
        if self.method == "isotonic":
            return np.interp(s, self.xs, self.ys)
        return 1.0 / (1.0 + np.exp(-(self.a * s + self.b)))


@dataclass
class Head:
    head_id: str
    question_id: str
    question_text: str
    kind: str  # "head" | "few-shot"
    embedder_id: str
    feature_version: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    calibration: Calibration
    threshold: float
    band: tuple[float, float]
    rows: int = 0
    n_yes: int = 0
    cv_metrics: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    chunk_coef: np.ndarray | None = None
    chunk_intercept: float = 0.0
    conv_div: float = 1.0
    chunk_div: float = 1.0
    lex_coef: np.ndarray | None = None
    lex_intercept: float = 0.0
    lex_div: float = 1.0

    def score(
        self,
        x: np.ndarray,
        chunk_vectors: Sequence[np.ndarray] | None = None,
        lexical: sp.csr_matrix | None = None,
    ) -> np.ndarray:
        """Uncalibrated score: conversation part (+ chunk and lexical parts when the head has them)."""
        s = (((x - self.mean) / self.scale) @ self.coef + self.intercept) / self.conv_div
        if self.chunk_coef is not None:
            if chunk_vectors is None:
                raise ValueError(f"head {self.head_id} needs the conversations' chunk vectors")
            s = s + chunk_scores(chunk_vectors, self.chunk_coef, self.chunk_intercept) / self.chunk_div
        if self.lex_coef is not None:
            if lexical is None:
                raise ValueError(f"head {self.head_id} needs the conversations' lexical rows ({LEXICON_FILE})")
            s = s + (np.asarray(lexical @ self.lex_coef).reshape(-1) + self.lex_intercept) / self.lex_div
        return s

    def p_yes(
        self,
        x: np.ndarray,
        chunk_vectors: Sequence[np.ndarray] | None = None,
        lexical: sp.csr_matrix | None = None,
    ) -> np.ndarray:
        return np.clip(self.calibration(self.score(x, chunk_vectors, lexical)), 0.0, 1.0)

    def meta(self) -> dict[str, Any]:
        return {
            "artifact_version": ARTIFACT_VERSION,
            "head_id": self.head_id,
            "question_id": self.question_id,
            "question_text": self.question_text,
            "kind": self.kind,
            "embedder_id": self.embedder_id,
            "feature_version": self.feature_version,
            "threshold": self.threshold,
            "band": list(self.band),
            "rows": self.rows,
            "n_yes": self.n_yes,
            "cv_metrics": self.cv_metrics,
            "calibration": {k: v for k, v in asdict(self.calibration).items() if k not in ("xs", "ys")},
            "chunk_part": self.chunk_coef is not None,
            "chunk_intercept": self.chunk_intercept,
            "conv_div": self.conv_div,
            "chunk_div": self.chunk_div,
            "lexical_part": self.lex_coef is not None,
            "lex_intercept": self.lex_intercept,
            "lex_div": self.lex_div,
            "created": self.created,
        }

    def save(self, root: Path) -> Path:
        d = root / self.head_id
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"weights.{os.getpid()}.tmp.npz"
        np.savez(
            tmp,
            mean=self.mean.astype(np.float64),
            scale=self.scale.astype(np.float64),
            coef=self.coef.astype(np.float64),
            intercept=np.float64(self.intercept),
            cal_xs=np.asarray(self.calibration.xs, np.float64),
            cal_ys=np.asarray(self.calibration.ys, np.float64),
            chunk_coef=np.zeros(0) if self.chunk_coef is None else self.chunk_coef.astype(np.float64),
            lex_coef=np.zeros(0) if self.lex_coef is None else self.lex_coef.astype(np.float64),
        )
        os.replace(tmp, d / "weights.npz")
        _write_json(d / "head.json", self.meta())
        return d

    @classmethod
    def load(cls, d: Path) -> Head:
        meta = json.loads((d / "head.json").read_text())
        if meta.get("artifact_version") != ARTIFACT_VERSION:
            raise HeadMismatch(f"{d}: artifact version {meta.get('artifact_version')} != {ARTIFACT_VERSION}")
        with np.load(d / "weights.npz") as z:
            cal = meta["calibration"]
            return cls(
                head_id=meta["head_id"],
                question_id=meta["question_id"],
                question_text=meta["question_text"],
                kind=meta["kind"],
                embedder_id=meta["embedder_id"],
                feature_version=meta["feature_version"],
                mean=z["mean"].astype(np.float64),
                scale=z["scale"].astype(np.float64),
                coef=z["coef"].astype(np.float64),
                intercept=float(z["intercept"]),
                calibration=Calibration(
                    method=cal["method"],
                    xs=z["cal_xs"].tolist(),
                    ys=z["cal_ys"].tolist(),
                    a=cal.get("a", 1.0),
                    b=cal.get("b", 0.0),
                ),
                threshold=float(meta["threshold"]),
                band=(float(meta["band"][0]), float(meta["band"][1])),
                rows=int(meta.get("rows", 0)),
                n_yes=int(meta.get("n_yes", 0)),
                cv_metrics=meta.get("cv_metrics", {}),
                created=float(meta.get("created", 0.0)),
                chunk_coef=z["chunk_coef"].astype(np.float64) if meta.get("chunk_part") else None,
                chunk_intercept=float(meta.get("chunk_intercept", 0.0)),
                conv_div=float(meta.get("conv_div", 1.0)),
                chunk_div=float(meta.get("chunk_div", 1.0)),
                lex_coef=z["lex_coef"].astype(np.float64) if meta.get("lexical_part") else None,
                lex_intercept=float(meta.get("lex_intercept", 0.0)),
                lex_div=float(meta.get("lex_div", 1.0)),
            )


CHUNK_TOP = 2


def chunk_scores(chunk_vectors: Sequence[np.ndarray], coef: np.ndarray, intercept: float) -> np.ndarray:
    """Mean of the CHUNK_TOP best chunk logits per conversation (0 for a conversation without chunks)."""
    out = np.zeros(len(chunk_vectors))
    for i, v in enumerate(chunk_vectors):
        if len(v):
            s = np.asarray(v, np.float64) @ coef + intercept
            out[i] = np.sort(s)[-CHUNK_TOP:].mean()
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_manifest(root: Path, embedder_id: str, entries: Mapping[str, Mapping[str, Any]], **extra: Any) -> None:
    """entries: question id -> {"head": head id or None, "path": head|few-shot|zero-shot, ...}."""
    root.mkdir(parents=True, exist_ok=True)
    _write_json(
        root / MANIFEST,
        {
            "artifact_version": ARTIFACT_VERSION,
            "embedder_id": embedder_id,
            "feature_version": FEATURE_VERSION,
            "created": time.time(),
            **extra,
            "questions": dict(entries),
        },
    )


def read_manifest(root: str | Path) -> dict[str, Any]:
    return json.loads((Path(root) / MANIFEST).read_text())


class HeadStack:
    """Every head's linear parts side by side: one matrix product per part scores all heads.

    Each head's standardisation and part divisor are folded into its columns, so the conversation
    part is ``x @ conv_w + conv_b``; a head without a chunk or lexical part has zero columns there.
    """

    def __init__(self, heads: Sequence[Head], lexicon_dim: int = 0) -> None:
        self.heads = list(heads)
        self.column = {h.head_id: i for i, h in enumerate(self.heads)}
        scale = [h.scale for h in self.heads]
        self.conv_w = np.stack([h.coef / s / h.conv_div for h, s in zip(self.heads, scale, strict=True)], 1)
        self.conv_b = np.array(
            [(h.intercept - float((h.mean / s) @ h.coef)) / h.conv_div for h, s in zip(self.heads, scale, strict=True)]
        )
        dim = next((len(h.chunk_coef) for h in self.heads if h.chunk_coef is not None), 0)
        self.chunk_w = np.zeros((dim, len(self.heads)))
        self.chunk_b = np.zeros(len(self.heads))
        self.chunk_div = np.ones(len(self.heads))
        self.lex_w = np.zeros((lexicon_dim, len(self.heads))) if lexicon_dim else None
        self.lex_b = np.zeros(len(self.heads))
        for i, h in enumerate(self.heads):
            if h.chunk_coef is not None:
                self.chunk_w[:, i] = h.chunk_coef
                self.chunk_b[i] = h.chunk_intercept
                self.chunk_div[i] = h.chunk_div
            if h.lex_coef is not None and self.lex_w is not None:
                self.lex_w[:, i] = h.lex_coef / h.lex_div
                self.lex_b[i] = h.lex_intercept / h.lex_div
        self.uses_chunks = any(h.chunk_coef is not None for h in self.heads)
        self.uses_lexicon = any(h.lex_coef is not None for h in self.heads)

    def scores(self, x: np.ndarray, chunks: StackedChunks, lexical: sp.csr_matrix | None) -> np.ndarray:
        """Uncalibrated scores, (conversations, heads)."""
        s = rowwise(np.asarray(x, np.float64), self.conv_w) + self.conv_b
        if self.uses_chunks:
            logits = rowwise(np.asarray(chunks.vectors, np.float64), self.chunk_w) + self.chunk_b
            s += chunks.top_mean(logits, CHUNK_TOP) / self.chunk_div
        if self.uses_lexicon and self.lex_w is not None:
            if lexical is None:
                raise ValueError(f"heads with a lexical part need the conversations' lexical rows ({LEXICON_FILE})")
            s += np.asarray(lexical @ self.lex_w) + self.lex_b  # sparse rows: each summed on its own
        return s

    def p_yes(self, x: np.ndarray, chunks: StackedChunks, lexical: sp.csr_matrix | None) -> np.ndarray:
        """Calibrated P(yes), (conversations, heads)."""
        s = self.scores(x, chunks, lexical)
        for i, h in enumerate(self.heads):
            s[:, i] = h.calibration(s[:, i])
        return np.clip(s, 0.0, 1.0)


class HeadScorer:
    """Stage-1 scorer for every head in a heads dir; the cascade maps each head id to it.

    One call scores a whole batch: feature rows and lexical rows once for the batch's
    conversations, then every head at once (`HeadStack`). Nothing is kept between batches.
    """

    def __init__(
        self,
        heads: Mapping[str, Head],
        features: FeatureExtractor,
        lexicon: Lexicon | None = None,
    ) -> None:
        self.heads = dict(heads)
        self.features = features
        self.lexicon = lexicon
        for h in self.heads.values():
            if h.lex_coef is not None and (lexicon is None or lexicon.dim != len(h.lex_coef)):
                raise HeadMismatch(f"head {h.head_id} has a lexical part but its {LEXICON_FILE} is missing or differs")
            if h.embedder_id != features.model_id:
                raise HeadMismatch(f"head {h.head_id} was trained on {h.embedder_id}, not {features.model_id}")
            if h.feature_version != features.version:
                raise HeadMismatch(
                    f"head {h.head_id} uses features {h.feature_version}, this build has {features.version}"
                )
        self.stack = HeadStack(list(self.heads.values()), lexicon.dim if lexicon is not None else 0)

    def _head(self, question: Question) -> Head:
        head_id = question.head or question.id
        try:
            return self.heads[head_id]
        except KeyError:
            raise KeyError(f"no head {head_id!r} loaded for question {question.id}") from None

    def stage1(self, plan: Plan, convs: Sequence[EmbeddedConversation]) -> list[Stage1Result]:
        heads = [self._head(q) for q, _ in plan]
        asked = sorted({i for _, idx in plan for i in idx})
        row = {i: r for r, i in enumerate(asked)}
        batch = [convs[i] for i in asked]
        p = np.zeros((0, len(self.stack.heads)))
        if batch:
            x = self.features.transform(batch)
            lexical = None
            if self.lexicon is not None and self.stack.uses_lexicon:
                lexical = self.lexicon.transform([c.conversation for c in batch])
            p = self.stack.p_yes(x, StackedChunks.of(batch, self.features.embedder.dim), lexical)
        return [
            Stage1Result(
                p[[row[i] for i in idx], self.stack.column[h.head_id]] if len(idx) else np.zeros(0),
                h.threshold,
                h.band,
                h.kind,
            )
            for h, (_, idx) in zip(heads, plan, strict=True)
        ]


def load_heads(
    root: str | Path, embedder: Embedder, features: FeatureExtractor | None = None
) -> tuple[dict[str, Any], str]:
    """(head id -> the one HeadScorer of every head under `root`, heads version) for `Cascade(heads=...)`.

    The version is a hash of the heads' metadata, so retrained heads change the event's model ids.
    """
    root = Path(root)
    heads: dict[str, Head] = {}
    digest = hashlib.sha256()
    for d in sorted(p for p in root.iterdir() if (p / "head.json").exists()):
        head = Head.load(d)
        heads[head.head_id] = head
        digest.update((d / "head.json").read_bytes())
    lexicon = None
    if (root / LEXICON_FILE).exists():
        lexicon = Lexicon.load(root)
        digest.update((root / LEXICON_FILE).read_bytes())
    if not heads:  # every question kept the zero-shot path (too few labels)
        return {}, "none"
    scorer = HeadScorer(heads, features or FeatureExtractor(embedder), lexicon=lexicon)
    return dict.fromkeys(heads, scorer), f"{FEATURE_VERSION}-{digest.hexdigest()[:12]}"


def head_ids_by_question(root: str | Path) -> dict[str, str]:
    """Question id -> head id for the questions that have a trained head in `root`."""
    entries = read_manifest(root).get("questions", {})
    return {qid: e["head"] for qid, e in entries.items() if e.get("head")}
