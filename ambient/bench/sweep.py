"""The rate sweep of `ambient bench`: ztunnel's CPU per request at a few fixed request rates (mesh only).

Why it is there: the fixed-rate figure (vCPU per 1000 rps at 1000 rps) mixes two costs, the work of relaying
a request and the cost of waking an idle Python process for it. At a low rate every request meets a process
(and caches) gone cold; at a high rate several requests share one wake-up. Running the same 1 KB
request/response load at a low, the reference and a high rate separates the two, so the table shows how much
of ztunnel's CPU per request is paid per wake-up rather than per byte or per frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ambient.bench.report import SWEEP_RATES, ArmResult, ScenarioResult, finish_scenario


class CpuSample(Protocol):
    cpu: dict[str, float]
    """role -> CPU seconds (utime + stime) over the run"""
    kernel: dict[str, float]
    """role -> of those, the kernel's (stime)"""


class SweepSettings(Protocol):
    @property
    def seconds(self) -> float: ...
    @property
    def conns(self) -> int: ...
    @property
    def reps(self) -> int: ...


class SweepBench(Protocol):
    """What the sweep needs of the bench (run.Bench): its settings, one sampled fixed-rate run, progress."""

    progress: Callable[[str], None]

    @property
    def cfg(self) -> SweepSettings: ...

    def sampled_rr(self, arm: str, rate: float, seconds: float) -> tuple[dict[str, float], CpuSample]: ...


def metric(role: str, rate: float) -> str:
    """The name of one figure: e.g. `client_us_per_req_at_250`."""
    return f"{role}_us_per_req_at_{rate:g}"


def kernel_metric(role: str, rate: float) -> str:
    """Of `metric(role, rate)`, the kernel's part (stime): e.g. `client_kernel_us_per_req_at_250`."""
    return f"{role}_kernel_us_per_req_at_{rate:g}"


def rate_sweep(
    bench: SweepBench, *, rates: tuple[float, ...] = SWEEP_RATES, arms: tuple[str, ...] = ("mesh",)
) -> ScenarioResult:
    """CPU microseconds per request of each ztunnel at each rate; one run per rate per repetition, for each
    of `arms` (ours, and upstream's when the run has it)."""
    cfg = bench.cfg
    seconds = cfg.seconds
    scenario = ScenarioResult(
        name="sweep",
        title="ztunnel CPU per request at several request rates",
        method=f"the fixed-rate 1 KB request/response load through the mesh at "
        f"{', '.join(f'{r:g}' for r in rates)} req/s over {cfg.conns} connections, {seconds:g} s each; "
        "utime+stime of each ztunnel divided by the requests served, and of that the kernel's part "
        "(stime: system calls, packets through the namespaces' network stacks, wake-ups; the kernel "
        "splits the two by sampling at clock ticks, too few at 250 rps to show). A cost that falls as the "
        "rate rises is paid per wake-up of an idle process, not per request",
        mesh_only=True,
        arms={arm: ArmResult() for arm in arms},
    )
    for rep in range(cfg.reps):
        for arm in arms if rep % 2 == 0 else tuple(reversed(arms)):
            run: dict[str, float] = {}
            for rate in rates:
                out, sampler = bench.sampled_rr(arm, rate, seconds)
                requests = max(1.0, out["requests"])
                for role in ("client", "server"):
                    run[metric(role, rate)] = sampler.cpu[role] * 1e6 / requests
                    run[kernel_metric(role, rate)] = sampler.kernel[role] * 1e6 / requests
                run[f"rps_at_{rate:g}"] = out["rps"]
            scenario.arms[arm].runs.append(run)
            bench.progress(
                f"sweep rep {rep + 1} {arm}: client ztunnel "
                + ", ".join(f"{run[metric('client', r)]:.0f} us/req at {r:g} rps" for r in rates)
            )
    return finish_scenario(scenario)
