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


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_short_soak_loses_nothing_silently_and_leaves_nothing(tmp_path):
    figures = tmp_path / "soak.json"
    command = [
        sys.executable, "-m", "bench.soak", "--minutes", "2", "--seed", str(SEED), "--streams", "4",
        "--clients", "2", "--fs-full-seconds", "20", "--json", str(figures),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert figures.exists(), f"the soak wrote no figures:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    fig = json.loads(figures.read_text())["figures"]
    shown = done.stdout[done.stdout.rfind("Soak: ") :][:6000]  # the report, from its first line
    assert fig["silent losses"] == [], f"connections lost silently:\n{shown}"
    assert fig["leaks"] == [], f"left behind after every stream was released:\n{shown}"
    assert fig["streams"]["made"] == fig["streams"]["released"] > 0, shown
    assert fig["connections"]["delivered whole"] > 0, shown
    kinds = {kind for kind, count in fig["faults"].items() if count["injected"]}
    assert len(kinds) >= (8 if os.geteuid() == 0 else 7), shown  # a full disk needs root (a tmpfs)
