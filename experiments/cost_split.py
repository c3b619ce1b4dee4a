"""Where the "pallas" implementation's time goes on a GPU, at the long-context benchmark shapes (bf16,
K = V = 128): the op (forward, forward+backward) with XLA's temp allocation, the op without the choice
between contained and plain kernels (fleetjax.nonfinite.contained_if_reached, contained_on_device and
contained_if_needed: the plain kernels called directly), and each walk kernel alone, plain and with
containment, at the default warps and others.

    PYTHONPATH=. python -m experiments.cost_split [--out DIR] [--smoke] [--op-only] [--gated] [--warps 4,8]

``--op-only`` times the public op alone (it runs against an older checkout too, for a before/after in one
device call: ``PYTHONPATH=old_tree:. python -m experiments.cost_split --op-only --label old``, from a directory
other than the repository's, the trees' processes alternated). ``--gated`` adds ``fwd_bwd_decay``, the gate with
a learned per-head decay beside it (the gated layers' op). ``--shapes "B,T,H;..."`` replaces the shapes,
``--ops fwd_bwd,...`` keeps those ops alone (a short device call). ``--walks JSON`` changes fields of the default
config's Mosaic walks (an sm_90 GPU's), e.g. ``'{"wide_auto_barriers": false}'``: variants of one checkout, in
alternated processes as two trees are.
Writes DIR/cost_split[-label].json. A diagnostic for the speed work: it reaches into fleetjax.pallas.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments.inputs import retnet_log_decay, with_walk_fields  # noqa: E402
from experiments.timing import jax_sync, time_calls  # noqa: E402

SHAPES = ((4, 16384, 16), (1, 32768, 8))


def _time(fn, sets):
    """(ms per call, XLA's temp allocation in MB or None) of ``fn`` jitted, compiled once."""
    compiled = jax.jit(fn).lower(*sets[0]).compile()
    ms = time_calls(compiled, sets, jax_sync, target_s=0.3).ms
    analysis = compiled.memory_analysis()
    return ms, None if analysis is None else analysis.temp_size_in_bytes / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape (CPU, Pallas interpret mode)")
    parser.add_argument("--op-only", action="store_true", help="the public op alone (any checkout)")
    parser.add_argument("--label", default="", help="suffix of the results file")
    parser.add_argument("--warps", default="", help="kernel ablations also at these num_warps, e.g. 4,8")
    parser.add_argument("--gated", action="store_true",
                        help="the op with a per-token log gate (logsigmoid(N(0, 1)) / 16), no per-head decay")
    parser.add_argument("--shapes", default=None, help="B,T,H;B,T,H;... (default: "
                        + ";".join(",".join(map(str, shape)) for shape in SHAPES) + ")")
    parser.add_argument("--ops", default=None,
                        help="the ops to time, comma-separated (default: all of fwd, fwd_bwd, fwd_bwd_fixed and, "
                             "with --gated, fwd_bwd_decay)")
    parser.add_argument("--walks", default=None, metavar="JSON",
                        help="MosaicWalkConfig fields, or the PallasConfig's own, to change from the default "
                             "config (sm_90 GPUs), e.g. '{\"wide_auto_barriers\": false}'")
    args = parser.parse_args(argv)
    if args.shapes is not None and not re.fullmatch(r"\d+,\d+,\d+(;\d+,\d+,\d+)*", args.shapes):
        parser.error(f"--shapes must be B,T,H triples separated by ';', got {args.shapes!r}")
    shapes = (((1, 128, 2),) if args.smoke else SHAPES) if args.shapes is None else tuple(
        tuple(int(x) for x in shape.split(",")) for shape in args.shapes.split(";"))
    known = ("fwd", "fwd_bwd", "fwd_bwd_fixed") + (("fwd_bwd_decay",) if args.gated else ())
    chosen = known if args.ops is None else tuple(args.ops.split(","))
    if not chosen or any(op not in known for op in chosen):
        parser.error(f"--ops must name some of {', '.join(known)}, got {args.ops!r}")
    rng = np.random.default_rng(0)
    records = []

    def record(**fields):
        records.append(fields)
        print(json.dumps(fields), flush=True)

    for B, T, H in shapes:
        K = V = 32 if args.smoke else 128
        sets = [tuple(jnp.asarray(rng.standard_normal((B, T, H, d)) / 8, jnp.bfloat16) for d in (K, K, V, V))
                for _ in range(2)]
        log_decay = jnp.asarray(retnet_log_decay(H))
        shape = dict(B=B, T=T, H=H, K=K, V=V) | (dict(gated=True) if args.gated else {})
        log_gate = (jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)) / 16
                    if args.gated else None)
        decay = None if args.gated else jnp.exp(log_decay)
        config = None
        if args.walks is not None:
            from fleetjax.pallas import chunked
            try:
                config = with_walk_fields(chunked.default_config(sets[0][0], sets[0][2]), args.walks)
            except ValueError as error:
                parser.error(str(error))
            shape["walks"] = args.walks

        def ops():
            attend = lambda q, k, v, decay, log_gate: fleetjax.fleet_attention(  # noqa: E731
                q, k, v, decay, scale=K ** -0.5, log_gate=log_gate, implementation="pallas", config=config)
            fixed = lambda q, k, v: attend(q, k, v, decay, log_gate)  # noqa: E731
            # fwd_bwd differentiates the decay (gated: the gate) as the benchmarks do; fwd_bwd_fixed does not.
            learned = ((lambda q, k, v, g: attend(q, k, v, None, g)), log_gate) if args.gated else (
                (lambda q, k, v, d: attend(q, k, v, d, None)), decay)
            timed = {"fwd": lambda q, k, v, do: fixed(q, k, v),
                     "fwd_bwd": lambda q, k, v, do: jax.vjp(learned[0], q, k, v, learned[1])[1](do),
                     "fwd_bwd_fixed": lambda q, k, v, do: jax.vjp(fixed, q, k, v)[1](do)}
            if args.gated:  # the gate and a learned per-head decay, both differentiated
                timed["fwd_bwd_decay"] = lambda q, k, v, do: jax.vjp(attend, q, k, v, jnp.exp(log_decay),
                                                                     log_gate)[1](do)
            return {op: fn for op, fn in timed.items() if op in chosen}

        for op, fn in ops().items():
            ms, temp = _time(fn, sets)
            record(**shape, what="op", op=op, ms=ms, temp_mb=temp)
        if args.op_only or args.gated:  # the kernel ablations below run the constant decay
            continue
        from fleetjax import nonfinite
        with (mock.patch.object(nonfinite, "contained_if_needed", lambda inputs, walks: walks(False)),
              mock.patch.object(nonfinite, "contained_if_reached", lambda walks: walks(False)[0]),
              mock.patch.object(nonfinite, "contained_on_device", lambda walks: walks(False)[0])):
            for op, fn in ops().items():  # fresh functions: a cached trace would keep the choice
                ms, temp = _time(fn, sets)
                record(**shape, what="op without the choice", op=op, ms=ms, temp_mb=temp)
        for warps in [None] + [int(w) for w in args.warps.split(",") if w]:
            for contain in (False, True):
                for kernel, fn in _kernels(B, T, H, K, V, log_decay, sets[0], warps, contain).items():
                    ms, _ = _time(fn, sets)
                    record(**shape, what=f"{kernel} kernel alone", contain=contain, num_warps=warps or "default",
                           ms=ms)
    os.makedirs(args.out, exist_ok=True)
    name = "cost_split" + (f"-{args.label}" if args.label else "") + ".json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, records=records), fh, indent=1)
    return 0


