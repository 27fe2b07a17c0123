"""ZDS sessions on random sequences. Client: a peer's bad order is only ever ZdsProtocolError, it is always
answerable, and after a NACK the session is closed. Server: random sends and receives raise only the
session's protocol errors (tests/fuzz/targets.py `server_session`)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.zds.errors import ZdsProtocolError
from shared.zds.session import ClientSession, Phase
from shared.zds.types import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    PodUid,
    Request,
    SnapshotSent,
    WorkloadInfo,
)
from tests.fuzz.targets import SESSION_STEPS, server_session, zds_session
from tests.fuzz.test_fuzz_targets import FUZZ

_uid = st.sampled_from([PodUid("a"), PodUid("b")])
_info = st.none() | st.just(WorkloadInfo(name="p", namespace="n", service_account="s"))
_request: st.SearchStrategy[Request] = st.one_of(
    st.builds(AddWorkload, uid=_uid, workload_info=_info), st.builds(KeepWorkload, uid=_uid),
    st.builds(DelWorkload, uid=_uid), st.just(SnapshotSent()))


@FUZZ
@given(st.lists(_request, max_size=20))
def test_client_session_sequences(requests: list[Request]) -> None:
    session = ClientSession()
    session.hello()
    for request in requests:
        try:
            session.receive_request(request)
        except ZdsProtocolError as exc:
            session.respond(str(exc))
            assert session.phase is Phase.CLOSED
            return
        session.respond()
        assert session.phase in (Phase.SNAPSHOT, Phase.STEADY)


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=len(SESSION_STEPS) - 1), max_size=30))
def test_server_session_sequences(steps: list[int]) -> None:
    server_session(steps)


@FUZZ
@given(st.binary(max_size=60))
def test_zds_session_bytes(data: bytes) -> None:
    zds_session(data)
