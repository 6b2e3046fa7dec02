"""The Prometheus endpoint: served on loopback, scraped over HTTP, fed by a real lake worker."""

from __future__ import annotations

import functools
import urllib.request
from pathlib import Path

import anyio
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from consumers import lake
from consumers.lake.settings import LakeSettings
from ops import metrics
from streams.bus import Publisher
from streams.topology import ensure, subject
from tests.factories import lake_trajectory

RUN = "metrics-run"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_metrics_server_listens_on_loopback_and_serves_updated_counters() -> None:
    server, port = metrics.start_metrics_server(0)
    try:
        assert server.server_address[0] == "127.0.0.1" and port > 0
        metrics.POLICY_VERSION.labels(worker="learner", run="m1").set(7)
        metrics.EPISODES.labels(run="m1", status="completed").inc(3)
        got = scrape(port)
        assert got[("rollstream_policy_version", (("run", "m1"), ("worker", "learner")))] == 7
        assert got[("rollstream_episodes_total", (("run", "m1"), ("status", "completed")))] == 3
    finally:
        server.shutdown()
        server.server_close()


async def test_the_lake_worker_counts_messages_and_flushed_rows(js: JetStreamContext, tmp_path: Path) -> None:
    await ensure(js, RUN)
    server, port = metrics.start_metrics_server(0)
    records = [lake_trajectory(i) for i in range(5)]
    try:
        async with anyio.create_task_group() as tg:
            settings = LakeSettings(flush_interval_s=0.2)
            await tg.start(functools.partial(lake.run, settings, js, run=RUN, root=tmp_path / "lake"))
            pub = Publisher(js)
            for scored in records:
                await pub.publish(subject("scored", RUN), scored, msg_id=scored.traj.traj_id)
            key = ("rollstream_lake_rows_flushed_total", (("run", RUN), ("table", "chunks")))
            with anyio.fail_after(20):
                while scrape(port).get(key, 0) < 15:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        got = scrape(port)
        assert got[("rollstream_messages_processed_total", (("run", RUN), ("worker", "lake")))] == 5
        assert got[("rollstream_lake_rows_flushed_total", (("run", RUN), ("table", "trajectories")))] == 5
        assert got[("rollstream_lake_flush_seconds_count", (("run", RUN),))] >= 1
    finally:
        server.shutdown()
        server.server_close()
