"""`flexor train`: per-question heads from labelled conversations, calibrated, with a manifest.

    flexor train --conversations star.jsonl.gz sgd.jsonl.gz --questions questions.json \
        --answers answers.jsonl.gz --split train [--shots K] --out heads/
    flexor train --conversations conversations.jsonl --questions questions.yaml \
        --answers labels.jsonl --split all --out heads/
    flexor train --from-store [--questions questions.yaml] [--split train|all] --out heads/

Data (`agents.learn.datasets`): the research files, the service's formats (conversation.v1,
questions.yaml, labels JSONL; split 80/20 by a hash of the conversation id), or with
``--from-store`` the labels table with the stored conversations and their stored chunk vectors
(`agents.learn.stored`: nothing is embedded again; chunks of another embedder are refused). From
the store, split ``train`` leaves out the share that ``flexor eval --from-store`` scores, the
lexicon is fitted on the split's stored conversations, and the manifest counts each question's
labels by source.

Per question: rows = conversations of the split with a gold answer, in (tenant, conversation id)
order whatever the input order; features from `agents.features` (standardise -> balanced
logistic regression), plus a chunk part and a lexical part (`agents.lexical`, TF-IDF fitted on
the split's text, written to DIR/lexicon.json), each its own balanced logistic regression;
out-of-fold scores (5 folds, 3 fold assignments) fit the calibration map (isotonic with >= 100
positives, else a sigmoid) and pick the F1-optimal threshold; the final model is refitted on
every row. ``--shots K`` keeps only K yes and K no rows per question (fixed seed): each part is
then a class-mean direction, plus the question's zero-shot direction, with the unlabelled
conversations the question applies to setting the scales (`fit_few_shot`).

Questions with fewer than MIN_PER_CLASS labels of either class keep the zero-shot path; the
manifest says so.
Per head, the manifest also keeps the drift reference (`agents.drift`): the histogram of p_yes
and the yes-rate of its out-of-fold scores (a few-shot head: of its scores on the pool).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from agents.drift import reference as drift_reference
from agents.features import FEATURE_VERSION, FeatureExtractor
from agents.heads import Calibration, Head, write_manifest
from agents.learn.datasets import HOLDOUT, LabelledSet, read_labelled, read_questions_file
from agents.learn.embedcache import CachingEmbedder
from agents.learn.labelled import add_data_arguments, check_data_arguments, source_names
from agents.learn.metrics import best_f1_threshold, summarize
from agents.lexical import LEXICON_VERSION, Lexicon
from agents.pipeline import embed_conversations
from agents.questions import QuestionSet
from agents.similarity import SimilarityScorer
from agents.types import Conversation, EmbeddedConversation
from models.embedder import load_embedder

log = logging.getLogger(__name__)

SEED = 13
FOLDS = 5
REPEATS = 3  # repeated cross-validation: see fit_head
ISOTONIC_MIN_POSITIVES = 100
C_HEAD = 0.05
C_CHUNK = 1.0
# TF-IDF rows are L2-normalised and sparse: they need far less shrinkage than the 900
# standardised dense features. 4 is the only value tried; it was not tuned on evaluation data.
C_LEX = 4.0
MIN_PER_CLASS = 3  # fewer yes (or no) rows than this: no head, the question keeps the zero-shot path



def _make_head(
    kind: str, head_id: str, question_id: str, question_text: str, embedder_id: str,
    mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float, cal: Calibration,
    threshold: float, y: np.ndarray, cv: dict[str, Any], **chunk_part: Any,
) -> Head:
    """The fields every head carries, whether trained on all rows or on a few shots."""
    return Head(
        head_id=head_id, question_id=question_id, question_text=question_text, kind=kind,
        embedder_id=embedder_id, feature_version=FEATURE_VERSION, mean=mean, scale=scale, coef=coef,
        intercept=intercept, calibration=cal, threshold=threshold, band=uncertain_band(threshold),
        rows=len(y), n_yes=int(y.sum()), cv_metrics=_round(cv), **chunk_part,
    )

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, split="train")
    parser.add_argument("--from-store", action="store_true",
                        help="train on the labels table and the stored chunks (nothing embedded again)")
    parser.add_argument("--holdout", type=float, default=HOLDOUT,
                        help="--from-store: share of conversations (by id hash) held out as split eval")
    parser.add_argument("--tenant", default=None, help="--from-store: this tenant's labels only")
    parser.add_argument("--shots", type=int, default=None, help="train from K yes and K no rows per question")
    parser.add_argument("--out", required=True, help="heads directory to write")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--only", nargs="*", default=None, help="train only these question ids")


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0).astype(np.float64)
    scale = x.std(0).astype(np.float64)
    scale[scale < 1e-6] = 1.0
    return mean, scale


def _logreg(z: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, tol=1e-4)
    m.fit(z, y)
    return m.coef_[0].astype(np.float64), float(m.intercept_[0])


def fit_calibration(s: np.ndarray, y: np.ndarray, method: str | None = None) -> Calibration:
    """Monotone map score -> P(yes) fitted on held-out scores."""
    y = np.asarray(y, bool)
    method = method or ("isotonic" if y.sum() >= ISOTONIC_MIN_POSITIVES else "sigmoid")
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y.astype(float))
        xs, ys = iso.X_thresholds_, iso.y_thresholds_
        return Calibration("isotonic", xs=[float(v) for v in xs], ys=[float(v) for v in ys])
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0).fit(np.asarray(s).reshape(-1, 1), y)
    return Calibration("sigmoid", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))


# Share of the room on each side of the threshold that counts as uncertain. Calibrated heads
# are right most of the time even near the threshold, so a wide band spends LLM calls where
# they rarely change the answer: on the evaluation split 0.35 routes 5.2% of answers with
# embedding-only heads (0.5 routed 7.4%) and 2.0% with the three-part heads of session 4 (all
# 22,126 answers of `flexor eval`), which keeps the cascade >= 30x cheaper in prompt tokens.
BAND_FRACTION = 0.35


def uncertain_band(threshold: float) -> tuple[float, float]:
    """[low, high) around the threshold, proportional to the room on each side."""
    return (round(threshold * (1.0 - BAND_FRACTION), 4), round(threshold + (1.0 - threshold) * BAND_FRACTION, 4))


def _spread(scores: np.ndarray) -> float:
    return max(float(np.std(scores)), 1e-6)


def _part_divisors(parts: Sequence[np.ndarray], y: np.ndarray) -> list[float]:
    """One divisor per part's out-of-fold scores, so that the head's score is their weighted sum.

    Each part is first put on unit spread; then a logistic regression on the parts (stacking)
    weighs them, with negative weights clipped to 0: a part with no signal for this question
    (the embeddings for "was the user annoyed?") is switched off instead of adding noise at the
    weight of the useful ones. Divisor = spread / weight."""
    from sklearn.linear_model import LogisticRegression

    spreads = [_spread(p) for p in parts]
    if len(parts) == 1:
        return spreads
    z = np.stack([p / s for p, s in zip(parts, spreads, strict=True)], axis=1)
    w = LogisticRegression(C=1.0, class_weight="balanced").fit(z, y).coef_[0]
    w = np.clip(w, 0.0, None)
    if not w.any():
        w = np.ones(len(parts))
    w = w / w.max()
    return [s / wi if wi > 1e-3 else 1e9 for s, wi in zip(spreads, w, strict=True)]


def _chunk_logreg(vectors: Sequence[np.ndarray], y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """Multiple-instance part: every chunk carries its conversation's label."""
    from sklearn.linear_model import LogisticRegression

    xc = np.concatenate([np.asarray(v, np.float32) for v in vectors])
    yc = np.repeat(y, [len(v) for v in vectors])
    m = LogisticRegression(C=c, class_weight="balanced", max_iter=300, tol=1e-4).fit(xc, yc)
    return m.coef_[0].astype(np.float64), float(m.intercept_[0])


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    *,
    chunk_vectors: Sequence[np.ndarray] | None = None,
    lexical: sp.csr_matrix | None = None,
    head_id: str,
    question_id: str,
    question_text: str,
    embedder_id: str,
    c: float = C_HEAD,
    seed: int = SEED,
    repeats: int = REPEATS,
) -> Head:
    """Full-data head: repeated CV scores -> calibration + threshold; final fit on every row.

    With `chunk_vectors` (one array per row) the head gets the chunk part, with `lexical` (one
    TF-IDF row per row) the lexical part; the parts' scores are added with the divisors of
    `_part_divisors` (unit spread, then stacking weights from their out-of-fold scores)."""
    from sklearn.model_selection import StratifiedKFold

    from agents.heads import chunk_scores

    y = np.asarray(y, bool)
    mean, scale = _standardizer(x)
    z = (x - mean) / scale
    folds = min(FOLDS, int(y.sum()), int((~y).sum()))
    # Every row gets one out-of-fold score per repeat; the calibration, the threshold and the
    # stacking weights are fitted on all of them. One fold assignment alone moved the evaluation
    # ECE of a question by up to 0.008; pooling several averages that luck out.
    oof = np.zeros((repeats, len(y)))
    oof_chunk = np.zeros((repeats, len(y)))
    oof_lex = np.zeros((repeats, len(y)))
    for r in range(repeats):
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed + r).split(z, y):
            # Each fold standardises with the full-data statistics: labels play no part in them.
            coef, b = _logreg(z[tr], y[tr], c)
            oof[r, te] = z[te] @ coef + b
            if chunk_vectors is not None:
                cw, cb = _chunk_logreg([chunk_vectors[i] for i in tr], y[tr], C_CHUNK)
                oof_chunk[r, te] = chunk_scores([chunk_vectors[i] for i in te], cw, cb)
            if lexical is not None:
                lw, lb = _logreg(lexical[tr], y[tr], C_LEX)
                oof_lex[r, te] = lexical[te] @ lw + lb
    y_all = np.tile(y, repeats)
    used = [True, chunk_vectors is not None, lexical is not None]
    parts = [p.ravel() for p, u in zip((oof, oof_chunk, oof_lex), used, strict=True) if u]
    divs = iter(_part_divisors(parts, y_all))
    conv_div, chunk_div, lex_div = (next(divs) if u else 1.0 for u in used)
    oof = (oof / conv_div + oof_chunk / chunk_div * used[1] + oof_lex / lex_div * used[2]).ravel()
    cal = fit_calibration(oof, y_all)
    p_oof = cal(oof)
    threshold = best_f1_threshold(y_all, p_oof)
    first = p_oof[: len(y)]
    cv = summarize(y, first, first >= threshold)
    cv["folds"] = folds
    cv["repeats"] = repeats
    cv["note"] = "out-of-fold (first repeat); calibration and threshold were fitted on every repeat's scores"
    # What the head outputs on rows it has not seen: the drift reference (`run` moves it to the manifest).
    cv["reference"] = drift_reference(first, threshold).as_dict()
    coef, b = _logreg(z, y, c)
    chunk_coef, chunk_b = _chunk_logreg(chunk_vectors, y, C_CHUNK) if chunk_vectors is not None else (None, 0.0)
    lex_coef, lex_b = _logreg(lexical, y, C_LEX) if lexical is not None else (None, 0.0)
    return _make_head(
        "head", head_id, question_id, question_text, embedder_id, mean, scale, coef, b, cal, threshold, y, cv,
        chunk_coef=chunk_coef,
        chunk_intercept=chunk_b,
        conv_div=conv_div,
        chunk_div=chunk_div,
        lex_coef=lex_coef,
        lex_intercept=lex_b,
        lex_div=lex_div,
    )


