"""CPU that the Prefect orchestration adds per (stage, shard) task, against a plain loop over the same stages.

Makes N tiny test videos (ffmpeg testsrc, 1 s, 160x90) and, for two sizes N and 2N, runs ``ingest`` and
``scenes`` at shard size 1:

* plain:   ``stages.runner.run_shard`` for every (stage, shard), one after another, in this process;
* prefect: the ``motionforge-pipeline`` flow (thread-pool task runner, the temporary local Prefect server
           unless PREFECT_API_URL points at one), through ``flows.pipeline.pipeline``.

CPU is user + system time of this process and all its children (the temporary server included, except while the
plain loop runs: it is idle then, and none of its CPU is the loop's), sampled with psutil; the tax is also split
into the flow process's share (what a worker node pays) and the server's (what recording task runs, states and
logs costs the Prefect server, on its own host in production; with ``--postgres`` the server's database is a
PostgreSQL cluster started here, whose CPU counts as the server's). A first, uncounted flow run starts the
temporary server. The per-task tax is the slope between the two sizes, so fixed costs (flow start, report,
artifacts) drop out of it and are reported separately:

    tax per task = [(prefect(2N) - prefect(N)) - (plain(2N) - plain(N))] / (tasks(2N) - tasks(N))

It also prints the plain difference over the 2N run alone, (prefect(2N) - plain(2N)) / tasks(2N): fixed costs
included, but steadier on a shared machine, where the CPU time of the same work varies by a fifth or more.

Prefect's own floor is measured in the same rounds: a flow of empty tasks with the same graph (the two stages'
N and 2N task runs, each scenes task waiting for its ingest task, a thread pool of the same size, a Completed
state with a message as ours return), its slope taken the same way. The tax minus that floor, per round, is what
motionforge's own code adds to each task run (``--no-floor`` skips it). By default each empty task sleeps (no CPU)
as long as the round's 2N pipeline run took per task and worker, so task runs reach the server at the pipeline's
pace: Prefect's CPU per task run is higher when they trickle in than in one burst (``--floor-task-s 0``: a burst). After every flow run the benchmark waits
until the server has recorded it (:func:`settle`), so no run's server work is counted with the next one (or with
the plain loop after it); what the idle server spends during that wait is taken off.

Target: <= 20 ms per task. Modest default sizes; the machine may be shared. ``--shards-per-task K`` runs the
pipeline with ``runtime.shards_per_task: K`` (K shards per task run); the figures stay per (stage, shard), the
floor's empty tasks one per shard.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_orchestration.py [--n 20] [--repeats 3] [--dir /tmp/x] [--postgres]
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

STAGES = ["ingest", "scenes"]


def cpu_split() -> tuple[float, float]:
    """(this process, its descendants) user + system CPU seconds. Descendants: the live ones (the temporary
    Prefect server, a forkserver) with what each has reaped (the forkserver's pool workers, which are not this
    process's children), plus the ones this process reaped (ffprobe). A worker that exits between two samples is
    counted through whoever reaped it, so the figure does not depend on when pools come and go."""
    me = psutil.Process()
    t = me.cpu_times()
    return t.user + t.system, t.children_user + t.children_system + descendants_cpu(me)


def own_and_reaped_cpu(p: psutil.Process) -> float:
    """User + system CPU seconds of ``p`` and of the children it has reaped."""
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def descendants_cpu(p: psutil.Process) -> float:
    """:func:`own_and_reaped_cpu` summed over the live descendants of ``p`` (one that exits meanwhile is skipped)."""
    total = 0.0
    for c in p.children(recursive=True):
        try:
            total += own_and_reaped_cpu(c)
        except psutil.Error:
            pass
    return total


class LocalPostgres:
    """A throwaway PostgreSQL cluster under ``folder`` for the temporary Prefect server's database: the database
    docs/cluster.md prescribes for production, here on the same cores. Needs the machine's ``initdb`` and
    ``pg_ctl`` (Debian: ``apt-get install postgresql``). As root it runs as the ``postgres`` user, since
    PostgreSQL refuses to run as root. Its processes are not this process's descendants, so :meth:`cpu` adds
    them up: the postmaster, its live backends, and what it has reaped (each connection's backend)."""

    def __init__(self, folder: Path):
        pg_ctl = shutil.which("pg_ctl") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))), None)
        if pg_ctl is None:
            raise SystemExit("--postgres needs PostgreSQL's pg_ctl and initdb on PATH "
                             "(Debian: apt-get install postgresql)")
        self.bin = Path(pg_ctl).resolve().parent
        self.data = folder / "pgdata"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.port = 0
        self.pid = 0

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, stdout=subprocess.DEVNULL)

    def start(self) -> str:
        """Create and start the cluster and a ``prefect`` database; the SQLAlchemy URL Prefect takes."""
        import socket

        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        if self.as_user:
            shutil.chown(self.data, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect")
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def cpu(self) -> float:
        try:
            p = psutil.Process(self.pid)
            return own_and_reaped_cpu(p) + descendants_cpu(p)
        except psutil.Error:
            return 0.0

    def version(self) -> str:
        out = subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        if self.pid:
            subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.pid = 0


DATABASE: LocalPostgres | None = None  # set by --postgres


def database_cpu() -> float:
    """CPU seconds of the Prefect server's own database, when it is one this benchmark started (--postgres)."""
    return DATABASE.cpu() if DATABASE is not None else 0.0


def cpu_tree() -> float:
    return sum(cpu_split())


def server_cpu() -> float:
    """CPU seconds of the temporary Prefect server (a live child running uvicorn), 0 when there is none."""
    total = 0.0
    for c in psutil.Process().children(recursive=True):
        try:
            if "uvicorn" in " ".join(c.cmdline()):
                ct = c.cpu_times()
                total += ct.user + ct.system
        except psutil.Error:
            pass
    return total


def settle(window: float = 1.0, quiet_cpu: float = 0.05, most: float = 60.0) -> float:
    """Wait until the server has recorded a flow run that just returned, so its CPU is counted with that run and
    not with the next one: at least the event persister's flush interval plus a second (it writes the last events
    of a run that far behind; the task-run recorder flushes every second), then until the server and its database
    use under ``quiet_cpu`` CPU-s in a ``window``. Returns the server's CPU-s over the wait that its idle loops
    would have spent anyway (:data:`IDLE`), which the caller takes off the run's figures."""
    from prefect.settings import get_current_settings

    t0 = time.monotonic()
    time.sleep(get_current_settings().server.services.event_persister.flush_interval + 1.0)
    last = server_cpu() + database_cpu()
    while time.monotonic() - t0 < most:
        time.sleep(window)
        now = server_cpu() + database_cpu()
        if now - last < quiet_cpu:
            break
        last = now
    return IDLE[0] * (time.monotonic() - t0)


IDLE = [0.0]  # CPU-s per second of the server (and its database) with no flow running; measured after warm-up


def measure_idle(seconds: float = 5.0) -> float:
    settle()
    c0, t0 = server_cpu() + database_cpu(), time.monotonic()
    time.sleep(seconds)
    IDLE[0] = (server_cpu() + database_cpu() - c0) / (time.monotonic() - t0)
    return IDLE[0]


def make_videos(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"v{i:04d}.mp4"
        if p.exists():
            continue
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x90:rate=25:duration=1",
                        "-vf", f"hue=h={i * 37 % 360}", "-pix_fmt", "yuv420p", str(p)], check=True)


