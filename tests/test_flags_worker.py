"""``python -m server.worker --max-attempts``: the poison-job path, through a real worker
process on a real redis-server. A job that keeps killing the workers that take it must end
with an error for its server after ``max_attempts`` deliveries rather than be retried for
ever, and a job under the limit must still be retried and scored."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis

from server.queue.base import WindowJob, WindowScore
from server.queue.redis_protocol import GROUP, ensure_group
from server.queue.redis_queue import JobFailed, RedisQueue
from tests.conftest import start_worker, stop_process
from tests.service_fixtures import wait_until

pytestmark = pytest.mark.timeout(180)


def _window(seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(4 * 8000)).astype(np.float32)


async def test_max_attempts_errors_out_a_poison_job_and_retries_the_others(
    redis_server: str,
) -> None:
    """Two windows are taken by a worker that dies before answering (a consumer that reads
    them and never acknowledges); the first was also taken over once more before, as a
    second crashed worker would have. A worker started with ``--max-attempts 2`` reclaims
    both: the first now reaches its third delivery and is answered with an error, the second
    its second and is scored. The shipped default (3) would have scored both, and a worker
    that ignored the flag fails this either way."""
    prefix = f"m{uuid.uuid4().hex[:8]}"
    queue = RedisQueue(redis_server, "default", prefix=prefix, job_timeout=120.0)
    await queue.start()
    client = aioredis.Redis.from_url(redis_server)
    worker = None
    try:
        await ensure_group(client, queue.keys.jobs)
        poison = asyncio.create_task(queue.submit(WindowJob("poison", "s0", _window(0))))
        retried = asyncio.create_task(queue.submit(WindowJob("retried", "s1", _window(1))))

        async def both_queued() -> bool:
            return await client.xlen(queue.keys.jobs) == 2

        await wait_until(both_queued, "both windows on the jobs stream")
        # the dead worker: reads both, acknowledges nothing
        ((_, entries),) = await client.xreadgroup(GROUP, "dead", {queue.keys.jobs: ">"},
                                                  count=10)
        ids = {fields[b"job"].decode(): entry_id for entry_id, fields in entries}
        assert set(ids) == {"poison", "retried"}
        # ... and the poison job was taken over once more (a second worker died on it)
        await client.xclaim(queue.keys.jobs, GROUP, "dead2", 0, [ids["poison"]])
        pending = {e["message_id"]: e["times_delivered"] for e in await client.xpending_range(
            queue.keys.jobs, GROUP, "-", "+", 10)}
        assert pending == {ids["poison"]: 2, ids["retried"]: 1}

        worker = start_worker(redis_server, prefix, "survivor", "--max-attempts", "2")
        with pytest.raises(JobFailed, match="failed after 2 attempts"):
            await asyncio.wait_for(poison, 120)
        score = await asyncio.wait_for(retried, 120)
        assert isinstance(score, WindowScore) and score.job_id == "retried"
        assert 0.0 <= score.spoof_probability <= 1.0
        assert (await client.xpending(queue.keys.jobs, GROUP))["pending"] == 0
    finally:
        if worker is not None:
            stop_process(worker)
        await client.aclose()
        await queue.close()
