"""Server side of the Status, Scale and ApplyConfig answers: the controller's view as protobuf.

The `mss status` and `mss scale` commands that ask for them are in
`controller/admin_cli.py`.
"""

from __future__ import annotations

import time

from controller.deployment_state import DeploymentState
from controller.nodes import NodeRecord
from protos import controller_pb2 as pb


def deployment_status(state: DeploymentState, name: str) -> pb.DeploymentStatus:
    record = state.deployments[name]
    status = pb.DeploymentStatus(
        name=name,
        target_replicas=record.target,
        running_replicas=state.running_replicas(name),
        engine=record.spec.engine,
        model_source=record.spec.model,
        strategy=record.spec.routing,
    )
    cfg = record.spec.autoscaling
    if cfg is not None:
        scaling = record.scaling
        decision = scaling.decision
        changed = scaling.changed_at
        status.autoscaling.CopyFrom(
            pb.AutoscalingStatus(
                min_replicas=cfg.min_replicas,
                max_replicas=cfg.max_replicas,
                ongoing_requests=scaling.ongoing,
                held_requests=scaling.held,
                last_direction=decision.direction if decision else "",
                last_reason=decision.reason if decision else "",
                last_change_unix=time.time() - (state.clock() - changed) if changed else 0.0,
            )
        )
    return status


def status_response(state: DeploymentState, routing_version: int) -> pb.StatusResponse:
    resp = pb.StatusResponse(routing_version=routing_version)
    for node in sorted(state.nodes.values(), key=lambda n: n.node_id):
        resp.nodes.append(
            pb.NodeStatus(
                node=_node_info(node),
                alive=node.alive,
                last_heartbeat_unix=node.last_seen_unix,
            )
        )
    for name in sorted(state.deployments):
        resp.deployments.append(deployment_status(state, name))
    for rec in sorted(state.replicas.values(), key=lambda r: (r.deployment, r.replica_id)):
        resp.replicas.append(
            pb.ReplicaView(
                status=pb.ReplicaStatus(
                    replica_id=rec.replica_id,
                    deployment=rec.deployment,
                    state=rec.state,  # type: ignore[arg-type]
                    address=rec.address,
                    metrics_address=rec.metrics_address,
                    pid=rec.pid,
                    restarts=rec.restarts,
                    load=pb.ReplicaLoad(
                        running=rec.running,
                        waiting=rec.waiting,
                        kv_cache_usage=rec.kv_cache_usage,
                    ),
                    message=rec.message,
                ),
                node_id=rec.node_id,
                keep=rec.keep,
            )
        )
    return resp


def _node_info(node: NodeRecord) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=node.node_id,
        host=node.host,
        cpus=node.cpus,
        memory_gib=node.memory_gib,
        gpus=node.gpus,
        metrics_address=node.metrics_address,
    )
