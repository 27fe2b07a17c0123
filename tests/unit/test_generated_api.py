"""shared/api/ must be exactly what scripts/gen_proto.py makes from proto/ (run it after editing a .proto)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "shared" / "api"
    fresh = sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".py", ".pyi"})
    existing = sorted(p.name for p in committed.iterdir() if p.suffix in {".py", ".pyi"})
    assert fresh == existing, "shared/api/ has missing or extra files: run scripts/gen_proto.py"
    stale = [name for name in fresh if not filecmp.cmp(tmp_path / name, committed / name, shallow=False)]
    assert not stale, f"stale generated modules {stale}: run python scripts/gen_proto.py"
