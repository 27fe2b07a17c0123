"""shared.addr (IPs and host:port as text, v4 and v6) and shared.settings (typed environment reads)."""

from __future__ import annotations

import socket

import pytest

from shared.addr import (
    AddressError,
    canonical_ip,
    format_host_port,
    ip_family,
    parse_ip_port,
    split_host_port,
    unmap,
    unmapped_ip,
)
from shared.settings import EnvSettings, SettingError, parse_bool, parse_duration


def test_canonical_ip_from_text_and_packed_bytes() -> None:
    assert canonical_ip("fd00:0:0::01") == "fd00::1"
    assert canonical_ip("10.0.0.1") == "10.0.0.1"
    assert canonical_ip(b"\x0a\x00\x00\x01") == "10.0.0.1"
    assert canonical_ip(bytes(15) + b"\x01") == "::1"
    with pytest.raises(ValueError):
        canonical_ip("not-an-ip")


def test_ipv4_mapped_addresses_are_written_as_ipv4() -> None:
    assert unmapped_ip("::ffff:10.0.0.1") == "10.0.0.1"
    assert unmapped_ip("fd00::0:1") == "fd00::1"
    assert unmap("::ffff:10.0.0.1") == "10.0.0.1" and unmap("fd00::1") == "fd00::1"
    assert ip_family("fd00::1") is socket.AF_INET6 and ip_family("10.0.0.1") is socket.AF_INET


def test_format_and_split_host_port_round_trip() -> None:
    for host, port in (("10.0.0.1", 80), ("fd00::1", 15008), ("istiod", 15012)):
        assert split_host_port(format_host_port(host, port)) == (host, port)
    assert format_host_port("fd00::1", 80) == "[fd00::1]:80"
    assert split_host_port(":15020", default_host="0.0.0.0") == ("0.0.0.0", 15020)


@pytest.mark.parametrize(
    "text", ["nonsense", "host:", "host:http", "h:65536", ":15020", "fd00::1:80", "[::1"]
)
def test_split_host_port_refuses_what_is_not_host_port(text: str) -> None:
    with pytest.raises(AddressError, match="is not host:port"):
        split_host_port(text)


def test_parse_ip_port_takes_only_an_ip_literal_and_a_port() -> None:
    assert parse_ip_port("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_ip_port("[fd00:0::1]:80") == ("fd00::1", 80)
    for bad in ("name:80", "10.0.0.1", "10.0.0.1:0", "[10.0.0.1]:80", "fd00::1:80", "10.0.0.1:99999"):
        assert parse_ip_port(bad) is None, bad


def test_env_settings_read_typed_values_and_name_the_variable_when_wrong() -> None:
    env = EnvSettings({"ON": " Yes ", "OFF": "0", "EMPTY": "", "T": "500ms", "M": "1m", "N": "7",
                       "ADDR": "[::]:15020", "PORT_ONLY": ":25000"})
    flags = (env.flag("ON", False), env.flag("OFF", True), env.flag("EMPTY", True), env.flag("UNSET", True))
    assert flags == (True, False, True, True)
    assert env.optional_flag("UNSET") is None and env.optional_flag("ON") is True
    assert (env.duration("T", 1.0), env.duration("M", 1.0), env.duration("UNSET", 2.5)) == (0.5, 60.0, 2.5)
    assert (env.integer("N", 0), env.number("N", 0.0), env.integer("UNSET", 3)) == (7, 7.0, 3)
    assert env.host_port("ADDR", (None, 1)) == ("::", 15020)
    assert env.host_port("PORT_ONLY", ("127.0.0.1", 15000)) == ("127.0.0.1", 25000)
    assert env.host_port("PORT_ONLY", (None, 15000)) == (None, 25000)


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (lambda env: env.flag("V", True), "V='maybe' is not a boolean; use true or false"),
        (lambda env: env.duration("V", 1.0), "V='maybe' is not a duration"),
        (lambda env: env.integer("V", 1), "V='maybe' is not a whole number"),
        (lambda env: env.number("V", 1.0), "V='maybe' is not a number"),
        (lambda env: env.host_port("V", (None, 1)), "V='maybe' is not host:port"),
    ],
)
def test_a_malformed_setting_raises_the_services_error(read: object, message: str) -> None:
    class ServiceConfigError(Exception):
        pass

    with pytest.raises(ServiceConfigError, match=message):
        read(EnvSettings({"V": "maybe"}, error=ServiceConfigError))  # type: ignore[operator]
    with pytest.raises(SettingError, match=message):
        read(EnvSettings({"V": "maybe"}))  # type: ignore[operator]


def test_parsers_alone() -> None:
    assert parse_bool("X", "TRUE") is True and parse_duration("X", "2") == 2.0
    with pytest.raises(SettingError, match="X='2h'"):
        parse_duration("X", "2h")
