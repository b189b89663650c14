"""Child process for the kill -9 test: appends readings forever from several concurrent
producers and prints each accepted range AFTER append returned.

usage: python _buffer_child.py DB_PATH SEED
After a first ``ready`` line, each stdout line is
``<device> <priority> <seq> <seq> ...`` (the accepted sequence numbers).
"""

from __future__ import annotations

import asyncio
import random
import sys

import structlog

from agent.buffer import BufferConfig, DurableBuffer
from pymigrate.clock import WallClock
from pymigrate.types import Priority, Reading


async def producer(buf: DurableBuffer, rnd: random.Random, device: str) -> None:
    t = 1_767_225_600_000
    while True:
        prio = rnd.choice(list(Priority))
        n = rnd.randint(1, 40)
        batch = [Reading(device_id=device, sensor=f"s{i % 5}", ts_ms=t + i, value=rnd.random(),
                         priority=prio) for i in range(n)]
        t += n
        accepted = await buf.append(batch)
        sys.stdout.write(f"{device} {int(prio)} {' '.join(str(r.seq) for r in accepted)}\n")
        sys.stdout.flush()
        await asyncio.sleep(rnd.random() * 0.002)


async def main(path: str, seed: int) -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    rnd = random.Random(seed)
    cfg = BufferConfig(path=path, commit_window_ms=5, chunk_max_readings=50,
                       chunk_max_age_s=0.3)
    buf = DurableBuffer(cfg, clock=WallClock())
    await buf.open()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.gather(*(producer(buf, random.Random(rnd.random()), dev)
                           for dev in ("dev-a", "dev-a", "dev-b")))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
