"""Whether this realtime process takes another call.

One event loop serves every call of a process, and past what it can carry every call
gets worse at once: answers come late, the agent's audio has gaps (docs/performance.md:
on the 2-core machine, 30 calls keep the platform's overhead at a few milliseconds, 100
make it hundreds). So a process says when it is full, two ways:

* ``GET /readyz`` answers 503 while the process is at its call cap or its event loop
  runs late (the lag of a 20 ms timer, smoothed over about two seconds, above
  ``max_loop_lag_ms``), for load balancers and orchestrators (a Kubernetes readiness
  probe) to send new calls to other processes;
* with a cap set (``max_calls``), a new call's stream is refused at the cap with close
  code 1013 ("try again later"): Twilio then asks the call's ``<Connect action>``, which
  streams the call again - behind a load balancer, to another process - and a web client
  reconnects. The loop's lag alone never refuses a stream: a moment of lag (a full
  garbage collection) must not turn callers away.

A call already live here (a web client back after a dropped socket, a new Twilio stream
for a call whose stream here still looks open) is always taken: it adds no load.
"""

from __future__ import annotations

from dataclasses import dataclass

from realtime.stats import RealtimeStats

#: Close code of a refused stream (RFC 6455 registry: "Try Again Later").
TRY_AGAIN_LATER = 1013


@dataclass
class Admission:
    stats: RealtimeStats
    #: Concurrent calls this process takes; None: no cap.
    max_calls: int | None = None
    #: Smoothed event-loop lag above which ``GET /readyz`` says busy; None: not checked.
    max_loop_lag_ms: float | None = None
    #: Calls admitted whose sessions have not ended (counted from admission, so calls
    #: still being set up count too).
    calls: int = 0

    @property
    def at_cap(self) -> bool:
        return self.max_calls is not None and self.calls >= self.max_calls

    def admit(self, *, always: bool = False) -> bool:
        """Take a new call (then ``release`` it once its session has ended), or refuse it.
        ``always``: take it even at the cap (it was live here a moment ago)."""
        if self.at_cap and not always:
            return False
        self.calls += 1
        return True

    def release(self) -> None:
        self.calls -= 1

    def busy(self) -> str | None:
        """Why the process should get no new calls now; None when it can take one."""
        if self.at_cap:
            return f"at its cap of {self.max_calls} calls"
        lag_ms = self.stats.recent_loop_lag_s * 1000.0
        if self.max_loop_lag_ms is not None and lag_ms > self.max_loop_lag_ms:
            return f"its event loop runs {lag_ms:.0f} ms late (limit {self.max_loop_lag_ms:g} ms)"
        return None

    def snapshot(self) -> dict[str, float | int]:
        return {
            "admitted_calls": self.calls,
            "recent_loop_lag_ms": round(self.stats.recent_loop_lag_s * 1000.0, 2),
        }
