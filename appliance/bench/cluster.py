"""`appliance bench-cluster`: the shared queue's own ceiling, on one PostgreSQL.

Two measures, each beside its baseline measured in the same run:

- Claims: the queue (jobs/shared_queue.py) is kept `queued` images deep (a
  top-up thread adds what the claimers take, as steady submits would), and
  `claimers` threads, each with its connection and node name, call claim_batch
  in a loop for `seconds`: images and claims a second, claim latency p50/p99,
  and a check that no image was returned twice. Baseline: the in-memory queue
  (engine/queue.py) of one node, kept as deep the same way, taken from by as
  many threads with the same batch size.
- Admission: two real `appliance serve` nodes on the database, loaded by wrk
  with one-image POSTs, each job cancelled by a following request, so that the
  workers make only the images they start before it (counted: they take the
  same CPUs); baseline: one node on a SQLite file, loaded the same way.

It writes benchmark accounts, jobs and nodes into the database it is given:
a scratch database, never one that serves.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.accounts import accounts, audit
from appliance.bench import serving
from appliance.bench.http import parse_wrk, server_config
from appliance.core.clock import utc_now
from appliance.core.config import Config
from appliance.core.database import ConnectionPool, Database
from appliance.core.database_url import DatabaseUrl
from appliance.engine.queue import ImageQueue
from appliance.jobs import shared_queue
from appliance.jobs.models import GenerationSettings, ImageStatus, JobStatus, QueuedImage

CLAIMERS = (2, 8, 32)
BATCHES = (8, 32)
# Accounts whose images take turns, and settings the batches split on.
ACCOUNTS = 4
SETTINGS = tuple(GenerationSettings(width=512, height=512, steps=steps, guidance_scale=7.5)
                 for steps in (20, 30))
# Long enough that no claim runs out during a run: each image is claimed once.
LEASE_SECONDS = 3600.0
# What the on-paper line assumes a node makes (an H100 at the default settings).
NODE_IMAGES_PER_SECOND = 10.0
# Each account's credits, and its pending images and the queue's room on the nodes: more
# than any run takes (each job is cancelled at once and refunded).
CREDITS = 1_000_000
# Admission: client connections in all, and wrk threads (one key each).
CONNECTIONS = 16
WRK_THREADS = 4
URL = "/api/playground/images"
# In the benchmark accounts' addresses, so that a database can take another run.
RUN = secrets.token_hex(4)
# The in-memory baseline's images beyond the depth: about what it takes in a second here,
# for each second of a run, up to a bound on the memory they take; and how often its
# takers look at the depth.
IN_MEMORY_IMAGES_A_SECOND = 300_000
IN_MEMORY_IMAGES_MAX = 1_200_000
LOOK_EVERY = 16


@dataclass
class ClaimerRun:
    ids: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    empty: int = 0
    error: BaseException | None = None


def _figures(runs: list[ClaimerRun], seconds: float) -> dict[str, Any]:
    ids = [image_id for run in runs for image_id in run.ids]
    latencies = [latency for run in runs for latency in run.latencies]
    claims = len(latencies) - sum(run.empty for run in runs)
    return {
        "images_per_second": len(ids) / seconds,
        "claims_per_second": claims / seconds,
        "empty_claims": sum(run.empty for run in runs),
        "claim_p50_ms": serving.percentile(latencies, 0.50) * 1000 if latencies else 0.0,
        "claim_p99_ms": serving.percentile(latencies, 0.99) * 1000 if latencies else 0.0,
        "images": len(ids),
        "claimed_twice": len(ids) - len(set(ids)),
    }


def _run_threads(count: int, seconds: float, work: Callable[[int, float, ClaimerRun], None]
                 ) -> tuple[list[ClaimerRun], float]:
    """`count` threads run work(index, deadline, run) together; their runs and the seconds
    from their common start to the last one's end."""
    runs = [ClaimerRun() for _ in range(count)]
    start = threading.Barrier(count + 1)

    def body(index: int) -> None:
        run = runs[index]
        try:
            work(index, -1.0, run)  # connects (a deadline already past claims nothing)
            start.wait()
            work(index, time.perf_counter() + seconds, run)
        except BaseException as exc:  # noqa: BLE001 - reported below
            run.error = exc
            start.abort()

    threads = [threading.Thread(target=body, args=(index,), name=f"bench-claimer-{index}")
               for index in range(count)]
    for thread in threads:
        thread.start()
    # Broken only when a thread failed: reported below.
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    for run in runs:
        if run.error is not None:
            raise RuntimeError(f"a claimer failed: {run.error!r}") from run.error
    return runs, time.perf_counter() - began


