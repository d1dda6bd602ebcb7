"""The Tune page's measurements run as background jobs (core.services.tune_jobs): AppTest waits for them."""
from __future__ import annotations

import time

from streamlit.testing.v1 import AppTest

from core.services import tune_jobs


def run_jobs(at: AppTest, timeout: float = 600) -> AppTest:
    """Wait for every running Tune job to end, then run the page again: it picks up their results.

    While waiting, the test watches the jobs as the page's polling fragment would (a job nobody
    has polled for :data:`core.services.tune_jobs.EXPIRE_S` seconds is cancelled).
    """
    deadline = time.monotonic() + timeout
    for job in tune_jobs.jobs():
        while not job.wait(1.0):
            job.watch("apptest")
            assert time.monotonic() < deadline, (f"the {job.name} job did not finish within {timeout} s "
                                                 f"({job.done} of {job.total} steps, last: {job.label})")
    return at.run()
