"""Probe: the forward walk with two compute warpgroups per program that share each chunk's query and key
tiles (Pallas Mosaic GPU's warp-specialized pipeline: a third warpgroup issues the tile copies), against the
package's Mosaic forward walk (one warpgroup per (value block, batch*head) program).

    PYTHONPATH=. python -m experiments.probe_wide_walk [--shapes "4,16384,16;8,8192,16"] [--stages 2,3]
    PYTHONPATH=. python -m experiments.probe_wide_walk --lower     # any host: lower it for sm_90 only

Why: on the H200 the forward walk at B4 H16 T=16384 (bf16, K = V = 128) runs at about 290 TFLOP/s of its
own products, one warpgroup per SM (168 KiB of shared memory a program), and neither fewer waits per chunk
(the early state update) nor two smaller programs per SM made it faster (experiments/README.md, sixth
session of 2026-12-03). Two warpgroups per program give the SM two independent chains of products and
read q and k once for all value columns (the scores are formed by each warpgroup, as in the package's walk
with two value blocks). This is a probe, not the package's kernel: the constant decay, no initial state,
one sequence piece, V = 2 * block_v, and the final state returned in the inputs' dtype (the package's f32
tile does not fit beside the two warpgroups' tiles). It prints the largest relative error against the
package's Mosaic walk, and the times of the package's op, its walk and the probe
(experiments.timing.time_calls, the benchmarks' method).

First run (H200, 2026-12-03, the factors formed per chunk, as ``--per-chunk`` now; results/2026-12-03-h200-
probe_wide_walk.txt): bitwise equal to the package's walk, and slower: 0.924 against 0.495 ms at B4 H16
T=16384 (stages 3: 0.954), 0.224 against 0.166 at T=4096. At B*H = 64 it fills 64 of the 132 SMs where the
package's two value blocks fill 128, so per SM it did 1.07x the package's work. Not yet run: the factors
carried (the default now), and a shape that fills the SMs for both (B8 H16 T=8192: 128 programs).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from experiments.inputs import retnet_log_decay  # noqa: E402
from fleetjax.chunk import decayed  # noqa: E402
from fleetjax.pallas.mosaic import _mma_tiles  # noqa: E402

f32 = jnp.float32
C = 64  # positions per chunk: one wgmma row tile


def wide_forward(q, k, v, log_decay, *, scale: float, stages: int = 2, precomputed: bool = True,
                 interpret=None):
    """(o [B, T, H, V] in v's dtype, the final state [B, H, K, V] in v's dtype) of the constant-decay walk
    from a zero state; q, k [B, T, H, K], v [B, T, H, V] 16-bit, log_decay [H] float32; T % 64 == 0, V % 2
    == 0 with V / 2 in (32, 64, 128), K in (64, 128). Program per batch*head: warpgroups 0 and 1 hold the
    state's value columns [0, V/2) and [V/2, V), warpgroup 2 copies the tiles. ``precomputed``: the decay's
    factors formed once per warpgroup and carried (registers), else formed in every chunk."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    B, T, H, K = q.shape
    V = v.shape[-1]
    bv, n, dtype = V // 2, T // C, v.dtype
    wg_layout = plgpu.Layout.WGMMA
    tiles = _mma_tiles(dtype, bv)

    def kernel(log_decay_gmem, q_gmem, k_gmem, v_gmem, o_gmem, final_gmem, state_smem, weighted_smem, out_smem,
               keys_t_smem=None, scores_smem=None):
        bh, wg = lax.axis_index("bh"), lax.axis_index("wg")
        b, h = bh // H, bh % H
        columns = pl.ds(wg * bv, bv)

        def iota(shape, dimension):
            if interpret is not None:
                return lax.broadcasted_iota(jnp.int32, shape, dimension)
            return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=wg_layout)

        def accumulate(init, issue):
            """init + what issue(acc)'s wgmmas add (the interpreter: added after a zeroed accumulator)."""
            if interpret is not None:
                return init + pl.run_scoped(lambda acc: (issue(acc), acc[...])[1], plgpu.ACC(init.shape, f32))
            return pl.run_state(issue)(plgpu.ACC.init(init))

        def k_t(ref):  # the key tile transposed (the interpreter: a copy in shared memory)
            if interpret is None:
                return plgpu.transpose_ref(ref, (1, 0))
            keys_t_smem.at[wg][...] = ref[...].T
            return keys_t_smem.at[wg]

        def from_registers(x):  # a wgmma operand A in registers (the interpreter reads operands from refs)
            if interpret is None:
                return x
            scores_smem.at[wg][...] = x
            return scores_smem.at[wg]

        def factors():
            """The constant decay's (weights, entering rows times the scale, leaving rows, carry), formed once
            per warpgroup and carried through the chunks (formed per chunk they cost about a hundred exp a
            thread)."""
            log_gamma = log_decay_gmem[h]
            lag = iota((C, C), 0) - iota((C, C), 1)
            row = iota((C, bv), 0).astype(f32)
            return (decayed(lag >= 0, lag.astype(f32) * log_gamma), jnp.exp((row + 1.0) * log_gamma) * scale,
                    jnp.exp((C - 1.0 - row) * log_gamma), jnp.exp(C * log_gamma))

        def body(indices, q_smem, k_smem, v_smem, carry):
            (c,) = indices
            state, constants = carry
            weights, entering, leaving, decay_c = constants if precomputed else factors()
            mine = state_smem.at[wg]
            mine[...] = state.astype(dtype)
            plgpu.commit_smem()

            def first(scores_acc, inter_acc):
                plgpu.wgmma(scores_acc, q_smem, k_t(k_smem))
                plgpu.wgmma(inter_acc, q_smem, mine)
                return scores_acc[...], inter_acc[...]

            scores, inter = pl.run_scoped(first, plgpu.ACC((C, C), f32), plgpu.ACC((C, bv), f32))
            scores = (scores * weights * scale).astype(dtype)
            values = v_smem.at[:, columns]

            o = accumulate(inter * entering, lambda acc: plgpu.wgmma(acc, from_registers(scores), values))
            slot = c % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the slot's copy two chunks ago has read it
            out_smem.at[wg, slot][...] = o.astype(dtype)
            weighted_smem.at[wg][...] = (values[...].astype(f32) * leaving + 0.0 * o).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], o_gmem.at[b, pl.ds(c * C, C), h, columns])

            state = accumulate(decay_c * state, lambda acc: plgpu.wgmma(acc, k_t(k_smem), weighted_smem.at[wg]))
            return state, constants

        def compute(pipeline):
            zeros = jnp.zeros((K, bv), f32)
            state, _ = pipeline((zeros if interpret is not None else plgpu.layout_cast(zeros, wg_layout),
                                 factors() if precomputed else ()))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            state_smem.at[wg][...] = state.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(state_smem.at[wg], final_gmem.at[b, h, :, columns])
            plgpu.wait_smem_to_gmem(0)

        rows = lambda width: plgpu.BlockSpec((C, width), lambda c: (c, 0), transforms=tiles)  # noqa: E731
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body, grid=(n,), memory_registers=40, in_specs=[rows(K), rows(K), rows(V)],
            max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=2, compute_context=compute)
        pipeline(q_gmem.at[b, :, h], k_gmem.at[b, :, h], v_gmem.at[b, :, h])

    call = plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct((B, T, H, V), dtype), jax.ShapeDtypeStruct((B, H, K, V), dtype)),
        grid=(B * H,), grid_names=("bh",), num_threads=3, thread_name="wg",
        **({} if interpret is None else dict(interpret=interpret)),
        scratch_types=[plgpu.SMEM((2, K, bv), dtype, transforms=tiles), plgpu.SMEM((2, C, bv), dtype, transforms=tiles),
                       plgpu.SMEM((2, 2, C, bv), dtype, transforms=tiles)]
        + ([] if interpret is None else [plgpu.SMEM((2, K, C), dtype), plgpu.SMEM((2, C, C), dtype)]))
    return call(log_decay.astype(f32), q, k, v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4,16384,16;8,8192,16;4,4096,16", help="B,T,H;... (K = V = 128)")
    ap.add_argument("--stages", default="2,3", help="pipeline depths of the probe, comma-separated")
    ap.add_argument("--per-chunk", action="store_true", help="form the decay's factors in every chunk")
    ap.add_argument("--lower", action="store_true", help="lower for sm_90 on this host and exit (no GPU needed)")
    args = ap.parse_args(argv)
    for shape in args.shapes.split(";"):
        B, T, H = (int(x) for x in shape.split(","))
        probe(B, T, H, [int(x) for x in args.stages.split(",")], per_chunk=args.per_chunk, lower=args.lower)
    return 0


def probe(B: int, T: int, H: int, stages: list[int], *, per_chunk: bool, lower: bool, K: int = 128,
          V: int = 128) -> None:
    """Print the probe's error against the package's Mosaic walk, and the times of the package's op (the
    witness's read and the plain/contained cond included), its walk alone and the probe at each depth."""
    from fleetjax.chunking import Chunking
    from fleetjax.pallas import mosaic
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.bfloat16)
    decay = jnp.asarray(np.exp(retnet_log_decay(H)), jnp.float32)
    log_decay, scale = jnp.log(decay), K ** -0.5
    wides = {n: jax.jit(functools.partial(wide_forward, log_decay=log_decay, scale=scale, stages=n,
                                          precomputed=not per_chunk)) for n in stages}
    if lower:
        for n, wide in wides.items():
            text = wide.trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
            print(f"B{B} T{T} H{H} stages {n}: lowered for sm_90,", text.count("custom_call @mosaic_gpu"),
                  "Mosaic GPU kernel", flush=True)
        return
    import fleetjax
    from experiments.timing import jax_sync, time_calls
    package = jax.jit(lambda q, k, v: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas"))
    walk = jax.jit(lambda q, k, v: mosaic.walk(q, k, v, log_decay, None, Chunking(T, C, 1), reverse=False,
                                               scale=scale, config=mosaic.MosaicWalkConfig())[0])
    ref = walk(q, k, v)
    runs = {"package op": package, "package walk": walk}
    for n, wide in wides.items():
        o = wide(q, k, v)[0]
        err = float(jnp.max(jnp.linalg.norm((o - ref).astype(f32), axis=-1))
                    / jnp.max(jnp.linalg.norm(ref.astype(f32), axis=-1)))
        print(f"B{B} T{T} H{H} K{K} V{V} stages {n} per_chunk {per_chunk}: relerr against the package's walk "
              f"{err:.2e}", flush=True)
        runs[f"probe, stages {n}"] = lambda q, k, v, wide=wide: wide(q, k, v)[0]
    for name, fn in runs.items():
        print(f"  {name}: {time_calls(fn, [(q, k, v)], jax_sync, target_s=0.1).ms:.4f} ms", flush=True)


if __name__ == "__main__":
    sys.exit(main())
