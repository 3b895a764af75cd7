"""`flexor heads diff LIVE CANDIDATE --conversations FILE...`: the shadow-heads comparison offline.

Both sets of heads score the same conversations with stage 1 (no LLM), exactly as the service's
shadow heads do (`agents.shadow`); per question it prints how often their answers agree, each
side's yes-rate and the mean change in p_yes. LIVE or CANDIDATE may be `none`: zero-shot for
every question (the comparison before the first heads go live).

Conversations are conversation.v1 JSONL or the labelled-data format, (.gz) as `flexor produce`
reads them. Questions: --questions, else LIVE/questions.yaml, else CANDIDATE/questions.yaml
(what `flexor train` writes), else the example questions.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any

import orjson

from stream.config import LimitsConfig

EXAMPLES = Path(str(importlib.resources.files("examples")))
BATCH = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    from models.embedder import BACKENDS

    sub = p.add_subparsers(dest="heads_command", required=True, parser_class=type(p), metavar="COMMAND")
    d = sub.add_parser("diff", help="compare two heads directories on the same conversations",
                       description="Compare two heads directories on the same conversations (stage 1 only).")
    d.add_argument("live", help="heads directory in production (or `none`: zero-shot)")
    d.add_argument("candidate", help="heads directory to compare with it (or `none`)")
    d.add_argument("--conversations", type=Path, nargs="+", required=True, help="JSONL(.gz) conversations")
    d.add_argument("--questions", type=Path, default=None, help="questions file (see above for the default)")
    d.add_argument("--limit", type=int, default=None, help="at most this many conversations per file")
    d.add_argument("--embedder", default="onnx-int8", choices=BACKENDS, help="the heads' embedder backend")
    d.add_argument("--json", type=Path, default=None, help="also write the comparison to this file")


def _heads_dir(value: str) -> Path | None:
    if value == "none":
        return None
    path = Path(value)
    if not (path / "manifest.json").is_file():
        raise ValueError(f"{path} is not a heads directory (no manifest.json): pass one that flexor train wrote")
    return path


def _questions_file(args: argparse.Namespace, live: Path | None, candidate: Path | None) -> Path:
    if args.questions is not None:
        return args.questions
    for d in (live, candidate):
        if d is not None and (d / "questions.yaml").is_file():
            return d / "questions.yaml"
    return EXAMPLES / "questions.yaml"


def diff(args: argparse.Namespace) -> dict[str, Any]:
    from agents.learn.embedcache import CachingEmbedder
    from agents.pipeline import embed_conversations
    from agents.questions import load_questions
    from agents.shadow import candidate_cascade, compare
    from agents.similarity import SimilarityScorer
    from models.embedder import load_embedder
    from stream.dev.produce import load_conversations
    from stream.schemas import decode_conversation

    live_dir, cand_dir = _heads_dir(args.live), _heads_dir(args.candidate)
    questions = load_questions(_questions_file(args, live_dir, cand_dir))
    limits = LimitsConfig()
    convs = [
        decode_conversation(orjson.dumps(e), limits).to_conversation()
        for path in args.conversations
        for e in load_conversations(path, args.limit)
    ]
    embedder = CachingEmbedder(load_embedder(args.embedder))
    zero_shot = SimilarityScorer(embedder)
    wanted = dict.fromkeys(q.head for q in questions.questions if q.head)
    live, live_version = candidate_cascade(live_dir, embedder, zero_shot, wanted)
    cand, cand_version = candidate_cascade(cand_dir, embedder, zero_shot, wanted)
    totals: dict[str, list[Any]] = {}
    for start in range(0, len(convs), BATCH):
        embedded = embed_conversations(embedder, convs[start : start + BATCH])
        plan = [(q, [i for i, e in enumerate(embedded) if q.applies(e.conversation.metadata) and e.chunks])
                for q in questions.questions]
        plan = [(q, idx) for q, idx in plan if idx]
        for (q, _), a, b in zip(plan, live.stage1(plan, embedded), cand.stage1(plan, embedded), strict=True):
            totals.setdefault(q.id, []).append(compare(q, a, b))
    embedder.flush()
    rows = {}
    for qid, parts in totals.items():
        n = sum(p.n for p in parts)
        rows[qid] = {
            "n": n,
            "agreement": sum(p.agree for p in parts) / n,
            "live_yes_rate": sum(p.live_yes for p in parts) / n,
            "candidate_yes_rate": sum(p.candidate_yes for p in parts) / n,
            "mean_abs_dp": sum(p.mean_abs_dp * p.n for p in parts) / n,
        }
    return {"live": {"dir": args.live, "version": live_version},
            "candidate": {"dir": args.candidate, "version": cand_version},
            "conversations": len(convs), "questions": rows}


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    result = diff(args)
    print(f"{'question':<24} {'n':>6} {'agree':>7} {'live yes':>9} {'cand yes':>9} {'mean |dp|':>9}")
    for qid, r in result["questions"].items():
        print(f"{qid:<24} {r['n']:>6} {r['agreement']:>7.3f} {r['live_yes_rate']:>9.3f} "
              f"{r['candidate_yes_rate']:>9.3f} {r['mean_abs_dp']:>9.3f}")
    if not result["questions"]:
        print("no question applies to these conversations", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
