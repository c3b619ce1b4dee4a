"""shard_map's varying-manual-axes typing (``check_vma``), for code that may run inside ``jax.shard_map``.

Inside ``jax.shard_map(check_vma=True)`` every value carries the set of mesh axes over which it may differ
between devices. A fresh ``jnp.zeros`` or a replicated input is invariant; loop carries, custom-VJP
cotangents and ``pallas_call`` outputs must be typed like the varying inputs they mix with. Outside
shard_map, or with ``check_vma=False``, these helpers change nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _aval_axes(aval) -> frozenset | None:
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)
    return None if vma is None else frozenset(vma)


def cast_varying(x: jax.Array, axes: tuple) -> jax.Array:
    """x marked as varying over the mesh axes ``axes`` (over which it does not vary yet)."""
    if not axes:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # JAX before pcast


def varying_axes(x: jax.Array) -> frozenset | None:
    """The mesh axes over which x may differ, or None if JAX does not say (outside shard_map's typing)."""
    return _aval_axes(jax.typeof(x))


def vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """x marked as varying over every mesh axis over which one of refs varies."""
    have = varying_axes(x)
    if have is None:
        return x
    need: set = set()
    for ref in refs:
        need |= varying_axes(ref) or set()
    return cast_varying(x, tuple(sorted(need - have, key=str)))


def instantiate(cotangent: Any) -> jax.Array:
    """A custom VJP's cotangent (``symbolic_zeros=True``) as an array: a symbolic zero as zeros of its type,
    varying over the mesh axes its type names (what JAX would have passed without symbolic zeros)."""
    from jax.custom_derivatives import SymbolicZero
    if not isinstance(cotangent, SymbolicZero):
        return cotangent
    aval = cotangent.aval
    zero = jnp.zeros(aval.shape, aval.dtype)
    return cast_varying(zero, tuple(sorted(_aval_axes(aval) or (), key=str)))


def shape_dtype_like(shape: tuple[int, ...], dtype: Any, *refs: jax.Array) -> jax.ShapeDtypeStruct:
    """A ``jax.ShapeDtypeStruct`` for a ``pallas_call`` output, varying over the mesh axes of refs. Inside
    ``shard_map(check_vma=True)`` pallas_call needs the type also when it varies over no axis (jax 0.10 names
    the field ``manual_axis_type``, later versions ``vma``)."""
    axes: set = set()
    for ref in refs:
        axes |= varying_axes(ref) or set()
    aval = jax.typeof(vary_like(jnp.zeros((), dtype), *refs))
    if getattr(aval, "mat", None) is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.mat)
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset(axes))
