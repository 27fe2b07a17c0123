from __future__ import annotations

import logging
import resource

import pytest

from shared.limits import raise_open_files_limit


def test_the_soft_open_files_limit_is_raised_to_the_hard_one_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = saved
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} cannot be tested here")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard) // 2, hard))
        with caplog.at_level(logging.INFO, logger="shared.limits"):
            assert raise_open_files_limit("test") == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        record = next(r for r in caplog.records if r.getMessage() == "open files limit")
        fields = dict(record.fields)  # type: ignore[attr-defined]
        assert fields["soft"] == hard and fields["soft_at_start"] == min(soft, hard) // 2
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
