"""Each process's --help lists every setting it reads (found in its source, so a new one cannot be
forgotten), and every console script answers --version from the package metadata."""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

from ambient.cli import main as ambient_main
from services.istiod.app import main as istiod_main
from services.node_agent.app import main as node_agent_main
from services.ztunnel.app import main as ztunnel_main

ROOT = Path(__file__).resolve().parents[2]
READS = re.compile(
    r"""(?:env|environ)\.get\(\s*"([A-Z][A-Z0-9_]+)"|settings\.\w+\(\s*"([A-Z][A-Z0-9_]+)"|"""
    r"""from_env\(\s*"([A-Z][A-Z0-9_]+)\"""",
    re.S,
)
TARGET_SETTINGS = ("ADDRESS", "ROOT_CERT", "TOKEN_FILE", "HEADER_")  # what GrpcTarget.from_env(KIND) reads


def settings_read(*sources: str) -> set[str]:
    names: set[str] = set()
    for source in sources:
        for env_name, setting, kind in READS.findall((ROOT / source).read_text()):
            if kind:
                names.update(f"{kind}_{suffix}" for suffix in TARGET_SETTINGS)
            else:
                names.add(env_name or setting)
    return names


def help_text(main: Callable[[list[str]], object], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("main", "sources", "expected"),
    [
        (node_agent_main, ["services/node_agent/app.py"], {"ZTUNNEL_UDS_ADDRESS", "CONTROL_PLANE_ROOT_CERT"}),
        (ztunnel_main, ["services/ztunnel/config.py"], {"INPOD_UDS", "XDS_ADDRESS", "CA_TOKEN_FILE"}),
        (istiod_main, ["services/istiod/app.py"], {"ISTIOD_LISTEN", "ISTIOD_NODE_TOKENS"}),
    ],
)
def test_help_lists_every_setting_the_process_reads(
    main: Callable[[list[str]], object],
    sources: list[str],
    expected: set[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    read = settings_read(*sources)
    assert expected <= read  # the scan itself finds what it should
    text = help_text(main, capsys).replace("<N>", "").replace("_*", "_")
    missing = sorted(name for name in read if name not in text)
    assert missing == []


@pytest.mark.parametrize(
    ("main", "prog"),
    [(ambient_main, "ambient"), (node_agent_main, "node-agent"), (ztunnel_main, "ztunnel"),
     (istiod_main, "istiod-stub")],
)
def test_version_comes_from_the_package_metadata(
    main: Callable[[list[str]], object], prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"{prog} {metadata.version('trio-ambient')} (trio-ambient)\n"
