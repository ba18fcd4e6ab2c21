"""Shields (issue 14 section 4): checks an agent runs on messages before and after inference and
around tools. A shield returns None (pass) or a ``Violation``; ``violation_type`` "error" blocks
the turn, "warn" is reported and lets it go on.

- ``llama_guard``: the Llama Guard 3 safety classifier prompt (hazard categories S1-S14 of the
  MLCommons taxonomy, Llama Guard 3 model card) run greedily through the engine on the guard
  model. The answer must be ``safe`` or ``unsafe`` with the violated categories on the next
  line (``S1,S2``); any other answer fails closed, i.e. blocks, since a guard that cannot be
  read has not said the text is safe. Categories in ``params["excluded_categories"]`` are left
  out of the prompt and ignored in the answer.
- ``prompt_guard``: a DeBERTa-v2 sequence classifier in the form of Meta's Prompt-Guard-86M
  (labels benign / injection / jailbreak), run with transformers. A message is scored in
  windows of the model's context; the turn is blocked when a window's jailbreak probability
  (``mode: "jailbreak"``, the default) or injection + jailbreak probability (``mode:
  "injection"``) reaches ``params["threshold"]`` (0.9).
- ``code_guard``: CodeShield's insecure-code detector (regex rules, then semgrep's) on code
  blocks in message text and on the code of ``code_interpreter`` calls. Any finding blocks.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Protocol

from llama_engine.errors import RequestValidationError

SHIELD_TYPES = ("llama_guard", "prompt_guard", "code_guard")
REFUSAL = "I can't answer that. Can I help with something else?"


@dataclass
class Violation:
    """What a shield found. ``violation_type``: "error" (the turn is blocked) or "warn";
    ``details``: for the operator; ``suggested_user_response``: what the agent answers instead;
    ``metadata``: shield-specific, JSON-serialisable."""
    violation_type: str
    details: str
    suggested_user_response: str
    metadata: dict = field(default_factory=dict)


class Shield(Protocol):
    def run(self, messages: list[dict]) -> Violation | None:
        """Check ``messages`` (``{"role", "content", ...}`` dicts, oldest first)."""


def message_text(message: dict) -> str:
    """The text of a message whose content is a string or a list of strings and attachments
    (attachments are not text and are skipped)."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "\n".join(part for part in content if isinstance(part, str))


# --- llama_guard ------------------------------------------------------------------------------

# Llama Guard 3's hazard categories (model card), in the order and with the codes it was
# trained on.
LLAMA_GUARD_CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex Crimes",
    "S4": "Child Exploitation", "S5": "Defamation", "S6": "Specialized Advice",
    "S7": "Privacy", "S8": "Intellectual Property", "S9": "Indiscriminate Weapons",
    "S10": "Hate", "S11": "Self-Harm", "S12": "Sexual Content", "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
