"""Every implementation the benchmarks time, behind one interface (DESIGN.md section 6 says how to call each).

An :class:`Impl` binds to a :class:`Case` and an op ("fwd" or "fwd_bwd") and returns a :class:`Bound`:
``prepare`` turns the shared inputs (JAX arrays q, k [B, T, H, K], v and dO [B, T, H, V] in the case's
dtype) into the implementation's own arguments (torch tensors, another layout: not timed), ``call`` is what
is timed, and ``unpack`` turns its result back into JAX arrays in our layout for the error check:
{"o", "dq", "dk", "dv", "ddecay"}, whichever it returns. A peer whose import fails, or that cannot run the
case, is skipped with the reason recorded (:meth:`Impl.unavailable`, :meth:`Impl.skip_reason`).

Conventions, read from each peer's source (scale 1 everywhere; decay gamma in (0, 1] per head):
  - fleetjax: fleet_attention(q, k, v, decay, implementation=...), [B, T, H, K]; returns d decay.
  - fla 0.6.0: chunk_simple_gla / fused_recurrent_simple_gla(q, k, v, g_gamma=log gamma [H] float32,
    scale=1.0), [B, T, H, K]; returns (o, final_state); its backward returns no g_gamma gradient.
  - Lightning Attention-2 (lightning-attn 0.0.5): lightning_attn2(q, k, v, s), [B, H, T, D] contiguous,
    s = -log gamma [H] float32, no scale argument (scale 1); no gradient for s. Its kernel holds the whole
    head dim in one block, so head dims above 128 go through lightning_attn_func, which splits q and k
    into 64-wide slices and sums (exact for linear attention).
  - LeetDecoding 0.0.3: FleetAttention_triton(q, k, v, gamma), [B, H, T, D], gamma = decay [H] (not its
    log), no scale; needs D % 32 == 0; forward only. Its rank blocks add into the output with unsynchronized
    load/store, so its error is recorded, not assumed.
  - ejkernel 0.0.80.3: ejkernel.kernels._triton.recurrent.recurrent(q, k, v, g_gamma=log gamma,
    softmax_scale=1.0), [B, T, H, D]; the kernel reads g_gamma[i_h], so a [H] vector is right (its
    annotation says "... num_heads"); g_gamma is a non-differentiable argument (no decay gradient).
  - softmax attention: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
    [B, T, N, H]; a different operator, timed as what a user would otherwise pick (no error recorded).

Run ``python -m experiments.peers`` for a report of which peers import here and why the others do not.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
LEET_FILE = REPO_ROOT / ".peers" / "FleetAttention_triton.py"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: q, k [B, T, H, K], v [B, T, H, V] in ``dtype`` ("bfloat16" or "float32")."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"Case.dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        for name in ("B", "T", "H", "K", "V"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Case.{name} must be a positive int, got {getattr(self, name)!r}")

    @property
    def label(self) -> str:
        return f"{self.dtype} B{self.B} H{self.H} T{self.T} K{self.K} V{self.V}"

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def fields(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "B": self.B, "T": self.T, "H": self.H, "K": self.K, "V": self.V}


@dataclasses.dataclass
class Bound:
    """An implementation bound to one case and op (see the module docstring)."""

    prepare: Callable[[dict[str, Any]], tuple]
    call: Callable[..., Any]
    unpack: Callable[[Any], dict[str, Any]]
    framework: str  # "jax" or "torch"
    jitted: Any = None  # the jax.jit function, for compile time and recompilation counts
    notes: str = ""


class Impl:
    """Base class: a named implementation with its import check and its limits."""

    name: str = ""
    framework: str = "jax"
    ops: tuple[str, ...] = ("fwd", "fwd_bwd")
    autotunes: bool = False  # its first call per shape searches configurations (the benchmark runs it last)
    decay_grad: bool | None = None  # whether its fwd_bwd returns a gradient for the decay
    input_layout: str = "BTHD"

    def unavailable(self) -> str | None:
        """None if usable here, else why not (import failure, missing device)."""
        return None

    def skip_reason(self, case: Case, op: str) -> str | None:
        if op not in self.ops:
            return f"{self.name} has no {op}"
        return None

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- conversions

def _jnp_dtype(name: str):
    import jax.numpy as jnp
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[name]


def _torch_dtype(name: str):
    import torch
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def to_torch(x, device: str):
    """A JAX array as a torch tensor of the same dtype on ``device`` (its own copy). DLPack when it works,
    else through float32 numpy (exact for bfloat16 and float16)."""
    import jax
    import torch
    jax.block_until_ready(x)
    try:
        t = torch.from_dlpack(x)
        if str(t.device).split(":")[0] != device.split(":")[0]:
            raise RuntimeError("dlpack gave a tensor on another device")
        return t.clone()
    except Exception:  # noqa: BLE001 - any DLPack refusal falls back to the host copy
        dtype = _torch_dtype(str(x.dtype))
        return torch.from_numpy(np.asarray(x.astype("float32"))).to(device=device, dtype=dtype)


def to_jax(t):
    """A torch tensor as a JAX array (its own copy); DLPack when it works, else through float32 numpy."""
    import jax.numpy as jnp
    import torch
    t = t.detach()
    if t.is_cuda:
        torch.cuda.synchronize()
    try:
        import jax.dlpack
        return jnp.array(jax.dlpack.from_dlpack(t.contiguous()), copy=True)
    except Exception:  # noqa: BLE001
        return jnp.asarray(t.float().cpu().numpy())


# --------------------------------------------------------------------------------------------- fleetjax

class FleetjaxImpl(Impl):
    """fleetjax.fleet_attention with one implementation; fwd_bwd includes the decay gradient."""

    framework = "jax"
    decay_grad = True

    def __init__(self, implementation: str, max_T: int | None = None):
        self.implementation = implementation
        self.name = f"fleetjax.{implementation}"
        self.max_T = max_T

    def unavailable(self) -> str | None:
        try:
            import fleetjax
        except Exception as e:  # noqa: BLE001
            return f"import fleetjax failed: {type(e).__name__}: {e}"
        if self.implementation not in fleetjax.IMPLEMENTATIONS:
            return (f"implementation {self.implementation!r} is not registered in fleetjax.IMPLEMENTATIONS "
                    "(its module is missing or failed to import)")
        return None

    def skip_reason(self, case: Case, op: str) -> str | None:
        if self.max_T is not None and case.T > self.max_T:
            return f"{self.name} is timed at T <= {self.max_T} only"
        return super().skip_reason(case, op)

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        import jax
        import jax.numpy as jnp
        from fleetjax import fleet_attention

        decay = jnp.exp(jnp.asarray(log_decay, jnp.float32))
        attend = functools.partial(fleet_attention, implementation=self.implementation)
        if op == "fwd":
            jitted = jax.jit(lambda q, k, v, d: attend(q, k, v, d))
            return Bound(prepare=lambda x: (x["q"], x["k"], x["v"], decay), call=jitted,
                         unpack=lambda o: {"o": o}, framework="jax", jitted=jitted)

        def fwd_bwd(q, k, v, d, do):
            o, vjp = jax.vjp(attend, q, k, v, d)
            return (o,) + tuple(vjp(do))

        jitted = jax.jit(fwd_bwd)
        return Bound(prepare=lambda x: (x["q"], x["k"], x["v"], decay, x["do"]), call=jitted,
                     unpack=lambda out: dict(zip(("o", "dq", "dk", "dv", "ddecay"), out)), framework="jax",
                     jitted=jitted)


# ---------------------------------------------------------------------------------------------- softmax

class SoftmaxImpl(Impl):
    """Causal softmax attention through jax.nn.dot_product_attention: what a user would otherwise pick."""

    framework = "jax"
    decay_grad = False

    def __init__(self, implementation: str | None):
        self.implementation = implementation
        self.name = f"softmax.{implementation or 'xla'}"

    def unavailable(self) -> str | None:
        import jax
        if self.implementation == "cudnn" and jax.default_backend() != "gpu":
            return f"cuDNN attention needs a GPU (jax backend is {jax.default_backend()})"
        return None

    def skip_reason(self, case: Case, op: str) -> str | None:
        if self.implementation == "cudnn" and case.dtype == "float32":
            return "cuDNN attention takes float16/bfloat16 only"
        if case.K != case.V:
            return "dot_product_attention needs K == V"
        return super().skip_reason(case, op)

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        import jax
        attend = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                   implementation=self.implementation)
        if op == "fwd":
            jitted = jax.jit(lambda q, k, v: attend(q, k, v))
            return Bound(prepare=lambda x: (x["q"], x["k"], x["v"]), call=jitted, unpack=lambda o: {},
                         framework="jax", jitted=jitted, notes="different operator: no error recorded")

        def fwd_bwd(q, k, v, do):
            o, vjp = jax.vjp(lambda q, k, v: attend(q, k, v), q, k, v)
            return (o,) + tuple(vjp(do))

        jitted = jax.jit(fwd_bwd)
        return Bound(prepare=lambda x: (x["q"], x["k"], x["v"], x["do"]), call=jitted, unpack=lambda o: {},
                     framework="jax", jitted=jitted, notes="different operator: no error recorded")


# --------------------------------------------------------------------------------------------- ejkernel

_JAX_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_entry_size_bytes",
                      "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_enable_xla_caches")


@functools.lru_cache(maxsize=None)
def _ejkernel_recurrent() -> tuple[Callable | None, str | None]:
    """ejkernel's recurrent. Importing ejkernel turns on JAX's persistent compilation cache for the whole
    process (its ejit decorator sets jax_compilation_cache_dir at import); the options are put back so
    that fleetjax's compile times and compile counts mean the same before and after the import."""
    import jax
    saved = {name: getattr(jax.config, name) for name in _JAX_CACHE_OPTIONS if hasattr(jax.config, name)}
    try:
        from ejkernel.kernels._triton.recurrent import recurrent
        return recurrent, None
    except Exception as e:  # noqa: BLE001 - recorded as the skip reason
        return None, f"import ejkernel.kernels._triton.recurrent failed: {type(e).__name__}: {e}"
    finally:
        for name, value in saved.items():
            if getattr(jax.config, name) != value:
                jax.config.update(name, value)


