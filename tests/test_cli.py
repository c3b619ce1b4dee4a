"""The ``fleetjax`` command line: ``check`` passes on the real implementations and fails on a wrong one."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

import fleetjax
from fleetjax import cli


def test_check_quick_covers_every_implementation(capsys):
    """Every implementation (Pallas ones in interpret mode off-GPU) runs the quick shape and matches."""
    assert cli.main(["check", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("B2 T67")]
    assert len(rows) == len(fleetjax.IMPLEMENTATIONS), out
    for name in fleetjax.IMPLEMENTATIONS:
        assert any(f"  {name}" in row and row.rstrip().endswith("ok") for row in rows), (name, out)
    assert f"{len(fleetjax.IMPLEMENTATIONS)} ok, 0 failed" in out


def test_check_long_shapes(capsys):
    """The default shapes past the first (T = 513 and 1031), on the implementations that run them here."""
    assert cli.main(["check", "--implementations", "xla", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert sum(line.rstrip().endswith("ok") for line in out.splitlines() if line.startswith("B")) == 3, out


def _wrong(fn, factor):
    def wrong(*args, **kwargs):
        o, final = fn(*args, **kwargs)
        return o * factor, final
    return wrong


@pytest.mark.parametrize("factor", [1.001, float("nan")], ids=["off-by-0.1%", "nan"])
def test_check_fails_on_a_wrong_implementation(monkeypatch, capsys, factor):
    impl = fleetjax.IMPLEMENTATIONS["xla"]
    monkeypatch.setitem(fleetjax.IMPLEMENTATIONS, "xla", dataclasses.replace(impl, fn=_wrong(impl.fn, factor)))
    assert cli.main(["check", "--quick", "--implementations", "xla,quadratic", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    xla_line = next(line for line in out.splitlines() if "  xla" in line)
    assert xla_line.rstrip().endswith("FAIL"), out
    assert "1 ok, 1 failed" in out


def test_check_fails_on_a_wrong_gradient_only(monkeypatch, capsys):
    """A forward that is right but whose gradient is not (here: dq is doubled) fails too."""
    import jax

    impl = fleetjax.IMPLEMENTATIONS["xla"]

    @jax.custom_vjp
    def double_grad(q):
        return q

    double_grad.defvjp(lambda q: (q, None), lambda _, g: (2 * g,))

    def wrong(q, *args, **kwargs):
        return impl.fn(double_grad(q), *args, **kwargs)

    monkeypatch.setitem(fleetjax.IMPLEMENTATIONS, "xla", dataclasses.replace(impl, fn=wrong))
    assert cli.main(["check", "--quick", "--implementations", "xla", "--repeats", "1"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if "  xla" in line)
    fwd_err, grad_err = (float(cell) for cell in line.split()[-5:-3])
    assert fwd_err < 1e-5 and grad_err > 0.1, line


def test_check_reports_a_crashing_implementation(monkeypatch, capsys):
    impl = fleetjax.IMPLEMENTATIONS["xla"]

    def crash(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(fleetjax.IMPLEMENTATIONS, "xla", dataclasses.replace(impl, fn=crash))
    assert cli.main(["check", "--quick", "--implementations", "xla", "--repeats", "1"]) == 1
    assert "ERROR RuntimeError: kernel exploded" in capsys.readouterr().out


def test_check_unknown_implementation(capsys):
    assert cli.main(["check", "--implementations", "xla,flash"]) == 2
    assert "flash" in capsys.readouterr().err


def test_bfloat16_check(capsys):
    assert cli.main(["check", "--quick", "--dtype", "bfloat16", "--implementations", "xla", "--repeats", "1"]) == 0
    assert "bfloat16 inputs" in capsys.readouterr().out


def test_usage_errors():
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "--implementations", ","])
    assert exit_info.value.code == 2


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
    done = subprocess.run([sys.executable, "-m", "fleetjax.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"fleetjax {fleetjax.__version__}", done


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command, the same text, so what CI checks is what a user types."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    command = ".venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest"
    readme_lines = [line.strip() for line in readme.splitlines() if command in line]
    ci_lines = [line.strip() for line in ci.splitlines() if command in line]
    assert len(readme_lines) == 1 and ci_lines == readme_lines, (readme_lines, ci_lines)
