"""docs/methods/ is generated from the code's docstrings; this fails when a page is stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_method_pages_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_method_docs.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_loss_type_has_a_page():
    from epsdpo.losses import LossType

    pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
    for kind in LossType:
        slug = {"cdpo": "dpo", "epsilon_dpo": "epsilon-dpo", "beta_dpo": "beta-dpo"}.get(kind.value, kind.value)
        assert slug in pages, kind
    assert {"tr-dpo", "alignment-potential"} <= pages
