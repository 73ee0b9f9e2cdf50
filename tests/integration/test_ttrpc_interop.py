"""Our ttrpc client against a peer no one here wrote: containerd's own ttrpc server."""

from __future__ import annotations

import subprocess
import time

import pytest
from harness import Containerd, wait_for

from supervisor import ttrpc
from supervisor.api import typeurls
from supervisor.api.events import task_pb2 as ev
from supervisor.api.events import ttrpc_pb2 as events_api

EVENTS = "containerd.services.events.ttrpc.v1.Events"


def forward_request(namespace: str, topic: str, event: ev.TaskOOM) -> bytes:
    request = events_api.ForwardRequest()
    request.envelope.timestamp.GetCurrentTime()
    request.envelope.namespace = namespace
    request.envelope.topic = topic
    request.envelope.event.CopyFrom(typeurls.pack(event))
    return request.SerializeToString()


async def test_forward_reaches_ctr_events(containerd: Containerd) -> None:
    c = containerd
    out = c.dir / "events.txt"
    with open(out, "wb") as f:
        watcher = subprocess.Popen(c.ctr_argv("events"), stdout=f, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        async with await ttrpc.connect_unix(c.ttrpc_address) as client:
            # Several concurrent calls on one connection, each answered.
            for i in range(3):
                payload = forward_request(
                    c.namespace, "/tasks/oom", ev.TaskOOM(container_id=f"interop-{i}")
                )
                reply = await client.call(EVENTS, "Forward", payload, timeout=5,
                                          metadata={ttrpc.NAMESPACE_KEY: c.namespace})
                assert reply == b""  # google.protobuf.Empty

            # containerd's server answers an unknown method with UNIMPLEMENTED.
            with pytest.raises(ttrpc.RPCError) as info:
                await client.call(EVENTS, "NoSuchMethod", b"", timeout=5)
            assert info.value.code is ttrpc.Code.UNIMPLEMENTED
            # ...and a malformed envelope with an error, not a dropped connection.
            with pytest.raises(ttrpc.RPCError):
                await client.call(EVENTS, "Forward", b"\xff\xff", timeout=5)
            payload = forward_request(c.namespace, "/tasks/oom",
                                      ev.TaskOOM(container_id="interop-after"))
            await client.call(EVENTS, "Forward", payload, timeout=5)

        def seen() -> bool:
            text = out.read_text(errors="replace")
            return all(f"interop-{i}" in text for i in (0, 1, 2, "after"))

        wait_for(seen, 10, message="forwarded events in ctr events")
        lines = [ln for ln in out.read_text().splitlines() if "interop-" in ln]
        assert all("/tasks/oom" in ln and c.namespace in ln for ln in lines)
    finally:
        watcher.kill()
        watcher.wait()
