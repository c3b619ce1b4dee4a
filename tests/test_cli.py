"""The ``fleetjax`` command line and the checker behind ``fleetjax check`` (fleetjax.check): the checker passes
on the real implementations and fails on wrong ones; a usage mistake is one line and exit status 2; the
parser starts without JAX."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import fleetjax
from fleetjax import api, check, cli

# The smallest shape that still crosses a segment boundary and carries an initial state.
TINY = check.CheckShape(B=1, T=9, H=2, K=8, V=16, segments=True, min_decay=0.3)
SCAN_FN = api.IMPLEMENTATIONS["scan"].fn


def _with_records(monkeypatch, **records: api.Implementation) -> None:
    """The registry with ``records`` added or replacing those of their names."""
    monkeypatch.setattr(api, "IMPLEMENTATIONS", types.MappingProxyType({**api.IMPLEMENTATIONS, **records}))


def _with_record(monkeypatch, name: str, **changes) -> None:
    """Replace implementation ``name`` of the registry by a copy of its record with ``changes``."""
    _with_records(monkeypatch, **{name: dataclasses.replace(api.IMPLEMENTATIONS[name], **changes)})


# ------------------------------------------------------------------------------------------ the checker

def test_every_implementation_passes_the_check():
    """Every registered implementation (those that run here only interpreted, in Pallas interpret mode), with
    per-token gates: every gradient, d log_gate too."""
    rows = check.run_check(sorted(api.IMPLEMENTATIONS), [dataclasses.replace(TINY, gated=True)], repeats=1)
    assert [row.implementation for row in rows] == sorted(api.IMPLEMENTATIONS)
    for row in rows:
        impl = api.IMPLEMENTATIONS[row.implementation]
        assert row.status == "ok" and row.repeatable, row
        assert set(row.errors) == set(check.FORWARD_OUTPUTS + check.GRADIENTS), row
        expected_mode = "reference" if row.implementation == check.REFERENCE else (
            "interpret" if impl.interpreted() else "compiled")
        assert row.mode == expected_mode, row


def _scaled_output(factor: float):
    def fn(*args, **kwargs):
        o, final = SCAN_FN(*args, **kwargs)
        return o * factor, final
    return fn


@jax.custom_vjp
def _double_gradient(q):
    return q


_double_gradient.defvjp(lambda q: (q, None), lambda _, g: (2 * g,))


_CALLS = itertools.count()


def _drifting(*args, **kwargs):
    """The reference's output times 1 + n 2^-23 for the n-th call (n cycling through 1..64): within the
    tolerance, and different bits from one call to the next (random noise of 1e-7 rounded to 1.0 in float32
    often enough that two calls could agree)."""
    o, final = SCAN_FN(*args, **kwargs)
    noise = lambda: np.float32(1 + (1 + next(_CALLS) % 64) * 2.0 ** -23)
    factor = jax.pure_callback(noise, jax.ShapeDtypeStruct((), np.float32))
    return o * jax.lax.stop_gradient(factor).astype(o.dtype), final


def _crash(*args, **kwargs):
    raise RuntimeError("kernel exploded")


# Wrong implementations, each the reference's function changed in one way (it compiles fastest).
WRONG = {
    "off_by_0.1%": _scaled_output(1.001),
    "nan": _scaled_output(float("nan")),
    "doubled_dq": lambda q, *args, **kwargs: SCAN_FN(_double_gradient(q), *args, **kwargs),
    "drifting": _drifting,
    "crashing": _crash,
}


def test_the_check_fails_on_wrong_implementations(monkeypatch):
    """A wrong forward, a wrong gradient only, different bits from the same inputs and a crash each fail,
    reported where they are."""
    scan = api.IMPLEMENTATIONS["scan"]
    _with_records(monkeypatch, **{name: dataclasses.replace(scan, name=name, fn=fn) for name, fn in WRONG.items()})
    rows = {row.implementation: row for row in check.run_check(list(WRONG), [TINY], repeats=2)}
    assert all(row.failed for row in rows.values()), rows
    tolerance = check.TOLERANCE["float32"]
    for name in ("off_by_0.1%", "nan"):
        row = rows[name]
        assert row.status == "FAIL" and not row.errors["o"] <= tolerance and row.errors["final_state"] == 0, row
    dq = rows["doubled_dq"]
    assert dq.status == "FAIL" and dq.forward_error == 0 and dq.errors["dq"] > 0.1, dq
    assert max(dq.errors[name] for name in ("dk", "dv", "ddecay", "dinitial_state")) < 1e-6, dq
    drifting = rows["drifting"]
    assert drifting.status == "FAIL" and drifting.forward_error <= tolerance and drifting.repeatable is False
    assert rows["crashing"].status == "ERROR RuntimeError: kernel exploded"


def test_capabilities_come_from_the_record(monkeypatch):
    """Where an implementation runs, and whether only interpreted, is read from its record, not its name."""
    _with_record(monkeypatch, "quadratic", platforms=("no-such-backend",), interpret=True)  # here: interpreted
    _with_record(monkeypatch, "xla", platforms=("no-such-backend",))  # not here at all
    big = check.CheckShape(B=1, T=4000, H=1, K=8, V=8)
    rows = check.run_check(["quadratic", "xla"], [TINY, big], repeats=1)
    not_here = f"skipped (runs on no-such-backend, not {jax.default_backend()})"
    assert [(row.mode, row.status) for row in rows] == [
        ("interpret", "ok"), ("-", not_here),
        ("interpret", "skipped (Pallas interpret mode: small shapes only)"), ("-", not_here)]
    assert not any(row.failed for row in rows)


def test_a_variant_takes_a_config_or_a_function_of_the_shape():
    """A config function runs for each shape and its result goes to the implementation (here a wrong one,
    refused before anything compiles)."""
    seen = []

    def config(q, v):
        seen.append((q.shape, v.shape))
        return "not a config"

    row = check.run_check([check.Variant("xla", config, "wrong")], [TINY], repeats=1)[0]
    assert row.implementation == "xla [wrong]" and seen == [((1, 9, 2, 8), (1, 9, 2, 16))]
    assert row.status.startswith("ERROR TypeError: config for implementation='xla' must be a XlaConfig"), row


def test_an_implementation_missing_from_the_registry_is_skipped(monkeypatch):
    others = {name: record for name, record in api.IMPLEMENTATIONS.items() if name != "quadratic"}
    monkeypatch.setattr(api, "IMPLEMENTATIONS", types.MappingProxyType(others))
    row = check.run_check(["quadratic"], [TINY], repeats=1)[0]
    assert row.status == "skipped (not in this installation's IMPLEMENTATIONS)" and not row.failed


# ------------------------------------------------------------------------------------- fleetjax check

def test_check_command_prints_the_table_and_exit_status(monkeypatch, capsys):
    """The table of the check; bfloat16 inputs to both (float32 accumulation) agree within its tolerance."""
    monkeypatch.setattr(check, "CPU_SHAPES", (TINY,))
    monkeypatch.setattr(check, "GPU_SHAPES", (TINY,))
    argv = ["check", "--quick", "--dtype", "bfloat16", "--implementations", "xla,scan", "--repeats", "1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "bfloat16 inputs against implementation='scan', tolerance 0.03" in lines[0]
    assert lines[1] == check.Table.fitting(["xla", "scan"], [TINY]).header
    assert len(lines) == 5 and lines[4].startswith("2 ok, 0 failed, 0 skipped"), lines
    for line, name in zip(lines[2:4], ("xla", "scan")):
        assert line.startswith(str(TINY)) and f"  {name}  " in line and line.endswith("  ok"), line
    assert float(lines[2].split()[-5]) > 0  # xla's gradients differ from the reference's in rounding

    failing = [check.CheckRow(str(TINY), "xla", status="ok"), check.CheckRow(str(TINY), "scan", status="FAIL")]
    monkeypatch.setattr(check, "report", lambda *args, **kwargs: failing)
    assert cli.main(argv) == 1


def test_the_parsers_names_are_the_librarys():
    """The parser's choices are written out (it imports no JAX): they must be the library's."""
    assert set(cli.IMPLEMENTATION_NAMES) == set(api.IMPLEMENTATIONS)
    assert set(cli.CHECK_DTYPES) == set(check.TOLERANCE)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_building_the_parser_imports_no_jax():
    done = _run("-c", "import sys, fleetjax.cli; fleetjax.cli.build_parser(); "
                      "assert 'jax' not in sys.modules, 'jax imported'")
    assert done.returncode == 0, done.stderr


USAGE_MISTAKES = [
    (["train", "--implementation", "flash"], "invalid choice: 'flash'"),
    (["train", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["train", "--d-model", "10", "--num-heads", "3"], "--d-model (10) must be divisible by --num-heads (3)"),
    (["train", "--resume", "no/such/dir"], "--resume must be a checkpoint directory"),
    (["train", "--attention", "softmax", "--implementation", "pallas"], "--attention softmax must be one of"),
    (["train", "--implementation", "cudnn"], "--attention fleet must be one of fleet_attention's"),
    (["train", "--gate-rank", "0"], "--gate-rank must be a positive integer, got 0"),
    (["train", "--attention", "softmax", "--gate-rank", "4"], "--gate-rank is FleetAttention's per-token gate"),
    (["demo", "--temperature", "-1"], "--temperature must be >= 0"),
    (["check", "--implementations", "xla,flash"], "unknown implementation(s) 'flash'"),
    (["check", "--repeats", "0"], "expected a positive integer, got 0"),
    ([], "the following arguments are required: COMMAND"),
]


def test_the_op_and_the_layers_never_import_the_application():
    """The package's floors: the op (fleetjax.api and what it imports) and fleetjax.nn stand without
    fleetjax.models and fleetjax.cli above them."""
    done = _run("-c", "import sys, fleetjax.api, fleetjax.nn, fleetjax.nn.linen; "
                      "above = [m for m in sys.modules if m.startswith(('fleetjax.models', 'fleetjax.cli'))]; "
                      "assert not above, above")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args, says", USAGE_MISTAKES, ids=[" ".join(args) or "no command" for args, _ in USAGE_MISTAKES])
def test_a_usage_mistake_is_one_line_and_status_2(args, says):
    """Refused before any data is read or anything compiles: one line on stderr, nothing on stdout."""
    done = _run("-m", "fleetjax.cli", *args)
    assert done.returncode == 2 and done.stdout == "", done
    assert len(done.stderr.splitlines()) == 1 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_adding_a_subcommand_is_one_function_and_one_registration(monkeypatch, capsys):
    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 7

    def register_hello(subparsers):
        parser = subparsers.add_parser("hello")
        parser.add_argument("name")
        parser.set_defaults(func=hello)

    monkeypatch.setattr(cli, "REGISTRARS", cli.REGISTRARS + [register_hello])
    assert cli.main(["hello", "world"]) == 7
    assert capsys.readouterr().out == "hello world\n"


def test_module_entry_point():
    """``python -m fleetjax.cli`` (what the ``fleetjax`` console script calls) runs in a fresh process."""
    done = _run("-m", "fleetjax.cli", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fleetjax {fleetjax.__version__}", done


def test_the_package_says_its_version_and_ships_its_types():
    """The installed distribution's version is fleetjax.__version__ (one source: pyproject reads it), and the
    package ships PEP 561's py.typed marker, so that type checkers read fleetjax's annotations."""
    import importlib.metadata
    import importlib.resources
    assert importlib.metadata.version("fleetjax") == fleetjax.__version__
    assert importlib.resources.files("fleetjax").joinpath("py.typed").is_file()


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command, the same text, so what CI checks is what a user types."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    command = ".venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest"
    readme_lines = [line.strip() for line in readme.splitlines() if command in line]
    ci_lines = [line.strip() for line in ci.splitlines() if command in line]
    assert len(readme_lines) == 1 and ci_lines == readme_lines, (readme_lines, ci_lines)
