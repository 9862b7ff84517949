"""``kvpipe bench prefix``: what reusing prefix keys/values through Redis buys, and costs.

Everything on the ``gen-small`` transformer (d_model 512, 8 layers, 8 heads, context 4096,
chunks of 128 tokens; seeded weights), a real worker on the local Redis and Tansu broker, and
the client reading the stream on its reply topic. Both sides of every comparison in one run:

1. **TTFT cold vs warm** for shared prefixes of 256, 1,024 and 2,048 tokens: a prompt whose
   prefix nothing holds (cold), then the same prefix with another question after the worker's
   own prefix cache was emptied, so every reused chunk comes from Redis (warm, Redis), then once
   more with the worker's cache as it is (warm, local). Time to first token as the worker
   measured it (dispatch to first token: lookup, fetch, prefill) and as the client saw it
   (send to the first token's message, through Kafka both ways).
2. **Overhead on a complete miss**: unique 1,024-token prompts with the prefix cache on (one
   MGET that finds nothing, chunks written back in the background) and off, alternating.
3. **Chat trace**: conversations that share a system prompt, each turn the whole conversation
   so far plus a new message, on a worker whose prefix cache is smaller than the trace: the
   token-level hit rate, where hits came from, bytes read from Redis per request, and the
   worker cache's peak bytes against its budget.
4. **Inter-token latency** on the Kafka stream with 1, 8 and 32 concurrent generations: gaps
   between a generation's consecutive token messages as they reach the client, p50/p99, and
   the worker's decode steps (mean sequences per numpy step).
5. **Break-even**: computing ``n`` prompt tokens against fetching their keys/values from Redis
   (one MGET, checksum, decode), in-process, for ``n`` from 16 to 1,024; the smallest ``n``
   from which fetching is cheaper, with the arithmetic (FLOPs per token, bytes per token, the
   measured GFLOP/s and Redis MB/s).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.inference import start_serving
from pipeline.bench.figures import MODEL, Emit
from pipeline.bench.harness import drop_topics, prepare_side, side_settings
from pipeline.client import InferenceClient
from pipeline.config import Settings, with_values
from pipeline.io.kv import open_kv
from pipeline.io.stream import Generated, StreamMessage
from pipeline.params.keys import PrefixKey
from pipeline.params.models import preset
from pipeline.params.prefix import decode_chunk, encode_chunk
from pipeline.params.transformer import Transformer, transformer_of
from pipeline.serving.worker import Worker

PRESET = "gen-small"
LENGTHS = (256, 1024, 2048)
MiB = 1024 * 1024
#: The worker cache of the chat trace: smaller than the trace's working set, so it evicts.
CHAT_BUDGET = 48 * MiB
GOAL_WARM = 0.2  # warm TTFT at most 1/5 of cold at 1,024 tokens (from Redis)
GOAL_OVERHEAD = 0.05  # a complete miss at most 5% slower than no prefix cache


def _tokens(n: int, seed: int) -> str:
    """``n`` printable ASCII bytes (one token each), different for each seed."""
    rng = np.random.default_rng(seed)
    return bytes(rng.integers(32, 127, n, dtype=np.uint8)).decode("ascii")


def _pct(values: Sequence[float], q: float) -> float | None:
    return None if not values else float(np.percentile(np.asarray(values), q))


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class Timed:
    """One generation as the client saw it."""

    final: StreamMessage
    client_ttft_ms: float
    arrivals: list[float]  # perf_counter of each piece with tokens

    @property
    def server_ttft_ms(self) -> float:
        return float(self.final.timings.get("ttft_ms", float("nan")))


@dataclass
class PrefixResult:
    """Every figure of the suite; ``passed`` when every generation ended ok and every
    reuse check held (tokens equal, chunks from where they should come)."""

    ttft: list[dict[str, Any]] = field(default_factory=list)
    overhead: dict[str, Any] = field(default_factory=dict)
    chat: dict[str, Any] = field(default_factory=dict)
    itl: list[dict[str, Any]] = field(default_factory=list)
    break_even: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "preset": PRESET,
            "ttft": self.ttft,
            "overhead": self.overhead,
            "chat": self.chat,
            "itl": self.itl,
            "break_even": self.break_even,
            "problems": self.problems,
            "passed": self.passed,
        }


class _Bench:
    def __init__(self, client: InferenceClient, result: PrefixResult) -> None:
        self.client = client
        self.result = result

    async def generate(self, prompt: str, max_tokens: int, what: str) -> Timed:
        sent = time.perf_counter()
        first: float | None = None
        arrivals: list[float] = []
        final: StreamMessage | None = None
        pieces: list[Generated] = []
        async for piece in self.client.generate(MODEL, prompt, max_tokens=max_tokens, timeout=120):
            now = time.perf_counter()
            if piece.tokens:
                first = first or now
                arrivals.append(now)
            pieces.append(piece)
            final = piece.final or final
        assert final is not None
        if not final.ok:
            self.result.problems.append(f"{what}: {final.error_code}: {final.error_message}")
        elif [t for p in pieces for t in p.tokens] != final.tokens:
            self.result.problems.append(f"{what}: streamed tokens differ from the final ones")
        return Timed(final, ((first or time.perf_counter()) - sent) * 1000, arrivals)


async def _ttft(bench: _Bench, worker: Worker, rounds: int, emit: Emit) -> None:
    prefix = worker.generation.prefix
    for length in LENGTHS:
        rows: dict[str, list[Timed]] = {"cold": [], "redis": [], "local": []}
        for r in range(rounds):
            shared = _tokens(length, seed=length * 100 + r)
            prefix.local.invalidate_where(lambda _: True)
            cold = await bench.generate(shared + "\nQ: first question?", 4, f"cold {length}")
            await prefix.flush()  # its chunks are in Redis before the warm request
            prefix.local.invalidate_where(lambda _: True)  # a worker with an empty cache
            warm = await bench.generate(shared + "\nQ: another one!!", 4, f"warm {length}")
            local = await bench.generate(shared + "\nQ: and a third?", 4, f"local {length}")
            for name, t, where in (
                ("redis", warm, "redis_tokens"),
                ("local", local, "local_tokens"),
            ):
                if t.final.prefix.get(where) != length:
                    bench.result.problems.append(
                        f"warm ({name}) {length}: reused {t.final.prefix} instead of {length} "
                        f"tokens from {name}"
                    )
            if cold.final.prefix.get("reused_tokens"):
                bench.result.problems.append(f"cold {length}: something was reused")
            rows["cold"].append(cold)
            rows["redis"].append(warm)
            rows["local"].append(local)
        # ratios within each round (cold and warm back to back), then their median: a load
        # that drifts between rounds (the machine is shared) moves both sides alike
        ratio = statistics.median(
            w.server_ttft_ms / c.server_ttft_ms
            for c, w in zip(rows["cold"], rows["redis"], strict=True)
        )
        med = {k: statistics.median(t.server_ttft_ms for t in v) for k, v in rows.items()}
        cli = {k: statistics.median(t.client_ttft_ms for t in v) for k, v in rows.items()}
        read = statistics.median(t.final.prefix["bytes_read"] for t in rows["redis"])
        row: dict[str, Any] = {
            "prefix_tokens": length,
            "server_ttft_ms": {k: _r(v) for k, v in med.items()},
            "client_ttft_ms": {k: _r(v) for k, v in cli.items()},
            "warm_redis_over_cold": _r(ratio, 3),
            "warm_redis_over_cold_of_medians": _r(med["redis"] / med["cold"], 3),
            "warm_local_over_cold": _r(med["local"] / med["cold"], 3),
            "client_warm_redis_over_cold": _r(cli["redis"] / cli["cold"], 3),
            "bytes_read": read,
        }
        if length == 1024:
            row["goal"] = GOAL_WARM
            row["goal_met"] = ratio <= GOAL_WARM
        bench.result.ttft.append(row)
        emit(
            f"prefix  TTFT {length:>5} tokens: worker cold {med['cold']:8.1f} ms, warm from "
            f"Redis {med['redis']:7.1f} ms ({ratio:.3f}x), warm local "
            f"{med['local']:6.1f} ms ({med['local'] / med['cold']:.3f}x); client (via Kafka) "
            f"cold {cli['cold']:7.1f}, warm Redis {cli['redis']:6.1f} ms "
            f"({cli['redis'] / cli['cold']:.3f}x); {read / MiB:.1f} MiB read"
        )


async def _overhead(bench: _Bench, worker: Worker, rounds: int, emit: Emit) -> None:
    prefix = worker.generation.prefix
    on: list[float] = []
    off: list[float] = []
    lookups: list[float] = []  # the miss's own step on the way to the first token
    for i in range(max(12, 4 * rounds)):
        for enabled in (True, False) if i % 2 == 0 else (False, True):
            prefix.enabled = enabled
            prompt = _tokens(1024, seed=10_000 + 2 * i + enabled) + "\nQ?"
            timed = await bench.generate(prompt, 4, f"miss on={enabled}")
            (on if enabled else off).append(timed.server_ttft_ms)
            if enabled:
                lookups.append(float(timed.final.timings.get("lookup_ms", 0.0)))
            await prefix.flush()
    prefix.enabled = True
    m_on, m_off = statistics.median(on), statistics.median(off)
    paired = statistics.median(a / b for a, b in zip(on, off, strict=True)) - 1
    bench.result.overhead = {
        "prompt_tokens": 1026,
        "runs_each": len(on),
        "server_ttft_ms_on": _r(m_on),
        "server_ttft_ms_off": _r(m_off),
        "overhead": _r(paired, 4),
        "overhead_of_medians": _r(m_on / m_off - 1, 4),
        "server_ttft_ms_on_mean": _r(statistics.mean(on)),
        "server_ttft_ms_off_mean": _r(statistics.mean(off)),
        "lookup_ms_on_median": _r(statistics.median(lookups), 3),
        "goal": GOAL_OVERHEAD,
        "goal_met": paired <= GOAL_OVERHEAD,
    }
    emit(
        f"prefix  complete miss, 1,026-token prompts: TTFT with the prefix cache {m_on:.1f} ms, "
        f"without {m_off:.1f} ms (medians of {len(on)} each): overhead {100 * paired:+.1f}% "
        f"(median of the {len(on)} back-to-back pairs); the miss's lookup itself "
        f"{statistics.median(lookups):.2f} ms (one MGET finding nothing)"
    )


async def _chat(bench: _Bench, worker: Worker, emit: Emit) -> None:
    """4 conversations x 6 turns, one shared 512-token system prompt, each turn the whole
    conversation so far plus a new ~100-token message, answers of 16 tokens."""
    prefix = worker.generation.prefix
    system = _tokens(512, seed=7)
    history = [system for _ in range(4)]
    prompt_tokens = reused = local = redis = 0
    reads: list[int] = []
    peak = 0
    for turn in range(6):
        for c in range(4):
            history[c] += f"\nUser: {_tokens(100, seed=1000 * c + turn)}\nAssistant: "
            t = await bench.generate(history[c], 16, f"chat {c}.{turn}")
            history[c] += bytes(x for x in t.final.tokens if x < 128).decode("ascii")
            p = t.final.prefix
            prompt_tokens += t.final.usage["prompt_tokens"]
            reused += p["reused_tokens"]
            local += p["local_tokens"]
            redis += p["redis_tokens"]
            reads.append(p["bytes_read"])
            peak = max(peak, prefix.local.stats.bytes)
    budget = prefix.local.capacity_bytes
    bench.result.chat = {
        "requests": len(reads),
        "prompt_tokens": prompt_tokens,
        "token_hit_rate": _r(reused / prompt_tokens, 4),
        "from_local_tokens": local,
        "from_redis_tokens": redis,
        "bytes_read_per_request_mean": round(statistics.mean(reads)),
        "bytes_read_per_request_p50": _r(_pct(reads, 50), 0),
        "bytes_read_per_request_max": max(reads),
        "cache_budget_bytes": budget,
        "cache_peak_bytes": peak,
        "cache_evictions": prefix.local.stats.evictions,
        "within_budget": peak <= budget,
    }
    if peak > budget:
        bench.result.problems.append(f"chat: prefix cache peaked at {peak} > budget {budget}")
    emit(
        f"prefix  chat trace, {len(reads)} requests ({prompt_tokens:,} prompt tokens): token hit "
        f"rate {reused / prompt_tokens:.1%} ({local:,} from the worker's cache, {redis:,} from "
        f"Redis); bytes read per request mean {statistics.mean(reads) / MiB:.2f} MiB, max "
        f"{max(reads) / MiB:.2f} MiB; worker cache peak {peak / MiB:.1f} of {budget / MiB:.0f} "
        f"MiB ({prefix.local.stats.evictions} evictions)"
    )


async def _itl(bench: _Bench, worker: Worker, emit: Emit) -> None:
    for concurrent in (1, 8, 32):
        steps0 = worker.generation.steps
        seqs0 = worker.generation.stepped_sequences
        started = time.perf_counter()
        timed = await asyncio.gather(
            *(
                bench.generate(_tokens(64, seed=50_000 + 100 * concurrent + i), 32, "itl")
                for i in range(concurrent)
            )
        )
        elapsed = time.perf_counter() - started
        gaps = [
            1000 * (b - a) for t in timed for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)
        ]
        steps = worker.generation.steps - steps0
        seqs = worker.generation.stepped_sequences - seqs0
        tokens = sum(len(t.final.tokens) for t in timed)
        row = {
            "concurrent": concurrent,
            "itl_ms_p50": _r(_pct(gaps, 50)),
            "itl_ms_p99": _r(_pct(gaps, 99)),
            "client_ttft_ms_p50": _r(_pct([t.client_ttft_ms for t in timed], 50)),
            "tokens_per_s": _r(tokens / elapsed, 1),
            "decode_steps": steps,
            "mean_sequences_per_step": _r(seqs / steps if steps else None),
        }
        bench.result.itl.append(row)
        emit(
            f"prefix  inter-token latency, {concurrent:>2} concurrent: p50 {row['itl_ms_p50']} "
            f"ms, p99 {row['itl_ms_p99']} ms; {row['tokens_per_s']} tokens/s; "
            f"{row['mean_sequences_per_step']} sequences per decode step"
        )


async def _break_even(settings: Settings, emit: Emit) -> dict[str, Any]:
    """Computing ``n`` more prompt tokens against fetching their keys/values, in-process.

    Every request computes at least its tail (here 16 tokens), and the first token of a
    prefill pays for reading every weight once; so what reuse saves is the marginal cost of
    the ``n`` prefix tokens, ``prefill(n + 16) - prefill(16)``, against one MGET of a chunk of
    ``n`` tokens plus its checksum and decode."""
    model = preset(PRESET)
    t = transformer_of(model)
    assert isinstance(t, Transformer)
    params = model.init(0)
    tail = list(_tokens(16, seed=1).encode())

    async def prefill_ms(tokens: list[int]) -> float:
        state = t.new_state(len(tokens))
        began = time.perf_counter()
        await asyncio.to_thread(t.prefill, params, tokens, state)
        return 1000 * (time.perf_counter() - began)

    async def marginal_ms(prefix: list[int]) -> float:
        """prefill(prefix + tail) - prefill(tail), the two back to back, median of 5."""
        diffs = []
        for _ in range(5):
            diffs.append(await prefill_ms(prefix + tail) - await prefill_ms(tail))
        return statistics.median(diffs)

    base = statistics.median([await prefill_ms(tail) for _ in range(5)])
    rows: list[dict[str, Any]] = []
    async with open_kv(settings.redis) as kv:
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            prefix = list(_tokens(n, seed=n).encode())
            marginal = await marginal_ms(prefix)
            state = t.new_state(n)
            t.prefill(params, prefix, state)
            key = PrefixKey("breakeven", 1, f"{n:064x}")  # a chunk of n tokens
            blob = encode_chunk(key, state.kv)
            redis_key = f"{settings.redis.key_prefix}:breakeven:kv:{n}"
            await kv.set(redis_key, blob, ex=300)
            shape = tuple(state.kv.shape)
            gets, decodes = [], []
            for _ in range(5):
                began = time.perf_counter()
                (got,) = await kv.mget([redis_key])
                mid = time.perf_counter()
                assert got is not None
                await asyncio.to_thread(decode_chunk, key, got, shape)
                gets.append(mid - began)
                decodes.append(time.perf_counter() - mid)
            await kv.delete(redis_key)
            get_ms, decode_ms = 1000 * statistics.median(gets), 1000 * statistics.median(decodes)
            rows.append({
                "tokens": n, "compute_marginal_ms": round(marginal, 3),
                "fetch_ms": round(get_ms + decode_ms, 3), "mget_ms": round(get_ms, 3),
                "decode_ms": round(decode_ms, 3), "bytes": len(blob),
            })  # fmt: skip
    # the break-even: the smallest n from which fetching is cheaper at every n measured
    cheaper = []
    for r in reversed(rows):
        if r["fetch_ms"] >= r["compute_marginal_ms"]:
            break
        cheaper.append(int(r["tokens"]))
    last = rows[-1]
    gflops = t.flops_per_token * last["tokens"] / (last["compute_marginal_ms"] / 1000) / 1e9
    mbps = last["bytes"] / (last["mget_ms"] / 1000) / MiB
    result = {
        "rows": rows,
        "tail_tokens": len(tail),
        "tail_prefill_ms": round(base, 3),
        "fetch_cheaper_from_tokens": min(cheaper) if cheaper else None,
        "flops_per_token": t.flops_per_token,
        "kv_bytes_per_token": t.kv_bytes_per_token,
        "flops_per_kv_byte": round(t.flops_per_token / t.kv_bytes_per_token),
        "measured_gflops": _r(gflops),
        "measured_redis_mget_mib_per_s": _r(mbps, 1),
        "kv_chunk": t.kv_chunk,
    }
    emit(
        "prefix  break-even (marginal compute vs fetch): "
        + ", ".join(
            f"{r['tokens']} tok {r['compute_marginal_ms']:.1f} vs {r['fetch_ms']:.2f} ms"
            for r in rows
        )
        + f"; fetching is cheaper from {result['fetch_cheaper_from_tokens']} tokens (a "
        f"{len(tail)}-token tail alone: {base:.1f} ms); {t.flops_per_token / 1e6:.1f} MFLOP and "
        f"{t.kv_bytes_per_token // 1024} KiB of K/V per token ({result['flops_per_kv_byte']} FLOP "
        f"per byte): numpy {gflops:.1f} GFLOP/s, Redis MGET {mbps:.0f} MiB/s"
    )
    return result


async def bench_prefix(base: Settings, tag: str, rounds: int, emit: Emit) -> dict[str, Any]:
    """The suite (see the module docstring); ``{"prefix": PrefixResult}``."""
    result = PrefixResult()
    # 110 MB of weights go in one publish and 64 MiB of keys/values in one MGET: a Redis
    # timeout for bulk transfers on a loaded machine, not for a ping
    settings = side_settings(
        base, f"{tag}-prefix", "gen", {"cache.prefix_bytes": 512 * MiB, "redis.timeout_s": 60.0}
    )
    model = preset(PRESET)
    await prepare_side(settings, model, model.init(0))
    try:
        async with InferenceClient(settings.kafka) as client:
            bench = _Bench(client, result)
            stop = asyncio.Event()
            worker, task = await start_serving(settings, stop, timeout_s=120)
            try:
                await bench.generate("warm up: load the parameters", 2, "warm-up")
                await _ttft(bench, worker, rounds, emit)
                await _overhead(bench, worker, rounds, emit)
                await _itl(bench, worker, emit)
            finally:
                stop.set()
                await asyncio.wait_for(task, 120)
            small = with_values(settings, {"cache.prefix_bytes": CHAT_BUDGET})
            stop = asyncio.Event()
            worker, task = await start_serving(small, stop, timeout_s=120)
            try:
                await _chat(bench, worker, emit)
            finally:
                stop.set()
                await asyncio.wait_for(task, 120)
        result.break_even = await _break_even(settings, emit)
    finally:
        await drop_topics(settings.kafka)
    return {"prefix": result}