SHARDS_PER_TASK = [1]  # --shards-per-task


def config():
    from flows.config import load_pipeline_config

    return load_pipeline_config("tiny", overrides={"ingest": {"shard_size": 1}, "runtime": {
        "max_workers": 2, "shards_per_task": SHARDS_PER_TASK[0]}})


def plain(videos: Path, out: Path) -> tuple[float, float, int]:
    from flows.pipeline import plan_inputs
    from stages.registry import get_stage
    from stages.runner import plan_shards, run_shard
    from storage.root import OutputRoot

    pc = config()
    shutil.rmtree(out, ignore_errors=True)
    root = OutputRoot(str(out))
    plan_inputs.fn(str(videos), str(out), 1, list(pc.ingest.extensions))
    (s0, k0), v0, w0 = cpu_split(), server_cpu(), time.perf_counter()
    tasks = 0
    for name in STAGES:
        for k in plan_shards(root):
            run_shard(get_stage(name), root, pc.stage_config(name), k, force=True)
            tasks += 1
    (s1, k1), v1 = cpu_split(), server_cpu()
    # the temporary server (started by the warm-up) is a child too, idle here: none of its CPU is the loop's work
    k1 -= v1 - v0
    PLAIN_SPLIT[str(out)] = (s1 - s0, k1 - k0)
    return (s1 - s0) + (k1 - k0), time.perf_counter() - w0, tasks


