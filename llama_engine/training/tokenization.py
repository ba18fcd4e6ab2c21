"""Dataset rows to token sequences with labels: dialogs through the model's chat template
with loss on assistant tokens only, text as plain language modelling, and preference pairs
(prompt + chosen / rejected reply) for DPO and reward modelling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from llama_engine.training.losses import IGNORE_INDEX

DEFAULT_MAX_SEQ_LEN = 2048
ASSISTANT = "assistant"


class ChatTokenizer(Protocol):
    """What tokenization needs of ``llama_engine.tokenizer.Tokenizer``."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True, **extra: Any) -> list[int] | str: ...


@dataclass(frozen=True)
class Example:
    """One training sequence: input_ids [L] and labels [L], labels[t] = the token that
    should follow position t, or IGNORE_INDEX where no loss is taken."""
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class PreferencePair:
    chosen: Example
    rejected: Example


class TokenizationError(ValueError):
    """A row the chat template cannot split into prompt and assistant tokens."""


def _message(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"]}


def dialog_tokens(tokenizer: ChatTokenizer, messages: Sequence[dict],
                  last_turn_only: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation rendered with the chat template, and for each token
    whether it is part of an assistant reply (its text and its end-of-turn marker) that
    carries loss: every assistant turn, or only the last one (``last_turn_only``, for
    preference pairs whose prompt holds earlier turns).

    Each assistant turn's span is where the rendering of the messages up to it
    (``add_generation_prompt=False``) extends the rendering of the messages before it
    (``add_generation_prompt=True``), torchtune's per-message masking done through the
    template. Raises TokenizationError if the template does not render prefixes that way."""
    messages = [_message(m) for m in messages]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
    if last_turn_only:
        assistant_turns = assistant_turns[-1:]
    spans: list[tuple[int, int]] = []
    for i in assistant_turns:
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False,
                                                tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise TokenizationError(f"message {i}: the chat template does not render the "
                                    "conversation as a sequence of prefixes")
        spans.append((len(before), len(through)))
    ids: list[int] = []
    trainable: list[bool] = []
    cursor = 0
    for start, end in spans:
        for lo, hi, flag in ((cursor, start, False), (start, end, True)):
            piece = tokenizer.encode(full[lo:hi], add_special_tokens=False) if hi > lo else []
            ids += piece
            trainable += [flag] * len(piece)
        cursor = end
    tail = tokenizer.encode(full[cursor:], add_special_tokens=False) if cursor < len(full) else []
    return ids + tail, trainable + [False] * len(tail)


def text_tokens(tokenizer: ChatTokenizer, text: str, add_special_tokens: bool = True
                ) -> list[int]:
    """``text`` then EOS (so the model learns where a document ends)."""
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def make_example(ids: list[int], trainable: list[bool], max_seq_len: int) -> Example:
    """Shift to next-token labels and truncate to ``max_seq_len`` tokens."""
    ids, trainable = ids[:max_seq_len], trainable[:max_seq_len]
    labels = [ids[t + 1] if trainable[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return Example(ids, labels + [IGNORE_INDEX])


def sft_example(tokenizer: ChatTokenizer, row: dict, max_seq_len: int = DEFAULT_MAX_SEQ_LEN
                ) -> Example:
    """A row with ``dialog`` (loss on assistant tokens) or ``text`` (loss on every token)."""
    if "dialog" in row:
        ids, trainable = dialog_tokens(tokenizer, row["dialog"])
    else:
        ids = text_tokens(tokenizer, row["text"])
        trainable = [True] * len(ids)
    return make_example(ids, trainable, max_seq_len)


def _reply_example(tokenizer: ChatTokenizer, prompt: Any, reply: str, max_seq_len: int) -> Example:
    if isinstance(prompt, list):  # a dialog: the reply is the assistant's next turn
        ids, trainable = dialog_tokens(tokenizer, [*prompt, {"role": ASSISTANT, "content": reply}],
                                       last_turn_only=True)
    else:
        prompt_ids = tokenizer.encode(prompt)
        reply_ids = text_tokens(tokenizer, reply, add_special_tokens=False)
        ids, trainable = prompt_ids + reply_ids, [False] * len(prompt_ids) + [True] * len(reply_ids)
    return make_example(ids, trainable, max_seq_len)


def preference_pair(tokenizer: ChatTokenizer, row: dict, max_seq_len: int = DEFAULT_MAX_SEQ_LEN
                    ) -> PreferencePair:
    """A row with ``prompt`` (dialog or text), ``chosen`` and ``rejected`` (text)."""
    return PreferencePair(_reply_example(tokenizer, row["prompt"], row["chosen"], max_seq_len),
                          _reply_example(tokenizer, row["prompt"], row["rejected"], max_seq_len))
