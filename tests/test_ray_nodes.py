"""``--engine ray`` on a real multi-node cluster on this machine (``ray.cluster_utils.Cluster``): a head node with
no CPUs for workers (the driver's node: GCS, object store) and two worker nodes of one CPU each, each its own
raylet and object store, so each of the two actors lives on its own node. relprop's engine joins it by address
as it joins any cluster (``RayOptions.address``).

- The zoo models of ``tests/test_ray_engine.py`` give its single-process numbers bit for bit (results.json and
  the per-example rows, same settings, one thread) with one worker node removed mid-run: the node (raylet,
  object store, the worker processes: killed, not drained) is removed while its actor holds a shard of the
  second model, after the first model's four shards are finished (the trigger is the worker itself, not a
  timer: see ``_held``). Nothing is lost: the lost shard runs again on the other node, the finished shards'
  files are the same files after the run (not rewritten), the run ends complete. Before the engine retried lost
  shards itself, the shard waited for its actor's restart, which never came (no free CPU anywhere): a hang.
- A node that lacks what the model needs (installed packages, cached hub weights are not shipped): the failed
  cell's error names the node (its IP and node id) and what was missing.

Quiet: no dashboard, Ray's logs not sent to the driver, the cluster's address not written to
``/tmp/ray/ray_current_cluster`` (another ``ray.init()`` on the machine would join it), shut down after."""

import _thread
import os
import threading
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from ray.cluster_utils import Cluster  # noqa: E402

from test_ray_engine import MODELS, _numbers, _rows, _run, data, local, methods  # noqa: E402, F401

pytestmark = pytest.mark.slow

#: a killed node is declared dead after 2 missed health checks 0.5 s apart (Ray's default: 5 x 3 s)
FAST_HEALTH = {"health_check_failure_threshold": 2, "health_check_period_ms": 500, "health_check_initial_delay_ms": 0}

#: after the node's removal, a run still going this long is taken for hung and interrupted (it takes seconds)
HANG_SECONDS = 300


@pytest.fixture(scope="module")
def nodes():
    """The 3-node cluster: head with 0 CPUs (so a lost actor has nowhere else to restart), 2 workers of 1 CPU."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(num_cpus=0, include_dashboard=False, _system_config=FAST_HEALTH),
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        mp.undo()


def _held(hold, spec: str):
    """A loader (it travels to the workers by value) that loads as relprop does, except that the first Ray
    worker to load ``spec`` writes its node id to ``hold`` and waits there, inside the shard it was given, until
    its node is removed (120 s at most, then it fails the shard)."""

    def load(s):  # self-contained: the workers cannot import this test module
        import ray

        from relprop.specs import load_model

        if s == spec and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            try:
                os.close(os.open(f"{hold}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return load_model(s)
            tmp = f"{hold}.tmp"
            with open(tmp, "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
            os.replace(tmp, hold)
            end = time.monotonic() + 120
            while time.monotonic() < end:
                time.sleep(0.05)
            raise RuntimeError("the test did not remove this node")
        return load_model(s)

    return load


def _finished(shards) -> dict:
    """Each finished shard (its Parquet file: the commit mark) -> (inode, mtime): a rewrite changes both."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.rglob("*.parquet")}


