"""Every command line of the project is a typer CLI (the design card; issue 24): one style of
help pages and of usage errors (typer's usage and one line, exit status 2).

The one exception is the shaper (scistream/s2ds/shaper.py), whose few options are read by hand:
every rate-limited request waits for its shaper to listen, and typer's import alone (~50 ms) would
be most of that wait (tests/unit/test_shaping.py checks what it loads). Not argparse either.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("scistream", "bench", "containers", "scripts", "tests")


def python_files() -> list[Path]:
    """The project's Python files: *.py, and scripts whose first line names python."""
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py":
                found.append(path)
            elif not path.suffix:
                with path.open("rb") as file:
                    if b"python" in file.readline():
                        found.append(path)
    return found


def imported(path: Path) -> set[str]:
    """The top-level names of the modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_command_line_of_the_project_is_parsed_by_argparse():
    files = python_files()
    assert ROOT / "scripts" / "swarm-bed-measure" in files  # a script without .py is still read
    users = [
        str(path.relative_to(ROOT))
        for path in files
        if "argparse" in imported(path) and path != ROOT / "scistream" / "s2ds" / "shaper.py"
    ]
    assert users == [], "argparse in a command line; the project's are typer CLIs"


def test_the_shaper_reads_its_options_by_hand_not_with_typer():
    assert not {"argparse", "typer", "click"} & imported(ROOT / "scistream" / "s2ds" / "shaper.py")


@pytest.mark.parametrize(
    "path",
    [
        "scistream/compose_demo.py",
        "containers/demo/service.py",
        "containers/demo/producer.py",
        "bench/__main__.py",
        "bench/soak.py",
        "bench/shaper_cost.py",
        "bench/htb_cost.py",
        "bench/hop_cost.py",
        "scripts/swarm-bed-measure",
        "scripts/swarm-bed",
    ],
)
def test_each_command_is_a_typer_cli(path: str):
    assert "typer" in imported(ROOT / path)


def loaded(path: str) -> ModuleType:
    """A command's module: by its name in a package, else (a script of the image, one without
    .py) from its file."""
    if path.startswith(("scistream/", "bench/")):
        return importlib.import_module(path.removesuffix(".py").replace("/", "."))
    loader = importlib.machinery.SourceFileLoader(f"command_{Path(path).stem}", str(ROOT / path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


# Each command as its users call it, with one line its help must show. The soak is left out: as
# root, its main() starts itself again in a mount namespace (its options: test_the_soak_...).
HELPS = {
    "scistream/compose_demo.py": ("python -m scistream.compose_demo", "--project"),
    "containers/demo/service.py": ("service.py", "--port"),
    "containers/demo/producer.py": ("producer.py", "--to HOST:PORT"),
    "bench/__main__.py": ("python -m bench", "--throughput-only"),
    "bench/shaper_cost.py": ("python -m bench.shaper_cost", "--pairs"),
    "bench/htb_cost.py": ("python -m bench.htb_cost", "veth|lo"),  # typer 0.18 [veth|lo], 0.28 <veth|lo>
    "bench/hop_cost.py": ("python -m bench.hop_cost", "--rounds"),
    "scripts/swarm-bed-measure": ("scripts/swarm-bed-measure", "--mib"),
}


@pytest.mark.parametrize("path", sorted(HELPS))
def test_each_command_shows_its_help(path: str, capsys: pytest.CaptureFixture[str]):
    prog, option = HELPS[path]
    with pytest.raises(SystemExit) as ended:
        loaded(path).main(["--help"])
    assert ended.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"Usage: {prog} [OPTIONS]")
    assert option in shown


def test_a_compose_project_name_compose_refuses_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    from scistream import compose_demo

    with pytest.raises(SystemExit) as ended:  # before any docker command
        compose_demo.main(["--project", "Bad!"])
    assert ended.value.code == 2
    told = capsys.readouterr().err.splitlines()
    assert told[0] == "Usage: python -m scistream.compose_demo [OPTIONS]"
    assert told[-1] == (
        "Error: Invalid value for '--project': 'Bad!': lower-case letters, digits, '-' and '_' only"
    )


def test_the_soak_takes_its_options_and_refuses_what_cannot_run():
    from bench import soak

    def asked(argv: list[str]) -> soak.Options:
        found: list[soak.Options] = []
        soak.command(lambda options: found.append(options) or 0)(args=argv, standalone_mode=False)
        return found[0]

    # As tests/integration/test_soak.py runs it.
    short = asked(["--minutes", "2", "--seed", "11", "--streams", "4", "--clients", "2",
                   "--fs-full-seconds", "20", "--json", "soak.json"])  # fmt: skip
    assert short == soak.Options(2.0, 11, 4, 2, 12.0, 20.0, 4.0, Path("soak.json"), None, False)
    assert 1 <= asked([]).seed < 100_000  # a new one, printed to replay the run
    for wrong in (["--minutes", "0"], ["--streams", "0"], ["--clients", "-1"]):
        with pytest.raises(Exception) as refused:
            asked(wrong)
        assert getattr(refused.value, "exit_code", None) == 2, wrong
        assert wrong[0] in refused.value.format_message() or wrong[0] in str(refused.value.param_hint)


def test_the_swarm_bed_shows_its_commands_and_refuses_a_node_that_cannot_be():
    bed = [sys.executable, str(ROOT / "scripts" / "swarm-bed")]
    shown = subprocess.run([*bed, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("Usage: scripts/swarm-bed [OPTIONS] COMMAND [ARGS]...")
    for command in ("up", "down", "kill", "stop-engine", "start", "show"):
        assert f"  {command} " in shown.stdout, command
    refused = subprocess.run([*bed, "kill", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2  # a usage error, before anything is touched
    assert "Invalid value for 'I': 0 is not in the range x>=1." in refused.stderr


def test_a_shaper_cost_variant_without_a_rate_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    from bench import shaper_cost

    with pytest.raises(SystemExit) as ended:  # before any iperf3 or shaper is started
        shaper_cost.main(["fast:1000", "x:abc"])
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "Error: Invalid value for 'VARIANT...': 'x:abc' is not label:rate_kbps[:...]"
    )