class EjkernelImpl(Impl):
    """ejkernel's Triton recurrent kernel, the JAX peer (one position at a time, state on chip)."""

    name = "ejkernel.recurrent"
    framework = "jax"
    decay_grad = False

    def unavailable(self) -> str | None:
        return _ejkernel_recurrent()[1]

    def _fns(self, log_decay: np.ndarray):
        import jax
        import jax.numpy as jnp
        recurrent = _ejkernel_recurrent()[0]
        # A closed-over constant, not a traced argument: g_gamma is one of the custom VJP's
        # non-differentiable arguments, which must not be tracers.
        g_gamma = jnp.asarray(log_decay, jnp.float32)

        def fwd(q, k, v):
            return recurrent(q, k, v, g_gamma=g_gamma, softmax_scale=1.0)[0]

        def fwd_bwd(q, k, v, do):
            o, vjp = jax.vjp(fwd, q, k, v)
            return (o,) + tuple(vjp(do))

        return fwd, fwd_bwd

    def skip_reason(self, case: Case, op: str) -> str | None:
        import jax
        reason = super().skip_reason(case, op)
        if reason is None and jax.default_backend() != "gpu":
            # Still check the call convention (shapes, dtypes, argument names) without running the kernel.
            from jax import ShapeDtypeStruct as S
            fwd, fwd_bwd = self._fns(np.zeros(case.H, np.float32))
            dt = _jnp_dtype(case.dtype)
            qk, v = S((case.B, case.T, case.H, case.K), dt), S((case.B, case.T, case.H, case.V), dt)
            shapes = jax.eval_shape(fwd, qk, qk, v) if op == "fwd" else jax.eval_shape(fwd_bwd, qk, qk, v, v)
            return (f"its Triton kernels need a GPU (jax backend is {jax.default_backend()}); the call "
                    f"traced with jax.eval_shape to {jax.tree_util.tree_map(lambda s: s.shape, shapes)}")
        return reason

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        import jax
        fwd, fwd_bwd = self._fns(log_decay)
        if op == "fwd":
            jitted = jax.jit(fwd)
            return Bound(prepare=lambda x: (x["q"], x["k"], x["v"]), call=jitted, unpack=lambda o: {"o": o},
                         framework="jax", jitted=jitted)
        jitted = jax.jit(fwd_bwd)
        return Bound(prepare=lambda x: (x["q"], x["k"], x["v"], x["do"]), call=jitted,
                     unpack=lambda out: dict(zip(("o", "dq", "dk", "dv"), out)), framework="jax",
                     jitted=jitted)


