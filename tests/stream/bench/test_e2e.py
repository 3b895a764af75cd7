"""`flexor bench --e2e --revisions` on a few example conversations: the fields that compare
versions are there and agree with what was produced."""

from __future__ import annotations

import json
from pathlib import Path

from agents.chunking import Turn, chunk_turns
from models.llm.guard import strip_instructions
from stream.bench.e2e import chat_revisions
from stream.cli import main
from stream.dev.produce import load_conversations
from tests.conftest import EXAMPLES


def test_e2e_revisions_report(tmp_path: Path) -> None:
    conversations = EXAMPLES / "conversations.jsonl"
    code = main(["bench", "--e2e", "--revisions", "--realtime", "all", "--limit", "2",
                 "--conversations", str(conversations), "--report", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert (r["settings"]["heads"], r["settings"]["llm"]) == ("none", "none")
    assert r["replay"]["answers_identical"] is True
    assert r["e2e"]["latency_fresh_conversations"] is True

    events = load_conversations(conversations, 2)
    stream, _ = chat_revisions(events)
    v = r["revisions"]
    assert (v["conversations"], v["events"]) == (2, len(stream)) == (2, sum(len(e["turns"]) + 1 for e in events))

    def windows(e: dict) -> list[str]:  # type: ignore[type-arg]
        turns = [Turn(t["turn_id"], t["speaker"], t["text"]) for t in e["turns"]]
        return [strip_instructions(c.text)[0] for c in chunk_turns(turns)]

    # Every question real-time: every revision is embedded; reuse embeds each distinct window once.
    assert v["texts_embedded"] == len({w for e in stream for w in windows(e)})
    assert v["texts_embedded_reuse_off"] == sum(len(windows(e)) for e in stream)
    assert v["texts_single_pass"] == sum(len(windows(e)) for e in events)
    assert v["reuse_on"]["cache_hit_rate"] > 0 and v["reuse_off"]["cache_hit_rate"] is None
    assert 0 < v["reuse_on"]["stage_shares"]["embed"] < 1
    for run in (r["replay"]["reuse_on"], r["replay"]["reuse_off"], v["reuse_on"], v["reuse_off"]):
        assert sum(run["stage_shares"].values()) <= 1.0  # stages are parts of their batch's time
    assert len(v["realtime_questions"]) == 8
