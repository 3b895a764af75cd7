"""Which conversations a teacher labels next: `uncertainty` or `random` (the control).

`uncertainty` is diverse mini-batch active learning (Zhdanov 2019, "Diverse mini-batch Active
Learning", arXiv:1901.05954): keep the PREFILTER x n candidates whose stage-1 p_yes lies
closest to the question's decision threshold, cluster them into n groups with k-means on their
conversation vectors (each weighted by how uncertain it is), and take from every group the
member closest to the threshold. Near-duplicates fall into one group, so a batch is not spent on
n copies of one template while other kinds of uncertain conversation go unasked.

A cold start needs more: while a question's labels do not yet hold both answers, the stage-1
score near the threshold can be wrong in one direction only, and picks near it keep returning
that one answer. On the shared data the zero-shot scorer put only positives of q05 near its
threshold: 200 uncertainty picks, 200 yes, never a head (F1 0.67 where a head reaches 0.99).
So `pick_uncertain` can take a share of the picks elsewhere (`label_question` does so until the
question has enough labels of each answer to train a head): half of that share goes to the
conversations the current scorer ranks likeliest to have the missing answer (highest p_yes when
yes is missing, lowest when no is), spread over k-means groups like the uncertain picks, and half
at random, for a scorer whose ranking is wrong. With random picks alone, q04 had 2 yes labels
after 100 on the shared data (one chunk per turn; a 7 % base rate) and no head until 150,
although the zero-shot scorer ranks q04 at ROC-AUC 0.96.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agents.types import EmbeddedConversation

UNCERTAINTY = "uncertainty"
RANDOM = "random"
STRATEGIES = (UNCERTAINTY, RANDOM)
PREFILTER = 10


def conversation_vectors(convs: Sequence[EmbeddedConversation]) -> np.ndarray:
    """One unit vector per conversation: the mean of its chunk vectors (zeros without chunks)."""
    dim = next((c.vectors.shape[1] for c in convs if len(c.vectors)), 1)
    out = np.zeros((len(convs), dim), np.float32)
    for i, c in enumerate(convs):
        if len(c.vectors):
            v = c.vectors.mean(0)
            out[i] = v / max(float(np.linalg.norm(v)), 1e-9)
    return out


def pick_random(n_candidates: int, n: int, seed: int) -> np.ndarray:
    """n candidate indices, uniformly, fixed by `seed`."""
    return np.sort(np.random.default_rng(seed).permutation(n_candidates)[:n])


def uncertainty(p_yes: np.ndarray, threshold: float) -> np.ndarray:
    """1 at the threshold, falling linearly to 0 at whichever end of [0, 1] is farther."""
    room = max(threshold, 1.0 - threshold)
    return 1.0 - np.abs(np.asarray(p_yes, np.float64) - threshold) / room


def pick_uncertain(
    p_yes: np.ndarray, threshold: float, vectors: np.ndarray, n: int, seed: int, prefilter: int = PREFILTER,
    explore: float = 0.0,
    seek: Sequence[bool] = (),
) -> np.ndarray:
    """n candidate indices: `explore` of them elsewhere, the rest near the threshold, spread over
    k-means groups (module docstring). `seek`: the answers (True: yes) the labels still lack; half
    of the `explore` share goes to the candidates likeliest to have them, the rest is random."""
    p_yes = np.asarray(p_yes, np.float64)
    u = uncertainty(p_yes, threshold)
    if n >= len(u):
        return np.arange(len(u))
    k = round(explore * n)
    near = _near_threshold(u, vectors, n - k, seed, prefilter) if n - k else np.zeros(0, int)
    rest = np.setdiff1d(np.arange(len(u)), near)
    sought = np.zeros(0, int)
    if k and seek:
        shares = np.array_split(np.arange(k // 2), len(seek))
        for answer, share in zip(seek, shares, strict=True):
            if len(share):
                likely = p_yes[rest] if answer else 1.0 - p_yes[rest]
                sought = np.r_[sought, rest[_near_threshold(likely, vectors[rest], len(share), seed, prefilter)]]
                rest = np.setdiff1d(rest, sought)
    spread = rest[pick_random(len(rest), k - len(sought), seed)] if k > len(sought) else np.zeros(0, int)
    return np.sort(np.r_[near, sought, spread].astype(int))


def _near_threshold(u: np.ndarray, vectors: np.ndarray, n: int, seed: int, prefilter: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    # Stable sort with index order breaking ties, so the choice depends only on the inputs.
    short = np.argsort(-u, kind="stable")[: max(n, prefilter * n)]
    if len(short) == n:
        return np.sort(short)
    groups = KMeans(n_clusters=n, n_init=3, random_state=seed).fit_predict(
        vectors[short], sample_weight=np.maximum(u[short], 1e-6)
    )
    picked = []
    for g in range(n):
        members = short[groups == g]
        if len(members):
            picked.append(int(members[np.argmax(u[members])]))  # argmax: the first of equals
    # k-means can leave a group empty when points coincide: fill up from the most uncertain.
    taken = set(picked)
    rest = [int(i) for i in short if int(i) not in taken]
    picked += rest[: n - len(picked)]
    return np.sort(np.asarray(picked, int))
