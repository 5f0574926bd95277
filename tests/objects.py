"""Actor classes used only by the tests (each exercises one runtime behaviour)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

from ndo import Actor, AlarmInfo, ConflictError, method
from ndo.examples import Counter


class Slow(Actor):
    """Read-modify-write with an await in between: loses updates if two turns ever overlap."""

    @method
    async def bump(self, pause: float = 0.0) -> int:
        value: int = await self.storage.get("n", 0)
        await asyncio.sleep(pause)
        self.storage.put("n", value + 1)
        return value + 1

    @method
    async def read(self) -> int:
        value: int = await self.storage.get("n", 0)
        return value

    @method
    async def sleep(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        self.storage.put("slept", seconds)
        return "done"

    @method
    async def give_up_after(self, limit: float) -> str:
        """Wait longer than ``limit`` inside the handler's own ``asyncio.timeout``."""
        try:
            async with asyncio.timeout(limit):
                await asyncio.sleep(limit * 20)
        except TimeoutError:
            return "gave up"
        return "waited"


class Faulty(Actor):
    """Handlers that fail in different ways after writing, to prove nothing is half-written."""

    starts: ClassVar[int] = 0

    async def on_start(self) -> None:
        type(self).starts += 1
        self.loaded = await self.storage.get("n", 0)

    @method
    async def write_then_raise(self, value: int) -> None:
        self.storage.put("n", value)
        self.emit("changed", value)
        self.loaded = value
        raise RuntimeError("boom after writing")

    @method
    async def write(self, value: int) -> int:
        self.storage.put("n", value)
        self.loaded = value
        return value

    @method
    async def state(self) -> dict[str, int]:
        return {"stored": await self.storage.get("n", 0), "attribute": self.loaded}

    @method
    async def conflict(self) -> None:
        raise ConflictError("not now", type="busy")

    @method
    async def unencodable(self) -> object:
        return object()

    @method
    async def store_unencodable(self) -> None:
        self.storage.put("bad", object())

    @method
    async def big_value(self, size: int) -> None:
        self.storage.put("big", "x" * size)


