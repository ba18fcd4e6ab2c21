"""Text <-> token ids for Llama-architecture models.

The heavy lifting (BPE, byte-level mapping, added-token matching) is done by the Rust `tokenizers`
library; this module only rebuilds its pipeline from GGUF metadata or an HF folder, renders chat
templates with a sandboxed jinja2 environment, and turns a token stream into text incrementally.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

# --- GGUF metadata keys -------------------------------------------------------------------------
KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS_ID = "tokenizer.ggml.bos_token_id"
KEY_EOS_ID = "tokenizer.ggml.eos_token_id"
KEY_UNK_ID = "tokenizer.ggml.unknown_token_id"
KEY_PAD_ID = "tokenizer.ggml.padding_token_id"
KEY_EOT_ID = "tokenizer.ggml.eot_token_id"
KEY_EOM_ID = "tokenizer.ggml.eom_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
# Chat-template variable name (also the tokenizer_config key) -> GGUF key of that token's id.
GGUF_SPECIAL_TOKEN_KEYS = {
    "bos_token": KEY_BOS_ID,
    "eos_token": KEY_EOS_ID,
    "unk_token": KEY_UNK_ID,
    "pad_token": KEY_PAD_ID,
}

GGUF_MODEL_BYTE_LEVEL_BPE = "gpt2"
GGUF_MODEL_SENTENCEPIECE_BPE = "llama"
PRE_DEFAULT = "default"

# HF folder file names.
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"

SENTENCEPIECE_SPACE = "\u2581"  # "▁": how SentencePiece spells a space inside pieces
REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete / invalid UTF-8 sequence

# Tokens that end an assistant turn in common chat formats; each counts as a stop token when the
# vocabulary has it, even if the model's declared EOS is a different token.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (SmolLM, Qwen)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end_of_text|>",  # Llama 3 base
    "<|endoftext|>",  # GPT-2 / StarCoder family base EOS
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
)

# How many prompt tokens the streaming detokenizer decodes as left context, so that the first
# generated token is rendered the way it would be mid-text (e.g. a leading "▁" becomes a space).
DETOKENIZER_PROMPT_CONTEXT_TOKENS = 5


class GGUFTokenType(IntEnum):
    """llama.cpp's per-token type, stored in tokenizer.ggml.token_type."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Pre-tokenizer split patterns, selected by tokenizer.ggml.pre. GPT-2's pattern is what the
# ByteLevel pre-tokenizer applies itself when use_regex=True, so it needs no entry here.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_LLAMA3 = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"})
PRE_QWEN2 = frozenset({"qwen2", "deepseek-r1-qwen"})
# GPT-2's pattern with every digit split off first (StarCoder-derived vocabularies).
PRE_SINGLE_DIGITS = frozenset({"smollm", "starcoder", "refact"})
PRE_GPT2 = frozenset({PRE_DEFAULT, "gpt2", "gpt-2"})
# llama.cpp ignores the merge list for these when a whole pre-token is already in the vocabulary.
PRE_IGNORE_MERGES = PRE_LLAMA3


class ChatTemplateError(ValueError):
    """The chat template is missing, or it rejected the conversation (raise_exception)."""


# ================================================================================================
# Building the `tokenizers` pipeline from GGUF metadata
# ================================================================================================


def _require(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF file has no tokenizer metadata: missing key {key!r}")
    return metadata[key]


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split that matches how the vocabulary's merges were learned (tokenizer.ggml.pre)."""
    byte_level_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in PRE_LLAMA3:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), "isolated"), byte_level_only])
    if pre in PRE_QWEN2:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), "isolated"), byte_level_only])
    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in PRE_SINGLE_DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split])
    if pre in PRE_GPT2:
        return gpt2_split
    raise ValueError(f"unsupported GGUF pre-tokenizer: {KEY_PRE}={pre!r}")