class _TopUp:
    """A thread that keeps `depth` images waiting while the claimers take them."""

    def __init__(self, waiting: Callable[[], int], add: Callable[[int], None], depth: int):
        self.waiting, self.add, self.depth = waiting, add, depth
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.lowest = depth
        self.fill()
        # The fewest images found waiting once the run began: 0 would mean the claimers
        # outran the top-up.
        self.lowest = depth
        self.thread = threading.Thread(target=self._run, name="bench-top-up")
        self.thread.start()

    def fill(self) -> None:
        waiting = self.waiting()
        self.lowest = min(self.lowest, waiting)
        missing = self.depth - waiting
        if missing > 0:
            self.add(missing)

    def _run(self) -> None:
        try:
            while not self.stopped.wait(0.002):
                self.fill()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"the top-up failed: {self.error!r}") from self.error


# One job of `n` queued images, in one statement.
_ADD_JOB = f"""
    WITH job AS (
        INSERT INTO jobs (id, account_id, status, total_images, credits_used, settings,
                          created_at)
        VALUES (gen_random_uuid()::text, ?, '{JobStatus.QUEUED}', ?, ?, ?, ?) RETURNING id)
    INSERT INTO job_images (job_id, idx, prompt, seed, status)
    SELECT job.id, n, 'a benchmark prompt', n, '{ImageStatus.QUEUED}'
    FROM job, generate_series(0, ? - 1) AS n
"""
_UNCLAIMED = ("SELECT COUNT(*) FROM job_images"
              f" WHERE status = '{ImageStatus.QUEUED}' AND claimed_by IS NULL")


class _SharedSide:
    """The database's queue: accounts made once, images added as the claimers take them."""

    def __init__(self, pool: ConnectionPool):
        self.pool = pool
        db = pool.db()
        self.accounts = [accounts.create_account(db, f"bench-claims-{index}-{RUN}@example.com",
                                                 serving.throwaway_password(),
                                                 audit.Actor.cli()).id
                         for index in range(ACCOUNTS)]
        self._jobs = 0

    def waiting(self) -> int:
        return int(self.pool.db().execute(_UNCLAIMED).fetchone()[0])

    def add(self, count: int) -> None:
        db = self.pool.db()
        for index, account_id in enumerate(self.accounts):
            share = count // ACCOUNTS + (index < count % ACCOUNTS)
            if share:
                settings = SETTINGS[self._jobs % len(SETTINGS)]
                self._jobs += 1
                db.execute(_ADD_JOB, [account_id, share, share, settings.to_json(), utc_now(),
                                      share])

    def clear(self) -> None:
        """Every claimed image and emptied job goes, so the next run starts as this one did."""
        db = self.pool.db()
        db.execute("DELETE FROM job_images WHERE claimed_by IS NOT NULL AND job_id IN"
                   " (SELECT id FROM jobs WHERE account_id = ANY(?))", [self.accounts])
        db.execute("DELETE FROM jobs j WHERE account_id = ANY(?) AND NOT EXISTS"
                   " (SELECT 1 FROM job_images i WHERE i.job_id = j.id)", [self.accounts])
        db.execute("VACUUM ANALYZE job_images")
        db.execute("VACUUM ANALYZE jobs")

    def remove(self) -> None:
        """The benchmark's images and jobs go, so that no node finds them to make."""
        db = self.pool.db()
        db.execute("DELETE FROM job_images WHERE job_id IN"
                   " (SELECT id FROM jobs WHERE account_id = ANY(?))", [self.accounts])
        db.execute("DELETE FROM jobs WHERE account_id = ANY(?)", [self.accounts])

    def claimed_by(self, nodes: list[str]) -> dict[str, int]:
        """Images the database records as each node's."""
        return dict(self.pool.db().execute(
            "SELECT claimed_by, COUNT(*) FROM job_images WHERE claimed_by = ANY(?)"
            " GROUP BY claimed_by", [nodes]).fetchall())

    def run(self, claimers: int, batch: int, seconds: float, depth: int) -> dict[str, Any]:
        nodes = [f"bench-{claimers}x{batch}-{index}" for index in range(claimers)]

        def claim(index: int, deadline: float, run: ClaimerRun) -> None:
            db: Database = self.pool.db()
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                images = shared_queue.claim_batch(db, nodes[index], batch, LEASE_SECONDS)
                run.latencies.append(time.perf_counter() - started)
                run.ids += [image.image_id for image in images]
                run.empty += not images

        top_up = _TopUp(self.waiting, self.add, depth)
        try:
            runs, elapsed = _run_threads(claimers, seconds, claim)
        finally:
            top_up.stop()
        figures = _figures(runs, elapsed)
        figures["lowest_depth"] = top_up.lowest
        # The database's own record agrees with what each claimer was handed.
        recorded = self.claimed_by(nodes)
        figures["recorded_as_returned"] = all(
            recorded.get(node, 0) == len(run.ids) for node, run in zip(nodes, runs, strict=True))
        self.clear()
        return figures