def test_a_node_removed_mid_run_loses_nothing(nodes, local, tmp_path, data, methods):  # noqa: F811
    hold = tmp_path / "held"
    out = tmp_path / "ray"
    seen: dict = {}

    def remove_when_held():
        while not hold.exists():
            if stop.wait(0.05):
                return
        node = next(n for n in nodes.worker_nodes if n.node_id == hold.read_text())
        seen["before"] = _finished(out / "shards")
        nodes.remove_node(node, allow_graceful=False)
        seen["removed"] = node.node_id
        watchdog.start()  # a hang (the lost shard waiting forever) ends as Ctrl-C would end it: "interrupted"

    stop = threading.Event()
    watchdog = threading.Timer(HANG_SECONDS, _thread.interrupt_main)
    remover = threading.Thread(target=remove_when_held, daemon=True)
    remover.start()
    said: list[str] = []
    try:
        res = _run(
            data, methods, out, engine="ray", ray_options={"workers": 2, "address": nodes.address},
            load=_held(hold, MODELS[1]), log=said.append,
        )  # fmt: skip
    finally:
        stop.set()
        remover.join()
        watchdog.cancel()
    assert seen.get("removed"), ("no worker held a shard of the second model", res["problems"])
    assert res["status"] == "complete" and not res["problems"], res["problems"]
    assert (res["engine"]["shards_computed"], res["engine"]["shards_retried"]) == (8, 1), res["engine"]
    assert any("a Ray worker was lost: shard" in s for s in said), said
    before = seen["before"]
    assert len(before) >= 4  # the first model's shards were finished when the node went
    after = _finished(out / "shards")
    assert len(after) == 8 and all(after[p] == st for p, st in before.items())  # finished: never rewritten
    assert _numbers(out) == _numbers(local)
    assert _rows(out) == _rows(local)


def test_a_node_without_a_package_is_named(nodes, tmp_path, data, methods):  # noqa: F811
    """One node lacks a package the model needs (its loader raises ModuleNotFoundError there, as a node
    without timm would): the cells it ran fail with an error naming that node and the module, and the fix."""
    while len(nodes.worker_nodes) < 2:  # the test above removed one
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    bare, other = sorted(n.node_id for n in nodes.worker_nodes)

    def load(s):  # self-contained: the workers cannot import this test module
        import ray

        from relprop.specs import load_model

        if ray.is_initialized() and ray.get_runtime_context().get_node_id() == bare:
            raise ModuleNotFoundError("No module named 'timm'", name="timm")
        return load_model(s)

    res = _run(
        data, methods, tmp_path, models=MODELS[:1], engine="ray",
        ray_options={"workers": 2, "address": nodes.address}, load=load,
    )  # fmt: skip
    assert res["status"] == "incomplete", res["problems"]
    wanted = f"could not be loaded on Ray node {nodes.head_node.node_ip_address} (id {bare[:12]})"
    assert any(wanted in p and "No module named 'timm'" in p and "on every node" in p for p in res["problems"]), res[
        "problems"
    ]
    assert not any(other[:12] in p for p in res["problems"])  # the node that has it is not blamed


def test_a_node_without_relprop_leaves_the_pool_and_the_run_completes(nodes, tmp_path, data, methods):  # noqa: F811
    """A node where relprop cannot be imported (for that node's processes only, a ``PYTHONPATH`` folder whose
    ``relprop`` raises ModuleNotFoundError shadows the installed one): the actor placed there dies in its creation
    task, the shard it was given runs on another node, and the run says which node and what was missing."""
    shadow = tmp_path / "shadow" / "relprop"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'relprop'\", name='relprop')\n")
    while len(nodes.worker_nodes) < 2:
        nodes.add_node(num_cpus=1)
    bare = nodes.add_node(num_cpus=1, env_vars={"PYTHONPATH": str(shadow.parent)})
    nodes.wait_for_nodes()
    said: list[str] = []
    try:  # one actor per worker node (one CPU each), so one lands on the bare node
        res = _run(
            data, methods, tmp_path / "out", models=MODELS[:1], engine="ray", log=said.append,
            ray_options={"workers": len(nodes.worker_nodes), "address": nodes.address},
        )  # fmt: skip
    finally:
        nodes.remove_node(bare)
    assert res["status"] == "complete" and not res["problems"], res["problems"]
    assert (res["engine"]["shards_computed"], res["engine"]["shards_retried"]) == (4, 1), res["engine"]
    gone = [s for s in said if "gone for good" in s]
    assert len(gone) == 1, said
    assert f"on node {bare.node_ip_address}: ModuleNotFoundError: No module named 'relprop'" in gone[0], gone
    assert "must be installed on every node" in gone[0]
