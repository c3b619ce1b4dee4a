"""d log_gate from the walks' per-block parts in two small launches (PallasConfig.gate_grad_kernel, on by
default): :func:`log_gate_grad`, fleetjax.vjp.log_gate_grad formed by Triton programs over (batch, head) rows
in tiles of whole chunks, the choice between the plain and the contained walks made on the device. XLA takes
eight fusions for it on an H100 at B4 H16 T=4096 (about 45 us): the choice between the two walks' parts, their
sums over value blocks, the running sums in two passes and d's transpose. Here the programs read the chosen
walks' parts (the choice a branch of the program) and the marking's flags as they come, and write d in the
op's [B, T, H] layout.

fleetjax.vjp.log_gate_grad defines d. Its two in-chunk sums are one here: sum_{t >= r} w_t + sum_{s < r} u_s
= in_m + sum_{s < r} (u_s - w_s) over r's chunk m (in_m: the chunk's sum of w), a forward running sum (the
Triton lowering has no reverse one), rounded relative to the chunk's sums as the reference's are. spanned is
either a walk's own or, from the Mosaic walks, fleetjax.vjp.spanned_from_sums of their row and column sums.
The flow across a tile's last boundary is what the row's later tiles let in less what they let out: a first
launch forms each tile's (:func:`nets_kernel`), the second sums those after its tile (:func:`grad_kernel`).
One program a row, carrying the flow through its tiles in turn, took 22 us at T=4096 and 83 us at T=16384
(B4 H16, 64 programs; ncu on an H200, 2026-12-07); the two launches 6.3 + 12.2 us and 14.0 + 35.6 us against
22.7 and 82.6 for the one on an H100 (ncu, 2026-12-07, bf16, the gate alone,
experiments/results/2026-12-07-h100-fortyfirst_split_fwd_bwd_*).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

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


def _summed(parts: dict, side: str, name: str):
    """``side``'s part ``name`` [tile, C], summed over its value blocks."""
    ref = parts[f"{side}_{name}_ref"]
    return functools.reduce(jnp.add, (ref[j] for j in range(ref.shape[0])))


def _flows(parts: dict, side: str):
    """``side``'s w and u [tile, C] and each chunk's flow into and out of it [tile] (their sums)."""
    w, u = _summed(parts, side, "w"), _summed(parts, side, "u")
    return w, u, jnp.sum(w, axis=1), jnp.sum(u, axis=1)


def _chosen(chosen_ref, parts: dict, form: Callable[[str], Any]):
    """``form(side)`` of the chosen side: the plain walks' where ``chosen_ref`` [1] is nonzero, else the
    contained ones'; a branch of the program."""
    return jax.lax.cond(chosen_ref[0] != 0, lambda: form("plain"), lambda: form("contained"))


def nets_kernel(*, chosen_ref, net_ref, **parts):
    """One tile of one (batch, head) row: its chunks' flows in less out (:func:`_flows`, as
    :func:`grad_kernel` forms them), summed [1]. parts: ``<side>_w_ref`` and ``<side>_u_ref`` [blocks, tile,
    C]."""
    def tile_net(side):
        _, _, into, out = _flows(parts, side)
        return jnp.sum(into - out)

    net_ref[...] = jnp.full((1,), _chosen(chosen_ref, parts, tile_net), f32)


def grad_kernel(*, chosen_ref, d_ref, tiles: int, net_ref=None, **parts):
    """One tile of one (batch, head) row. parts: ``plain_<name>_ref`` and ``contained_<name>_ref`` [blocks,
    tile, C] (name: w, u, and spanned or row and column), ``reached_<i>_ref`` [tile, C] int32 (positive: NaN
    there, read with the contained parts alone); chosen [1] int32: nonzero, the plain walks' parts; net [M]
    (``tiles`` of them and padding; None where the row is one tile): each tile's :func:`nets_kernel`; d [tile,
    C]."""
    reached = [ref for name, ref in parts.items() if name.startswith("reached_")]
    if net_ref is None:
        after = jnp.zeros((), f32)
    else:  # the flow across the tile's last boundary: what the row's later tiles let in less out
        later = jax.lax.broadcasted_iota(jnp.int32, net_ref.shape, 0)
        i = pl.program_id(1)
        after = jnp.sum(jnp.where((later > i) & (later < tiles), net_ref[...], 0.0))

    def tile_d(side):
        w, u, into, out = _flows(parts, side)
        if f"{side}_spanned_ref" in parts:
            spanned = _summed(parts, side, "spanned")
        else:
            lag = _summed(parts, side, "column") - _summed(parts, side, "row")
            spanned = jnp.cumsum(lag, axis=1) - lag
        net = into - out
        # The flow across the boundary after each chunk: the tile's later chunks' and those after the tile.
        flow = after + (jnp.sum(net) - jnp.cumsum(net))
        lag = u - w
        d = spanned + into[:, None] + (jnp.cumsum(lag, axis=1) - lag) + (flow - out)[:, None]
        if side == "contained" and reached:
            d = jnp.where(functools.reduce(jnp.maximum, (ref[...] for ref in reached)) > 0, jnp.nan, d)
        return d

    d_ref[...] = _chosen(chosen_ref, parts, tile_d)


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
    tiles = n // tile
    grid = (B * H, tiles)
    row_tile = pl.BlockSpec((None, None, tile, C), lambda g, i: (g // H, g % H, i, 0))
    chosen_in = (jnp.reshape(chosen, (1,)).astype(jnp.int32), pl.BlockSpec((1,), lambda g, i: (0,)))
    sides = {}
    for side, given in (("plain", plain), ("contained", contained)):
        for name, part in given.items():
            blocks = part.shape[0]
            spec = pl.BlockSpec((blocks, None, None, tile, C), lambda g, i: (0, g // H, g % H, i, 0))
            sides[f"{side}_{name}_ref"] = (part.reshape(blocks, B, H, n, C), spec)
    inputs = dict(chosen_ref=chosen_in, **sides)
    if tiles > 1:
        M = pl.next_power_of_2(tiles)  # a Triton block's length; the padding is never written nor summed
        flows = {name: x for name, x in sides.items() if name.endswith(("_w_ref", "_u_ref"))}
        net_spec = pl.BlockSpec((None, None, 1), lambda g, i: (g // H, g % H, i))
        nets = call(nets_kernel, name="fleet_gate_nets", grid=grid, inputs=dict(chosen_ref=chosen_in, **flows),
                    outputs=dict(net_ref=(((B, H, M), f32), net_spec)), num_warps=4, num_stages=1)["net_ref"]
        inputs["net_ref"] = (nets, pl.BlockSpec((None, None, M), lambda g, i: (g // H, g % H, 0)))
    for i, flags in enumerate(reached):
        inputs[f"reached_{i}_ref"] = (flags.astype(jnp.int32).reshape(B, H, n, C), row_tile)
    by_token = pl.BlockSpec((None, tile, C, None), lambda g, i: (g // H, i, 0, g % H))
    out = call(functools.partial(grad_kernel, tiles=tiles), name="fleet_gate_grad", grid=grid,
               inputs=inputs, outputs=dict(d_ref=(((B, n, C, H), f32), by_token)), num_warps=4, num_stages=1)
    return jnp.swapaxes(out["d_ref"].reshape(B, T, H), 1, 2)
