"""Wall-clock measurement: one timing method for every implementation (JAX and torch alike, so the numbers
compare), compile and recompilation accounting for jitted JAX functions, and the time budget of a run with
a per-step time limit."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import statistics
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from experiments.memory import tree_bytes, xla_memory_mb


@dataclasses.dataclass
class Timing:
    """Median milliseconds per call, and how they were measured."""

    ms: float
    ms_min: float
    samples: int
    calls_per_sample: int
    first_call_s: float


def _perf() -> float:
    return time.perf_counter()


def time_calls(call: Callable[..., Any], arg_sets: Sequence[tuple], sync: Callable[[Any], None], *,
               target_s: float = 0.25, min_samples: int = 5, max_samples: int = 25,
               sample_floor_s: float = 2e-3) -> Timing:
    """Wall-clock time per call of ``call(*args)``, the argument sets rotated from call to call.

    The first call (compilation, autotuning) is timed on its own and reported as first_call_s; every set is
    then run once as a warm-up. A sample is ``calls_per_sample`` back-to-back calls (enough to last about
    ``sample_floor_s``, so launch overhead overlaps the work as in a real program) followed by one ``sync``;
    the result is the median over samples of the time per call. Rotating inputs keeps a later call from
    finding its inputs in L2. The same method times JAX (sync = block_until_ready) and torch (sync =
    torch.cuda.synchronize), so their numbers compare.
    """
    if not arg_sets:
        raise ValueError("arg_sets must hold at least one tuple of arguments")
    n = len(arg_sets)
    t0 = _perf()
    sync(call(*arg_sets[0]))
    first = _perf() - t0
    for args in arg_sets[1:]:
        sync(call(*args))
    t0 = _perf()
    sync(call(*arg_sets[1 % n]))
    estimate = max(_perf() - t0, 1e-7)
    per_sample = int(min(400, max(1, math.ceil(sample_floor_s / estimate))))
    if estimate > 0.5:
        min_samples = min(min_samples, 3)
    samples = int(min(max_samples, max(min_samples, target_s // (estimate * per_sample))))
    times = []
    i = 0
    for _ in range(samples):
        t0 = _perf()
        out = None
        for _ in range(per_sample):
            out = call(*arg_sets[i % n])
            i += 1
        sync(out)
        times.append((_perf() - t0) / per_sample)
        del out
    return Timing(ms=statistics.median(times) * 1e3, ms_min=min(times) * 1e3, samples=samples,
                  calls_per_sample=per_sample, first_call_s=first)


def jax_sync(out: Any) -> None:
    import jax
    jax.block_until_ready(out)


@dataclasses.dataclass
class Queued:
    """Device time per call with the host kept ahead (:func:`queued_calls`)."""

    ms: float  # median over rounds of (the head and the calls done - the head alone, that round) / calls
    enqueue_ms: float  # the host's own time per call (dispatch, launches), median over rounds
    calls: int
    long_ms: float  # the head alone (``heads`` long ops), median over rounds
    ahead: bool  # whether the host enqueued every call of every round inside the head's time
    heads: int = 1  # long ops enqueued before the calls


def queued_calls(call: Callable[..., Any], arg_sets: Sequence[tuple], sync: Callable[[Any], None],
                 long_op: Callable[[], Any], *, call_ms: float, rounds: int = 3, min_calls: int = 8,
                 pending_bytes: int = 8 << 30, ahead_margin: float = 0.8, max_heads: int = 16) -> Queued:
    """Time per call measured on the device's queue rather than the host's clock: ``long_op()`` (a device
    op of known length that needs no host) is enqueued first, then the calls, then one sync. While the
    device works through the long op, the host enqueues the calls; the device then runs them back to back
    with no wait on the host, so (all done - long op) / calls is the calls' device time. ``enqueue_ms`` is
    the host's own time per call: where it nears a call's wall-clock time, :func:`time_calls` measured the
    host. ``ahead`` is False when enqueueing outlasted the long op (then ``ms`` is again partly the host's).

    Each round times the head alone just before the head with the calls, and the difference is the calls':
    at least ``min_calls`` calls (the pending outputs' bound aside), behind as many long ops as their
    ``call_ms`` (a wall-clock time, so at least the host's) asks. Thus the long op's own jitter (a
    compute-bound op follows the SM clock) and its sync's wait are shared by more calls. With one timing of
    the long op for every round and three or four calls, fwd+bwd at T=16384 read 12% and 20% below the wall
    clock's fastest sample on an H200; with this form, seven and eight calls read 4% and 3% below it on an
    H100 (2026-12-06). What remains of the gap is not explained.

    A first, untimed round leaves the allocator what a round needs, so that the timed rounds do not wait on
    it, and measures the host's enqueueing behind the head: where it took more than ``ahead_margin`` of the
    head's time, the timed rounds take as many more long ops as cover it with that margin, at most
    ``max_heads`` (each long op's output is held until the sync). ``call_ms`` can underestimate the host's
    time per call: on an H100 host the fleetjax forward at B4 H16 T=4096 enqueued in 0.26 ms a call behind the
    head against 0.13 ms a call by the wall clock, and its rows read ``ahead`` False (2026-12-07). ``ahead``
    asks more than the measure needs (each call enqueued before the device reaches it, which at a steady
    enqueueing rate those rows likely met), but it is what can be checked without the device's own time.

    The calls must run in order on one device queue (one JAX device; torch's current stream). A call's outputs
    may hold memory until it has run, so the count also keeps the pending outputs within ``pending_bytes``.
    """
    sync(long_op())
    t0 = _perf()
    sync(long_op())
    long_s = _perf() - t0
    n = len(arg_sets)
    probe = call(*arg_sets[0])
    sync(probe)
    out_bytes = max(tree_bytes(probe), 1)
    del probe
    call_s = max(call_ms * 1e-3, 1e-6)
    calls = int(min(400, pending_bytes // out_bytes, max(min_calls, round(long_s / call_s))))
    calls = max(2, calls)
    heads = max(1, math.ceil(calls * call_s / long_s))

    def head():
        return [long_op() for _ in range(heads)]

    times, enqueues, longs, ahead = [], [], [], True
    for r in range(rounds + 1):
        t0 = _perf()
        sync(head())
        alone = _perf() - t0
        t0 = _perf()
        first = head()
        for i in range(calls):  # each output dropped at once: the runtime frees it after its call has run
            last = call(*arg_sets[i % n])
        t1 = _perf()
        sync((first, last))  # one stream, in order: the last call done means all are
        t2 = _perf()
        del first, last
        if r == 0:  # the head to cover the host's measured enqueueing, from the next round on
            if t1 - t0 > ahead_margin * alone:
                heads = min(max_heads, max(heads, math.ceil((t1 - t0) / (ahead_margin * alone / heads))))
            continue
        times.append(max(t2 - t0 - alone, 0.0) / calls)
        enqueues.append((t1 - t0) / calls)
        longs.append(alone)
        ahead = ahead and (t1 - t0) < alone
    return Queued(ms=statistics.median(times) * 1e3, enqueue_ms=statistics.median(enqueues) * 1e3,
                  calls=calls, long_ms=statistics.median(longs) * 1e3, ahead=ahead, heads=heads)


def batched_calls(fn: Callable[..., Any], arg_sets: Sequence[tuple], *, target_s: float = 0.25,
                  min_samples: int = 5, sample_floor_s: float = 2e-3) -> tuple[float, int]:
    """(ms per call, calls per dispatch) of a JAX function run on every argument set in one jitted program:
    the calls follow each other on the device with no host between them, so the time is the device's even
    where the host's time per call outlasts it (a short op, whose :func:`queued_calls` then reads
    ``ahead`` False). Timed as :func:`time_calls` times one call (each sample's dispatches back to back, one
    sync), divided by the sets. The sets differ, so XLA cannot merge the calls; what does not depend on
    them (a constant's broadcast) it may form once for all of them."""
    import jax
    every = jax.jit(lambda sets: [fn(*args) for args in sets])
    timing = time_calls(every, [(list(arg_sets),)], jax_sync, target_s=target_s, min_samples=min_samples,
                        sample_floor_s=sample_floor_s)
    return timing.ms / len(arg_sets), len(arg_sets)


@functools.lru_cache(maxsize=None)
def jax_long_op(target_ms: float = 20.0) -> Callable[[], Any]:
    """A jitted device op of about ``target_ms`` that reads no host data: float32 products of a fixed
    matrix, as many as that takes (16 products timed first, on this device, so that one sync's wait does
    not count as much), compiled and run once here."""
    import jax
    import jax.numpy as jnp
    size = 4096 if jax.default_backend() == "gpu" else 256
    x = jnp.full((size, size), 1.0 / size, jnp.float32)

    def chain(x, count):
        return jax.lax.fori_loop(0, count, lambda _, y: jnp.tanh(y @ x), x)

    one = jax.jit(chain, static_argnums=1)
    jax_sync(one(x, 16))
    t0 = _perf()
    jax_sync(one(x, 16))
    per = max(_perf() - t0, 1e-6) / 16
    count = int(min(10_000, max(1, round(target_ms * 1e-3 / per))))
    jax_sync(one(x, count))  # its own compile (the count is static) before anyone times it
    return lambda: one(x, count)


@functools.lru_cache(maxsize=None)
def torch_long_op(target_ms: float = 20.0) -> Callable[[], Any]:
    """torch.cuda._sleep for about ``target_ms`` on the current stream (its cycles per millisecond timed
    first, on this device)."""
    import torch
    torch.cuda._sleep(1_000_000)
    torch.cuda.synchronize()
    t0 = _perf()
    torch.cuda._sleep(10_000_000)
    torch.cuda.synchronize()
    per_ms = 10_000_000 / max((_perf() - t0) * 1e3, 1e-3)
    cycles = int(per_ms * target_ms)
    return lambda: torch.cuda._sleep(cycles)


def sync_wait_us(repeats: int = 200) -> dict[str, float | None]:
    """Median microseconds from enqueueing a tiny device op to its sync's return, JAX and torch.

    The op takes a few microseconds on the GPU, so the time is the host's: dispatch, launch, and the
    sync's wake-up once the GPU is done. Each sample of :func:`time_calls` pays one sync, shared by its
    calls; machines of one GPU model can differ in it, so every results file records it.
    """
    import jax
    import jax.numpy as jnp
    out: dict[str, float | None] = {"jax_us": None, "torch_us": None}
    x = jnp.ones((8,), jnp.float32)
    bump = jax.jit(lambda x: x + 1.0)
    jax_sync(bump(x))

    def median_us(step: Callable[[], None]) -> float:
        times = []
        for _ in range(repeats):
            t0 = _perf()
            step()
            times.append(_perf() - t0)
        return statistics.median(times) * 1e6

    out["jax_us"] = median_us(lambda: jax_sync(bump(x)))
    try:
        import torch
        if torch.cuda.is_available():
            y = torch.ones(8, device="cuda")
            torch.cuda.synchronize()
            out["torch_us"] = median_us(lambda: (y.add_(1.0), torch.cuda.synchronize()))
    except Exception:  # noqa: BLE001 - torch absent: the JAX number stands alone
        pass
    return out


def torch_sync(out: Any) -> None:
    del out
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_do_bench_ms(fn: Callable[[], Any]) -> float | None:
    """triton.testing.do_bench's median (CUDA events, L2 flushed between calls), recorded beside our own
    number for the torch peers; None without CUDA or triton."""
    try:
        import torch
        import triton.testing
        if not torch.cuda.is_available():
            return None
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001 - a second opinion only; its absence must not lose the record
        return None


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events), to show that new data does not recompile."""

    _count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        import jax.monitoring
        try:
            from jax._src.dispatch import BACKEND_COMPILE_EVENT as event
        except ImportError:  # pragma: no cover - name moved in a later jax
            event = "/jax/core/compile/backend_compile_duration"

        def listener(name: str, duration: float, **kwargs) -> None:
            del duration, kwargs
            if name == event:
                cls._count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True

    @classmethod
    def count(cls) -> int:
        return cls._count


def jit_cache_size(jitted: Any) -> int | None:
    """Entries in a jax.jit function's dispatch cache (None where jax hides it)."""
    size = getattr(jitted, "_cache_size", None)
    try:
        return int(size()) if callable(size) else None
    except Exception:  # noqa: BLE001
        return None


def compile_jax(jitted: Any, args: tuple) -> tuple[Any, float, dict[str, float] | None]:
    """Lower and compile ``jitted`` for ``args``: (compiled, seconds, XLA's memory analysis in MiB)."""
    t0 = _perf()
    compiled = jitted.lower(*args).compile()
    seconds = _perf() - t0
    return compiled, seconds, xla_memory_mb(compiled)


# ---------------------------------------------------------------------------------------- budget, limits

class Budget:
    """A wall-clock budget for a whole benchmark: what is left, and whether a step may still start."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = _perf()

    def elapsed(self) -> float:
        return _perf() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


class CallTimeout(Exception):
    """Raised inside a step that ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CallTimeout in the main thread after ``seconds`` (SIGALRM). Python checks signals between
    bytecodes, so a long C++ call (an XLA or Triton compile) finishes before the timeout lands; autotuning
    loops are Python, so they stop at the next configuration. No limit off the main thread or where
    SIGALRM does not exist."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return
    if seconds <= 0:
        raise CallTimeout("no time left")

    def handler(signum, frame):
        del signum, frame
        raise CallTimeout(f"ran past its limit of {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
