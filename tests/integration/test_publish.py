"""Publishing against real Redis: concurrent publishers, Redis out of memory, hostile ``.npz``.

Issue 10, cases 5 and 8: a slower publisher must never move the pointer back (nor let the
newest version expire); operator errors are one line with exit status 2.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from pipeline.config import RedisBackend, RedisSettings
from pipeline.dev.local import RedisServer, free_port
from pipeline.io.kv import KeyValue, open_kv
from pipeline.io.npy import MAX_NPZ_BYTES
from pipeline.params.models import preset
from pipeline.params.store import ParamStore
from tests.integration.test_cli import kvpipe
from tests.unit.io.test_npz import CASES, MiB, hostile, write_bomb
from tests.unit.params.test_publish import SlowKV

pytestmark = pytest.mark.integration

BACKENDS: list[RedisBackend] = ["redis-py", "asyncio-redis"]
RedisFactory = Callable[..., Awaitable[RedisServer]]


@pytest_asyncio.fixture(params=BACKENDS)
async def kv(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[KeyValue]:
    async with open_kv(RedisSettings(url=redis_server.url, backend=request.param)) as adapter:
        yield adapter


async def ttls(url: str, pattern: str) -> dict[str, int]:
    """PTTL of every key matching ``pattern`` (-1: no expiry), read with a plain client."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
        return {k.decode(): int(await client.pttl(k)) for k in keys}
    finally:
        await client.aclose()


async def test_a_slower_publisher_never_moves_the_pointer_back(
    kv: KeyValue, redis_server: RedisServer
) -> None:
    prefix = f"race{uuid.uuid4().hex[:8]}"
    model = preset("mlp")
    slow = SlowKV(kv, delay_s=0.1)
    a = ParamStore(slow, prefix=prefix, retention_s=60.0)  # type: ignore[arg-type]
    b = ParamStore(kv, prefix=prefix, retention_s=60.0)
    await b.publish("m", model.arch, model.init(0))  # v1

    task_a = asyncio.create_task(a.publish("m", model.arch, model.init(1)))
    await asyncio.wait_for(slow.took_version.wait(), 5)
    published_b = await b.publish("m", model.arch, model.init(2))
    assert not task_a.done()  # A took its number first and finishes last
    published_a = await task_a

    assert (published_a.version, published_b.version) == (2, 3)
    assert await b.current_version("m") == 3  # before the fix: 2 (A's late SET won)
    rows = {r.version: r for r in await b.versions("m")}
    assert rows[3].current and rows[3].expires_at is None  # before: v3 scheduled to expire
    keys = await ttls(redis_server.url, f"{prefix}:m:v3:*")
    assert len(keys) == 5 and all(ttl == -1 for ttl in keys.values()), keys
    assert getattr(published_a, "current", None) == 3 and not published_a.is_current
    assert published_b.is_current
    # A's version is complete and listed: an ordinary older version (here, the kept previous).
    assert rows[2].available and rows[2].expires_at is None
    manifest, _ = await b.load("m", 2)
    assert manifest.version == 2


async def test_a_rollback_never_lets_newer_versions_expire(
    kv: KeyValue, redis_server: RedisServer
) -> None:
    prefix = f"roll{uuid.uuid4().hex[:8]}"
    model = preset("mlp")
    store = ParamStore(kv, prefix=prefix, retention_s=60.0)
    for seed in range(4):
        await store.publish("m", model.arch, model.init(seed))
    await store.set_current("m", 2)
    # A retention pass that was computed before the rollback (keep v4 and v3) runs late.
    await store.expire_old("m", keep=(4, 3))
    rows = {r.version: r for r in await store.versions("m")}
    assert rows[2].current and rows[2].expires_at is None
    assert rows[3].expires_at is None and rows[4].expires_at is None
    keys = await ttls(redis_server.url, f"{prefix}:m:v[234]:*")
    assert len(keys) == 15 and all(ttl == -1 for ttl in keys.values()), keys
    # A publish moves on from the rollback; the rolled-back-from versions may expire now.
    published = await store.publish("m", model.arch, model.init(9))
    assert published.version == 5 and await store.current_version("m") == 5
    rows = {r.version: r for r in await store.versions("m")}
    assert rows[4].expires_at is None and rows[5].expires_at is None
    assert rows[3].expires_at is not None and rows[2].expires_at is not None


