"""Memory-bank benchmark: ingest throughput against sentence-transformers + faiss, and query
latency at 10k and 100k chunks.

    python benchmarks/memory.py                       # ingest 48 documents, query at 10k and 100k
    python benchmarks/memory.py --documents 16 --sizes 10000

Ingest: the same synthetic documents (about 3 chunks each) go through our store (extract,
chunk, embed with our BERT encoder, one SQLite transaction with fsync) and through the peer
(sentence-transformers ``encode`` of the same chunk texts, normalized, added to an in-memory
``faiss.IndexFlatIP``, nothing written to disk), alternating rounds in one run; chunks/s is
chunks over wall time, best round of each.

Query: a bank filled to N chunks with synthetic unit vectors and synthetic text (embedding
100k real chunks would take hours on this CPU; search cost depends only on the count), then
``MemoryStore.query`` timed end to end (query embedding + search + fetch) in each mode, and
the vector scan alone beside faiss's exact search over the same vectors.
Results go to benchmarks/results/memory-<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_engine.memory import Document, Embedder, MemoryStore  # noqa: E402
from llama_engine.memory.chunking import Chunk, chunk_text  # noqa: E402
from llama_engine.memory.embedding import default_model_folder  # noqa: E402
from llama_engine.memory.store import _Prepared  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VOCABULARY_SIZE = 5000
WORDS_PER_CHUNK = 40  # ~ a 60-word-piece chunk of synthetic text
QUERY_WORDS = 8
INSERT_BATCH = 5000  # synthetic chunks per transaction while filling a bank
MAX_CHUNKS = 3


def vocabulary(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(VOCABULARY_SIZE)]


def synthetic_document(rng: random.Random, words: list[str], sentences: int) -> str:
    out = []
    for _ in range(sentences):
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 18))).capitalize() + ".")
    return " ".join(out)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def bench_ingest(args: argparse.Namespace, embedder: Embedder) -> dict:
    rng = random.Random(0)
    words = vocabulary(rng)
    texts = [synthetic_document(rng, words, args.sentences) for _ in range(args.documents)]
    documents = [Document.from_text(f"doc-{i}", text) for i, text in enumerate(texts)]
    chunk_texts = [c.text for text in texts for c in chunk_text(text, embedder.token_offsets)]

    import faiss
    from sentence_transformers import SentenceTransformer
    peer_model = SentenceTransformer(str(default_model_folder()), device="cpu")

    ours, peer = [], []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as state, MemoryStore(state, embedder=embedder) as store:
            store.create_bank("bench", "bench")
            started = time.perf_counter()
            written = store.insert("bench", documents)
            ours.append(written.chunk_count / (time.perf_counter() - started))
        started = time.perf_counter()
        vectors = peer_model.encode(chunk_texts, normalize_embeddings=True, convert_to_numpy=True)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        peer.append(len(chunk_texts) / (time.perf_counter() - started))
        print(f"ingest round {round_}: ours {ours[-1]:.1f} chunks/s, peer {peer[-1]:.1f} chunks/s", flush=True)
    return {"documents": len(documents), "chunks": len(chunk_texts), "rounds": args.rounds,
            "ours_chunks_per_s": max(ours), "peer_chunks_per_s": max(peer),
            "ratio": max(ours) / max(peer), "all_ours": ours, "all_peer": peer}


def fill_bank(store: MemoryStore, size: int, rng: random.Random, words: list[str]) -> np.ndarray:
    """Write ``size`` chunks of synthetic text and random unit vectors through the store's
    own row writer, in batches of INSERT_BATCH per transaction. Returns the vectors."""
    store.create_bank("bench", "bench")
    dimension = store.embedder.dimension
    np_rng = np.random.default_rng(0)
    all_vectors = []
    for first in range(0, size, INSERT_BATCH):
        count = min(INSERT_BATCH, size - first)
        vectors = np_rng.standard_normal((count, dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = [Chunk(" ".join(rng.choice(words) for _ in range(WORDS_PER_CHUNK)), WORDS_PER_CHUNK)
                  for _ in range(count)]
        prepared = [_Prepared(Document.from_text(f"doc-{first}", "synthetic"), chunks, vectors)]
        with store._write_lock:
            store._write(lambda conn: store._insert_rows(conn, "bench", prepared))
        all_vectors.append(vectors)
    store._indexes.clear()  # the first query rebuilds the index from SQLite, as after a restart
    return np.concatenate(all_vectors)


def time_calls(call, queries: list, warmup: int = 3) -> dict:
    for q in queries[:warmup]:
        call(q)
    timings = []
    for q in queries:
        started = time.perf_counter()
        call(q)
        timings.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": percentile(timings, 50), "p99_ms": percentile(timings, 99), "n": len(timings)}


def bench_query(args: argparse.Namespace, embedder: Embedder, size: int) -> dict:
    import faiss

    rng = random.Random(size)
    words = vocabulary(rng)
    questions = [" ".join(rng.choice(words) for _ in range(QUERY_WORDS)) for _ in range(args.queries)]
    with tempfile.TemporaryDirectory() as state, MemoryStore(state, embedder=embedder) as store:
        started = time.perf_counter()
        vectors = fill_bank(store, size, rng, words)
        fill_s = time.perf_counter() - started
        started = time.perf_counter()
        store.query("bench", questions[0], MAX_CHUNKS)
        reopen_s = time.perf_counter() - started
        result = {"chunks": size, "fill_s": fill_s, "first_query_with_index_build_s": reopen_s}
        for mode in ("hybrid", "vector", "keyword"):
            result[mode] = time_calls(lambda q: store.query("bench", q, MAX_CHUNKS, mode), questions)
        query_vectors = embedder.embed(questions)
        index = store._loaded_index("bench")
        result["vector_scan_only"] = time_calls(lambda v: index.search(v, MAX_CHUNKS), list(query_vectors))
        result["query_embedding_only"] = time_calls(lambda q: embedder.embed([q]), questions)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    result["faiss_flat_scan"] = time_calls(lambda v: flat.search(v[None], MAX_CHUNKS), list(query_vectors))
    print(f"query at {size} chunks: {json.dumps(result)}", flush=True)
    return result


def render_markdown(report: dict) -> str:
    ingest = report["ingest"]
    lines = [f"# Memory banks, CPU, {report['date']}", "",
             f"- machine: {report['machine']}; load average at start {report['load_average']}",
             f"- command: `{report['command']}`",
             "- ingest: our store (extract, chunk, embed, SQLite WAL commit with fsync) vs "
             "sentence-transformers encode + in-memory faiss IndexFlatIP (no disk), same chunk texts, "
             "alternating rounds, best round of each", "",
             "| ingest | chunks | ours chunks/s | peer chunks/s | ratio |", "|---|---|---|---|---|",
             f"| {ingest['documents']} synthetic documents | {ingest['chunks']} | {ingest['ours_chunks_per_s']:.1f} "
             f"| {ingest['peer_chunks_per_s']:.1f} | **{ingest['ratio']:.2f}x** |", "",
             "Query latency, ms (p50 / p99), max_chunks=3; the bank holds synthetic unit vectors and "
             "synthetic text (the vectors' values do not change the cost of an exact scan):", "",
             "| chunks | hybrid | vector | keyword | vector scan alone | faiss IndexFlatIP scan | query embedding |",
             "|---|---|---|---|---|---|---|"]
    for q in report["query"]:
        cells = [f"{q[k]['p50_ms']:.1f} / {q[k]['p99_ms']:.1f}" for k in
                 ("hybrid", "vector", "keyword", "vector_scan_only", "faiss_flat_scan", "query_embedding_only")]
        lines.append(f"| {q['chunks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--documents", type=int, default=48)
    parser.add_argument("--sentences", type=int, default=40, help="sentences per synthetic document")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--skip-ingest", action="store_true")


def run(args: argparse.Namespace) -> None:
    embedder = Embedder()
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average": round(os.getloadavg()[0], 2),
              "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:])}
    report["ingest"] = None if args.skip_ingest else bench_ingest(args, embedder)
    report["query"] = [bench_query(args, embedder, size) for size in args.sizes]
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"memory-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    if report["ingest"] is not None:
        stem.with_suffix(".md").write_text(render_markdown(report))
    print(f"wrote {stem}.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
