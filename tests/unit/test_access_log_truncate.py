from __future__ import annotations

from services.ztunnel.telemetry.access_log import MAX_FIELD_LENGTH, truncate_field


def test_long_field_cut_with_count() -> None:
    value = "x" * 60_000
    out = truncate_field(value)
    assert out.startswith("x" * MAX_FIELD_LENGTH)
    assert out.endswith(f"...({60_000 - MAX_FIELD_LENGTH} more)")
    assert len(out) < 2 * MAX_FIELD_LENGTH


def test_short_field_kept() -> None:
    assert truncate_field("connection refused") == "connection refused"
