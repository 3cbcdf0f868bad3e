"""A client's error raised inside a stage replica reaches the client as its 4xx, not as Ray's wrapper; a fault in a
replica is a 500 that shows neither Ray's nor torch's text."""

import pytest
from ray.exceptions import RayTaskError

from omni.types import InvalidRequest
from omni.encoders.sources import MediaError
from omni.serve.api.server import classify_error


@pytest.mark.parametrize("wrap", [lambda e: e, lambda e: e.as_instanceof_cause()], ids=["wrapped", "as-cause"])
def test_client_errors_from_a_replica_keep_their_status(wrap):
    err = classify_error(
        wrap(
            RayTaskError(
                "generate",
                "Traceback (most recent call last): ...",
                InvalidRequest("unknown voice 'x'", "audio.voice", "invalid_voice"),
            )
        )
    )
    assert (err.status, err.message, err.param, err.code) == (400, "unknown voice 'x'", "audio.voice", "invalid_voice")
    too_big = classify_error(RayTaskError("encode", "tb", MediaError("image too large", 413)))
    assert too_big.status == 413 and too_big.message == "image too large"


def test_a_replica_fault_is_a_500_without_internals():
    exc = RayTaskError("generate", "Traceback ... torch ... CUDA error", RuntimeError("CUDA error: device-side assert"))
    err = classify_error(exc, "0123abcd")
    assert err.status == 500 and err.code == "internal_error"
    assert err.message == "internal server error (request id 0123abcd); the server log has the details"