SPLIT: dict[str, tuple[float, float, float]] = {}  # out -> (flow process, children, of which the server)


def measure_flow(run):
    """Call ``run`` (one flow run) and wait until the server has recorded it (:func:`settle`). Returns its result,
    its wall seconds (the call alone) and the CPU-s of (this process, its children, of which the server). The
    database's processes are not descendants: they are added to the children and to the server; the idle
    server's CPU over the wait is taken off both."""
    (s0, k0), v0, d0, w0 = cpu_split(), server_cpu(), database_cpu(), time.perf_counter()
    result = run()
    wall = time.perf_counter() - w0
    idle = settle()
    (s1, k1), v1, d1 = cpu_split(), server_cpu(), database_cpu()
    db = d1 - d0 - idle
    return result, wall, (s1 - s0, k1 - k0 + db, v1 - v0 + db)


def prefect(videos: Path, out: Path) -> tuple[float, float]:
    from flows.pipeline import pipeline

    shutil.rmtree(out, ignore_errors=True)
    _, wall, split = measure_flow(lambda: pipeline(input=str(videos), out=str(out), config=config(), stages=STAGES,
                                                   force=True))
    SPLIT[str(out)] = split
    return split[0] + split[1], wall


PLAIN_SPLIT: dict[str, tuple[float, float]] = {}  # out -> (this process, children)


def empty_graph_flow(task_s: float = 0.0):
    """Prefect's floor for our task graph: ``empty(n)`` runs 2n empty task runs shaped like the pipeline's
    (stage ``ingest`` shards 0..n-1, then ``scenes`` shards each waiting for the same ingest shard), on a thread
    pool as large as the benchmark's config gives the pipeline, each ending in a Completed state with a message
    (so one "Finished in state" log line each, as ours). ``task_s``: each task sleeps that long (no CPU), so
    that task runs reach the server at the pipeline's pace rather than in one burst. Prefect is imported here,
    as the pipeline is in :func:`prefect`, so that importing this module imports no Prefect."""
    from flows.prefect_api import apply_server_defaults

    apply_server_defaults()  # the temporary server gets the pipeline's settings, whichever flow starts it
    from prefect import flow, task
    from prefect.cache_policies import NONE
    from prefect.states import Completed
    from prefect.task_runners import ThreadPoolTaskRunner

    @task(name="empty-shard", task_run_name="{stage} / shard {shard:05d}", cache_policy=NONE, persist_result=False)
    def empty_shard(stage: str, shard: int):
        if task_s:
            time.sleep(task_s)
        return Completed(message=f"{stage} / shard {shard:05d}: nothing done", data={"outcome": {}})

    @flow(name="motionforge-bench-empty-graph",
          task_runner=ThreadPoolTaskRunner(max_workers=config().runtime.max_workers))
    def empty(n: int) -> int:
        futures = {}
        for name in STAGES:
            for k in range(n):
                waits = [futures[(inp, k)] for inp in STAGES[:STAGES.index(name)]]
                futures[(name, k)] = empty_shard.submit(name, k, wait_for=waits)
        for f in futures.values():
            f.wait()
        return sum(1 for f in futures.values() if f.state.is_completed())

    return empty


FLOOR: dict[float, object] = {}  # task_s -> the empty-graph flow, built once


