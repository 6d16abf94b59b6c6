"""The ``fastspawn`` command as torchrun's elastic agent (any rendezvous backend but static).

torch's own machinery does the elastic part: the rendezvous handler comes from
``torch.distributed.elastic.rendezvous``'s registry (c10d over a TCPStore, etcd, etcd-v2, or a
registered one), and the agent's state machine is torch's ``SimpleElasticAgent`` (through
``LocalElasticAgent``): rendezvous, global ranks, the monitor loop, restarts within
``--max-restarts`` after a failure, a restart that consumes none when nodes wait to join, the
exit barrier, events. fastspawn replaces only the start of the workers (``_start_workers``):
they are forked from the warm zygote by fastspawn's engine, with fastspawn's output (whole,
prefixed lines), failure records and error files. Stopping and monitoring are
LocalElasticAgent's, driving fastspawn's process context.

This module imports torch: only the elastic path of the command loads it.
"""

from __future__ import annotations

import logging
import os
import sys
from string import Template
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

from torch.distributed.elastic import events
from torch.distributed.elastic.agent.server.api import WorkerGroup, WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry
from torch.distributed.elastic.utils import macros  # type: ignore[attr-defined]  # not re-exported

from . import _cli
from .elastic import SignalException, start_processes
from .elastic.errors import ChildFailedError

__all__ = ["FastspawnAgent", "run_elastic"]

logger = logging.getLogger("fastspawn.cli")


class FastspawnAgent(LocalElasticAgent):
    """torch's local elastic agent whose workers are started by fastspawn: forked from the
    warm zygote (Python targets) or executed (programs), their output prefixed with the
    global rank (or ``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``)."""

    def _start_workers(self, worker_group: WorkerGroup) -> Dict[int, Any]:
        spec = worker_group.spec
        restart_count = spec.max_restarts - self._remaining_restarts
        use_agent_store = bool(spec.rdzv_handler.use_agent_store)
        run_id = spec.rdzv_handler.get_run_id()
        envs: Dict[int, Dict[str, str]] = {}
        args: Dict[int, Tuple[Any, ...]] = {}
        prefixes: Dict[int, str] = {}
        group_rank, group_world_size = worker_group.group_rank, worker_group.group_world_size
        master_addr, master_port = worker_group.master_addr, worker_group.master_port
        assert group_rank is not None and group_world_size is not None  # set by the rendezvous
        assert master_addr is not None and master_port is not None and spec.entrypoint is not None
        for worker in worker_group.workers:
            local = worker.local_rank
            envs[local] = _cli.worker_env(
                worker.global_rank, local, group_rank, group_world_size,
                spec.local_world_size, worker.world_size, master_addr, master_port,
                restart_count, spec.max_restarts, run_id, use_agent_store, os.environ, spec.role,
                spec.virtual_local_rank)
            envs[local]["ROLE_RANK"] = str(worker.role_rank)
            envs[local]["ROLE_WORLD_SIZE"] = str(worker.role_world_size)
            if self._log_line_prefix_template:
                prefixes[local] = Template(self._log_line_prefix_template).safe_substitute(
                    role_name=spec.role, rank=worker.global_rank, local_rank=local)
            else:
                prefixes[local] = f"[{worker.global_rank}]:"
            args[local] = self._worker_args(spec, local)
        self._setup_local_watchdog(envs=envs)
        self._setup_healthcheck()
        context = start_processes(
            spec.role, spec.entrypoint, args, envs, self._logs_specs, log_line_prefixes=prefixes,
            start_method=self._start_method, duplicate_stdout_filters=spec.duplicate_stdout_filters,
            duplicate_stderr_filters=spec.duplicate_stderr_filters)
        self._pcontext = context
        return dict(context.pids())

    @staticmethod
    def _worker_args(spec: WorkerSpec, local_rank: int) -> Tuple[Any, ...]:
        if isinstance(spec.entrypoint, str):  # a program: torch's ${local_rank} macro in its arguments
            return tuple(macros.substitute(list(spec.args), str(local_rank)))
        kind, name, target_args = spec.args
        return kind, name, tuple(macros.substitute(list(target_args), str(local_rank)))

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        logger.warning("restarting the %d local ranks after a new rendezvous (%d restart(s) left for failures)",
                       worker_group.spec.local_world_size, self._remaining_restarts)
        super()._restart_workers(worker_group)


def run_elastic(plan: _cli.Plan, entrypoint: Union[Callable[..., Any], str], args: Sequence[Any],
                modules: List[str]) -> int:
    """Run the plan as torchrun's agent would; the exit status (0, the first failure's,
    1 when the rendezvous failed, 128+N after signal N)."""
    settings = plan.settings
    assert settings is not None
    del modules  # the zygote is already warming up with them
    params = RendezvousParameters(
        backend=settings.rdzv_backend, endpoint=settings.rdzv_endpoint, run_id=settings.run_id,
        min_nodes=settings.min_nodes, max_nodes=settings.max_nodes, local_addr=settings.local_addr,
        **settings.rdzv_configs)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = settings.signals_to_handle
    try:
        handler = rdzv_registry.get_rendezvous_handler(params)
    except Exception as exc:  # noqa: BLE001 - torch's handlers raise what they like
        _cli._say(f"error: rendezvous backend {settings.rdzv_backend!r} at {settings.rdzv_endpoint!r}: {exc}")
        return 1
    spec = WorkerSpec(
        role=settings.role, local_world_size=settings.nproc_per_node, entrypoint=entrypoint, args=tuple(args),
        rdzv_handler=handler, max_restarts=settings.max_restarts, monitor_interval=settings.monitor_interval,
        master_addr=None, master_port=None, local_addr=settings.local_addr,
        event_log_handler=settings.event_log_handler,
        duplicate_stdout_filters=settings.duplicate_stdout_filters,
        duplicate_stderr_filters=settings.duplicate_stderr_filters,
        virtual_local_rank=settings.virtual_local_rank)
    agent = FastspawnAgent(
        spec=spec, logs_specs=_cli.make_logs_specs(plan.options, settings.nproc_per_node),
        start_method=settings.start_method,
        log_line_prefix_template=os.environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"),
        shutdown_timeout=settings.shutdown_timeout)  # type: ignore[arg-type]  # fractions are fine
    shutdown_rdzv = True
    try:
        result = agent.run()
        events.record(agent.get_event_succeeded(), settings.event_log_handler)
        if not result.is_failed():
            return 0
        error = ChildFailedError(plan.target.name, result.failures)
        sys.stderr.write(error.format_msg() + "\n")
        sys.stderr.flush()
        return _cli._exit_status(error.get_first_failure()[1].exitcode)  # noqa: SLF001
    except SignalException as exc:
        shutdown_rdzv = False  # as torchrun: the job's rendezvous stays open for the others
        events.record(agent.get_event_failed(), settings.event_log_handler)
        return 128 + int(exc.sigval)
    except Exception as exc:  # noqa: BLE001 - a rendezvous error, reported in one line
        events.record(agent.get_event_failed(), settings.event_log_handler)
        _cli._say(f"error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if shutdown_rdzv:
            handler.shutdown()
