"""A RAG pipeline on the splitserve client: retrieve, build prefix-sharing prompts, answer in a paced batch.

1. Load the documents in ``examples/docs/`` (one short text file per topic).
2. A TF-IDF retriever (numpy only) picks the ``--top-k`` documents most relevant
   to the whole set of questions: the shared context.
3. Every prompt is that context first and its question last
   (``splitserve.client.rag_prompt``), so all prompts share one long prefix the
   server's prefix cache computes once.
4. The questions go through ``Client.batch`` (streamed, paced, retried) and the
   script prints each request's time to first token, inter-token latency and
   total, then the medians.

Start a server first (``bash scripts/serve.sh``), then::

    python examples/rag_pipeline.py --base-url http://127.0.0.1:8000 --concurrency 8 --max-tokens 32

With the default model (SmolLM2-135M-Instruct) the answers come from the retrieved
documents, e.g. "How do stellar black holes form?" -> "Stellar black holes form when a
massive star collapses under its own gravity. ..." (a 135M model: short and plain).
``--chat`` sends them through the model's chat template.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from splitserve.client import Client, Completion, Document, load_documents, rag_messages, rag_prompt
from splitserve.client.rag import common_prefix

DOCS_DIR = Path(__file__).resolve().parent / "docs"

QUESTIONS = [
    "What makes some volcanoes erupt explosively?",
    "How does a shield volcano differ from a stratovolcano?",
    "What is magma called once it reaches the surface?",
    "How can volcanic ash affect aircraft and the climate?",
    "How does a forager bee tell other bees where flowers are?",
    "What jobs do worker bees do as they age?",
    "How do bees turn nectar into honey?",
    "Who lives in a honeybee colony besides the queen?",
    "What is the event horizon of a black hole?",
    "How do stellar black holes form?",
    "Which black hole sits at the centre of the Milky Way?",
    "How do astronomers detect black holes they cannot see?",
    "What makes sourdough bread rise without commercial yeast?",
    "Why does sourdough taste sour?",
    "How often should a sourdough starter be fed?",
    "Why is sourdough baked in a covered pot?",
    "How does a lithium-ion battery store energy?",
    "What is thermal runaway in a lithium battery?",
    "Why do phones and electric cars use lithium-ion cells?",
    "What does a battery management system watch?",
]

_STOP = frozenset(
    "a an and are as at be by can do does for from how in into is it its of on or so some such that the their "
    "them then there these they this to was what when where which while who why will with".split()
)


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP and len(w) > 1]


class TfidfRetriever:
    """Cosine similarity between L2-normalised TF-IDF vectors (smoothed idf, sublinear tf)."""

    def __init__(self, documents: list[Document]) -> None:
        self.documents = documents
        tokenised = [words(f"{d.name.replace('_', ' ')} {d.text}") for d in documents]
        self.vocab = {w: i for i, w in enumerate(sorted({w for doc in tokenised for w in doc}))}
        counts = np.zeros((len(documents), len(self.vocab)))
        for row, doc in enumerate(tokenised):
            for w in doc:
                counts[row, self.vocab[w]] += 1
        df = (counts > 0).sum(axis=0)
        self.idf = np.log((1 + len(documents)) / (1 + df)) + 1.0
        self.matrix = self._normalise(self._tf(counts) * self.idf)

    @staticmethod
    def _tf(counts: np.ndarray) -> np.ndarray:
        return np.where(counts > 0, 1.0 + np.log(np.maximum(counts, 1.0)), 0.0)

    @staticmethod
    def _normalise(m: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(m, axis=-1, keepdims=True)
        return m / np.where(norms == 0, 1.0, norms)

    def scores(self, query: str) -> np.ndarray:
        """Similarity of ``query`` to every document (0 for no shared word)."""
        counts = np.zeros(len(self.vocab))
        for w in words(query):
            if w in self.vocab:
                counts[self.vocab[w]] += 1
        return self.matrix @ self._normalise(self._tf(counts) * self.idf)

    def shared_context(self, questions: list[str], k: int) -> list[Document]:
        """The ``k`` documents most relevant to the questions together, in corpus order (a stable prefix)."""
        total = sum(self.scores(q) for q in questions)
        best = sorted(np.argsort(-total, kind="stable")[:k].tolist())
        return [self.documents[i] for i in best]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL, with or without /v1")
    p.add_argument("--model", default=None, help="model name (default: the one the server serves)")
    p.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"), help="bearer token (default: $SPLITSERVE_API_KEY)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--top-k", type=int, default=5, help="documents in the shared context")
    p.add_argument("--docs", type=Path, default=DOCS_DIR, help="folder of .txt documents")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions (documents in the system message)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", type=Path, default=None, help="also write every prompt, answer and timing here")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.max_tokens < 1 or args.top_k < 1:
        p.error("--concurrency, --max-tokens and --top-k must be >= 1")
    return args


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.1f}"


def print_table(questions: list[str], sources: list[str], results: list, out=None) -> None:
    """One row per question (its best-matching document, tokens, TTFT, median ITL, total), then the medians."""
    out = out or sys.stdout
    print(f"{'#':>3}  {'question':<44} {'best document':<17} {'tokens':>6} {'ttft ms':>8} {'itl ms':>7} {'total ms':>9}  answer",
          file=out)
    for i, (q, src, r) in enumerate(zip(questions, sources, results)):
        q = q if len(q) <= 44 else q[:41] + "..."
        if isinstance(r, Completion):
            t, n = r.timings, r.usage.completion_tokens if r.usage else len(r.text)
            answer = r.text.strip().replace("\n", " ")[:30]
            print(f"{i:>3}  {q:<44} {src[:17]:<17} {n:>6} {_ms(t.ttft_s):>8} {_ms(t.median_itl_s):>7} {_ms(t.total_s):>9}  "
                  f"{answer!r}", file=out)
        else:
            print(f"{i:>3}  {q:<44} {src[:17]:<17} {'error':>6}  {type(r).__name__}: {r}", file=out)
    ok = [r for r in results if isinstance(r, Completion)]
    if ok:
        def med(xs: list) -> float:
            xs = [x for x in xs if x is not None]
            return statistics.median(xs) if xs else float("nan")

        print(f"{'':>3}  {'median':<44} {'':<17} {'':>6} {_ms(med([r.timings.ttft_s for r in ok])):>8} "
              f"{_ms(med([x for r in ok for x in r.timings.itl_s])):>7} {_ms(med([r.timings.total_s for r in ok])):>9}", file=out)
    print(f"{len(ok)} of {len(results)} questions answered", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    documents = load_documents(args.docs)
    retriever = TfidfRetriever(documents)
    context = retriever.shared_context(QUESTIONS, min(args.top_k, len(documents)))
    sources = [documents[int(np.argmax(retriever.scores(q)))].name for q in QUESTIONS]
    if args.chat:
        conversations = [rag_messages(context, q) for q in QUESTIONS]
        prompts = [json.dumps(c) for c in conversations]
    else:
        prompts = [rag_prompt(context, q) for q in QUESTIONS]
    prefix = common_prefix(prompts)
    print(f"{len(documents)} documents; shared context: {', '.join(d.name for d in context)}")
    print(f"{len(prompts)} prompts share a prefix of {len(prefix)} characters (of {len(prompts[0])} in the first)\n")

    with Client(args.base_url, api_key=args.api_key, model=args.model) as client:
        run = client.batch_chat if args.chat else client.batch
        results = run(conversations if args.chat else prompts, concurrency=args.concurrency,
                      progress=not args.no_progress, max_tokens=args.max_tokens, temperature=0)
    print_table(QUESTIONS, sources, results)
    if args.json is not None:
        rows = [{
            "question": q, "best_document": src, "prompt": p, "answer": r.text if isinstance(r, Completion) else None,
            "error": None if isinstance(r, Completion) else repr(r),
            "ttft_s": getattr(getattr(r, "timings", None), "ttft_s", None),
            "itl_s": getattr(getattr(r, "timings", None), "itl_s", None),
            "total_s": getattr(getattr(r, "timings", None), "total_s", None),
        } for q, src, p, r in zip(QUESTIONS, sources, prompts, results)]
        args.json.write_text(json.dumps({"context": [d.name for d in context], "results": rows}, indent=1))
    return 0 if all(isinstance(r, Completion) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
