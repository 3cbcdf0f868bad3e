"""The Serve app's replicas as Ray actors: which exist, on which node and process, their resident memory, and killing
one (fault tests). Call from a driver of the app's cluster (`ray.init(address=...)`,
omni.serve.cluster.process.ServeProcess.connect_ray).

Replica actors are named `SERVE_REPLICA::<app>#<deployment>#<id>` in namespace "serve", of class
`ServeReplica:<app>:<deployment>` (Ray 2.60). They are read from the GCS actor table: `ray.util.state.list_actors`
would need the dashboard, which `omni serve` does not start.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Optional

import ray

__all__ = [
    "Replica",
    "Memory",
    "list_replicas",
    "replica_memory",
    "kill_replica",
    "wait_for_new_replica",
    "SERVE_NAMESPACE",
]

SERVE_NAMESPACE = "serve"  # where Serve names its actors


@dataclass(frozen=True)
class Replica:
    deployment: str  # "Thinker", "VisionEncoder", ... (omni.serve.cluster.builder.DEPLOYMENT_NAMES)
    name: str  # the actor's name: SERVE_REPLICA::omni#Thinker#<id>
    actor_id: str  # hex
    pid: int  # the replica's worker process
    node_id: str  # hex; ray.get_runtime_context().get_node_id() inside the replica


def list_replicas(app: str = "omni", deployment: Optional[str] = None) -> list[Replica]:
    """The live replica actors of `app` (of one deployment when given), sorted by deployment then name."""
    from ray._private import state

    prefix = f"ServeReplica:{app}:"
    out = []
    for actor_id, a in state.actors().items():
        cls = a.get("ActorClassName", "")
        if a.get("State") != "ALIVE" or not cls.startswith(prefix):
            continue
        dep = cls[len(prefix) :]
        if deployment is None or dep == deployment:
            out.append(Replica(dep, a["Name"], actor_id, int(a["Pid"]), a["Address"]["NodeID"]))
    return sorted(out, key=lambda r: (r.deployment, r.name))


class Memory(NamedTuple):
    """A process's resident memory, bytes."""

    rss: int  # resident set size (VmRSS): anonymous + file-backed + shared pages
    anon: int  # its anonymous part (RssAnon: heap, tensors): what a leak grows; file pages (the mapped libraries)
    #            are what the kernel evicts first when the host runs short of memory


def _memory(pids: list[int]) -> dict[int, Optional[Memory]]:
    import psutil

    out: dict[int, Optional[Memory]] = {}
    for pid in pids:
        try:
            m = psutil.Process(pid).memory_info()
            out[pid] = Memory(m.rss, m.rss - m.shared)  # Linux: shared = RssFile + RssShmem
        except psutil.Error:  # gone (killed, restarting)
            out[pid] = None
    return out


@ray.remote(num_cpus=0)
def _memory_on_node(pids: list[int]) -> dict[int, Optional[Memory]]:
    return _memory(pids)


def replica_memory(replicas: Iterable[Replica]) -> dict[str, Optional[Memory]]:
    """Each replica's process memory by replica name (None: its process is gone). Processes on this driver's node are
    read here; on other nodes by a zero-CPU task placed on that node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_node: dict[str, list[Replica]] = {}
    for r in replicas:
        by_node.setdefault(r.node_id, []).append(r)
    here = ray.get_runtime_context().get_node_id()
    out: dict[str, Optional[Memory]] = {}
    for node, reps in by_node.items():
        pids = [r.pid for r in reps]
        if node == here:
            mem = _memory(pids)
        else:
            mem = ray.get(
                _memory_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    pids
                ),
                timeout=120,
            )
        out.update({r.name: mem[r.pid] for r in reps})
    return out


def kill_replica(replica: Replica) -> None:
    """`ray.kill` the replica's actor (no Ray-level restart: the Serve controller notices and starts a new replica)."""
    ray.kill(ray.get_actor(replica.name, namespace=SERVE_NAMESPACE), no_restart=True)


def wait_for_new_replica(app: str, deployment: str, old: Iterable[str], timeout_s: float = 180) -> Replica:
    """The first live replica of `deployment` whose name is not in `old` (one Serve started) and that Serve reports
    RUNNING; raises TimeoutError after `timeout_s`."""
    from ray import serve

    old = set(old)
    deadline = time.monotonic() + timeout_s
    while True:
        fresh = [r for r in list_replicas(app, deployment) if r.name not in old]
        if fresh:
            status = serve.status().applications[app].deployments[deployment]
            if status.replica_states.get("RUNNING", 0) >= 1 and status.status == "HEALTHY":
                return fresh[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new {deployment} replica of {app} within {timeout_s:g} s")
        time.sleep(0.5)