@dataclass(frozen=True)
class FewShotPool:
    """Unlabelled conversations of the split (the question's dataset): they set the
    standardisation and each part's spread, so no label leaks into either."""

    x: np.ndarray
    lexical: sp.csr_matrix | None = None
    chunk_vectors: Sequence[np.ndarray] | None = None


def _class_mean_direction(rows: np.ndarray | sp.csr_matrix, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit direction between the class means and the intercept that puts their midpoint at 0:
    a prototype classifier, the limit of a strongly regularised linear model."""
    pos = np.asarray(rows[y].mean(0), np.float64).ravel()
    neg = np.asarray(rows[~y].mean(0), np.float64).ravel()
    w = pos - neg
    w /= max(float(np.linalg.norm(w)), 1e-9)
    return w, -float((pos + neg) @ w) / 2


def fit_few_shot(
    x: np.ndarray,
    y: np.ndarray,
    pool: FewShotPool,
    *,
    lexical: sp.csr_matrix | None = None,
    chunk_vectors: Sequence[np.ndarray] | None = None,
    prototype: np.ndarray | None = None,
    head_id: str,
    question_id: str,
    question_text: str,
    embedder_id: str,
    seed: int = SEED,
) -> Head:
    """K yes + K no rows. Up to three parts, each put on unit spread over the pool and added:
    - conversation part: class-mean direction in standardised feature space;
    - lexical part (with `lexical`): class-mean direction over the TF-IDF rows;
    - chunk part (with `prototype`, the question's zero-shot direction from
      `agents.similarity`): scored like a full head's chunk part, centred between the shots'
      class means. It adds what the question says, which ten rows show only noisily.
    Ten rows cannot weigh the parts, so they count equally. A sigmoid is fitted on
    leave-one-out scores."""
    from agents.heads import chunk_scores

    y = np.asarray(y, bool)
    mean, scale = _standardizer(pool.x)
    z = (x - mean) / scale
    use_lex = lexical is not None and pool.lexical is not None
    use_chunk = prototype is not None and chunk_vectors is not None and pool.chunk_vectors is not None
    proto_rows = chunk_scores(chunk_vectors, prototype, 0.0) if use_chunk else np.zeros(len(y))

    def fit(keep: np.ndarray) -> tuple[np.ndarray, float, np.ndarray | None, float, float]:
        w, b = _class_mean_direction(z[keep], y[keep])
        lw, lb = _class_mean_direction(lexical[keep], y[keep]) if use_lex else (None, 0.0)
        s, yy = proto_rows[keep], y[keep]
        return w, b, lw, lb, -float(s[yy].mean() + s[~yy].mean()) / 2

    w, b, lw, lb, cb = fit(np.ones(len(y), bool))
    conv_div = _spread((pool.x - mean) / scale @ w)
    lex_div = _spread(pool.lexical @ lw) if use_lex else 1.0
    chunk_div = _spread(chunk_scores(pool.chunk_vectors, prototype, 0.0)) if use_chunk else 1.0

    loo = np.zeros(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        wi, bi, lwi, lbi, cbi = fit(keep)
        loo[i] = (z[i] @ wi + bi) / conv_div
        if use_lex:
            loo[i] += (float((lexical[i] @ lwi)[0]) + lbi) / lex_div
        if use_chunk:
            loo[i] += (proto_rows[i] + cbi) / chunk_div
    cal = fit_calibration(loo, y, method="sigmoid")
    if cal.a <= 0:
        # Leave-one-out scores of a prototype classifier on ~10 rows are biased against the
        # held-out row and can even rank inversely; a calibration must never flip the direction.
        # Fall back to a unit-spread sigmoid centred between the class means (the intercept's 0).
        cal = Calibration("sigmoid", a=1.0 / max(float(np.std(loo)), 1e-6), b=0.0)
    p_loo = cal(loo)
    threshold = 0.5
    cv = summarize(y, p_loo, p_loo >= threshold)
    cv["folds"] = "leave-one-out"
    head = _make_head(
        "few-shot", head_id, question_id, question_text, embedder_id, mean, scale, w, b, cal, threshold, y, cv,
        conv_div=conv_div,
        chunk_coef=prototype if use_chunk else None,
        chunk_intercept=cb,
        chunk_div=chunk_div,
        lex_coef=lw,
        lex_intercept=lb,
        lex_div=lex_div,
    )
    # The drift reference: the head's scores on the pool, which its 2K shots barely overlap.
    pool_p = head.p_yes(pool.x, pool.chunk_vectors, pool.lexical if use_lex else None)
    head.cv_metrics["reference"] = drift_reference(pool_p, threshold).as_dict()
    return head


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def sample_shots(y: Sequence[bool], k: int, seed: int) -> np.ndarray:
    """Indices of k yes and k no rows (fewer when a class is smaller), fixed by `seed`."""
    y = np.asarray(y, bool)
    rng = np.random.default_rng(seed)
    pos = rng.permutation(np.flatnonzero(y))[:k]
    neg = rng.permutation(np.flatnonzero(~y))[:k]
    return np.sort(np.r_[pos, neg])


def resolve_embedder(args: argparse.Namespace) -> str:
    """--embedder, else the service's (models.embedder) for --from-store, else onnx-int8."""
    if args.embedder:
        return str(args.embedder)
    return str(args.settings().models.embedder) if args.from_store else "onnx-int8"


def _store_settings(args: argparse.Namespace) -> Any:
    if not hasattr(args, "settings"):
        raise ValueError("--from-store reads the database from the flexor settings: run `flexor train --from-store`")
    return args.settings()


async def read_store(
    pool: Any, questions: QuestionSet, embedder_id: str, split: str, *, holdout: float = HOLDOUT,
    tenant: str | None = None,
) -> tuple[LabelledSet, list[Conversation]]:
    """(labelled set of the split, the split's stored conversations to fit the lexicon on)."""
    from agents.learn.stored import LEXICON_MAX, load_labelled, stored_conversations

    data = await load_labelled(pool, questions, embedder_id, split, holdout=holdout, tenant_id=tenant)
    text = await stored_conversations(pool, split, holdout=holdout, tenant_id=tenant, limit=LEXICON_MAX)
    return data, text


def read_training_data(args: argparse.Namespace, embedder_id: str) -> tuple[LabelledSet, list[Conversation], str]:
    """(labelled set, conversations to fit the lexicon on, where it came from) for the arguments."""
    if args.from_store:
        from agents.learn.stored import open_settings_pool

        settings = _store_settings(args)
        questions = read_questions_file(args.questions or settings.questions_file)[0]

        async def go() -> tuple[LabelledSet, list[Conversation]]:
            pool = await open_settings_pool(settings)
            try:
                return await read_store(pool, questions, embedder_id, args.split, holdout=args.holdout,
                                        tenant=args.tenant)
            finally:
                await pool.close()

        data, text = asyncio.run(go())
        return data, text, "store"
    check_data_arguments(args)
    data = read_labelled(args.conversations, args.questions, args.answers, args.split, args.limit)
    return data, data.conversations, "files"


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    embedder_name = resolve_embedder(args)
    base = load_embedder(embedder_name)
    data, lexicon_text, origin = read_training_data(args, base.model_id)
    for note in data.notes:
        print(note, file=sys.stderr)
    if not data.conversations:
        what = "no labelled conversations in the store" if origin == "store" else "no conversations"
        print(f"{what} in the requested split", file=sys.stderr)
        return 2
    embedder = base if args.no_cache or data.embedded is not None else CachingEmbedder(base)
    if data.embedded is None:
        print(f"embedding {len(data.conversations)} conversations with {embedder.model_id} ...", file=sys.stderr)
    else:
        print(f"{origin}: {len(data.conversations)} labelled conversations with their stored vectors "
              f"({len(data.gold)} labels); nothing embedded again", file=sys.stderr)
    sources = source_names(args.conversations) if origin == "files" else ["store"]
    extra: dict[str, Any] = {"split": args.split, "sources": sources}
    if origin == "store":
        extra |= {"from_store": True, "holdout": args.holdout, "tenant": args.tenant}
    heads = train_heads(data, embedder, Path(args.out), lexicon_text=lexicon_text, shots=args.shots,
                        seed=args.seed, only=args.only, manifest=extra)
    print(f"wrote {len(heads)} heads to {args.out} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


def _canonical(embedded: list[EmbeddedConversation]) -> tuple[list[int], dict[int, int]]:
    """Conversations in (tenant, id, revision) order, so heads do not depend on file or table order:
    (new order of old indices, old index -> new index)."""
    convs = [e.conversation for e in embedded]
    order = sorted(range(len(convs)), key=lambda i: (convs[i].tenant_id, convs[i].conversation_id, convs[i].revision))
    return order, {old: new for new, old in enumerate(order)}


def train_heads(
    data: LabelledSet,
    embedder: Any,
    out: Path,
    *,
    lexicon_text: Sequence[Conversation] | None = None,
    shots: int | None = None,
    seed: int = SEED,
    only: Sequence[str] | None = None,
    manifest: dict[str, Any] | None = None,
    log_to: Any = sys.stderr,
) -> dict[str, str]:
    """Heads for every question of `data` with enough labels of each class (MIN_PER_CLASS), into
    `out` with manifest.json, lexicon.json and questions.yaml; the others keep the zero-shot path
    and the manifest says why. Returns question id -> head id. `data.embedded` (the stored
    vectors) is used when present; otherwise the conversations are embedded with `embedder`.
    The lexicon is fitted on `lexicon_text` (default: the set's conversations)."""
    t0 = time.perf_counter()
    embedded = data.embedded if data.embedded is not None else embed_conversations(embedder, data.conversations)
    if isinstance(embedder, CachingEmbedder):
        embedder.flush()
    order, new_index = _canonical(embedded)
    embedded = [embedded[i] for i in order]
    conversations = [e.conversation for e in embedded]
    feats = FeatureExtractor(embedder)
    x_all = feats.transform(embedded)
    lexicon = Lexicon.fit(lexicon_text if lexicon_text is not None else conversations)
    out.mkdir(parents=True, exist_ok=True)
    lexicon.save(out)
    lex_all = lexicon.transform(conversations)
    print(f"features {x_all.shape} + lexical {lex_all.shape[1]} terms "
          f"in {time.perf_counter() - t0:.0f}s", file=log_to)

    entries: dict[str, dict[str, Any]] = {}
    heads: dict[str, str] = {}
    zero_shot = SimilarityScorer(embedder)
    split = (manifest or {}).get("split", "all")
    for q in data.questions.questions:
        if only and q.id not in only:
            continue
        old_idx, gold = data.rows(q.id)
        pairs = sorted((new_index[i], y) for i, y in zip(old_idx, gold, strict=True))
        rows = np.asarray([i for i, _ in pairs], int)
        y = np.asarray([a for _, a in pairs], bool)
        common = {"head_id": q.id, "question_id": q.id, "question_text": q.text}
        by_source = data.label_sources.get(q.id)
        if len(y) == 0 or y.sum() < MIN_PER_CLASS or (~y).sum() < MIN_PER_CLASS:
            why = (
                "no labelled rows"
                if len(y) == 0
                else f"{int(y.sum())} positives and {int((~y).sum())} negatives (need {MIN_PER_CLASS} of each)"
            )
            entries[q.id] = {"head": None, "path": "zero-shot", "reason": why, "rows": len(y)}
            if by_source is not None:
                entries[q.id]["labels_by_source"] = by_source
            print(f"{q.id}: {why} in split {split}: keeps the zero-shot path", file=log_to)
            continue
        t = time.perf_counter()
        if shots:
            pick = sample_shots(y, shots, seed)
            chosen = rows[pick]
            in_pool = [i for i, c in enumerate(conversations) if q.applies(c.metadata)]
            head = fit_few_shot(
                x_all[chosen],
                y[pick],
                FewShotPool(x_all[in_pool], lex_all[in_pool], [embedded[i].vectors for i in in_pool]),
                lexical=lex_all[chosen],
                chunk_vectors=[embedded[i].vectors for i in chosen],
                prototype=zero_shot.prototype(q).astype(np.float64),
                embedder_id=embedder.model_id,
                seed=seed,
                **common,
            )
        else:
            head = fit_head(
                x_all[rows],
                y,
                chunk_vectors=[embedded[i].vectors for i in rows],
                lexical=lex_all[rows],
                embedder_id=embedder.model_id,
                seed=seed,
                **common,
            )
        reference = head.cv_metrics.pop("reference")
        head.save(out)
        heads[q.id] = head.head_id
        cv = head.cv_metrics
        entries[q.id] = {
            "head": head.head_id,
            "path": head.kind,
            "rows": head.rows,
            "n_yes": head.n_yes,
            "threshold": head.threshold,
            "band": list(head.band),
            "cv_metrics": cv,
            "reference": reference,
        }
        if by_source is not None:
            entries[q.id]["labels_by_source"] = by_source
        print(
            f"{q.id}: {head.kind} rows={head.rows} yes={head.n_yes} thr={head.threshold:.3f} "
            f"cv f1={cv['f1']:.3f} auc={cv['roc_auc']} ece={cv['ece']:.3f} ({time.perf_counter() - t:.1f}s)",
            file=log_to,
        )
    extra = dict(manifest or {})
    if data.notes:
        extra["notes"] = data.notes
    write_manifest(out, embedder.model_id, entries, shots=shots, lexicon=LEXICON_VERSION, seed=seed,
                   conversations=len(conversations), **extra)
    updated = [q.model_copy(update={"head": heads.get(q.id)}) for q in data.questions.questions]
    _write_questions_yaml(out / "questions.yaml", QuestionSet(questions=updated))
    return heads


def _write_questions_yaml(path: Path, qs: QuestionSet) -> None:
    import yaml

    data = {"questions": [q.model_dump(mode="json", exclude_defaults=False) for q in qs.questions]}
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="flexor train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
