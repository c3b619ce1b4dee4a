"""d log_gate from the walks' per-block parts in one launch (PallasConfig.gate_grad_kernel, on by default):
:func:`log_gate_grad`, fleetjax.vjp.log_gate_grad formed by one Triton program per (batch, head) row, where
the choice between the plain and the contained walks is made on the device. XLA takes eight fusions for it on
an H100 at B4 H16 T=4096 (about 45 us; this launch 21 us): the choice between the two walks' parts, their sums
over value blocks, the running sums in two passes and d's transpose. Here the program reads the chosen walks'
parts (the choice a branch of the program) and the marking's flags as they come, and writes d in the op's
[B, T, H] layout.

fleetjax.vjp.log_gate_grad defines d. Its two in-chunk sums are one here: sum_{t >= r} w_t + sum_{s < r} u_s
= in_m + sum_{s < r} (u_s - w_s) over r's chunk m (in_m: the chunk's sum of w), a forward running sum (the
Triton lowering has no reverse one), rounded relative to the chunk's sums as the reference's are. spanned is
either a walk's own or, from the Mosaic walks, fleetjax.vjp.spanned_from_sums of their row and column sums.
The program walks its row's chunks from the end in tiles of whole chunks, carrying the flow across the
chunk boundaries from the chunks after each tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fleetjax.pallas.launch import call

f32 = jnp.float32
# Chunks a program sums at a time: the largest power of two up to this that divides the row's chunk count.
MAX_TILE = 16


def serves(T: int, chunk_size: int) -> bool:
    """Whether :func:`log_gate_grad` takes rows of T positions: whole chunks."""
    return T >= chunk_size and T % chunk_size == 0


def grad_kernel(*, chosen_ref, d_ref, n: int, tile: int, **parts):
    """One (batch, head) row of n chunks. parts: ``plain_<name>_ref`` and ``contained_<name>_ref`` [blocks, n,
    C] (name: w, u, and spanned or row and column), ``reached_<i>_ref`` [n, C] int32 (positive: NaN there, read
    with the contained parts alone); chosen [1] int32: nonzero, the plain walks' parts; d [n, C]."""
    reached = [ref for name, ref in parts.items() if name.startswith("reached_")]

    def summed(side, name, rows):
        ref = parts[f"{side}_{name}_ref"]
        return functools.reduce(jnp.add, (ref[j, rows, :] for j in range(ref.shape[0])))

    def chosen_parts(side, rows):
        w, u = summed(side, "w", rows), summed(side, "u", rows)
        bad = (functools.reduce(jnp.maximum, (ref[rows, :] for ref in reached)) if side == "contained" and reached
               else jnp.zeros(w.shape, jnp.int32))
        if f"{side}_spanned_ref" in parts:
            return w, u, summed(side, "spanned", rows), bad
        lag = summed(side, "column", rows) - summed(side, "row", rows)
        return w, u, jnp.cumsum(lag, axis=1) - lag, bad

    def step(i, after):
        rows = pl.ds((n // tile - 1 - i) * tile, tile)
        w, u, spanned, bad = jax.lax.cond(chosen_ref[0] != 0, lambda: chosen_parts("plain", rows),
                                          lambda: chosen_parts("contained", rows))
        into, out = jnp.sum(w, axis=1), jnp.sum(u, axis=1)
        net = into - out
        tile_net = jnp.sum(net)
        # The flow across the boundary after each chunk: the tile's later chunks' and those after the tile.
        flow = after + (tile_net - jnp.cumsum(net))
        lag = u - w
        d = spanned + into[:, None] + (jnp.cumsum(lag, axis=1) - lag) + (flow - out)[:, None]
        d_ref[rows, :] = jnp.where(bad > 0, jnp.nan, d)
        return after + tile_net

    jax.lax.fori_loop(0, n // tile, step, jnp.zeros((), f32))


def log_gate_grad(plain: dict, contained: dict, reached: tuple[jax.Array, ...], chosen: jax.Array, *,
                  chunk_size: int) -> jax.Array:
    """d log_gate [B, H, T] float32 (fleetjax.vjp.log_gate_grad) from ``plain``'s parts where ``chosen`` (a bool
    scalar array), else from ``contained``'s with NaN where any of ``reached`` (int32 [B, H, T], positive where
    a non-finite input reaches; not read where ``chosen``, so a skipped marking may leave them undefined):
    dicts of w, u and either spanned or row and column, each [blocks, B, H, T] float32 (any number of blocks,
    summed here), T a multiple of ``chunk_size`` (:func:`serves`). The launch writes d as [B, T, H], the op's
    layout, so that the caller's transpose back to it cancels this one."""
    B, H, T = plain["w"].shape[1:]
    C = chunk_size
    n = T // C
    tile = next(t for t in (MAX_TILE >> s for s in range(MAX_TILE.bit_length())) if n % t == 0)
    row = pl.BlockSpec((None, None, n, C), lambda g: (g // H, g % H, 0, 0))
    inputs = dict(chosen_ref=(jnp.reshape(chosen, (1,)).astype(jnp.int32), pl.BlockSpec((1,), lambda g: (0,))))
    for i, flags in enumerate(reached):
        inputs[f"reached_{i}_ref"] = (flags.astype(jnp.int32).reshape(B, H, n, C), row)
    for side, given in (("plain", plain), ("contained", contained)):
        for name, part in given.items():
            blocks = part.shape[0]
            spec = pl.BlockSpec((blocks, None, None, n, C), lambda g: (0, g // H, g % H, 0, 0))
            inputs[f"{side}_{name}_ref"] = (part.reshape(blocks, B, H, n, C), spec)
    by_token = pl.BlockSpec((None, n, C, None), lambda g: (g // H, 0, 0, g % H))
    out = call(functools.partial(grad_kernel, n=n, tile=tile), name="fleet_gate_grad", grid=(B * H,),
               inputs=inputs, outputs=dict(d_ref=(((B, n, C, H), f32), by_token)), num_warps=4, num_stages=1)
    return jnp.swapaxes(out["d_ref"].reshape(B, T, H), 1, 2)
