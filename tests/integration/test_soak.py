"""The soak, short (docs/reliability.md): two minutes of churn, byte-checked traffic and every
kind of fault once, on a fixed schedule; nothing may be lost silently and nothing may be left.

The soak runs as its own process (bench/soak.py, as `make soak` runs it), in this test's network
namespace; it stops by itself, and the limits below are generous for a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 11  # its schedule has each of the eight kinds of fault once


# A connection that a fault cuts is reset on both ends, never closed cleanly: the shapers carry
# each connection's end across the proxies (docs/reliability.md, "What a fault does to a
# connection"), so no loss may be silent, during a fault or not.
@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """The figures of one short soak, and its report."""
    figures = tmp_path_factory.mktemp("soak") / "soak.json"
    command = [
        sys.executable, "-m", "bench.soak", "--minutes", "2", "--seed", str(SEED), "--streams", "4",
        "--clients", "2", "--fs-full-seconds", "20", "--json", str(figures),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert figures.exists(), f"the soak wrote no figures:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    shown = done.stdout[done.stdout.rfind("Soak: ") :][:6000]  # the report, from its first line
    return json.loads(figures.read_text())["figures"], shown


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_short_soak_survives_every_fault_and_leaves_nothing(soak):
    fig, shown = soak
    assert fig["leaks"] == [], f"left behind after every stream was released:\n{shown}"
    assert fig["faults not survived"] == [], shown
    assert fig["streams"]["made"] == fig["streams"]["released"] > 0, shown
    assert fig["connections"]["delivered whole"] > 0, shown
    assert fig["connections"]["cut, no fault to explain it"] == [], shown
    assert fig["requests"]["failed, no fault to explain it"] == [], shown
    kinds = {kind for kind, count in fig["faults"].items() if count["injected"]}
    assert len(kinds) >= (8 if os.geteuid() == 0 else 7), shown  # a full disk needs root (a tmpfs)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_no_connection_is_lost_silently(soak):
    fig, shown = soak
    assert fig["silent losses"] == [], f"connections whose end took a cut for a delivery:\n{shown}"