class Store(Actor):
    """Exposes the storage API one call at a time."""

    @method
    async def put(self, key: str, value: object) -> None:
        self.storage.put(key, value)

    @method
    async def put_many(self, entries: dict[str, object]) -> None:
        self.storage.put_many(entries)

    @method
    async def get(self, key: str) -> object:
        return await self.storage.get(key)

    @method
    async def get_many(self, keys: list[str]) -> dict[str, object]:
        return await self.storage.get_many(keys)

    @method
    async def delete(self, key: str) -> None:
        self.storage.delete(key)

    @method
    async def delete_all(self) -> None:
        self.storage.delete_all()

    @method
    async def list(
        self,
        prefix: str | None = None,
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[list[object]]:
        found = await self.storage.list(
            prefix=prefix, start=start, end=end, limit=limit, reverse=reverse
        )
        return [[k, v] for k, v in found.items()]


class Reminder(Actor):
    """Alarm test object: records each delivery; ``fail_times`` makes the first ones raise."""

    @method
    async def schedule(self, at: float, fail_times: int = 0) -> None:
        await self.storage.set_alarm(at)
        self.storage.put("fail_times", fail_times)

    @method
    async def cancel(self) -> None:
        await self.storage.delete_alarm()

    @method
    async def alarm_time(self) -> float | None:
        return await self.storage.get_alarm()

    @method
    async def fired(self) -> list[list[float]]:
        return await self.storage.get("fired", [])

    async def alarm(self, info: AlarmInfo) -> None:
        fired = await self.storage.get("fired", [])
        if info.attempt <= await self.storage.get("fail_times", 0):
            raise RuntimeError(f"alarm failure on attempt {info.attempt}")
        fired.append([info.scheduled_time, info.attempt])
        self.storage.put("fired", fired)
        self.emit("fired", {"attempt": info.attempt})


class Relay(Actor):
    """Calls other objects from its handlers (calls between objects)."""

    @method
    async def forward(self, to: str, by: int = 1) -> int:
        """Increment counter ``to`` through a typed stub and count the forwards made."""
        value = await self.call(Counter, to).increment(by=by)
        self.storage.put("sent", await self.storage.get("sent", 0) + 1)
        return value

    @method
    async def sent(self) -> int:
        """Forwards this relay made (committed)."""
        count: int = await self.storage.get("sent", 0)
        return count

    @method
    async def chain(self, path: list[str]) -> list[str]:
        """Call relay ``path[0]`` with ``chain(path[1:])``; return the ids that answered."""
        if not path:
            return [self.id.object_id]
        rest: list[str] = await self.call(Relay, path[0]).chain(path=path[1:])
        return [self.id.object_id, *rest]

    @method
    async def call_self(self) -> int:
        """Call this object itself (refused: it would wait for itself)."""
        result: int = await self.call(Relay, self.id.object_id).sent()
        return result

    @method
    async def wait_then_sleep(self, to: str, wait: float, seconds: float) -> str:
        """Spend ``wait`` seconds, then make ``Slow`` ``to`` sleep ``seconds`` (deadlines)."""
        await asyncio.sleep(wait)
        result: str = await self.call(Slow, to).sleep(seconds=seconds)
        return result

    @method
    async def note(self, value: int) -> None:
        """Write ``value`` (a turn whose commit a test can stall)."""
        self.storage.put("note", value)

    @method
    async def touch(self, to: str) -> int:
        """Call ``Probe`` ``to`` (which records the call in memory, before any commit)."""
        count: int = await self.call(Probe, to).touch()
        return count

    @method
    async def forward_then_pause(self, to: str, marker: str) -> int:
        """Increment counter ``to``; the first time (no file at ``marker``), create the file and
        pause 20 s before committing, so a test can kill the worker in between."""
        value = await self.call(Counter, to).increment()
        path = Path(marker)
        if not await asyncio.to_thread(path.exists):
            await asyncio.to_thread(path.write_text, str(value))
            await asyncio.sleep(20)
        self.storage.put("sent", await self.storage.get("sent", 0) + 1)
        return value


class Flusher(Actor):
    """Counts in memory and writes the count only in ``on_stop`` (a best-effort flush)."""

    pending: int
    pause: float
    fail: bool

    async def on_start(self) -> None:
        self.pending = 0
        self.pause = 0.0
        self.fail = False

    @method
    async def add(self, by: int = 1) -> int:
        """Count ``by`` in memory only; return this instance's count (restarts at 0 with each
        instance)."""
        self.pending += by
        return self.pending

    @method
    async def flushed(self) -> dict[str, int]:
        """What the ``on_stop`` hooks wrote: the counts' sum and how many ran."""
        return {
            "total": await self.storage.get("total", 0),
            "stops": await self.storage.get("stops", 0),
        }

    @method
    async def stop_slowly(self, pause: float) -> None:
        """Make this instance's ``on_stop`` wait ``pause`` seconds before it writes."""
        self.pause = pause

    @method
    async def stop_badly(self) -> None:
        """Make this instance's ``on_stop`` raise after it wrote."""
        self.fail = True

    async def on_stop(self) -> None:
        await asyncio.sleep(self.pause)
        total: int = await self.storage.get("total", 0)
        self.storage.put("total", total + self.pending)
        self.storage.put("stops", await self.storage.get("stops", 0) + 1)
        self.emit("stopped", {"flushed": self.pending})
        if self.fail:
            raise RuntimeError("on_stop failed on purpose")


class Probe(Actor):
    """Records in memory (class-wide) every call it gets, as soon as its handler runs."""

    touched: ClassVar[list[str]] = []

    @method
    async def touch(self) -> int:
        """Record the call; return how many calls this process's probes got."""
        Probe.touched.append(self.id.object_id)
        return len(Probe.touched)
