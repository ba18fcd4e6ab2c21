"""Memory banks and embeddings over real HTTP: every route, refusals that name the field,
a PDF made here, and durability across `kill -9` of a real server process."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from llama_engine.memory.embedding import EMBEDDING_MODEL_ID, default_model_folder
from tests.memory_corpus import CORPUS
from tests.pdf_writer import minimal_pdf
from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 64
TIMEOUT_S = 300
ACKNOWLEDGED_BEFORE_KILL = 6


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def document(uuid: str, text: str, mime_type: str = "text/plain", **metadata: Any) -> dict[str, Any]:
    return {"uuid": uuid, "content": b64(text), "mime_type": mime_type, "metadata": metadata}


def post(server: ServerProcess, path: str, body: Any) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=TIMEOUT_S)


def query(server: ServerProcess, bank: str, text: str, **options: Any) -> dict[str, Any]:
    response = post(server, f"/memory_bank/query?bank_uuid={bank}", {"query": text, **options})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    state_dir = tmp_path_factory.mktemp("state")
    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--state-dir", str(state_dir)) as server:
        yield server


def test_bank_lifecycle(server: ServerProcess) -> None:
    docs = [document(uuid, text, topic=uuid) for uuid, text, _ in CORPUS[:6]]
    created = post(server, "/memory_banks/create?bank_uuid=life&bank_name=Lifecycle", docs)
    assert created.status_code == 200, created.text
    assert created.json()["document_uuids"] == [d["uuid"] for d in docs]
    listed = requests.get(f"{server.base_url}/memory_banks/get", timeout=TIMEOUT_S)
    assert listed.headers["Content-Type"].startswith("application/jsonl")
    assert {"uuid": "life", "name": "Lifecycle"} in [json.loads(line) for line in listed.text.splitlines()]

    got = post(server, "/memory_bank/get?bank_uuid=life", [CORPUS[1][0], CORPUS[0][0]])
    assert [json.loads(line) for line in got.text.splitlines()] == [docs[1], docs[0]]

    answer = query(server, "life", CORPUS[3][2], max_chunks=2)
    assert answer["chunks"][0]["document_uuid"] == CORPUS[3][0]
    assert len(answer["scores"]) == 2 and -1.0 <= answer["scores"][1] <= answer["scores"][0] <= 1.0

    replaced = document(CORPUS[3][0], "Pianos have eighty-eight keys.")
    assert post(server, "/memory_bank/update?bank_uuid=life", [replaced]).status_code == 200
    # 7 word pieces: pianos have eighty - eight keys .
    assert query(server, "life", "How many keys does a piano have?", max_chunks=1)["chunks"][0] == {
        "content": "Pianos have eighty-eight keys.", "token_count": 7, "document_uuid": CORPUS[3][0]}

    deleted = post(server, "/memory_bank/delete?bank_uuid=life", [CORPUS[3][0], "never-there"])
    assert deleted.text.splitlines() == [f'"{CORPUS[3][0]}"']
    for mode in ("vector", "keyword", "hybrid"):
        chunks = query(server, "life", "How many keys does a piano have?", max_chunks=10, mode=mode)["chunks"]
        assert CORPUS[3][0] not in [c["document_uuid"] for c in chunks]

    dropped = requests.delete(f"{server.base_url}/memory_banks/drop?bank_uuid=life", timeout=TIMEOUT_S)
    assert dropped.json() == "life"
    assert post(server, "/memory_bank/query?bank_uuid=life", {"query": "x"}).status_code == 404


def test_pdf_html_csv_json_documents_are_found(server: ServerProcess) -> None:
    pdf = minimal_pdf(["The Fennick tide mill grinds barley", "using only the incoming tide."])
    docs = [
        {"uuid": "pdf", "content": b64(pdf), "mime_type": "application/pdf", "metadata": {}},
        document("html", "<html><script>var mill='wrong';</script><p>Owls carry the night mail.</p></html>",
                 "text/html"),
        document("csv", "cheese,years\nKetterby,7\n", "text/csv"),
        document("json", '{"compass": {"points_to": "fresh water"}}', "application/json"),
    ]
    assert post(server, "/memory_banks/create?bank_uuid=mixed&bank_name=Mixed", docs).status_code == 200
    for question, uuid in [("What grain does the tidal mill grind?", "pdf"), ("Who delivers letters at night?", "html"),
                           ("How long is Ketterby cheese aged?", "csv"), ("Where does the compass point?", "json")]:
        assert query(server, "mixed", question, max_chunks=1)["chunks"][0]["document_uuid"] == uuid, question
    assert "wrong" not in query(server, "mixed", "owls", max_chunks=1, mode="keyword")["chunks"][0]["content"]


BAD_REQUESTS = [
    # (method, path, body, status, field named)
    ("POST", "/memory_bank/insert?bank_uuid=nope", [], 404, "bank_uuid"),
    ("POST", "/memory_banks/create?bank_uuid=kept&bank_name=again", [], 409, "bank_uuid"),
    ("POST", "/memory_bank/insert?bank_uuid=kept", [document("kept-doc", "again")], 409, "documents[0].uuid"),
    ("POST", "/memory_bank/insert?bank_uuid=kept", [document("new", "")], 400, "documents[0].content"),
    ("POST", "/memory_bank/insert?bank_uuid=kept",
     [{"uuid": "new", "content": b64(b"\xff\xfe\xfd"), "mime_type": "text/plain", "metadata": {}}], 400,
     "documents[0].content"),
    ("POST", "/memory_bank/insert?bank_uuid=kept", [document("ok", "fine"), document("new", "x", "image/png")],
     415, "documents[1].mime_type"),
    ("POST", "/memory_bank/insert?bank_uuid=kept",
     [{"uuid": "new", "content": "not base64!", "mime_type": "text/plain", "metadata": {}}], 400,
     "documents[0].content"),
    ("POST", "/memory_bank/insert?bank_uuid=kept",
     [{"uuid": "new", "content": b64(b"a" * (2 * 1024 * 1024 + 1)), "mime_type": "text/plain", "metadata": {}}],
     413, "documents[0].content"),
    ("POST", "/memory_bank/insert?bank_uuid=kept", [{"uuid": "new", "content": b64("x")}], 400,
     "documents[0].mime_type"),
    ("POST", "/memory_bank/insert?bank_uuid=kept", {"uuid": "new"}, 400, "documents"),
    ("POST", "/memory_bank/update?bank_uuid=kept", [document("ghost", "x")], 404, "documents[0].uuid"),
    ("POST", "/memory_bank/get?bank_uuid=kept", ["ghost"], 404, "document_uuids[0]"),
    ("POST", "/memory_bank/query?bank_uuid=kept", {"query": "x", "max_chunks": 0}, 400, "max_chunks"),
    ("POST", "/memory_bank/query?bank_uuid=kept", {"query": "x", "max_chunks": 101}, 400, "max_chunks"),
    ("POST", "/memory_bank/query?bank_uuid=kept", {"query": "  "}, 400, "query"),
    ("POST", "/memory_bank/query?bank_uuid=kept", {"query": "x", "mode": "fuzzy"}, 400, "mode"),
    ("POST", "/memory_bank/query", {"query": "x"}, 400, "bank_uuid"),
    ("DELETE", "/memory_banks/drop?bank_uuid=nope", None, 404, "bank_uuid"),
    ("POST", "/memory_banks/create?bank_uuid=c&bank_name=c&chunk_size_in_tokens=999", [], 400,
     "chunk_size_in_tokens"),
    ("POST", "/memory_banks/create?bank_uuid=c&bank_name=c&chunk_size_in_tokens=many", [], 400,
     "chunk_size_in_tokens"),
    ("POST", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model"),
    ("POST", "/v1/embeddings", {"model": EMBEDDING_MODEL_ID, "input": ["ok", ""]}, 400, "input[1]"),
    ("POST", "/v1/embeddings", {"model": EMBEDDING_MODEL_ID, "input": "word " * 300}, 400, "input"),
    ("POST", "/v1/embeddings", {"model": EMBEDDING_MODEL_ID, "input": "x", "dimensions": 8}, 400, "dimensions"),
]


def test_bad_input_is_a_4xx_naming_the_field_and_loses_nothing(server: ServerProcess) -> None:
    kept = document("kept-doc", "The Salt Choir sings at low tide.")
    assert post(server, "/memory_banks/create?bank_uuid=kept&bank_name=Kept", [kept]).status_code == 200
    for method, path, body, status, field in BAD_REQUESTS:
        response = requests.request(method, server.base_url + path, json=body, timeout=TIMEOUT_S)
        assert response.status_code == status, (path, body if not isinstance(body, list) else "", response.text)
        error = response.json()["error"]
        assert error["param"] == field and error["message"].startswith(field), error
    assert post(server, "/memory_bank/get?bank_uuid=kept", ["kept-doc"]).json() == kept
    assert post(server, "/memory_bank/get?bank_uuid=kept", ["ok"]).status_code == 404  # no half insert
    assert "Internal Server Error" not in server.log()


def test_embeddings_equal_sentence_transformers(server: ServerProcess) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(default_model_folder()), device="cpu")
    texts = ["Owls carry the night mail.", "Quelle heure est-il ?", "短い文"]
    expected = reference.encode(texts, normalize_embeddings=True)
    as_floats = post(server, "/v1/embeddings", {"model": EMBEDDING_MODEL_ID, "input": texts}).json()
    as_base64 = post(server, "/v1/embeddings", {"model": EMBEDDING_MODEL_ID, "input": texts,
                                                "encoding_format": "base64"}).json()
    floats = np.array([item["embedding"] for item in as_floats["data"]], dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                        for item in as_base64["data"]])
    assert (floats * expected).sum(axis=1).min() >= 0.9999
    np.testing.assert_array_equal(decoded, floats)
    tokens = sum(len(ids) for ids in reference.tokenizer(texts)["input_ids"])
    assert as_floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert as_floats["model"] == EMBEDDING_MODEL_ID and [d["index"] for d in as_floats["data"]] == [0, 1, 2]
    models = requests.get(f"{server.base_url}/v1/models", timeout=TIMEOUT_S).json()
    assert EMBEDDING_MODEL_ID in [model["id"] for model in models["data"]]


def test_openapi_documents_memory_routes_and_cosine_scores(server: ServerProcess) -> None:
    document_ = requests.get(f"{server.base_url}/openapi.json", timeout=TIMEOUT_S).json()
    assert document_["paths"]["/memory_banks/drop"]["delete"]["parameters"][0]["name"] == "bank_uuid"
    assert "get" in document_["paths"]["/memory_banks/get"]
    scores = document_["components"]["schemas"]["MemoryBankQueryResponse"]["properties"]["scores"]
    assert "Cosine similarity" in scores["description"]


def test_kill_9_keeps_every_acknowledged_document(tmp_path: Path) -> None:
    acknowledged: list[str] = []
    stop = threading.Event()

    def insert_until_killed(server: ServerProcess) -> None:
        for uuid, text, _ in CORPUS:
            if stop.is_set():
                return
            try:
                response = post(server, "/memory_bank/insert?bank_uuid=durable", [document(uuid, text)])
            except requests.RequestException:
                return  # the server died mid-request: this one was never acknowledged
            if response.status_code == 200:
                acknowledged.append(uuid)

    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--state-dir", str(tmp_path)) as server:
        assert post(server, "/memory_banks/create?bank_uuid=durable&bank_name=D", []).status_code == 200
        writer = threading.Thread(target=insert_until_killed, args=(server,))
        writer.start()
        while len(acknowledged) < ACKNOWLEDGED_BEFORE_KILL and writer.is_alive():
            threading.Event().wait(0.05)
        server.process.kill()  # SIGKILL, likely in the middle of the next insert
        server.process.wait()
        stop.set()
        writer.join()
    assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL

    with sqlite3.connect(tmp_path / "memory.sqlite3") as db:  # nothing half indexed
        assert db.execute("SELECT count(*) FROM documents WHERE id NOT IN "
                          "(SELECT document_id FROM chunks)").fetchone() == (0,)
        db.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('integrity-check')")

    questions = {uuid: question for uuid, _, question in CORPUS}
    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--state-dir", str(tmp_path)) as server:
        got = post(server, "/memory_bank/get?bank_uuid=durable", acknowledged)
        assert got.status_code == 200, got.text
        assert [json.loads(line)["uuid"] for line in got.text.splitlines()] == acknowledged
        for uuid in acknowledged:
            found = query(server, "durable", questions[uuid], max_chunks=3, mode="vector")["chunks"]
            assert uuid in [chunk["document_uuid"] for chunk in found], uuid


def test_chunking_options_are_read_from_the_query_string(server: ServerProcess) -> None:
    """Query-string values are text: "64" is the number 64 there (JSON bodies stay strict)."""
    text = " ".join(f"Sentence number {i} tells of the quiet lighthouse keeper." for i in range(40))
    created = post(server, "/memory_banks/create?bank_uuid=small&bank_name=Small"
                           "&chunk_size_in_tokens=64&overlap_size_in_tokens=8", [document("d", text)])
    assert created.status_code == 200, created.text
    chunks = query(server, "small", "lighthouse keeper", max_chunks=100)["chunks"]
    assert len(chunks) > 1 and all(c["token_count"] <= 64 for c in chunks)
