"""A replica that dies mid-request, or a stage that does not answer within stage_timeout_s, is StageUnavailable: a 503
with Retry-After (or an SSE error event with code stage_unavailable), not a 500; other failures stay 500s. The real
replica kills are in test_app_faults.py."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from omni.types import InvalidRequest, StageUnavailable
from omni.serve.api.server import _error_json, classify_error
from omni.serve.cluster.deployments import _raise_unavailable, _within


@pytest.mark.parametrize(
    "failure",
    [
        ActorDiedError(),
        ActorUnavailableError("the replica is unreachable", None),
        RayTaskError("generate", "tb", ActorDiedError()),  # the Vocoder saw the Talker die
        RayTaskError("generate", "tb", ActorDiedError()).as_instanceof_cause(),
    ],
    ids=["died", "unavailable", "wrapped", "as-cause"],
)
def test_a_dead_replica_is_stage_unavailable_and_a_503(failure):
    with pytest.raises(StageUnavailable) as caught:
        _raise_unavailable(failure)
    err = classify_error(caught.value, "abc")
    assert (err.status, err.code) == (503, "stage_unavailable") and "retry" in err.message
    response = _error_json(err)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    "other, status",
    [
        (RuntimeError("a bug"), 500),
        (RayTaskError("generate", "tb", RuntimeError("a bug")), 500),
        (RayTaskError("generate", "tb", InvalidRequest("bad voice", "audio.voice")), 400),
    ],
)
def test_other_failures_are_left_alone(other, status):
    _raise_unavailable(other)  # does not raise: the caller re-raises `other`, classified as before
    assert classify_error(other).status == status


def test_a_stage_that_does_not_answer_in_time_is_unavailable():
    async def go():
        with pytest.raises(StageUnavailable, match="no output within 0.05 s"):
            await _within(asyncio.sleep(10), 0.05, "no output")

        async def inner_timeout():
            raise TimeoutError("a stage's own timeout")

        with pytest.raises(TimeoutError, match="own timeout"):  # not ours: passed through
            await _within(inner_timeout(), 10, "no output")
        assert await _within(asyncio.sleep(0, result=7), 10, "no output") == 7

    asyncio.run(go())
