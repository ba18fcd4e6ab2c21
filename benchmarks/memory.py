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
100k real chunks would take hours on this CPU), then ``MemoryStore.query`` timed end to end
(query embedding + searches + fetch) in each mode on distinct questions (the store caches
recent query embeddings), and each stage of a hybrid query alone: the query embedding
(bfloat16 matmuls; beside it the same text through the float32 path documents take), the
vector search (Q8_0 pre-scan + float32 rescoring; random vectors leave few candidates to
rescore, clustered real ones more), the BM25 search, beside faiss's exact flat scan of the
same vectors. Results go to benchmarks/results/memory-<UTC date and time>.{md,json}.
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
from llama_engine.memory.store import MIN_FUSION_CANDIDATES, _Prepared  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VOCABULARY_SIZE = 5000
WORDS_PER_CHUNK = 40  # ~ a 60-word-piece chunk of synthetic text
QUERY_WORDS = 8
INSERT_BATCH = 5000  # synthetic chunks per transaction while filling a bank
MAX_CHUNKS = 3
WARMUP = 3  # untimed queries before each timed loop


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


def time_calls(call, items: list, warmup: list) -> dict:
    """p50/p99 wall ms of ``call`` over ``items``, and of the calling thread's CPU time (what a
    call costs on an idle core, whatever else shares the machine; a hybrid query's BM25 runs on
    another thread, beside it), after calls on ``warmup`` (other items, so a cache warmed there
    does not serve the timed calls)."""
    for item in warmup:
        call(item)
    timings, cpu = [], []
    for item in items:
        started, started_cpu = time.perf_counter(), time.thread_time()
        call(item)
        timings.append((time.perf_counter() - started) * 1000)
        cpu.append((time.thread_time() - started_cpu) * 1000)
    return {"p50_ms": percentile(timings, 50), "p99_ms": percentile(timings, 99), "n": len(timings),
            "cpu_p50_ms": percentile(cpu, 50), "cpu_p99_ms": percentile(cpu, 99)}


def bench_query(args: argparse.Namespace, embedder: Embedder, size: int) -> dict:
    import faiss

    rng = random.Random(size)
    words = vocabulary(rng)
    # distinct questions for every timed loop: the store caches recent query embeddings
    questions = [" ".join(rng.choice(words) for _ in range(QUERY_WORDS)) for _ in range(5 * args.queries + WARMUP)]
    warmup, questions = questions[:WARMUP], questions[WARMUP:]
    batches = [questions[i * args.queries:(i + 1) * args.queries] for i in range(5)]
    with tempfile.TemporaryDirectory() as state, MemoryStore(state, embedder=embedder) as store:
        started = time.perf_counter()
        vectors = fill_bank(store, size, rng, words)
        fill_s = time.perf_counter() - started
        started = time.perf_counter()
        store.query("bench", warmup[0], MAX_CHUNKS)
        reopen_s = time.perf_counter() - started
        result = {"chunks": size, "fill_s": fill_s, "first_query_with_index_build_s": reopen_s,
                  "mean_query_tokens": float(np.mean(embedder.count_tokens(questions)))}
        for mode, batch in zip(("hybrid", "vector", "keyword"), batches):
            result[mode] = time_calls(lambda q: store.query("bench", q, MAX_CHUNKS, mode), batch, warmup)
        # the stages of a hybrid query, each alone
        index = store._loaded_index("bench")
        depth = max(4 * MAX_CHUNKS, MIN_FUSION_CANDIDATES)
        # what a query runs (bfloat16 single-sequence forward, the cache bypassed), and the
        # float32 batch path documents take, on the same questions
        result["query_embedding_only"] = time_calls(embedder._embed_query, batches[3], warmup)
        result["float32_embedding_only"] = time_calls(lambda q: embedder.embed([q]), batches[3], warmup)
        query_vectors = list(embedder.embed(batches[4]))
        result["vector_search_only"] = time_calls(lambda v: index.search(v, depth), query_vectors,
                                                  list(embedder.embed(warmup)))
        result["keyword_search_only"] = time_calls(lambda q: store._keyword_search(index, q, depth), batches[4], warmup)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    result["faiss_flat_scan"] = time_calls(lambda v: flat.search(v[None], depth), query_vectors, query_vectors[:WARMUP])
    print(f"query at {size} chunks: {json.dumps(result)}", flush=True)
    return result


STAGES = ("hybrid", "vector", "keyword", "query_embedding_only", "float32_embedding_only", "vector_search_only",
          "keyword_search_only", "faiss_flat_scan")


def render_markdown(report: dict) -> str:
    ingest = report["ingest"]
    lines = [f"# Memory banks, CPU, {report['date']}", "",
             f"- machine: {report['machine']}; load average (1 min) {report['load_average']} at start, "
             f"{report['load_average_end']} at end",
             f"- command: `{report['command']}`",
             "- ingest: our store (extract, chunk, embed, SQLite WAL commit with fsync) vs "
             "sentence-transformers encode + in-memory faiss IndexFlatIP (no disk), same chunk texts, "
             "alternating rounds, best round of each", ""]
    if ingest is not None:
        lines += ["| ingest | chunks | ours chunks/s | peer chunks/s | ratio |", "|---|---|---|---|---|",
                  f"| {ingest['documents']} synthetic documents | {ingest['chunks']} | "
                  f"{ingest['ours_chunks_per_s']:.1f} | {ingest['peer_chunks_per_s']:.1f} | "
                  f"**{ingest['ratio']:.2f}x** |", ""]
    lines += [f"Query latency, ms (p50 / p99), max_chunks={MAX_CHUNKS}, distinct synthetic questions; the "
              "bank holds synthetic random unit vectors (the pre-scan leaves few rows to rescore; "
              "clustered real embeddings leave more) and synthetic text. The stage columns time one stage of a hybrid query alone "
              f"(searches {max(4 * MAX_CHUNKS, MIN_FUSION_CANDIDATES)} deep, as hybrid does):", "",
              "| chunks | query tokens | hybrid | vector | keyword | query embedding (bfloat16) "
              "| same text, float32 path | vector search | keyword search | faiss IndexFlatIP scan |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for q in report["query"]:
        cells = [f"{q[k]['p50_ms']:.1f} / {q[k]['p99_ms']:.1f}" for k in STAGES]
        lines.append(f"| {q['chunks']} | {q['mean_query_tokens']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "The calling thread's CPU time, ms (p50 / p99), same calls (a hybrid or keyword "
              "query's BM25 runs on a second thread, not counted in its column):", "",
              "| chunks | hybrid | vector | keyword | query embedding (bfloat16) | same text, float32 path "
              "| vector search | keyword search |",
              "|---|---|---|---|---|---|---|---|"]
    for q in report["query"]:  # faiss left out: it scans on its own OpenMP threads
        cells = [f"{q[k]['cpu_p50_ms']:.1f} / {q[k]['cpu_p99_ms']:.1f}" for k in STAGES if k != "faiss_flat_scan"]
        lines.append(f"| {q['chunks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def invocation() -> str:
    """The command line that ran this benchmark: the script or the ``llama-engine`` CLI."""
    program = Path(sys.argv[0])
    prefix = f"python benchmarks/{program.name}" if program.suffix == ".py" else program.name
    return " ".join([prefix] + sys.argv[1:])


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
              "command": invocation()}
    report["ingest"] = None if args.skip_ingest else bench_ingest(args, embedder)
    report["query"] = [bench_query(args, embedder, size) for size in args.sizes]
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"memory-{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H%MZ')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(f"wrote {stem}.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
