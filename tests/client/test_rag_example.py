"""``examples/rag_pipeline.py`` run end to end against the in-process server."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.client.conftest import API_KEY

pytestmark = pytest.mark.engine

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rag_pipeline.py"
TOPICS = ["black_holes", "honeybees", "lithium_batteries", "sourdough", "volcanoes"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("rag_pipeline_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retriever_finds_each_questions_document(example):
    from splitserve.client import load_documents

    docs = load_documents(example.DOCS_DIR)
    assert 15 <= len(docs) <= 30
    retriever = example.TfidfRetriever(docs)
    assert [d.name for d in retriever.shared_context(example.QUESTIONS, 5)] == TOPICS
    best = [docs[int(retriever.scores(q).argmax())].name for q in example.QUESTIONS]
    assert sorted(set(best)) == TOPICS and all(best.count(t) == 4 for t in TOPICS)


@pytest.mark.parametrize("chat", [False, True])
def test_every_question_answered_with_a_shared_document_prefix(example, live_server, tmp_path, capsys, chat):
    out = tmp_path / "run.json"
    argv = ["--base-url", live_server.url, "--api-key", API_KEY, "--concurrency", "4", "--max-tokens", "4",
            "--json", str(out), "--no-progress"] + (["--chat"] if chat else [])
    pool = live_server.worker.engine.pool
    hits_before, queries_before = pool.num_prefix_hits, pool.num_prefix_queries
    assert example.main(argv) == 0
    num_hits, num_queries = pool.num_prefix_hits - hits_before, pool.num_prefix_queries - queries_before
    # the point of documents-first: the server's prefix cache computed the shared block once per wave
    assert num_queries > 20 * 40 and num_hits >= 0.6 * num_queries, (num_hits, num_queries)
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["results"]
    assert len(rows) == len(example.QUESTIONS) == 20 and report["context"] == TOPICS
    # documents first: every prompt starts with the same instructions + documents block ...
    prefix = example.common_prefix([r["prompt"] for r in rows])
    doc_starts = [(example.DOCS_DIR / f"{t}.txt").read_text().strip()[:60] for t in TOPICS]
    assert "Documents:" in prefix and all(d in prefix for d in doc_starts)
    assert len(prefix) > 0.9 * min(len(r["prompt"]) for r in rows)
    # ... and the question last
    for row, question in zip(rows, example.QUESTIONS):
        assert row["question"] == question and row["error"] is None and row["answer"]
        assert 0 < row["ttft_s"] <= row["total_s"] and 1 <= len(row["itl_s"]) <= 3  # one gap per chunk: no token ids
        assert row["prompt"].count(question) == 1
        assert row["prompt"].index(question) > max(row["prompt"].index(d) for d in doc_starts)
    assert "20 of 20 questions answered" in printed and "median" in printed