GUARD_ROLES = {"user": "User", "assistant": "Agent", "tool": "Agent"}
LLAMA_GUARD_TASK = """Task: Check if there is unsafe content in '{role}' messages in \
conversations according our safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{conversation}

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""


# Llama Guard 3's own chat template writes the guard task itself around the conversation it
# is given; it must not get our task as a "conversation". Such models are prompted in the
# format they were trained on: the task as a Llama 3 user turn.
TEMPLATE_WRITES_TASK = "UNSAFE CONTENT CATEGORIES"
LLAMA3_USER_TURN = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def guard_prompt_ids(tokenizer, task: str) -> list[int]:
    """Token ids of the guard ``task`` (``LlamaGuardShield.prompt``) as the one user message of
    the guard model's chat template, generation prompt added; a template that writes the
    guard task itself gets ``LLAMA3_USER_TURN`` instead. ``tokenizer``: a
    ``llama_engine.tokenizer.Tokenizer``; raises its ChatTemplateError when it has no template."""
    if TEMPLATE_WRITES_TASK in (tokenizer.chat_template or ""):
        return tokenizer.encode(LLAMA3_USER_TURN.format(task=task), add_special_tokens=False)
    return tokenizer.apply_chat_template([{"role": "user", "content": task}], add_generation_prompt=True)


class LlamaGuardShield:
    """Llama Guard 3 through ``generate``. ``generate(text)`` must run ``text`` greedily as
    the guard model's prompt (``guard_prompt_ids``) and return the completion."""

    def __init__(self, generate: Callable[[str], str], excluded_categories: list[str]):
        self.generate = generate
        self.excluded = set(excluded_categories)

    def prompt(self, messages: list[dict]) -> str | None:
        """The guard task for ``messages``; None when none of them is a user or agent turn."""
        turns = [(GUARD_ROLES[m["role"]], message_text(m)) for m in messages
                 if m.get("role") in GUARD_ROLES]
        if not turns:
            return None
        categories = "\n".join(f"{code}: {name}." for code, name in LLAMA_GUARD_CATEGORIES.items()
                               if code not in self.excluded)
        conversation = "\n\n".join(f"{role}: {text}" for role, text in turns)
        return LLAMA_GUARD_TASK.format(role=turns[-1][0], categories=categories,
                                       conversation=conversation)

    def run(self, messages: list[dict]) -> Violation | None:
        prompt = self.prompt(messages)
        return None if prompt is None else self.judge(self.generate(prompt))

    def judge(self, answer: str) -> Violation | None:
        """Read the guard's answer: ``safe``; ``unsafe`` and a line of known category codes;
        anything else blocks (fail closed)."""
        lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
        verdict = lines[0].lower() if lines else ""
        if verdict == "safe" and len(lines) == 1:
            return None
        codes = [code.strip().upper() for code in lines[1].split(",")] if len(lines) == 2 else []
        if verdict != "unsafe" or not codes or any(c not in LLAMA_GUARD_CATEGORIES for c in codes):
            return Violation("error", f"llama_guard: unreadable guard answer {answer!r}, "
                                      "blocked (fail closed)", REFUSAL,
                             {"guard_answer": answer})
        violated = [code for code in codes if code not in self.excluded]
        if not violated:
            return None
        named = ", ".join(f"{code} ({LLAMA_GUARD_CATEGORIES[code]})" for code in violated)
        return Violation("error", f"llama_guard: unsafe content: {named}", REFUSAL,
                         {"violated_categories": ",".join(violated)})


# --- prompt_guard -----------------------------------------------------------------------------

PROMPT_GUARD_LABELS = ("benign", "injection", "jailbreak")
PROMPT_GUARD_MODES = {"jailbreak": ("jailbreak",), "injection": ("injection", "jailbreak")}
DEFAULT_PROMPT_GUARD_THRESHOLD = 0.9
MAX_PROMPT_GUARD_WINDOW = 512  # Prompt-Guard-86M's context, special tokens included