class _InMemorySide:
    """One node's queue (engine/queue.py), filled ahead with what the run takes.

    Its take costs the same at any depth (it walks the accounts, not the images), so
    rather than a top-up thread, which would contend for its lock and could not keep up
    with it, the queue starts deeper by what the run may take and a run stops early (each
    taker looks every LOOK_EVERY takes) before its depth falls under the shared queue's.
    """

    def run(self, claimers: int, batch: int, seconds: float, depth: int) -> dict[str, Any]:
        queue = ImageQueue(capacity=10**9)
        # What the takers may take past the depth between two looks.
        floor = depth + claimers * batch * LOOK_EVERY
        queue.put_recovered([
            QueuedImage(image_id, f"job-{image_id // 64}-{image_id % ACCOUNTS}",
                        image_id % ACCOUNTS, 0, "a benchmark prompt", image_id,
                        SETTINGS[(image_id // 64) % len(SETTINGS)])
            for image_id in range(floor + min(IN_MEMORY_IMAGES_MAX,
                                              round(IN_MEMORY_IMAGES_A_SECOND * seconds)))])

        def take(index: int, deadline: float, run: ClaimerRun) -> None:
            takes = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                images = queue.take_batch(batch, timeout=0.0)
                run.latencies.append(time.perf_counter() - started)
                run.ids += [image.image_id for image in images]
                run.empty += not images
                takes += 1
                if takes % LOOK_EVERY == 0 and len(queue) < floor:
                    break

        runs, elapsed = _run_threads(claimers, seconds, take)
        figures = _figures(runs, elapsed)
        figures["seconds"] = elapsed
        return figures


def run_claims(url: DatabaseUrl, seconds: float, claimers: tuple[int, ...],
               batches: tuple[int, ...], depth: int) -> list[dict[str, Any]]:
    pool = ConnectionPool(url)
    try:
        shared, in_memory = _SharedSide(pool), _InMemorySide()
        results = []
        try:
            for batch in batches:
                for count in claimers:
                    database = shared.run(count, batch, seconds, depth)
                    memory = in_memory.run(count, batch, seconds, depth)
                    results.append({
                        "claimers": count, "batch": batch, "shared": database,
                        "in_memory": memory,
                        "ratio": database["images_per_second"] / memory["images_per_second"]})
        finally:
            shared.remove()
        return results
    finally:
        pool.close()


# One key a wrk thread; each job a POST makes is cancelled by that thread's next request,
# so the nodes' workers make next to nothing and the CPU goes to admission. A POST's answer
# has the job's id and no status; a DELETE's is the job, with its status.
WRK_SCRIPT = """
local threads, made = {}, 0
function setup(thread)
  made = made + 1
  local keys = {}
  for key in string.gmatch(os.getenv("BENCH_KEYS"), "[^,]+") do keys[#keys + 1] = key end
  thread:set("key", keys[(made - 1) % #keys + 1])
  table.insert(threads, thread)
end
function init(args)
  posts, refused, pending = 0, 0, {}
  sent = {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}
end
function request()
  local job = table.remove(pending)
  if job then return wrk.format("DELETE", "URL_PATH/" .. job, sent) end
  return wrk.format("POST", "URL_PATH", sent, '{"prompts": ["a lighthouse"]}')
end
function response(status, headers, body)
  local job = body:match('"jobId"%s*:%s*"([^"]+)"')
  if status < 300 and job and not body:find('"status"') then
    posts = posts + 1
    pending[#pending + 1] = job
  elseif status >= 300 then
    refused = refused + 1
  end
end
function done(summary, latency, requests)
  local p, r = 0, 0
  for _, thread in ipairs(threads) do p = p + thread:get("posts"); r = r + thread:get("refused") end
  io.write(string.format("posts: %d\\nrefused: %d\\n", p, r))
end
""".replace("URL_PATH", URL)


def _wrk(base: str, keys_: list[str], threads: int, connections: int, seconds: int,
         script: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["wrk", "--threads", str(threads), "--connections", str(connections),
         "--duration", f"{seconds}s", "--latency", "--script", str(script), base],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "BENCH_KEYS": ",".join(keys_)})


def _script_count(name: str, output: str) -> int:
    """A count the script's done() printed."""
    found = re.search(rf"^{name}: (\d+)$", output, re.M)
    if found is None:
        raise RuntimeError(f"wrk's script printed no {name}:\n{output[-2000:]}")
    return int(found[1])


def _load_nodes(servers: list[serving.Server], keys_: list[str], seconds: int,
                script: Path) -> dict[str, Any]:
    """wrk on every node at once, the connections and keys split among them."""
    share = len(servers)
    runs = [_wrk(server.base, keys_[index::share], WRK_THREADS // share,
                 CONNECTIONS // share, seconds, script)
            for index, server in enumerate(servers)]
    cpu_before = [serving.cpu_seconds(server.process.pid) for server in servers]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=seconds + 120)
        if run.returncode != 0:
            raise RuntimeError(f"wrk failed: {err.strip()}")
        outputs.append(out)
    cpu_after = [serving.cpu_seconds(server.process.pid) for server in servers]
    loads = [parse_wrk(out) for out in outputs]
    posts = sum(_script_count("posts", out) for out in outputs)
    refused = sum(_script_count("refused", out) for out in outputs)
    cpu = None
    if None not in cpu_before and None not in cpu_after and posts:
        cpu = sum(after - before for before, after in zip(cpu_before, cpu_after, strict=True)
                  if after is not None and before is not None) / posts * 1e6
    return {
        "posts_per_second": posts / seconds,
        "requests_per_second": sum(load.requests_per_second for load in loads),
        "posts": posts,
        "refused": refused,
        "errors": sum(load.errors for load in loads),
        "p50_ms": max(load.p50_ms for load in loads),
        "p99_ms": max(load.p99_ms for load in loads),
        "server_cpu_us_per_post": cpu,
    }


def _node_config(config: Config, work: Path, name: str, port: int,
                 database: str | None) -> Path:
    sections = server_config(config, work / name, port, CREDITS)
    if database is not None:
        sections["storage"] = {"data_dir": str(work / name), "database": database,
                               "images_dir": str(work / "images")}
        sections["cluster"] = {"node_name": f"bench-{name}"}
    path = work / f"{name}.toml"
    serving.write_config(path, sections)
    return path


def _measure(servers: list[serving.Server], keys_: list[str], seconds: int,
             script: Path) -> dict[str, Any]:
    try:
        for server in servers:
            server.wait_until_up(300)
        for server in servers:
            # The model loaded and warmed up first, so that the load meets a settled node.
            server.wait_until_generating(keys_[0], 300)
        return _load_nodes(servers, keys_, seconds, script)
    finally:
        for server in servers:
            server.stop()


def _images_made(target: Path | DatabaseUrl, emails: str) -> int:
    """Images the nodes made for the accounts whose address is LIKE `emails` (the warm-up
    images included): started before their job's cancel reached them."""
    pool = ConnectionPool(target)
    try:
        return int(pool.db().execute(
            "SELECT COUNT(*) FROM job_images i JOIN jobs j ON j.id = i.job_id"
            " JOIN accounts a ON a.id = j.account_id WHERE i.status = ? AND a.email LIKE ?",
            [ImageStatus.COMPLETED, emails]).fetchone()[0])
    finally:
        pool.close()


def run_admission(config: Config, url: DatabaseUrl, seconds: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian's wrk package)")
    work = Path(tempfile.mkdtemp(prefix="appliance-bench-cluster-"))
    try:
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        # server_config keeps a node's data in FOLDER/data.
        database = work / "sqlite" / "data" / "appliance.db"
        database.parent.mkdir(parents=True)
        sqlite_keys = serving.make_keys(database, WRK_THREADS, credits=CREDITS)
        port = serving.free_port()
        path = _node_config(config, work, "sqlite", port, None)
        single = _measure([serving.Server(path, port, work / "sqlite.log")], sqlite_keys,
                          seconds, script)
        single["images_made"] = _images_made(database, "%")
        cluster_keys = serving.make_keys(url, WRK_THREADS, CREDITS,
                                         email=f"bench-admission-{{index}}-{RUN}@example.com")
        servers = []
        for name in ("node0", "node1"):
            port = serving.free_port()
            path = _node_config(config, work, name, port, url.url)
            (work / name).mkdir()
            servers.append(serving.Server(path, port, work / f"{name}.log"))
        cluster = _measure(servers, cluster_keys, seconds, script)
        cluster["images_made"] = _images_made(url, f"bench-admission-%-{RUN}@example.com")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"cluster_2_nodes": cluster, "sqlite_1_node": single,
            "ratio": cluster["posts_per_second"] / single["posts_per_second"]}


def run_cluster_benchmark(config: Config, url: DatabaseUrl, seconds: int,
                          claimers: tuple[int, ...], batches: tuple[int, ...], depth: int,
                          admission: bool) -> dict[str, Any]:
    result: dict[str, Any] = {
        "cpus": os.cpu_count(), "seconds": seconds, "queued": depth,
        "database": url.shown, "server_settings": _server_settings(url),
        "claims": run_claims(url, seconds, claimers, batches, depth),
    }
    if admission:
        result["admission"] = run_admission(config, url, seconds)
    return result


def _server_settings(url: DatabaseUrl) -> dict[str, str]:
    """The server's durability settings, which the figures depend on."""
    pool = ConnectionPool(url)
    try:
        db = pool.db()
        return {name: str(db.execute(f"SHOW {name}").fetchone()[0])
                for name in ("server_version", "fsync", "synchronous_commit",
                             "full_page_writes")}
    finally:
        pool.close()


def report_lines(result: dict[str, Any]) -> list[str]:
    settings = result["server_settings"]
    lines = [f"machine: {result['cpus']} CPUs, shared by the database, the claimers and"
             f" the nodes; PostgreSQL {settings['server_version']}, fsync"
             f" {settings['fsync']}, synchronous_commit {settings['synchronous_commit']},"
             f" full_page_writes {settings['full_page_writes']}",
             f"claims: {result['seconds']} s each, the queue kept {result['queued']} images"
             f" deep ({ACCOUNTS} accounts, {len(SETTINGS)} settings); baseline: one node's"
             " in-memory queue, as deep, as many threads"]
    for run in result["claims"]:
        shared, memory = run["shared"], run["in_memory"]
        lines.append(
            f"  {run['claimers']:>2} claimers, batch {run['batch']:>2}:"
            f" {shared['images_per_second']:.0f} images/s,"
            f" {shared['claims_per_second']:.0f} claims/s, p50 {shared['claim_p50_ms']:.1f} ms,"
            f" p99 {shared['claim_p99_ms']:.1f} ms, {shared['empty_claims']} empty,"
            f" {shared['claimed_twice']} claimed twice;"
            f" in-memory {memory['images_per_second']:.0f} images/s"
            f" ({run['ratio']:.3f}x)")
    for batch in sorted({run["batch"] for run in result["claims"]}):
        best = max((run for run in result["claims"] if run["batch"] == batch),
                   key=lambda run: run["shared"]["images_per_second"])
        claims, rate = (best["shared"]["claims_per_second"],
                        best["shared"]["images_per_second"])
        # Images claimed rather than claims x batch: a claim may come back short.
        lines.append(f"on paper: batches of {batch}: {claims:.0f} claims/s x"
                     f" {rate / claims if claims else 0:.1f} images a claim = {rate:.0f}"
                     f" images/s (at {best['claimers']} claimers) feeds about"
                     f" {rate / NODE_IMAGES_PER_SECOND:.0f} nodes at"
                     f" {NODE_IMAGES_PER_SECOND:.0f} images/s each")
    admission = result.get("admission")
    if admission:
        lines.append(f"admission: one-image POSTs for {result['seconds']} s, wrk"
                     f" {CONNECTIONS} connections and {WRK_THREADS} keys in all; each job"
                     " cancelled by its wrk thread's next request, so that the workers make"
                     " few (images made: those they started first, on the same CPUs);"
                     " baseline: one node on a SQLite file")
        for name, label in (("cluster_2_nodes", "2 nodes on PostgreSQL"),
                            ("sqlite_1_node", "1 node on SQLite (baseline)")):
            figure = admission[name]
            cpu = ("" if figure["server_cpu_us_per_post"] is None else
                   f", servers' CPU {figure['server_cpu_us_per_post']:.0f} us a POST")
            lines.append(f"  {label}: {figure['posts_per_second']:.0f} POSTs/s"
                         f" ({figure['requests_per_second']:.0f} requests/s with the"
                         f" cancels), p50 {figure['p50_ms']:.1f} ms, p99"
                         f" {figure['p99_ms']:.1f} ms{cpu}, {figure['images_made']} images made,"
                         f" {figure['refused']} refused, {figure['errors']} errors")
        lines.append(f"  ratio: {admission['ratio']:.2f}x; on paper: the cluster admits about"
                     f" {admission['cluster_2_nodes']['posts_per_second']:.0f} one-image"
                     " requests/s on this machine")
    return lines
