"""``public_message``: what a client may read of an internal error (issue 9, finding 5).

500 bodies used to carry a full Ray traceback (file paths, node IP, pid, actor
id) and the SSE error on a decode worker's death named the actor and its pid.
The reason survives; the internals do not.
"""

from __future__ import annotations

import traceback

import pytest

from splitserve.http_guard import public_message

pytestmark = pytest.mark.unit

RID = "fedcbafedcbafedcbafedcbafedcbafe"
ACTOR = "6e5f0b4d2a1c9e8f7a6b5c4d01000000"


def ray_task_error_text() -> str:
    from ray.exceptions import RayTaskError

    try:
        raise RuntimeError("engine loop of decode-0 stopped")
    except RuntimeError as cause:
        error = RayTaskError(
            "ServeReplica:splitserve:decode-0.handle_request_streaming", traceback.format_exc(), cause,
            proctitle="ray::ServeReplica:splitserve:decode-0", pid=4242, ip="10.1.2.3",
            actor_repr="<splitserve.decode.deployment.DecodeDeployment object at 0x7f3a2c0b1d90>", actor_id=ACTOR,
        )
    return str(error)


ACTOR_DIED = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:splitserve:decode-0\n"
    f"\tactor_id: {ACTOR}\n\tpid: 1234\n\tname: SERVE_REPLICA::splitserve#decode-0#x1\n\tnamespace: serve\n\tip: 192.168.7.9\n"
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR"
)

CASES = {
    "ray_task_error": (f"request {RID} failed while streaming from decode-0: " + "{ray}",
                       f"request {RID} failed while streaming from decode-0: RuntimeError: engine loop of decode-0 stopped"),
    "actor_died": (f"request {RID} failed after 3 attempts: {ACTOR_DIED}",
                   f"request {RID} failed after 3 attempts: The actor died unexpectedly before finishing this task."),
    "bare_traceback": ('Traceback (most recent call last):\n  File "/opt/app/x.py", line 3, in f\n'
                       "ValueError: bad value at /srv/models/ckpt from [fe80::1]:8000 pid=77", "ValueError: bad value at <path> from [<address>]:8000"),
    "plain_reason": ("request exceeded 600 s", "request exceeded 600 s"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_reason_survives_and_internals_do_not(case):
    raw, expected = CASES[case]
    raw = raw.replace("{ray}", ray_task_error_text()) if "{ray}" in raw else raw
    out = public_message(raw, RID)
    assert out == f"{expected} (request id {RID})"
    for secret in ("4242", "1234", "10.1.2.3", "192.168.7.9", ACTOR, "0x7f3a", "/opt/app", "File ", "ray::", "\n", "\x1b"):
        assert secret not in out, (secret, out)


def test_empty_and_very_long_messages():
    assert public_message("", RID) == f"internal error (request id {RID})"
    assert len(public_message("x" * 10_000)) <= 300