def _build_byte_level_backend(metadata: Mapping[str, Any], vocab: dict[str, int]) -> BackendTokenizer:
    """GPT-2 style byte-level BPE: tokens are already spelled in the byte-to-unicode alphabet."""
    pre = metadata.get(KEY_PRE)
    if pre is None:
        logger.warning("GGUF has no %s; using the GPT-2 pre-tokenizer", KEY_PRE)
        pre = PRE_DEFAULT
    merges = [tuple(merge.split(" ", 1)) for merge in _require(metadata, KEY_MERGES)]
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in PRE_IGNORE_MERGES)
    backend = BackendTokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_merges(
    tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Merge rules equivalent to SentencePiece BPE encoding.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is the highest-scoring
    normal piece. Listing every (left, right) split of every normal piece, best score first, gives
    a BPE merge table that makes the same choices.
    """
    candidates: list[tuple[float, int, int, str, str]] = []
    for piece_id, piece in enumerate(tokens):
        if token_types[piece_id] != GGUFTokenType.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[piece_id], piece_id, vocab[left], left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _build_sentencepiece_backend(metadata: Mapping[str, Any], vocab: dict[str, int]) -> BackendTokenizer:
    """SentencePiece BPE with byte fallback, reproducing llama.cpp's handling of the "▁" prefix."""
    tokens = metadata[KEY_TOKENS]
    scores = _require(metadata, KEY_SCORES)
    token_types = metadata.get(KEY_TOKEN_TYPE) or [GGUFTokenType.NORMAL] * len(tokens)
    unk_id = _optional_id(metadata, KEY_UNK_ID, len(tokens))
    bpe = models.BPE(
        vocab=vocab,
        merges=_sentencepiece_merges(tokens, scores, token_types, vocab),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = BackendTokenizer(bpe)
    add_space_prefix = bool(metadata.get(KEY_ADD_SPACE_PREFIX, True))
    # A normalizer (not Metaspace) so that every text fragment gets the prefix space, also one that
    # already starts with a space and one that follows a special token: what SentencePiece and
    # llama.cpp both do.
    space_to_piece = normalizers.Replace(" ", SENTENCEPIECE_SPACE)
    prefix_steps = [normalizers.Prepend(SENTENCEPIECE_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix_steps, space_to_piece])
    # Fuse before Strip: Strip works per token, and must remove only the one prefix space.
    strip_steps = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip_steps]
    )
    return backend


def _register_added_tokens(backend: BackendTokenizer, tokens: Sequence[str], token_types: Sequence[int]) -> None:
    """Make control/user-defined tokens match whole in text, as llama.cpp does.

    Control and unknown tokens become special (skipped by decode(skip_special_tokens=True));
    user-defined ones (e.g. "<think>") stay ordinary text when decoded.
    """
    special, user_defined = [], []
    for token, token_type in zip(tokens, token_types):
        if token_type in (GGUFTokenType.CONTROL, GGUFTokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == GGUFTokenType.USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(special)
    backend.add_tokens(user_defined)


# Names of the BOS/EOS slots in the post-processor template. Only the ids reach the output; fixed
# names avoid TemplateProcessing's parser, which rejects token text containing ":".
TEMPLATE_BOS_SLOT = "BOS"
TEMPLATE_EOS_SLOT = "EOS"


def _set_bos_eos_post_processor(backend: BackendTokenizer, bos_id: int | None, eos_id: int | None) -> None:
    """Have encode(add_special_tokens=True) wrap the ids in BOS/EOS (None: not added)."""
    template: list[str] = []
    slots: list[tuple[str, int]] = []
    if bos_id is not None:
        template.append(TEMPLATE_BOS_SLOT)
        slots.append((TEMPLATE_BOS_SLOT, bos_id))
    template.append("$A")
    if eos_id is not None:
        template.append(TEMPLATE_EOS_SLOT)
        slots.append((TEMPLATE_EOS_SLOT, eos_id))
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=slots)


def _end_of_turn_ids(backend: BackendTokenizer) -> set[int]:
    ids = (backend.token_to_id(token) for token in END_OF_TURN_TOKENS)
    return {token_id for token_id in ids if token_id is not None}


