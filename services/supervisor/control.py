"""The supervisor's control API (`SupervisorService`): thin translation to `Supervisor`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from common.grpc_server import Context
from common.stubs import common_pb2, supervisor_pb2, supervisor_pb2_grpc
from services.supervisor.supervisor import Supervisor
from services.supervisor.watcher import WatcherStatus

SERVICE_NAME = supervisor_pb2.DESCRIPTOR.services_by_name["SupervisorService"].full_name

_BREAKER = {
    "closed": supervisor_pb2.BREAKER_STATE_CLOSED,
    "open": supervisor_pb2.BREAKER_STATE_OPEN,
    "half_open": supervisor_pb2.BREAKER_STATE_HALF_OPEN,
}
_HEALTH = {
    "healthy": common_pb2.HEALTH_STATUS_HEALTHY,
    "degraded": common_pb2.HEALTH_STATUS_DEGRADED,
    "unhealthy": common_pb2.HEALTH_STATUS_UNHEALTHY,
    "unreachable": common_pb2.HEALTH_STATUS_UNREACHABLE,
}


def _wall_time(monotonic_at: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() - (time.monotonic() - monotonic_at)) * 1e9))
    return ts


def status_message(status: WatcherStatus) -> supervisor_pb2.AgentStatus:
    msg = supervisor_pb2.AgentStatus(
        agent=status.agent,
        group=status.group,
        machine=status.machine,
        state=supervisor_pb2.AgentState.Value(f"AGENT_STATE_{status.state.value}"),
        pid=status.pid or 0,
        uptime_s=status.uptime_s or 0.0,
        restarts=status.restarts,
        breaker_state=_BREAKER.get(status.breaker, supervisor_pb2.BREAKER_STATE_UNSPECIFIED),
        required=status.required,
        port=status.port or 0,
        health_check_port=status.health_check_port,
        last_health_status=_HEALTH.get(
            status.health_status or "", common_pb2.HEALTH_STATUS_UNSPECIFIED
        ),
        last_health_latency_ms=status.health_latency_ms or 0.0,
        last_health_issues=status.issues,
        message=status.reason,
    )
    if status.last_exit_code is not None:
        msg.last_exit_code = status.last_exit_code
    return msg


class SupervisorServicer(supervisor_pb2_grpc.SupervisorServiceServicer):
    """Answers the `graftmesh` CLI; `request_shutdown` ends `graftmesh up`."""

    def __init__(self, supervisor: Supervisor, request_shutdown: Callable[[], None]) -> None:
        self._sup = supervisor
        self._request_shutdown = request_shutdown

    async def GetStatus(
        self, request: supervisor_pb2.GetStatusRequest, context: Context
    ) -> supervisor_pb2.GetStatusResponse:
        sup = self._sup
        wanted = set(request.agents)
        agents = [
            status_message(s)
            for s in sup.statuses()
            if (not wanted or s.agent in wanted) and (not request.group or s.group == request.group)
        ]
        now = Timestamp()
        now.GetCurrentTime()
        response = supervisor_pb2.GetStatusResponse(
            machine=sup.cfg.machine,
            groups=sup.groups,
            mesh_state=supervisor_pb2.MeshState.Value(f"MESH_STATE_{sup.mesh_state()}"),
            agents=agents,
            supervisor_pid=os.getpid(),
            config_path=str(sup.cfg.source or ""),
            timestamp=now,
        )
        if sup.startup is not None:
            report = response.startup_report
            report.started_at.CopyFrom(_wall_time(sup.startup.started_at))
            if sup.startup.finished_at:
                report.finished_at.CopyFrom(_wall_time(sup.startup.finished_at))
                report.succeeded = sup.startup.succeeded
            for index, level in enumerate(sup.levels()):
                lvl = report.levels.add(index=index)
                for name in level:
                    st = sup.local[name].status()
                    lvl.agents.add(
                        agent=name,
                        outcome=supervisor_pb2.AgentState.Value(f"AGENT_STATE_{st.state.value}"),
                        ready_after_s=st.start_s or 0.0,
                        attempts=st.restarts + 1,
                        message=st.reason,
                    )
        return response

    async def RestartAgent(
        self,
        request: supervisor_pb2.RestartAgentRequest,
        context: Context,
    ) -> supervisor_pb2.RestartAgentResponse:
        await self._sup.restart_agent(request.agent)
        return supervisor_pb2.RestartAgentResponse(
            agent=status_message(self._sup.watcher(request.agent).status())
        )

    async def StopAgent(
        self, request: supervisor_pb2.StopAgentRequest, context: Context
    ) -> supervisor_pb2.StopAgentResponse:
        await self._sup.stop_agent(request.agent)
        return supervisor_pb2.StopAgentResponse(
            agent=status_message(self._sup.watcher(request.agent).status())
        )

    async def Shutdown(
        self, request: supervisor_pb2.ShutdownRequest, context: Context
    ) -> supervisor_pb2.ShutdownResponse:
        order = self._sup.stop_sequence()
        # Answer first, then stop: the caller should not see its call cut by our exit.
        asyncio.get_running_loop().call_soon(self._request_shutdown)
        return supervisor_pb2.ShutdownResponse(stopping_agents=order)
