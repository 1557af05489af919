"""The locust users of loadtest/locustfile.py under a load that rises, falls to nothing and returns.

Used by loadtest/autoscale.py to show replicas following the load. The shape,
in seconds from the start: ramp to the peak by 45, hold until 75, fall to a
tenth by 105, no user until 150 (long enough for the replicas to scale to
zero), a few users from 150 to 170 (a scale from zero), then the end at 175.
"""

from __future__ import annotations

import itertools
import os

from locust import LoadTestShape

from loadtest.locustfile import OpenAIChatUser, SeedChatUser

__all__ = ["OpenAIChatUser", "RampUpDownShape", "SeedChatUser"]

PEAK = int(os.environ.get("MSS_PEAK_USERS", "40"))
STAGES = ((0, 0), (45, PEAK), (75, PEAK), (105, PEAK // 10), (106, 0), (150, 0), (151, 8))
"""(seconds, users) points, joined by straight lines; after the last, 8 users until END_S."""
END_S = 175


def users_at(t: float) -> int:
    for (t0, u0), (t1, u1) in itertools.pairwise(STAGES):
        if t0 <= t < t1:
            return round(u0 + (u1 - u0) * (t - t0) / (t1 - t0))
    return STAGES[-1][1]


class RampUpDownShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t >= END_S:
            return None
        return users_at(t), 50.0