def _optional_id(metadata: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    """A token id from metadata, or None when absent or outside the vocabulary."""
    token_id = metadata.get(key)
    if token_id is None or not 0 <= int(token_id) < vocab_size:
        return None
    return int(token_id)


def _build_gguf_backend(metadata: Mapping[str, Any]) -> tuple[BackendTokenizer, bool]:
    """The `tokenizers` pipeline for a GGUF, and whether the model adds BOS when the file is silent."""
    model_kind = _require(metadata, KEY_MODEL)
    if model_kind not in (GGUF_MODEL_BYTE_LEVEL_BPE, GGUF_MODEL_SENTENCEPIECE_BPE):
        raise ValueError(f"unsupported GGUF tokenizer model: {KEY_MODEL}={model_kind!r}")
    tokens = _require(metadata, KEY_TOKENS)
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a duplicated spelling keeps its first id
    if model_kind == GGUF_MODEL_BYTE_LEVEL_BPE:
        backend = _build_byte_level_backend(metadata, vocab)
        # llama.cpp's defaults: Llama 3 vocabularies start with BOS, GPT-2 style ones do not.
        default_add_bos = metadata.get(KEY_PRE) in PRE_LLAMA3
    else:
        backend = _build_sentencepiece_backend(metadata, vocab)
        default_add_bos = True
    token_types = metadata.get(KEY_TOKEN_TYPE) or [GGUFTokenType.NORMAL] * len(tokens)
    _register_added_tokens(backend, tokens, token_types)
    return backend, default_add_bos


# ================================================================================================
# HF folder helpers
# ================================================================================================


def _load_json_if_present(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _select_chat_template(value: Any, use_tools: bool) -> str | None:
    """tokenizer_config's chat_template is a string or a list of {"name", "template"}."""
    if value is None or isinstance(value, str):
        return value
    named = {entry["name"]: entry["template"] for entry in value}
    if use_tools and "tool_use" in named:
        return named["tool_use"]
    return named.get("default", next(iter(named.values()), None))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _hf_special_tokens(
    backend: BackendTokenizer, config: Mapping[str, Any], special_map: Mapping[str, Any]
) -> dict[str, str]:
    """bos/eos/unk/pad token text from tokenizer_config, else special_tokens_map, if in the vocab."""
    found = {}
    for name in GGUF_SPECIAL_TOKEN_KEYS:
        content = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if content is not None and backend.token_to_id(content) is not None:
            found[name] = content
    return found


def _hf_raw_chat_template(folder: Path, config: Mapping[str, Any]) -> Any:
    """tokenizer_config's chat_template, else chat_template.jinja (where newer transformers save it)."""
    template_file = folder / HF_CHAT_TEMPLATE_FILE
    if config.get("chat_template") is None and template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    return config.get("chat_template")


# ================================================================================================
# Chat templates
# ================================================================================================


class _GenerationBlockExtension(jinja2.ext.Extension):
    """Accepts transformers' {% generation %}...{% endgeneration %} tag and renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_template_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; chat templates want plain JSON, as in transformers.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


@lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Same environment options as transformers, so templates render byte-identically."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlockExtension]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


# ================================================================================================
# Tokenizer
# ================================================================================================


class Tokenizer:
    """Encode/decode, chat templates and stop tokens for one model."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_stop_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        tool_chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self._vocab_size = vocab_size
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._chat_template = chat_template
        self._tool_chat_template = tool_chat_template or chat_template
        self._template_tokens = dict(template_tokens or {})
        stop_ids = {*extra_stop_token_ids, *_end_of_turn_ids(backend)}
        if eos_token_id is not None:
            stop_ids.add(eos_token_id)
        self._stop_token_ids = frozenset(stop_ids)
        self._special_ids = frozenset(
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        )

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_metadata: str | os.PathLike[str] | Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF file's tokenizer.* metadata: a path, or the metadata the loader read
        (``GGUFFile.metadata``). Raises ValueError for a missing key or an unsupported model."""
        if isinstance(path_or_metadata, Mapping):
            metadata = path_or_metadata
        else:
            from llama_engine.loader.gguf_file import GGUFFile
            metadata = GGUFFile(path_or_metadata).metadata
        backend, default_add_bos = _build_gguf_backend(metadata)
        tokens = metadata[KEY_TOKENS]
        ids = {name: _optional_id(metadata, key, len(tokens)) for name, key in GGUF_SPECIAL_TOKEN_KEYS.items()}
        bos_id, eos_id = ids["bos_token"], ids["eos_token"]
        add_bos = bool(metadata.get(KEY_ADD_BOS, default_add_bos)) and bos_id is not None
        add_eos = bool(metadata.get(KEY_ADD_EOS, False)) and eos_id is not None
        _set_bos_eos_post_processor(backend, bos_id if add_bos else None, eos_id if add_eos else None)
        extra_stops = (_optional_id(metadata, key, len(tokens)) for key in (KEY_EOT_ID, KEY_EOM_ID))
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            extra_stop_token_ids=[token_id for token_id in extra_stops if token_id is not None],
            chat_template=metadata.get(KEY_CHAT_TEMPLATE),
            template_tokens={name: tokens[token_id] for name, token_id in ids.items() if token_id is not None},
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Build from an HF tokenizer folder (tokenizer.json plus the optional config files)."""
        folder = Path(folder)
        tokenizer_file = folder / HF_TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no {HF_TOKENIZER_FILE} in {folder}")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _load_json_if_present(folder / HF_TOKENIZER_CONFIG_FILE)
        special_map = _load_json_if_present(folder / HF_SPECIAL_TOKENS_MAP_FILE)
        generation = _load_json_if_present(folder / HF_GENERATION_CONFIG_FILE)

        template_tokens = _hf_special_tokens(backend, config, special_map)
        bos_id = cls._id_of(backend, template_tokens.get("bos_token"))
        eos_id = cls._id_of(backend, template_tokens.get("eos_token"))
        generation_eos = _as_id_list(generation.get("eos_token_id"))
        if eos_id is None and generation_eos:
            eos_id = generation_eos[0]
        if bos_id is None and generation.get("bos_token_id") is not None:
            bos_id = int(generation["bos_token_id"])

        # An explicit add_bos/add_eos in the config wins over tokenizer.json's post-processor,
        # the same precedence transformers gives it.
        if "add_bos_token" in config or "add_eos_token" in config:
            wants_bos = bool(config.get("add_bos_token")) and bos_id is not None
            wants_eos = bool(config.get("add_eos_token")) and eos_id is not None
            _set_bos_eos_post_processor(backend, bos_id if wants_bos else None, eos_id if wants_eos else None)

        raw_template = _hf_raw_chat_template(folder, config)
        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            extra_stop_token_ids=generation_eos,
            chat_template=_select_chat_template(raw_template, use_tools=False),
            tool_chat_template=_select_chat_template(raw_template, use_tools=True),
            template_tokens=template_tokens,
        )

    @staticmethod
    def _id_of(backend: BackendTokenizer, token: str | None) -> int | None:
        return None if token is None else backend.token_to_id(token)

    # --- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds BOS/EOS only where the model asks for them."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ids. Special (control) tokens are kept unless skip_special_tokens, the default
        of HF transformers' decode; generation output asks for what its SamplingParams say."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The whole `tokenizers` pipeline as tokenizer.json text, for libraries that
        rebuild the vocabulary from it (the structured-output grammar engine)."""
        return self._backend.to_str()

    # --- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> list[int] | str:
        """Render the conversation with the model's template; ids (BOS comes from the template) or text."""
        template = self._tool_chat_template if tools else self._chat_template
        if template is None:
            raise ChatTemplateError(
                f"this model has no chat template ({KEY_CHAT_TEMPLATE} / tokenizer_config chat_template is not set)"
            )
        try:
            rendered = _compile_chat_template(template).render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **self._template_tokens,
                **extra,
            )
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template failed: {error}") from error
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    # --- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """EOS plus every end-of-turn token the vocabulary has: generation stops on any of them."""
        return self._stop_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self._vocab_size})")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this one token adds to the decoded text, whatever the vocabulary's
        spelling (GPT-2 byte-to-unicode alphabet, SentencePiece "▁" and <0xNN> byte pieces,
        added tokens as their text). A token may hold part of a multi-byte character, so
        the result need not be valid UTF-8 alone; a sequence's tokens joined decode to its
        text (SentencePiece's one stripped prefix space aside)."""
        piece = self.id_to_token(token_id)
        if token_id in _added_token_ids(self._backend):
            return piece.encode("utf-8")
        if isinstance(self._backend.decoder, decoders.ByteLevel):
            return bytes(_byte_level_alphabet()[char] for char in piece)
        if len(piece) == len("<0x00>") and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")


@lru_cache(maxsize=8)
def _added_token_ids(backend: BackendTokenizer) -> frozenset[int]:
    return frozenset(backend.get_added_tokens_decoder())


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: printable bytes stand for themselves, the
    rest (controls, space, ...) for code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


# ================================================================================================
# Streaming
# ================================================================================================


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, a few tokens at a time.

    Each step decodes only a short window: the tokens already emitted since the last checkpoint
    (prefix) plus the new ones, and returns what the new ones added. Text ending in U+FFFD is held
    back, because it usually means a multi-byte character is split across tokens.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or ())
        # [prefix_offset, read_offset) was already emitted and is decoded only as context;
        # [read_offset, end) is pending.
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - DETOKENIZER_PROMPT_CONTEXT_TOKENS, 0)

    def _decode_window(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _pending_text(self) -> str:
        prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        full_text = self._decode_window(self._prefix_offset, len(self._ids))
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def step(self, new_ids: Sequence[int]) -> str:
        """Append new_ids; return the text they completed (possibly "")."""
        self._ids.extend(new_ids)
        text = self._pending_text()
        if not text or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return text

    def flush(self) -> str:
        """At the end of the stream: return whatever is still held back, incomplete bytes included."""
        text = self._pending_text()
        self._advance()
        return text