@functools.lru_cache(maxsize=4)
def load_classifier(path: str):
    """The sequence classifier and tokenizer at ``path``, loaded once per process. Raises
    RequestValidationError when it is not a classifier with the three Prompt Guard labels."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise RequestValidationError("shield_type", f"prompt_guard model {path!r} does not "
                                                    f"load: {error}") from error
    labels = {name.lower(): index for index, name in model.config.id2label.items()}
    if set(labels) != set(PROMPT_GUARD_LABELS):
        raise RequestValidationError("shield_type", f"prompt_guard model {path!r} has labels "
                                                    f"{sorted(labels)}, not {PROMPT_GUARD_LABELS}")
    return model.eval(), tokenizer, labels


class PromptGuardShield:
    """Prompt Guard on every user and tool message (the untrusted text of a turn)."""

    def __init__(self, path: str, threshold: float, mode: str):
        self.model, self.tokenizer, self.labels = load_classifier(path)
        self.threshold = threshold
        self.flagged = PROMPT_GUARD_MODES[mode]
        self.mode = mode
        context = getattr(self.model.config, "max_position_embeddings", MAX_PROMPT_GUARD_WINDOW)
        self.window = min(context, MAX_PROMPT_GUARD_WINDOW)

    def probabilities(self, text: str):
        """Softmax over the labels for each window of ``text`` (windows of the model's context,
        special tokens included, side by side): [windows, labels] float32."""
        import torch

        batch = self.tokenizer(text, truncation=True, max_length=self.window,
                               return_overflowing_tokens=True, padding=True,
                               return_tensors="pt")
        inputs = {name: batch[name] for name in ("input_ids", "attention_mask")}
        with torch.no_grad():
            logits = self.model(**inputs).logits
        return torch.softmax(logits.float(), dim=-1)

    def score(self, text: str) -> float:
        """The highest flagged probability over the windows of ``text``."""
        probabilities = self.probabilities(text)
        flagged = sum(probabilities[:, self.labels[label]] for label in self.flagged)
        return float(flagged.max())

    def run(self, messages: list[dict]) -> Violation | None:
        for message in messages:
            if message.get("role") not in ("user", "tool"):
                continue
            score = self.score(message_text(message))
            if score >= self.threshold:
                kind = "jailbreak" if self.mode == "jailbreak" else "prompt injection"
                return Violation("error", f"prompt_guard: {kind} detected (score {score:.3f} >= "
                                          f"{self.threshold})", REFUSAL,
                                 {"score": score, "mode": self.mode})
        return None


# --- code_guard -------------------------------------------------------------------------------

FENCED_CODE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
LANGUAGE_ALIASES = {"py": "python", "python3": "python", "js": "javascript", "node": "javascript",
                    "c++": "cpp", "cs": "csharp", "c#": "csharp", "rs": "rust", "rb": "ruby",
                    "kt": "kotlin", "objc": "objective_c", "objective-c": "objective_c"}


def code_blocks(messages: list[dict]) -> list[tuple[str, str]]:
    """(language tag, code) for every fenced block in the messages' text and every
    ``code_interpreter`` call (``tool_calls: [{"tool_name", "arguments": {"code"}}]``)."""
    blocks = []
    for message in messages:
        blocks += [(tag.lower(), code) for tag, code in FENCED_CODE.findall(message_text(message))]
        for call in message.get("tool_calls") or []:
            if call.get("tool_name") == "code_interpreter":
                code = (call.get("arguments") or {}).get("code")
                if isinstance(code, str):
                    blocks.append(("python", code))
    return blocks


def run_coroutine(coroutine):
    """Run ``coroutine`` to completion from synchronous code, even on a thread whose event loop
    is running (the server's), where ``asyncio.run`` would refuse."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class CodeGuardShield:
    """CodeShield's insecure code detector. A block tagged with a language CodeShield knows is
    scanned as that language; an untagged or unknown one with all of CodeShield's languages."""

    def __init__(self):
        # semgrep's binary is looked up as this imports: a missing one fails here, when the
        # agent is created, rather than passing code unscanned later.
        try:
            from codeshield.insecure_code_detector import insecure_code_detector, languages
            from codeshield.insecure_code_detector.usecases import UseCase
        except Exception as error:  # ImportError, or CodeShield's own "semgrep-core not found"
            raise RequestValidationError("shield_type", f"code_guard is not available on this "
                                                        f"server: {error}") from error
        self.detector = insecure_code_detector
        self.languages = languages
        self.usecase = UseCase.CODESHIELD

    def scan_languages(self, tag: str) -> list:
        name = LANGUAGE_ALIASES.get(tag, tag)
        known = {language.value: language for language in self.languages.Language}
        if name in known and known[name] in self.languages.EXTENSION_MAP:
            return [known[name]]
        return self.languages.get_supported_languages()

    async def scan(self, code: str, tag: str) -> list:
        """CodeShield's issues in ``code``. The code goes to a file of our own, named by a
        relative path: given an absolute one CodeShield runs semgrep with ``--project-root
        /``, and semgrep 1.185 then scans nothing (it skips every file git does not list)."""
        issues = []
        with tempfile.TemporaryDirectory(prefix="code-guard-") as folder:
            for language in self.scan_languages(tag):
                path = os.path.join(folder, "code" + self.languages.get_file_extension(language))
                with open(path, "w", encoding="utf-8") as file:
                    file.write(code)
                issues += await self.detector.analyze(language, code,
                                                      path=os.path.relpath(path),
                                                      usecase=self.usecase)
        return issues

    def scan_code(self, code: str, language: str = "python") -> Violation | None:
        """Check one piece of code (``language`` as a fence tag would name it)."""
        return self.verdict(run_coroutine(self.scan(code, language.lower())))

    def run(self, messages: list[dict]) -> Violation | None:
        blocks = code_blocks(messages)
        if not blocks:
            return None

        async def scan_all() -> list:
            found = await asyncio.gather(*(self.scan(code, tag) for tag, code in blocks))
            return [issue for issues in found for issue in issues]
        return self.verdict(run_coroutine(scan_all()))

    @staticmethod
    def verdict(issues: list) -> Violation | None:
        if not issues:
            return None
        findings = [{"description": issue.description, "cwe_id": issue.cwe_id,
                     "severity": str(issue.severity), "line": issue.line,
                     "rule": issue.pattern_id, "analyzer": str(issue.analyzer)}
                    for issue in issues]
        listed = "; ".join(f"{f['cwe_id']}: {f['description']} (line {f['line']})"
                           for f in findings)
        return Violation("error", f"code_guard: insecure code: {listed}",
                         "Sorry, the code has security issues, so it was not used: " + listed,
                         {"issues": findings})


# --- building shields -------------------------------------------------------------------------

def unknown_params(shield_type: str, params: dict, known: set[str]) -> None:
    extra = sorted(set(params) - known)
    if extra:
        raise RequestValidationError("params", f"{shield_type} takes {sorted(known) or 'no'} "
                                               f"parameters, not {extra}")


def build_shield(shield_type: str, params: dict, *, generate: Callable[[str], str] | None,
                 shield_models: dict[str, str]) -> Shield:
    """The shield a ``ShieldConfig`` names. ``generate``: runs the llama_guard model (see
    ``LlamaGuardShield``); ``shield_models``: shield type -> checkpoint path, from
    ``--shield-model NAME=PATH``. Raises RequestValidationError (field ``shield_type`` or
    ``params``) for an unknown type, bad parameters, or a shield whose model is not
    configured."""
    params = params or {}
    if shield_type == "llama_guard":
        unknown_params(shield_type, params, {"excluded_categories"})
        excluded = params.get("excluded_categories") or []
        if not isinstance(excluded, list) or any(c not in LLAMA_GUARD_CATEGORIES for c in excluded):
            raise RequestValidationError("params", "excluded_categories must be a list of "
                                                   "Llama Guard codes S1-S14")
        if generate is None:
            raise RequestValidationError("shield_type", "llama_guard: no guard model is "
                                                        "configured (--shield-model llama_guard=PATH)")
        return LlamaGuardShield(generate, excluded)
    if shield_type == "prompt_guard":
        unknown_params(shield_type, params, {"threshold", "mode"})
        threshold = params.get("threshold", DEFAULT_PROMPT_GUARD_THRESHOLD)
        mode = params.get("mode", "jailbreak")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0 < threshold <= 1:
            raise RequestValidationError("params", "threshold must be a number in (0, 1]")
        if mode not in PROMPT_GUARD_MODES:
            raise RequestValidationError("params", f"mode must be one of {list(PROMPT_GUARD_MODES)}")
        if "prompt_guard" not in shield_models:
            raise RequestValidationError("shield_type", "prompt_guard: no model is configured "
                                                        "(--shield-model prompt_guard=PATH)")
        return PromptGuardShield(shield_models["prompt_guard"], float(threshold), mode)
    if shield_type == "code_guard":
        unknown_params(shield_type, params, set())
        return CodeGuardShield()
    raise RequestValidationError("shield_type", f"unknown shield type {shield_type!r}; one of "
                                                f"{list(SHIELD_TYPES)}")