def _kernels(B, T, H, K, V, log_decay, example, warps, contain, config=None):
    """kernel name -> fn(q, k, v, do): each walk kernel of implementation="pallas" launched alone with
    ``config`` (None: the default; ``warps``: num_warps of every walk instead), pieces' states given as
    zeros; the contained forward in one piece, marking as it walks, as the op runs it."""
    from fleetjax.pallas import backward as bwd
    from fleetjax.pallas import forward as fwd

    config = config or fleetjax.IMPLEMENTATIONS["pallas"].config_for(None, example[0], example[2])
    if warps is not None:
        config = dataclasses.replace(config, **{n: dataclasses.replace(getattr(config, n), num_warps=warps)
                                                for n in ("forward", "dq", "dv", "dk")})
    f32 = jnp.float32
    scale = K ** -0.5
    forward, backward = config.chunking(T, False), config.chunking(T, True)
    whole = dataclasses.replace(forward, max_pieces=1)
    zeros = lambda chunking, a, b: (None if chunking.pieces == 1  # noqa: E731
                                    else jnp.zeros((B, H, chunking.pieces - 1, a, b), f32))
    dq_local = None if backward.pieces == 1 else (zeros(backward, V, K), zeros(backward, V, K))
    walk = dict(scale=scale, contain=contain)
    return {
        "forward": lambda q, k, v, do: fwd.forward_walk(
            q, k, v, log_decay, None, None, whole if contain else forward, exact_state=False,
            local=None if contain else zeros(forward, K, V), **walk, **config.launch("forward", q.dtype))[0],
        "dq": lambda q, k, v, do: bwd.dq_walk(q, k, v, do, log_decay, None, None, backward, local=dq_local, **walk,
                                              **config.launch("dq", q.dtype))[:4],
        "dv": lambda q, k, v, do: bwd.dv_walk(q, k, do, log_decay, None, None, backward, local=zeros(backward, K, V),
                                              **walk, **config.launch("dv", q.dtype))[:2],
        "dk": lambda q, k, v, do: bwd.dk_walk(q, k, v, do, log_decay, None, None, backward,
                                              local=zeros(backward, K, V), **walk, **config.launch("dk", q.dtype))[:2],
    }


if __name__ == "__main__":
    sys.exit(main())
