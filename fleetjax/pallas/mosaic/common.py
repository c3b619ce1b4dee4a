"""What the Mosaic GPU walk kernels (fleetjax.pallas.mosaic.plain, .sums, .states) form the same way: a chunk's
index tiles and decay factors, wgmma products and their accumulators, the lazy carry of the state, the float32
state in and out of a program, and the launch of a kernel whose refs are named.

Everything here also runs in Mosaic GPU's CPU interpreter (``interpret``), which takes a few forms of its own:
no register layouts, accumulators summed after zeroed ones, transposed and register operands copied to shared
memory, one chunk at a time instead of emit_pipeline.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from fleetjax.chunk import decayed, split

f32 = jnp.float32
# MosaicWalkConfig.lazy_carry: the scale g of S = g T below which T takes it (T stays within 2^32 of S, far
# inside float32's range for any state that fits it with room).
LAZY_FLOOR = 2.0 ** -32


def mma_tiles(dtype, columns: int):
    """Shared-memory transforms that wgmma reads: rows of up to 128 bytes in (8, row) tiles, swizzled by the
    row's bytes."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    row = min(128, columns * jnp.dtype(dtype).itemsize)
    return (plgpu.TilingTransform((8, row // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(row))


class Walker:
    """One walk program's chunk arithmetic, for one trace: the tiling of ``config`` (a MosaicWalkConfig: chunks
    of C positions, a value block of block_v columns), keys of ``key_dim``, tiles of ``dtype``, forward or
    ``reverse`` in time.

    float16 (``scale_state``): the state is scaled before it is rounded (its range); bfloat16 keeps float32's,
    so the scale rides on the row factors (after the products: a hi/lo pair's sum holds the state either way).
    The chunk's pair weights carry the scale too. ``lazy``: the state is held as S = g T (:class:`Carry`,
    MosaicWalkConfig.lazy_carry), not for float16, whose copies of T could leave its range. ``interpret``:
    Mosaic GPU's interpret-mode parameters, with the interpreter's copies (:func:`interpreter_copies`) of the
    transposed key and value tiles (``keys_t``, ``block_t``) and of a register operand A (``register``)."""

    def __init__(self, config, *, key_dim: int, dtype, reverse: bool, scale: float, interpret=None, keys_t=None,
                 block_t=None, register=None):
        import jax.experimental.pallas.mosaic_gpu as plgpu
        self.C, self.K, self.bv, self.dtype = config.chunk_size, key_dim, config.block_v, dtype
        self.reverse, self.scale, self.interpret = reverse, scale, interpret
        self.split_by_bits = config.split_by_bits
        self.transposed = {} if interpret is None else {(self.C, key_dim): keys_t, (self.C, self.bv): block_t}
        self.register = register
        self.wg = plgpu.Layout.WGMMA
        self.scale_state = jnp.dtype(dtype) == jnp.dtype(jnp.float16)
        self.lazy = config.lazy_carry and not self.scale_state
        self.row_factor = 1.0 if self.scale_state else scale
        # The gated weights take the scale in their exponent (base 2, as the gated log decays are given), added
        # to the [C] log decays before they are broadcast.
        self.log_scale = math.log2(scale) if scale > 0 and scale != 1.0 else None

    def lazy_in(self, init):
        """The pipeline's carry from the state's (and, lazy, g = 1)."""
        return (init, jnp.asarray(1.0, f32)) if self.lazy else init

    def lazy_out(self, carried):
        """(the state's carry, g or None) of a chunk's or the pipeline's carry."""
        return carried if self.lazy else (carried, None)

    # Registers and layouts.

    def iota(self, shape, dimension, layout=None):
        import jax.experimental.pallas.mosaic_gpu as plgpu
        return (lax.broadcasted_iota(jnp.int32, shape, dimension) if self.interpret is not None
                else plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=layout or self.wg))

    def laid(self, x):
        import jax.experimental.pallas.mosaic_gpu as plgpu
        return x if self.interpret is not None else plgpu.layout_cast(x, self.wg)

    def rows(self, x):
        """A [C] vector broadcast along the value block's columns, [C, block_v]."""
        return self.laid(lax.broadcast_in_dim(x, (self.C, self.bv), (0,)))

    def parts_of(self, x, parts_dtype, parts: int):
        """x's hi/lo parts (fleetjax.chunk.split). The interpreter runs the body as XLA ops, whose GPU compiler
        would drop the splits' roundings: there they take a barrier."""
        by_bits = self.split_by_bits and jnp.dtype(parts_dtype) == jnp.dtype(jnp.bfloat16)
        return split(x, parts_dtype, parts, barrier=self.interpret is not None, by_bits=by_bits)

    # Products.

    def accumulate(self, *jobs):
        """[init + what issue(acc)'s wgmmas add] for each (init, issue) of ``jobs``, accumulated in place from
        init on the GPU, every wgmma issued before the first is waited for."""
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu
        if self.interpret is not None:
            return [init + pl.run_scoped(lambda acc, issue=issue: (issue(acc), acc[...])[1],
                                         plgpu.ACC(init.shape, f32)) for init, issue in jobs]

        def issue_all(accs):
            for acc, (_, issue) in zip(accs, jobs):
                issue(acc)

        return list(pl.run_state(issue_all)(tuple(plgpu.ACC.init(init) for init, _ in jobs)))

    def k_t(self, ref):
        """A tile transposed as a wgmma operand (the interpreter's copy of it)."""
        if self.interpret is None:
            return ref.transpose((1, 0))
        copy = self.transposed[ref.shape]
        copy[...] = ref[...].T
        return copy

    def from_registers(self, x):
        """A wgmma operand A in registers (the interpreter reads operands from refs)."""
        if self.interpret is None:
            return x
        self.register[...] = x
        return self.register

    def products(self, jobs: dict) -> dict:
        """{name: sum of a @ b over its pairs, float32} for jobs {name: (shape, pairs)}: every wgmma is issued
        before the first result is read, so that they share one wait. An operand b may be a thunk, taken just
        before its wgmma (the interpreter's transposed copies share a buffer per shape)."""
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu
        names = list(jobs)

        def body(*accs):
            for acc, name in zip(accs, names):
                for a, b_ in jobs[name][1]:
                    plgpu.wgmma(acc, a, b_() if callable(b_) else b_)
            return [acc[...] for acc in accs]

        return dict(zip(names, pl.run_scoped(body, *[plgpu.ACC(jobs[name][0], f32) for name in names])))

    def update(self, k_smem, *tiles):
        """An accumulator's issue: key^T tile for each tile (a hi/lo pair's parts add up)."""
        import jax.experimental.pallas.mosaic_gpu as plgpu

        def issue(acc):
            for tile in tiles:
                plgpu.wgmma(acc, self.k_t(k_smem), tile)
        return issue

    def exact_update(self, step, k_smem, weighted, state, derivative=None, *, leave_lag=None, tiles: dict,
                     joint: bool = False):
        """A chunk's carry out (``step``: its :class:`Carry`) after the update with float32-accurate products:
        S <- carry S + key^T weighted (the values times their leaving decay), weighted a hi/lo pair of parts
        (``tiles`` weighted, weighted_lo); with the tangent ``derivative`` (fleetjax.chunk.update_tangent) also
        D <- carry (D + C S) + key^T (leave_lag weighted) (tiles lagged, lagged_lo), from the entering S;
        ``joint``: S and D as one accumulator of twice the columns, one product (tiles moved, moved_lo: the
        weighted tiles, then the lagged ones, side by side; :meth:`update_tiles`)."""
        import jax.experimental.pallas.mosaic_gpu as plgpu
        tiles["weighted"][...], tiles["weighted_lo"][...] = self.parts_of(weighted, self.dtype, 2)
        if derivative is not None:
            tiles["lagged"][...], tiles["lagged_lo"][...] = self.parts_of(weighted * leave_lag, self.dtype, 2)
        plgpu.commit_smem()
        if joint:
            init = step.start(jnp.concatenate([state, derivative + self.C * state], axis=1))
            [both] = self.accumulate((init, self.update(k_smem, tiles["moved"], tiles["moved_lo"])))
            return step.out(both[:, :self.bv], both[:, self.bv:])
        jobs = [(step.start(state), self.update(k_smem, tiles["weighted"], tiles["weighted_lo"]))]
        if derivative is not None:
            jobs.append((step.start(derivative + self.C * state),
                         self.update(k_smem, tiles["lagged"], tiles["lagged_lo"])))
        return step.out(*self.accumulate(*jobs))

    def update_tiles(self, *, weighted=None, weighted_lo=None, lagged=None, lagged_lo=None, moved=None,
                     moved_lo=None) -> dict:
        """:meth:`exact_update`'s ``tiles`` from a program's scratch refs (None where it has none): with the
        joint ones (moved, moved_lo: 2 block_v columns) the weighted and lagged tiles are their two halves."""
        import jax.experimental.pallas as pl
        if moved is not None:
            weighted, lagged = (moved.at[:, pl.ds(i * self.bv, self.bv)] for i in range(2))
            weighted_lo, lagged_lo = (moved_lo.at[:, pl.ds(i * self.bv, self.bv)] for i in range(2))
        return dict(weighted=weighted, weighted_lo=weighted_lo, lagged=lagged, lagged_lo=lagged_lo, moved=moved,
                    moved_lo=moved_lo)

    def out(self, inter, scores, v_smem):
        """The chunk's out: inter (the entering state's part) + (scores * weights) value, in place."""
        import jax.experimental.pallas.mosaic_gpu as plgpu

        def intra(acc):
            plgpu.wgmma(acc, self.from_registers(scores.astype(self.dtype)), v_smem)

        [o] = self.accumulate((inter, intra))
        return o

    # The decay's factors.

    def steps(self):
        """(lag [C, C]: each pair's steps in the walk's order, lags >= 0 as float32, the rows' leaving steps
        [C, block_v])."""
        C = self.C
        pair_rows, pair_cols = self.iota((C, C), 0), self.iota((C, C), 1)
        lag = pair_cols - pair_rows if self.reverse else pair_rows - pair_cols
        # Exponents masked before exp (only lags >= 0): gamma -> 0 gives exact zeros, gamma = 1 ones.
        lags = jnp.where(lag >= 0, lag, 0).astype(f32)
        # The steps of each row's leaving decay: the tangent's weights (its derivative in log gamma).
        row = self.iota((C, self.bv), 0).astype(f32)
        return lag, lags, row + 1.0 if self.reverse else C - 1.0 - row

    def constant_factors(self, log_gamma, lag, lags):
        """The constant decay's factors from :meth:`steps`'s, the same for every chunk: (weights, the rows'
        entering and leaving factors [C], carry)."""
        C = self.C
        row = self.iota((C,), 0, self.wg.reduce(1)).astype(f32)
        enter_steps, leave_steps = (C - 1.0 - row, row + 1.0) if self.reverse else (row + 1.0, C - 1.0 - row)
        return (decayed(lag >= 0, lags * log_gamma) * self.scale,
                jnp.exp(enter_steps * log_gamma) * self.row_factor, jnp.exp(leave_steps * log_gamma),
                jnp.exp(C * log_gamma))

    def factors(self, within_smem, lag, *, bias: bool = False):
        """(weights, entering and leaving rows [C], carry) of a gated chunk from its ``within`` tile L [C], in
        base 2 (fleetjax.decay.Decays.within_chunks with base2): forward scale 2^(L_i - L_j) for j <= i, 2^L_i,
        2^(L_last - L_i), 2^L_last; in reverse the weights scale 2^(L_j - L_i) for j >= i and the entering and
        leaving rows swapped. Each is one exp2 of a difference (with MosaicWalkConfig.approx_exp the
        special-function unit's ex2 alone, where exp would multiply every exponent by log2(e) first: 32 instructions
        a chunk a thread for the weights).

        The pairs off the causal triangle (``lag`` < 0) take weight 0: by a select of each pair's exp, or with
        ``bias`` by an exponent of -inf, a [C, C] tile of 0 and -inf added to the pairs' exponents, which the
        compiler forms once, outside the chunk loop: one add a pair a chunk instead of a compare and a select,
        for 32 more float registers a thread (sm_90 SASS, experiments/sass.py --gate-only --T 4096, jax 0.11.2:
        on one warpgroup the forward walk's chunk loop 789 -> 767 instructions, the dv walk's 789 -> 771,
        neither spilling; on two, whose threads hold fewer registers, the forward's 725 -> 702 but its spills
        4 -> 24 bytes, and the gate's sums walks' 24 -> 76 bytes: those keep the select). Either way
        a NaN gate still reaches the pairs (with ``bias``, those off the triangle too: a plain walk's outputs
        are replaced wherever a non-finite value reaches, fleetjax.nonfinite)."""
        C, wg, reverse, log_scale = self.C, self.wg, self.reverse, self.log_scale
        if self.interpret is None:  # the tile as a column and as a row of the wgmma layout
            at_rows = load(within_smem, layout=wg.reduce(1))
            # Two loads that differ in an attribute: jax 0.11's CSE would merge identical ones (its layout
            # casts are pure) into one value that no layout serves both as row and column.
            at_cols = load(within_smem, layout=wg.reduce(0), optimized=False)
        else:
            at_rows = at_cols = within_smem[...]
        last = within_smem[C - 1]
        # log2(scale) joins the pairs' exponents through the rows' [C] values (their sign flips in reverse).
        shifted = at_rows if log_scale is None else at_rows + (-log_scale if reverse else log_scale)
        rows, cols = (self.laid(lax.broadcast_in_dim(x, (C, C), (axis,))) for x, axis in ((shifted, 0), (at_cols, 1)))
        # In reverse cols - rows, not -(rows - cols): the special-function unit's ex2 takes no negated operand.
        pair = cols - rows if reverse else rows - cols
        # The row factors' exp on the [C] values (the chunk broadcasts them): a thread holds two rows.
        from_start, to_end = jnp.exp2(at_rows), jnp.exp2(last - at_rows)
        enter, leave = (to_end, from_start) if reverse else (from_start, to_end)
        # Unlike fleetjax.chunk.decayed, the exponents are not masked before exp: off the pairs they are
        # differences of finite log decays in the wrong order (>= 0), whose exp at worst overflows to inf,
        # which the select drops; with ``bias`` their exponent is -inf and their exp 0 (a NaN gate still reaches
        # the pairs, as with the mask).
        if bias:
            weights = jnp.exp2(pair + jnp.where(lag >= 0, 0.0, -jnp.inf))
        else:
            weights = jnp.where(lag >= 0, jnp.exp2(pair), 0.0)
        weights = weights * self.scale if log_scale is None and self.scale != 1.0 else weights
        return weights, enter * self.row_factor, leave, jnp.exp2(last)

    # The float32 state in and out of a program.

    def state_tile(self):
        """A float32 [K, block_v] tile in shared memory: registers take tiled loads only from there."""
        import jax.experimental.pallas.mosaic_gpu as plgpu
        return plgpu.SMEM((self.K, self.bv), f32, transforms=mma_tiles(f32, self.bv))

    def entered(self, gmem, at: tuple, barrier, tile=None, zero=None):
        """The state entering the program from ``gmem.at[at]`` [K, block_v] float32 (``gmem`` None: zero)
        through ``tile`` (None: one scoped here); zero where ``zero`` (a traced bool, see :func:`entering_at`)
        is True."""
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu
        if gmem is None:
            return self.laid(jnp.zeros((self.K, self.bv), f32))

        def copy_in(tile):
            plgpu.copy_gmem_to_smem(gmem.at[at], tile, barrier)
            plgpu.barrier_wait(barrier)
            loaded = tile[...] if self.interpret is not None else load(tile, layout=self.wg)
            plgpu.commit_smem()  # every thread has read the tile before its space is reused
            if zero is None:
                return loaded
            # A select of like-shaped operands: Mosaic GPU does not broadcast a select's scalar predicate.
            zeros = self.laid(jnp.zeros(loaded.shape, f32))
            return jnp.where(self.laid(lax.broadcast_in_dim(zero, loaded.shape, ())), zeros, loaded)

        return copy_in(tile) if tile is not None else pl.run_scoped(copy_in, self.state_tile())

    @staticmethod
    def store(state, tile, gmem, at: tuple) -> None:
        """The state out to ``gmem.at[at]`` through ``tile``."""
        import jax.experimental.pallas.mosaic_gpu as plgpu
        tile[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(tile, gmem.at[at])
        plgpu.wait_smem_to_gmem(0)

    @classmethod
    def store_met(cls, state, tile, gmem, at: tuple, barrier_ref) -> None:
        """A compute warpgroup's state out (:meth:`store`) once its copies out have read their tiles and every
        compute warpgroup has left the pipeline (``meet`` at ``barrier_ref``): its float32 ``tile`` shares its
        space with the other warpgroup's pipeline scratch."""
        import jax.experimental.pallas.mosaic_gpu as plgpu
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        meet(barrier_ref)
        cls.store(state, tile, gmem, at)


def entering_at(entering, piece, pieces: int, reverse: bool):
    """(the index of ``piece``'s entering state in ``entering`` [B, H, P or P-1, K, V], whether it enters from
    zero or None): with P-1 states the first piece in the walk's order (forward 0, reverse P-1) enters from
    zero and the others are stored in order (fleetjax.pallas.mosaic.entering_states' ``zero_first``)."""
    if entering is None or entering.shape[2] == pieces:
        return piece, None
    if reverse:
        return jnp.minimum(piece, pieces - 2), piece == pieces - 1
    return jnp.maximum(piece - 1, 0), piece == 0


class Carry:
    """One chunk's carry of the state: S <- carry * S + (the chunk's update). With ``g`` (the lazy carry,
    MosaicWalkConfig.lazy_carry) the state is S = g T: the carry joins g, and T is multiplied only where g would
    fall below LAZY_FLOOR (then g = 1); the entering rows take g, the leaving ones 1 / g'."""

    def __init__(self, carry, g=None):
        self.carry, self.g = carry, g
        if g is not None:
            self.g_next = g * carry
            self.renorm = self.g_next < LAZY_FLOOR

    def rows(self, entering, leaving):
        """The entering and leaving rows' factors [C] of S's products, g's share in them."""
        if self.g is None:
            return entering, leaving
        # On the rows' [C] values, two a thread.
        return entering * self.g, leaving * jnp.where(self.renorm, 1.0, 1.0 / self.g_next)

    def start(self, init):
        """An update's accumulator before its product."""
        if self.g is None:
            return init * self.carry
        return lax.cond(self.renorm, lambda x: x * self.g_next, lambda x: x, init)

    def out(self, *values):
        """The chunk's carry out: the values (state first) and, lazy, g."""
        core = values[0] if len(values) == 1 else values
        return (core, jnp.where(self.renorm, 1.0, self.g_next)) if self.g is not None else core


def interpreter_copies(config, key_dim: int, dtype, per_group: tuple = ()) -> dict:
    """The scratch of the interpreter's operand copies (:class:`Walker`'s keys_t, block_t, register), every one
    each warpgroup's own (``per_group``): the Walker finds a transposed copy by its shape, so where K = block_v
    the keys' copy is the value block's, and two warpgroups sharing it would race."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    C, bv = config.chunk_size, config.block_v
    return dict(keys_t_smem=plgpu.SMEM((*per_group, key_dim, C), dtype),
                block_t_smem=plgpu.SMEM((*per_group, bv, C), dtype),
                register_smem=plgpu.SMEM((*per_group, C, C), dtype))


def launch(program: Callable[..., None], *, name: str, inputs: dict, outputs: dict, scratch: dict,
           grid: tuple[int, int, int], interpret=None, threads: int = 1, shared: tuple[str, ...] = (),
           no_auto_barriers: bool = False, approx_math: bool = False):
    """``program(**refs)`` as one Mosaic GPU kernel of grid (value blocks, batch*head, pieces), its refs by
    name: the non-None ``inputs`` (arrays) and ``outputs`` (ShapeDtypeStructs), then the ``scratch`` types;
    returns the outputs. ``threads``: warpgroups a program (more than one: the last issues the copies).
    ``shared``: scratch names that share their space with ``f32_smem`` (a RefUnion: those are used only while
    the pipeline runs). The kernel's name in profiles and lowered programs: <name>_mosaic_gpu_kernel."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    inputs = {key: x for key, x in inputs.items() if x is not None}
    outputs = {key: x for key, x in outputs.items() if x is not None}
    if shared:
        scratch = dict(scratch)
        union = plgpu.RefUnion(tuple(scratch.pop(key) for key in shared), scratch.pop("f32_smem"))
        scratch = {"shared": union, **scratch}
    names = [*inputs, *outputs, *scratch]

    def kernel(*refs):  # Mosaic GPU passes the refs in order: inputs, outputs, scratch
        named = dict(zip(names, refs))
        if shared:
            pipelined, named["f32_smem"] = named.pop("shared")
            named.update(zip(shared, pipelined))
        program(**named)

    kernel.__name__ = kernel.__qualname__ = name
    options = dict(num_threads=threads, thread_name="wg") if threads > 1 else {}
    params = {}
    if no_auto_barriers:
        params["unsafe_no_auto_barriers"] = True
    if approx_math:
        params["approx_math"] = True
    if params:
        options["compiler_params"] = plgpu.CompilerParams(**params)
    call = plgpu.kernel(kernel, out_type=tuple(outputs.values()), grid=grid, grid_names=("v", "bh", "piece"),
                        scratch_types=list(scratch.values()), **options,
                        **({} if interpret is None else dict(interpret=interpret)))
    return call(*inputs.values())


@functools.cache
def lowers_concatenate() -> bool:
    """Whether this jax's Mosaic GPU lowering takes lax.concatenate of register arrays (jax 0.11.2 does,
    0.10.2 does not)."""
    try:
        from jax._src.pallas.mosaic_gpu import core as gpu_core
        from jax._src.pallas.mosaic_gpu import lowering
        return lax.concatenate_p in lowering.mosaic_lowering_rules[gpu_core.LANExWG_SEMANTICS]
    except (ImportError, AttributeError, KeyError):
        return False


def load(ref, **kwargs):
    """plgpu.load of the whole ``ref`` (a layout given): jax 0.10's load takes the index as its second
    argument, later versions deprecate it in favour of indexing the ref (ref.at[...])."""
    import inspect

    import jax.experimental.pallas.mosaic_gpu as plgpu
    index = inspect.signature(plgpu.load).parameters["idx"]
    return plgpu.load(ref, **kwargs) if index.default is not inspect.Parameter.empty else plgpu.load(ref, (), **kwargs)


def meet(barrier_ref) -> None:
    """Wait until every compute warpgroup of the program reaches here: each arrives at ``barrier_ref`` (one of
    its arrivals), then waits for the others'."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    plgpu.barrier_arrive(barrier_ref)
    plgpu.barrier_wait(barrier_ref)


def warp_specialized(body, n: int, loads: dict, compute, *, stages: int, compute_wgs: int) -> None:
    """The chunk loop of a program of ``compute_wgs`` compute warpgroups and one that copies the chunks' tiles
    in: ``body`` over the ``loads`` {name: (BlockSpec, GMEM ref)}, each compute warpgroup running
    ``compute(loop)`` (its own setup and wrap-up around ``loop(init)``)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    plgpu.emit_pipeline_warp_specialized(
        body, grid=(n,), memory_registers=40, in_specs=[spec for spec, _ in loads.values()],
        max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=compute_wgs,
        compute_context=compute)(*[gmem for _, gmem in loads.values()])


def pipeline(body, n: int, in_specs, out_specs, gmems, init, *, stages: int, dtype, interpret=None):
    """The chunk loop: ``emit_pipeline(body, grid=(n,), ...)(*gmems)`` from the carry ``init``; in the
    interpreter one chunk at a time (:func:`stepwise`)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    if interpret is None:
        return plgpu.emit_pipeline(body, grid=(n,), in_specs=in_specs, out_specs=out_specs,
                                   max_concurrent_steps=stages, init_carry=init)(*gmems)
    return stepwise(body, n, in_specs, out_specs, gmems, init, dtype)


def stepwise(body, n: int, in_specs, out_specs, gmems, init, dtype):
    """``emit_pipeline(body, grid=(n,), ...)(*gmems)`` one chunk at a time, for Mosaic GPU's interpreter
    (jax 0.10.2's cannot run emit_pipeline's predicated copies): each step copies its input tiles to shared
    memory, runs ``body`` and copies its outputs back."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    specs = list(in_specs) + list(out_specs)
    shapes = [(spec.block_shape, dtype if len(spec.block_shape) == 2 else f32) for spec in specs]

    def scoped(barrier, *smems):
        def step(c, carry):
            for spec, gmem, smem in zip(in_specs, gmems, smems):
                plgpu.copy_gmem_to_smem(gmem.at[_block(spec, c)], smem, barrier)
                plgpu.barrier_wait(barrier)
            carry = body(c, *smems, carry)
            plgpu.commit_smem()
            for spec, gmem, smem in zip(out_specs, gmems[len(in_specs):], smems[len(in_specs):]):
                plgpu.copy_smem_to_gmem(smem, gmem.at[_block(spec, c)])
            plgpu.wait_smem_to_gmem(0)
            return carry

        return jax.lax.fori_loop(0, n, step, init)

    return pl.run_scoped(scoped, plgpu.Barrier(), *[plgpu.SMEM(shape, d) for shape, d in shapes])


def _block(spec, c):
    """The GMEM slice of block ``c`` of a BlockSpec (index_map gives block indices)."""
    import jax.experimental.pallas as pl
    index = spec.index_map(c)
    return tuple(pl.ds(i * size, size) for i, size in zip(index, spec.block_shape))
