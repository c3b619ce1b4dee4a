"""The chunked walk on Hopper's own instructions (Pallas Mosaic GPU): wgmma products, tiles brought in by the
bulk tensor copy engine (TMA) several chunks ahead, the [Dk, block_v] float32 state held in the tensor cores'
accumulator registers across the chunks.

fleetjax.pallas.chunked selects these walks through ``PallasConfig.mosaic_walks`` (set by the default config
on sm_90 GPUs) for the common case (:func:`supports`, :func:`serves_backward`): 16-bit inputs, no segments,
finite inputs (the contained walks stay Triton's), head dims 64 or 128, no float32-accurate state owed (a
returned final state, d initial_state: those stay in the Triton walks); the constant decay or the gated one,
whose weights, entering, leaving and carry are exp of differences of the log decay summed within the chunk
(Decays.within_chunks), each <= 0. One kernel a stage, one file each:

- ``plain.py``, :func:`walk`: the plain walk, the forward (q, k, v) and the backward's dq (dO, v, k), dv
  (reverse: k, q, dO) and dk (reverse: v, dO, q) where no sums are formed; one or two compute warpgroups;
- ``sums.py``, :func:`sums_walk`: the dq walk forming the decay's gradient sums with hi/lo products and the
  state's derivative in log gamma as a second state, and the gate's (with the dk walk: each the row or column
  sums of its chunk's pairs); one or two compute warpgroups;
- ``states.py``, :func:`piece_states`: the states-only walk of sequence pieces (one product a chunk), and the
  states entering each piece, passed in XLA from the pieces' local states (:func:`entering_states`,
  :func:`entering_tangents`);
- ``backward.py``, :func:`backward_walks`: the backward's three walks;
- ``common.py``: what the kernels form the same way (factors, products, the lazy carry, the launch);
  ``config.py``: :class:`MosaicWalkConfig`, one tiling for all of them.

Everything runs in Mosaic GPU's CPU interpreter too (``interpret=``, the tests; the gated two-warpgroup
walk with several fake CPU devices, whose client then has threads for its three warpgroups' executions:
with one, on a two-core host, they stalled), which takes a few forms of its own: no register layouts,
accumulators summed after zeroed ones, transposed and register operands copied to shared memory, one chunk
at a time instead of emit_pipeline (two warpgroups keep their warp-specialized pipeline there).
"""

from fleetjax.pallas.mosaic.backward import backward_walks
from fleetjax.pallas.mosaic.config import KEY_DIMS, MosaicWalkConfig, on_hopper, serves_backward, supports
from fleetjax.pallas.mosaic.states import STATES_KERNEL, entering_states, entering_tangents, piece_states
from fleetjax.pallas.mosaic.sums import sums_walk
from fleetjax.pallas.mosaic.plain import walk, witness_of

__all__ = ["KEY_DIMS", "STATES_KERNEL", "MosaicWalkConfig", "backward_walks", "entering_states", "entering_tangents",
           "on_hopper", "piece_states", "serves_backward", "sums_walk", "supports", "walk",
           "witness_of"]