# ------------------------------------------------------------------------------------------ torch peers

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def torch_device() -> tuple[str | None, str | None]:
    """("cuda", None) with a GPU; ("cpu", None) under TRITON_INTERPRET=1 (Triton's CPU interpreter, for
    checking call conventions here); else (None, reason)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return None, f"import torch failed: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        return "cuda", None
    if _interpreting():
        _interpreter_single_config()
        return "cpu", None
    return None, "needs CUDA: torch sees no GPU (TRITON_INTERPRET=1 runs the Triton kernels on the CPU)"


def _interpreter_single_config() -> None:
    """Under Triton's interpreter there is no GPU to benchmark autotuning candidates on: keep each
    autotuned kernel's first configuration. Used only when TRITON_INTERPRET=1 (CPU checks)."""
    import triton.runtime.autotuner as autotuner
    if getattr(autotuner.Autotuner, "_fleetjax_single_config", False):
        return
    original = autotuner.Autotuner.__init__

    def __init__(self, fn, arg_names, configs, *args, **kwargs):
        original(self, fn, arg_names, list(configs)[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = __init__
    autotuner.Autotuner._fleetjax_single_config = True


class TorchImpl(Impl):
    """A torch peer: inputs converted once (not timed), fwd under no_grad, fwd_bwd through
    torch.autograd.grad with the same dO."""

    framework = "torch"

    def _import(self) -> tuple[Any, str | None]:
        raise NotImplementedError

    def unavailable(self) -> str | None:
        device, reason = torch_device()
        if device is None:
            return reason
        return self._import()[1]

    def _forward(self, case: Case, log_decay: np.ndarray, device: str) -> Callable:
        """fn(q, k, v) -> o, all in the peer's own layout."""
        raise NotImplementedError

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        import torch
        device = torch_device()[0]
        forward = self._forward(case, log_decay, device)
        to_native = (lambda t: t) if self.input_layout == "BTHD" else (lambda t: t.transpose(1, 2).contiguous())
        from_native = (lambda t: t) if self.input_layout == "BTHD" else (lambda t: t.transpose(1, 2))

        if op == "fwd":
            def prepare(x):
                return tuple(to_native(to_torch(x[n], device)) for n in ("q", "k", "v"))

            def call(q, k, v):
                with torch.no_grad():
                    return forward(q, k, v)

            return Bound(prepare=prepare, call=call, unpack=lambda o: {"o": to_jax(from_native(o))},
                         framework="torch")

        def prepare(x):
            q, k, v = (to_native(to_torch(x[n], device)).requires_grad_(True) for n in ("q", "k", "v"))
            return q, k, v, to_native(to_torch(x["do"], device))

        def call(q, k, v, do):
            o = forward(q, k, v)
            return (o,) + tuple(torch.autograd.grad(o, (q, k, v), do))

        def unpack(out):
            return {name: to_jax(from_native(t)) for name, t in zip(("o", "dq", "dk", "dv"), out)}

        return Bound(prepare=prepare, call=call, unpack=unpack, framework="torch")


@functools.lru_cache(maxsize=None)
def _fla_ops() -> tuple[Any, str | None]:
    """fla.ops.simple_gla. fla/__init__ also imports its layers and models (transformers); if that part
    breaks, import the ops without running the package __init__ (the ops do not need it)."""
    try:
        return importlib.import_module("fla.ops.simple_gla"), None
    except Exception as first:  # noqa: BLE001
        spec = importlib.util.find_spec("fla") if "fla" not in sys.modules else None
        for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
            del sys.modules[name]
        spec = spec or importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            return None, f"import fla.ops.simple_gla failed: {type(first).__name__}: {first}"
        package = types.ModuleType("fla")
        package.__path__ = list(spec.submodule_search_locations)
        try:  # fla's modules read the package version
            package.__version__ = importlib.metadata.version("fla-core")
        except importlib.metadata.PackageNotFoundError:
            package.__version__ = "0.0.0"
        package.fleetjax_note = f"imported without fla/__init__, which failed: {type(first).__name__}: {first}"
        sys.modules["fla"] = package
        try:
            return importlib.import_module("fla.ops.simple_gla"), None
        except Exception as second:  # noqa: BLE001
            return None, (f"import fla.ops.simple_gla failed: {type(first).__name__}: {first}; without "
                          f"fla/__init__: {type(second).__name__}: {second}")


class FlaChunkImpl(TorchImpl):
    name = "fla.chunk"
    decay_grad = False
    autotunes = True

    def __init__(self, max_head_dim: int | None = None):
        self.max_head_dim = max_head_dim

    def _import(self):
        return _fla_ops()

    def skip_reason(self, case: Case, op: str) -> str | None:
        if self.max_head_dim is not None and max(case.K, case.V) > self.max_head_dim:
            return (f"skipped (--skip-slow-autotune): fla autotunes for minutes at head dim > "
                    f"{self.max_head_dim}")
        return super().skip_reason(case, op)

    def _forward(self, case, log_decay, device):
        import torch
        chunk_simple_gla = self._import()[0].chunk_simple_gla
        g_gamma = torch.tensor(np.asarray(log_decay, np.float32), device=device)
        return lambda q, k, v: chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]


class FlaRecurrentImpl(FlaChunkImpl):
    name = "fla.fused_recurrent"
    ops = ("fwd",)

    def _forward(self, case, log_decay, device):
        import torch
        fused_recurrent_simple_gla = self._import()[0].fused_recurrent_simple_gla
        g_gamma = torch.tensor(np.asarray(log_decay, np.float32), device=device)
        return lambda q, k, v: fused_recurrent_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]


