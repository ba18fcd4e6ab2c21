"""What a reward model scores (a dialog and one reply, as reward training saw it), summary
statistics of scores, and the dataset rows kept generations become."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from llama_engine.training.tokenization import ASSISTANT, ChatTokenizer, dialog_tokens

SFT, DPO = "sft", "dpo"
# dataset type -> its columns, as the trainers read them (datasets.columns.TRAINER_COLUMNS)
DATASET_TYPES: dict[str, dict[str, str]] = {
    SFT: {"dialog": "dialog"},
    DPO: {"prompt": "dialog", "chosen": "text", "rejected": "text"},
}


def reply_token_ids(tokenizer: ChatTokenizer, messages: Sequence[dict], reply: str) -> list[int]:
    """The token ids a reward model scores at their last position: ``messages`` ({role,
    content}) and the assistant ``reply`` rendered with the chat template, tokenized piece by
    piece exactly as reward training tokenizes a preference pair (``dialog_tokens``), so the
    score is read where training read it, and every reply to one dialog starts with the same
    dialog tokens (the prefix the KV cache shares). Raises TokenizationError (a ValueError)
    when the template does not render the dialog as a prefix of dialog + reply."""
    ids, _ = dialog_tokens(tokenizer, [*messages, {"role": ASSISTANT, "content": reply}],
                           last_turn_only=True)
    return ids


@dataclass
class ScoredPrompt:
    """One prompt's dialog ({role, content} messages), its generations (text), their scores,
    and the indices a filter kept."""
    messages: list[dict]
    generations: list[str]
    scores: list[float]
    kept: list[int]


def score_statistics(scores: Sequence[float]) -> dict[str, float | None]:
    """mean, std (population), min and max of ``scores``; None each when there are none."""
    if not scores:
        return {"score_mean": None, "score_std": None, "score_min": None, "score_max": None}
    return {"score_mean": statistics.fmean(scores), "score_std": statistics.pstdev(scores),
            "score_min": min(scores), "score_max": max(scores)}


def dataset_rows(prompts: Sequence[ScoredPrompt], dataset_type: str) -> list[dict[str, Any]]:
    """Rows of the kept generations. ``sft``: one ``dialog`` row per kept generation (the
    prompt's messages, then the generation as the assistant's turn). ``dpo``: one row per
    prompt with at least two kept generations of different scores: ``prompt`` (its
    messages), ``chosen`` the best kept generation, ``rejected`` the worst. Raises
    ValueError for an unknown type."""
    if dataset_type == SFT:
        return [{"dialog": [*p.messages, {"role": ASSISTANT, "content": p.generations[i]}]}
                for p in prompts for i in p.kept]
    if dataset_type == DPO:
        rows = []
        for p in prompts:
            ranked = sorted(p.kept, key=lambda i: (-p.scores[i], i))
            if len(ranked) >= 2 and p.scores[ranked[0]] > p.scores[ranked[-1]]:
                rows.append({"prompt": list(p.messages), "chosen": p.generations[ranked[0]],
                             "rejected": p.generations[ranked[-1]]})
        return rows
    raise ValueError(f"unknown dataset type {dataset_type!r}; known: {', '.join(DATASET_TYPES)}")
