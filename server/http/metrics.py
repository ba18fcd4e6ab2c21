"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library."""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from typing import Iterable

from server.api.registry import ModelRegistry

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRIC_PREFIX = "llama_engine"
# Time to first token on a CPU spans milliseconds (a cached prefix) to tens of seconds (a long
# prompt behind a full batch); time per output token spans ~1 ms to ~1 s.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# An agent step spans a millisecond (a math call, a keyword shield) to minutes (a long answer,
# a code-interpreter call that runs to its timeout).
AGENT_STEP_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0, 120.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(buckets)
        self.counts: dict[Labels, list[int]] = defaultdict(lambda: [0] * len(self.buckets))
        self.sums: dict[Labels, float] = defaultdict(float)
        self.totals: dict[Labels, int] = defaultdict(int)

    def observe(self, labels: Labels, value: float) -> None:
        position = bisect.bisect_left(self.buckets, value)
        if position < len(self.buckets):
            self.counts[labels][position] += 1
        self.sums[labels] += value
        self.totals[labels] += 1

    def lines(self, name: str) -> list[str]:
        out = []
        for labels, counts in self.counts.items():
            cumulative = 0
            for bound, count in zip(self.buckets, counts):
                cumulative += count
                out.append(f"{name}_bucket{_labels(labels, (('le', _number(bound)),))} {cumulative}")
            out.append(f"{name}_bucket{_labels(labels, (('le', '+Inf'),))} {self.totals[labels]}")
            out.append(f"{name}_sum{_labels(labels)} {_number(self.sums[labels])}")
            out.append(f"{name}_count{_labels(labels)} {self.totals[labels]}")
        return out


class ServerMetrics:
    """Counters and histograms the server updates; engine gauges are read at scrape time."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.http_requests: dict[Labels, int] = defaultdict(int)
        self.prompt_tokens: dict[Labels, int] = defaultdict(int)
        self.generation_tokens: dict[Labels, int] = defaultdict(int)
        self.cached_prompt_tokens: dict[Labels, int] = defaultdict(int)
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.tpot = Histogram(TPOT_BUCKETS_S)
        self.agent_steps = Histogram(AGENT_STEP_BUCKETS_S)

    # ---- GenerationListener --------------------------------------------------------------

    def first_token(self, model_id: str, seconds_since_start: float) -> None:
        self.ttft.observe((("model", model_id),), seconds_since_start)

    def request_finished(self, model_id: str, prompt_tokens: int, generated_tokens: int,
                         seconds_after_first_token: float, cached_tokens: int) -> None:
        labels = (("model", model_id),)
        self.prompt_tokens[labels] += prompt_tokens
        self.generation_tokens[labels] += generated_tokens
        self.cached_prompt_tokens[labels] += cached_tokens
        if generated_tokens > 1:
            self.tpot.observe(labels, seconds_after_first_token / (generated_tokens - 1))

    # ---- agents.turn.StepListener ---------------------------------------------------------

    def step_finished(self, step_type: str, seconds: float) -> None:
        self.agent_steps.observe((("step_type", step_type),), seconds)

    # ---- HTTP -----------------------------------------------------------------------------

    def count_request(self, route: str, method: str, status: int) -> None:
        self.http_requests[(("route", route), ("method", method), ("status", str(status)))] += 1

    # ---- exposition -----------------------------------------------------------------------

    @staticmethod
    def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
        full = f"{METRIC_PREFIX}_{name}"
        return [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}",
                *(f"{full}{sample}" for sample in samples)]

    @staticmethod
    def _counter_samples(values: dict[Labels, int]) -> list[str]:
        return [f"{_labels(labels)} {value}" for labels, value in values.items()]

    def _engine_gauges(self) -> dict[str, list[str]]:
        gauges: dict[str, list[str]] = defaultdict(list)
        for model in self.registry.models():
            stats = model.engine.stats()
            labels = _labels((("model", model.model_id),))
            queries = stats.get("prefix_cache_queries", 0)
            hit_rate = stats.get("prefix_cache_hits", 0) / queries if queries else 0.0
            gauges["requests_waiting"].append(f"{labels} {stats.get('num_waiting', 0)}")
            gauges["requests_running"].append(f"{labels} {stats.get('num_running', 0)}")
            gauges["requests_in_flight"].append(f"{labels} {model.in_flight}")
            gauges["kv_cache_usage_ratio"].append(f"{labels} {_number(float(stats.get('kv_cache_usage', 0.0)))}")
            gauges["prefix_cache_hit_rate"].append(f"{labels} {_number(float(hit_rate))}")
        return gauges

    def render(self) -> str:
        gauges = self._engine_gauges()
        lines = [
            *self._family("http_requests_total", "counter", "HTTP requests by route, method and status.",
                          self._counter_samples(self.http_requests)),
            *self._family("prompt_tokens_total", "counter", "Prompt tokens processed.",
                          self._counter_samples(self.prompt_tokens)),
            *self._family("generation_tokens_total", "counter", "Tokens generated.",
                          self._counter_samples(self.generation_tokens)),
            *self._family("prefix_cache_hit_tokens_total", "counter",
                          "Prompt tokens served from the prefix cache.",
                          self._counter_samples(self.cached_prompt_tokens)),
            *self._family("time_to_first_token_seconds", "histogram",
                          "Seconds from request arrival at the engine to its first token.", []),
            *[f"{METRIC_PREFIX}_{line}" for line in self.ttft.lines("time_to_first_token_seconds")],
            *self._family("time_per_output_token_seconds", "histogram",
                          "Mean seconds per output token after the first, per request.", []),
            *[f"{METRIC_PREFIX}_{line}" for line in self.tpot.lines("time_per_output_token_seconds")],
            *self._family("agent_step_seconds", "histogram",
                          "Seconds per agent turn step: safety_filtering (shields), "
                          "memory_retrieval, model_inference, tool_execution.", []),
            *[f"{METRIC_PREFIX}_{line}" for line in self.agent_steps.lines("agent_step_seconds")],
            *self._family("requests_waiting", "gauge", "Requests waiting in the engine.", gauges["requests_waiting"]),
            *self._family("requests_running", "gauge", "Requests running in the engine.", gauges["requests_running"]),
            *self._family("requests_in_flight", "gauge", "Sequences admitted by the server and not yet finished.",
                          gauges["requests_in_flight"]),
            *self._family("kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.",
                          gauges["kv_cache_usage_ratio"]),
            *self._family("prefix_cache_hit_rate", "gauge", "Prefix-cache hits over queries, in tokens.",
                          gauges["prefix_cache_hit_rate"]),
        ]
        return "\n".join(lines) + "\n"