@functools.lru_cache(maxsize=None)
def _lightning() -> tuple[Any, str | None]:
    try:
        from lightning_attn.ops import lightning_attn_func
        from lightning_attn.ops.triton.lightning_attn2 import lightning_attn2
        return (lightning_attn2, lightning_attn_func), None
    except Exception as e:  # noqa: BLE001
        return None, f"import lightning_attn failed: {type(e).__name__}: {e}"


class LightningImpl(TorchImpl):
    name = "lightning.attn2"
    decay_grad = False
    input_layout = "BHTD"

    def _import(self):
        return _lightning()

    def skip_reason(self, case: Case, op: str) -> str | None:
        for name, d in (("K", case.K), ("V", case.V)):
            if d & (d - 1) or d < 16:
                return f"its kernel needs a power-of-two head dim >= 16, got {name}={d}"
        return super().skip_reason(case, op)

    def _forward(self, case, log_decay, device):
        import torch
        lightning_attn2, lightning_attn_func = self._import()[0]
        s = torch.tensor(-np.asarray(log_decay, np.float32), device=device)
        fn = lightning_attn2 if case.K <= 128 else lightning_attn_func
        return lambda q, k, v: fn(q, k, v, s)


@functools.lru_cache(maxsize=None)
def _leet() -> tuple[Any, str | None]:
    if not LEET_FILE.exists():
        return None, f"{LEET_FILE.relative_to(REPO_ROOT)} is missing (extract it from the leetdecoding sdist)"
    try:
        spec = importlib.util.spec_from_file_location("leetdecoding_fleet_attention_triton", LEET_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.FleetAttention_triton, None
    except Exception as e:  # noqa: BLE001
        return None, f"loading {LEET_FILE.name} failed: {type(e).__name__}: {e}"


class LeetImpl(TorchImpl):
    name = "leetdecoding.fleet"
    ops = ("fwd",)
    decay_grad = False
    input_layout = "BHTD"

    def __init__(self, max_T: int | None = None):
        self.max_T = max_T

    def _import(self):
        return _leet()

    def skip_reason(self, case: Case, op: str) -> str | None:
        if case.V % 32:
            return f"its kernel tiles V by 32 and needs V % 32 == 0, got V={case.V}"
        if self.max_T is not None and case.T > self.max_T:
            return f"timed at T <= {self.max_T} only (one position per step, seconds per call beyond)"
        return super().skip_reason(case, op)

    def _forward(self, case, log_decay, device):
        import torch
        fleet = self._import()[0]
        gamma = torch.tensor(np.exp(np.asarray(log_decay, np.float64)).astype(np.float32), device=device)
        return lambda q, k, v: fleet(q, k, v, gamma)


# ------------------------------------------------------------------------------------------------ lists

def forward_impls(*, smoke: bool = False, skip_slow_autotune: bool = False) -> list[Impl]:
    """Issue 4's forward list; fla's kernels (their first call per shape autotunes) last."""
    impls: list[Impl] = [FleetjaxImpl("pallas"), FleetjaxImpl("pallas_fleet"), FleetjaxImpl("xla"),
                         FleetjaxImpl("scan", max_T=4096),
                         SoftmaxImpl(None if smoke else "cudnn"),
                         LightningImpl(), EjkernelImpl(), LeetImpl(),
                         FlaChunkImpl(max_head_dim=128 if skip_slow_autotune else None),
                         FlaRecurrentImpl(max_head_dim=128 if skip_slow_autotune else None)]
    return impls


def backward_impls(*, smoke: bool = False, skip_slow_autotune: bool = False) -> list[Impl]:
    """Issue 5's forward+backward list, fla last."""
    return [FleetjaxImpl("pallas"), FleetjaxImpl("pallas_fleet"), FleetjaxImpl("xla"),
            SoftmaxImpl(None if smoke else "cudnn"), LightningImpl(), EjkernelImpl(),
            FlaChunkImpl(max_head_dim=128 if skip_slow_autotune else None)]


def main() -> int:
    """Print which implementations are usable here and why the others are not."""
    seen = {}
    for impl in forward_impls() + backward_impls():
        seen.setdefault(impl.name, impl)
    for name, impl in seen.items():
        print(f"{name:22s} {impl.unavailable() or 'ok'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