# -- operator errors: one line, exit status 2 for usage, 1 at run time (case 8) ------------------


def one_line_error(out: Any, status: int = 2) -> str:
    assert out.returncode == status, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("kvpipe publish: error: ")
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_publish_from_a_hostile_npz_is_one_line(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.npz"
    fragment = hostile(case, path)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # never reached: the file is refused first
    out = kvpipe("publish", "--model", "m", "--from", str(path), "--redis", dead, "--no-announce")
    line = one_line_error(out)
    assert f"cannot read {path} as a .npz of arrays" in line and fragment in line, line
    assert not path.with_suffix(".unpickled").exists()


def test_publish_from_a_zip_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    expanded = MAX_NPZ_BYTES + 256 * MiB  # over the default bound; ~10 MB on disk
    write_bomb(path, expanded)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    argv = ["publish", "--model", "m", "--from", str(path), "--redis", dead, "--no-announce"]
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    peak_mib = int(out.stdout.split()[-1]) / 1024  # VmHWM is in KiB
    line = one_line_error(out)
    assert f"over the limit of {MAX_NPZ_BYTES}" in line and "would expand to" in line, line
    assert peak_mib < 250, peak_mib  # before the fix: over 2,300 MiB (the whole member)


#: Runs the CLI in this process, then prints its peak RSS (KiB), whatever the CLI did. VmHWM,
#: not ru_maxrss: Linux carries ru_maxrss across fork and exec, so it would report the test
#: runner's own size (measured: 289 MiB once onnxruntime was loaded in the runner).
PEAK_RSS = """
import sys
from pipeline.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        print(next(l.split()[1] for l in f if l.startswith("VmHWM:")), flush=True)
sys.exit(code)
"""


@pytest.mark.parametrize("backend", BACKENDS)
async def test_publish_into_a_full_redis_is_one_line_and_leaves_only_expiring_keys(
    backend: str, redis_factory: RedisFactory
) -> None:
    # The article model's two 4 MB weights are refused; its biases and manifest get in.
    redis = await redis_factory(maxmemory=6 * MiB)
    prefix = f"oom{uuid.uuid4().hex[:8]}"
    argv = ["publish", "--model", "big", "--preset", "article", "--no-announce"]
    env = {"KVPIPE_REDIS": redis.url, "KVPIPE_REDIS_BACKEND": backend, "KVPIPE_KEY_PREFIX": prefix}
    out = await asyncio.to_thread(kvpipe, *argv, env=env)
    line = one_line_error(out, status=1)  # Redis refused at run time: not a usage error
    assert "out of memory" in line and "maxmemory" in line, line  # before: "unavailable"
    assert "unavailable" not in line
    for raw in ("NUMPY", "descr", "\\x", "\ufffd"):  # no tensor bytes, however rendered
        assert raw not in out.stderr, line
    keys = await ttls(redis.url, f"{prefix}:big:v*")
    assert keys, "nothing was written: the test did not fill Redis half-way"
    assert all(ttl > 0 for ttl in keys.values()), keys  # before: -1 (kept for good)
    assert (await ttls(redis.url, f"{prefix}:big:current")) == {}


async def test_the_cli_says_when_its_version_is_not_the_current_one(
    redis_server: RedisServer,
) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(f"{prefix}:m:current", b"7")  # a newer publish got there first
        env = {"KVPIPE_REDIS": redis_server.url, "KVPIPE_KEY_PREFIX": prefix}
        # No broker at all: announcing would fail, so exit 0 also shows nothing was announced.
        env["KVPIPE_KAFKA"] = f"127.0.0.1:{free_port()}"
        out = await asyncio.to_thread(
            kvpipe, "publish", "--model", "m", "--preset", "mlp", "--json", env=env
        )
        assert out.returncode == 0, out.stderr
        assert '"version": 1' in out.stdout and '"current": 7' in out.stdout, out.stdout
        assert "published m v1, but v7 is already current" in out.stderr, out.stderr
        assert await client.get(f"{prefix}:m:current") == b"7"  # before the fix: b"1"
        assert await client.pttl(f"{prefix}:m:v1:manifest") == -1  # complete, kept
    finally:
        await client.aclose()
