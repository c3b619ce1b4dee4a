"""The backward's three walks on Hopper: dq = walk(dO, v, k) from S0^T, dv = reverse walk(k, q, dO), dk =
reverse walk(v, dO, q), the plain walk (fleetjax.pallas.mosaic.plain) where no gradient of the decay is
wanted, else the dq walk (and for the gate the dk walk) forming its sums (fleetjax.pallas.mosaic.sums)."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from fleetjax import vjp
from fleetjax.chunking import Chunking
from fleetjax.decay import Decays
from fleetjax.pallas.mosaic.config import MosaicWalkConfig
from fleetjax.pallas.mosaic.states import entering_states, entering_tangents
from fleetjax.pallas.mosaic.sums import sums_walk
from fleetjax.pallas.mosaic.plain import walk, witness_of


def backward_walks(q, k, v, do, decays: Decays, start, chunking: Chunking, dq_local, reverse_local, *,
                   scale: float, config: MosaicWalkConfig, log_decay_wanted: bool, log_gate_wanted: bool = False,
                   per_block: bool = False, interpret=None):
    """(dq, dk, dv, the gradient's per-position sums or None, the witness) where
    fleetjax.pallas.mosaic.serves_backward: the pieces entering from the local states of the dq walk's
    ``dq_local`` (keys v, values k: (states, their derivatives in log gamma or None)) and of the reverse walks'
    ``reverse_local`` (keys q, values dO; the dk walk's are their transposes), [B, H, P-1, ., .] or None; the
    gated decay where ``decays`` has a gate. The sums [B, H, T] (summed over their value blocks): with
    ``log_decay_wanted`` "decay" (each position's summand of d log decay, fleetjax.vjp.log_decay_summand),
    with ``log_gate_wanted`` w, u and spanned (fleetjax.vjp.log_gate_grad's parts; spanned from the two walks'
    row and column sums of the chunks' pairs, fleetjax.vjp.spanned_from_sums). The witness: the first rows of the
    dq and dv walks' states after their pieces (fleetjax.pallas.mosaic.witness_of), non-finite whenever dq or
    dv is (their 0 * out terms), which each q_t, k_t, v_t and dO_t reaches through its own pair (the dk walk's
    states after its pieces, read by nobody, are no witness: it runs with ``witness=False``). ``per_block``:
    the gate's parts per value block [blocks, B, H, T], row and column in place of spanned
    (fleetjax.pallas.gate_grad). ``interpret``: see fleetjax.pallas.mosaic.plain."""
    B, T = q.shape[:2]
    dq_local, dq_local_tangents = (None, None) if dq_local is None else dq_local
    if start is None and log_decay_wanted and chunking.pieces == 1:
        # No state: ptxas allocates the tangent's dq walk worse from a known zero than from an array of
        # zeros (sm_90 SASS: 1447 instructions a chunk and 288 bytes of spills against 1393 and 184,
        # experiments/results/2026-12-06-cpu-sass-base2.txt); the other walks gain nothing from one.
        start = jnp.zeros((B, decays.log_decay.shape[0], k.shape[-1], v.shape[-1]), jnp.float32)
    dq_entering = entering_states(None if start is None else jnp.swapaxes(start, -1, -2), dq_local, decays,
                                  chunking, B)
    reverse_entering = entering_states(None, reverse_local, decays, chunking, B, reverse=True)
    dk_entering = None if reverse_entering is None else jnp.swapaxes(reverse_entering, -1, -2)
    within = decays.within_chunks(B, T, chunking.chunk_size, base2=True) if decays.gated else None
    common = dict(log_decay=decays.log_decay, chunking=chunking, scale=scale, within=within, interpret=interpret)
    plain = functools.partial(walk, config=dataclasses.replace(config, warpgroups=config.backward_warpgroups),
                              **common)
    if not (log_decay_wanted or log_gate_wanted):
        dq, dq_finals = plain(do, v, k, entering=dq_entering, reverse=False, name="dq_walk")
        dv, dv_finals = plain(k, q, do, entering=reverse_entering, reverse=True, name="dv_walk")
        dk, _ = plain(v, do, q, entering=dk_entering, reverse=True, witness=False, name="dk_walk")
        return dq, dk, dv, None, (witness_of(dq_finals), witness_of(dv_finals))
    sums = functools.partial(sums_walk, config=dataclasses.replace(config, block_v=config.sums_block_v,
                                                                   stages=config.sums_stages), **common)
    tangents_entering = (entering_tangents(dq_entering, dq_local_tangents, decays, chunking, B)
                         if log_decay_wanted else None)
    dq, dq_finals, dq_sums = sums(do, v, k, entering=dq_entering, reverse=False, rows=q, tangent=log_decay_wanted,
                                  entering_tangents=tangents_entering, before=log_gate_wanted, name="dq_sums_walk")
    summed = (lambda part: part) if per_block else functools.partial(jnp.sum, axis=0)
    parts = {"w" if name == "state" else name: summed(part) for name, part in dq_sums.items()}
    dv, dv_finals = plain(k, q, do, entering=reverse_entering, reverse=True, name="dv_walk")
    if log_gate_wanted:  # the gate's gradient takes the dk walk's sums (the decay's come from the dq walk alone)
        dk, _, dk_sums = sums(v, do, q, entering=dk_entering, reverse=True, rows=k, before=True, witness=False,
                              name="dk_sums_walk")
        u, column, row = dk_sums["state"], dk_sums["before"], parts.pop("before")  # row: the dq walk's, in parts
        parts |= (dict(u=u, row=row, column=column) if per_block else
                  dict(u=summed(u), spanned=vjp.spanned_from_sums(row, summed(column), chunking.chunk_size)))
    else:
        dk, _ = plain(v, do, q, entering=dk_entering, reverse=True, witness=False, name="dk_walk")
    return dq, dk, dv, parts, (witness_of(dq_finals), witness_of(dv_finals))