def floor(n: int, task_s: float = 0.0) -> tuple[float, float, float, int]:
    """CPU of the empty-task graph for n shards, each task sleeping ``task_s``: (all, flow process, server,
    completed task runs)."""
    if task_s not in FLOOR:
        FLOOR[task_s] = empty_graph_flow(task_s)
    done, _, (own, kids, srv) = measure_flow(lambda: FLOOR[task_s](n))
    return own + kids, own, srv, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved repeats of both sizes; medians are reported (the machine may be shared)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-bench-orchestration")
    ap.add_argument("--keep-prefect-home", action="store_true",
                    help="record into the current PREFECT_HOME's database instead of a fresh one under --dir")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the empty-task flows that measure Prefect's own floor in each round")
    ap.add_argument("--floor-task-s", type=float, default=None,
                    help="seconds each empty task sleeps (default: the round's 2N pipeline run's wall per task and "
                         "worker, rounded to 10 ms; 0: all task runs in one burst)")
    ap.add_argument("--postgres", action="store_true",
                    help="give the temporary server a PostgreSQL database (started here, on the same cores; its "
                         "CPU counts as the server's) instead of SQLite: the production setup of docs/cluster.md")
    ap.add_argument("--shards-per-task", type=int, default=1,
                    help="runtime.shards_per_task of the pipeline runs (the figures stay per (stage, shard))")
    args = ap.parse_args()
    SHARDS_PER_TASK[0] = args.shards_per_task
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    if args.postgres:
        if os.environ.get("PREFECT_API_URL"):
            raise SystemExit("--postgres starts its own server's database; unset PREFECT_API_URL")
        global DATABASE
        DATABASE = LocalPostgres(args.dir)
        atexit.register(DATABASE.stop)
        os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = DATABASE.start()
        print(f"server database: {DATABASE.version()}, port {DATABASE.port}, data {DATABASE.data}")
    if not args.keep_prefect_home and not os.environ.get("PREFECT_API_URL"):
        # a fresh database for the temporary server: the figures do not depend on how many runs an old
        # database already holds, and the benchmark's thousands of task runs do not land in the user's database
        home = args.dir / "prefect-home"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        os.environ["PREFECT_HOME"] = str(home)
    sizes = (args.n, 2 * args.n)
    for n in sizes:
        make_videos(args.dir / f"videos-{n}", n)
    # Warm-up: the first flow run of a process starts the temporary server and imports Prefect's engine; that
    # one-off cost is reported apart, not mixed into the slope.
    w_cpu, w_wall = prefect(args.dir / f"videos-{args.n}", args.dir / "prefect-warmup")
    print(f"warm-up flow run (server start, imports): cpu {w_cpu:.2f}s wall {w_wall:.2f}s; server idle "
          f"{measure_idle() * 1000:.0f} ms CPU per second (taken off the waits for the server to finish each run)")
    taxes, workers, servers, fixeds = [], [], [], []
    floors: list[tuple[float, float, float]] = []  # per round, per task: all, flow process, server
    whole_runs: list[tuple[float, float, float]] = []  # per task over the 2N run: all, flow process, server
    for r in range(args.repeats):
        res = {}
        for n in sizes:
            tag = f"{n}-{r}"
            pc_cpu, pc_wall, tasks = plain(args.dir / f"videos-{n}", args.dir / f"plain-{tag}")
            pf_cpu, pf_wall = prefect(args.dir / f"videos-{n}", args.dir / f"prefect-{tag}")
            res[n] = (pc_cpu, pc_wall, pf_cpu, pf_wall, tasks)
            own, kids, srv = SPLIT[str(args.dir / f"prefect-{tag}")]
            p_own, p_kids = PLAIN_SPLIT[str(args.dir / f"plain-{tag}")]
            res[n] += (own, kids - srv, srv, p_own, p_kids)
            print(f"[{r + 1}/{args.repeats}] N={n:4d} tasks={tasks:4d}  plain cpu {pc_cpu:7.2f}s (process {p_own:.2f}s, "
                  f"children {p_kids:.2f}s) wall {pc_wall:7.2f}s | prefect cpu {pf_cpu:7.2f}s (flow process {own:.2f}s, "
                  f"server {srv:.2f}s, other children {kids - srv:.2f}s) wall {pf_wall:7.2f}s | "
                  f"ratio cpu {pf_cpu / pc_cpu:.2f}x wall {pf_wall / pc_wall:.2f}x")
            shutil.rmtree(args.dir / f"plain-{tag}", ignore_errors=True)
            shutil.rmtree(args.dir / f"prefect-{tag}", ignore_errors=True)
        (a, b) = sizes
        d_tasks = res[b][4] - res[a][4]
        if not args.no_floor:
            fl = {}
            pace = args.floor_task_s
            if pace is None:  # the pipeline's wall per task and worker in this round's 2N run
                pace = round(res[b][3] * config().runtime.max_workers / res[b][4], 2)
            for n in sizes:
                fl[n] = floor(n, pace)
                all_, own_, srv_, done = fl[n]
                if done != len(STAGES) * n:
                    raise SystemExit(f"empty-task flow finished {done} of {len(STAGES) * n} task runs")
                print(f"[{r + 1}/{args.repeats}] N={n:4d} empty tasks={done:4d} sleeping {pace:.2f}s  cpu "
                      f"{all_:7.2f}s (flow process {own_:.2f}s, server {srv_:.2f}s)")
            floors.append(tuple((fl[b][i] - fl[a][i]) / d_tasks for i in range(3)))
        tax = ((res[b][2] - res[a][2]) - (res[b][0] - res[a][0])) / d_tasks

        def slope(i: int) -> float:
            return (res[b][i] - res[a][i]) / d_tasks

        # the same over the whole 2N run, fixed costs included: a difference of two runs, not of four, so it
        # swings less when the machine is shared (the slope subtracts two noisy differences)
        whole_runs.append(((res[b][2] - res[b][0]) / res[b][4], (res[b][5] - res[b][8]) / res[b][4],
                           res[b][7] / res[b][4]))
        taxes.append(tax)
        fixeds.append(res[a][2] - res[a][0] - tax * res[a][4])
        # the flow process against the plain loop's process plus the children both start (ffprobe, scene workers)
        workers.append(slope(5) + slope(6) - slope(8) - slope(9))
        servers.append(slope(7))

    def show(xs: list[float], scale: float = 1000.0) -> str:
        each = " / ".join(f"{x * scale:.1f}" for x in xs)
        return f"{statistics.median(xs) * scale:.1f}" + (f" (median of {len(xs)}: {each})" if len(xs) > 1 else "")

    print(f"orchestration CPU per (stage, shard) task: {show(taxes)} ms (target <= 20 ms); "
          f"fixed per flow run once the server is up: {show(fixeds, 1.0)} CPU-s")
    print(f"  of which the flow process (what a worker node pays): {show(workers)} ms per task; "
          f"the Prefect server (recording task runs, states, logs): {show(servers)} ms per task")
    print(f"over the whole N={sizes[1]} run (fixed costs included), per task: {show([w[0] for w in whole_runs])} ms; "
          f"flow process against the plain loop's process {show([w[1] for w in whole_runs])} ms, "
          f"server {show([w[2] for w in whole_runs])} ms")
    if floors:
        print(f"Prefect's floor, empty tasks in the same graph: {show([f[0] for f in floors])} ms per task "
              f"(flow process {show([f[1] for f in floors])} ms, server {show([f[2] for f in floors])} ms)")
        print(f"  motionforge's own share of the tax (tax - floor, per round): "
              f"{show([t - f[0] for t, f in zip(taxes, floors)])} ms per task; flow process "
              f"{show([w - f[1] for w, f in zip(workers, floors)])} ms, server "
              f"{show([v - f[2] for v, f in zip(servers, floors)])} ms")
    loops = {m: importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools")}
    print(f"  server event loop / HTTP parser available to uvicorn: {loops}")


if __name__ == "__main__":
    main()
