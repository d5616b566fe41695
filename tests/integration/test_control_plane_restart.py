"""The control plane itself killed (SIGKILL) on a live cluster (`bench.router_failover.kill_control_plane`): the
workers and the router serve on; the operator's Scale is refused with the reason; `pdserve up` again adopts them
(no worker or router restarts); the cluster's log keeps the killed run's record; and `pdserve down` then leaves
nothing of the cluster running (no redis-server, no Ray process, no router)."""

import pytest

from pdserve.bench import router_failover as faults

pytestmark = pytest.mark.model


def test_a_killed_control_plane_leaves_the_cluster_serving_and_is_adopted_then_down_stops_everything(tmp_path):
    report = faults.kill_control_plane(str(tmp_path), requests=4)
    assert (report.served_while_down, report.lost_while_down) == (4, 0), report
    assert "control plane is not running" in report.scale_refusal, report
    assert (report.workers_restarted, report.routers_restarted) == (0, 0), report
    assert report.left_after_down == 0, report
    assert report.log_runs_kept == 2, report
