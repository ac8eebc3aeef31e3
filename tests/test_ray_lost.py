"""The driver's bookkeeping of lost Ray workers (:meth:`RayEngine._run`), with a scripted stand-in for Ray so
that each path is taken for sure (``tests/test_ray_nodes.py`` kills a real node; which of these paths a real
loss takes depends on timing): a shard lost after its file was written is kept, not run again; one lost before
runs again, on another actor or on the same one once Ray has restarted it; a shard lost more than
``max_retries`` times fails its cell; when every actor is dead for good, the rest fails with that reason."""

import types

import pytest

ray = pytest.importorskip("ray")

import relprop.report.distributed as dist  # noqa: E402
from relprop.report.distributed import RayEngine, RayOptions  # noqa: E402

LOST = ray.exceptions.ActorUnavailableError("RpcError: Socket closed", None)  # its node or process died
RESTARTING = ray.exceptions.ActorUnavailableError("IOError: The actor is restarting.", None)
DEAD = ray.exceptions.ActorDiedError()  # restarts used up


class _Ref:
    def __init__(self, outcome):
        self.outcome = outcome  # the value, or the exception ray.get raises


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Ref(self.fn(*args))


class _Actor:
    """``run_shard`` answers shard ``i`` with the next of ``shards[i]`` (then ``i``); ``ready`` with the next
    of ``probes`` (then True)."""

    def __init__(self, shards=None, probes=()):
        self.shards = {i: list(v) for i, v in (shards or {}).items()}
        self.probes = list(probes)
        self.ran: list[int] = []
        self.run_shard = _Method(self._shard)
        self.ready = _Method(lambda: self.probes.pop(0) if self.probes else True)

    def _shard(self, *args):
        i = args[11]
        self.ran.append(i)
        return self.shards[i].pop(0) if self.shards.get(i) else i


class _Ray:
    """Every call done at once; ``wait`` answers the first reference it is given."""

    exceptions = ray.exceptions

    def put(self, x):
        return x

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:1], refs[1:]

    def get(self, ref):
        if isinstance(ref.outcome, BaseException):
            raise ref.outcome
        return ref.outcome

    def cancel(self, ref, force=False):
        pass


def _engine(monkeypatch, actors, written=(), max_retries=3):
    """An engine over ``actors`` (no Ray started), whose shard files ``written`` are there; a fake clock."""
    e = object.__new__(RayEngine)
    e.ray, e.o, e.actors, e.run, e.data_ref = _Ray(), RayOptions(max_retries=max_retries), list(actors), "r", None
    e.lost, e.lost_reason, e.shards_computed, e.shards_retried = {}, "", 0, 0
    e.said = []
    e.log = e.said.append
    e.job_of_run = types.SimpleNamespace(data=None, indices=list(range(8)))
    now = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(dist, "time", clock)
    monkeypatch.setattr(dist, "_identity", lambda *a, **k: {})
    monkeypatch.setattr("relprop.specs.sources.pack_items", lambda data, idx: None)
    monkeypatch.setattr(dist, "read_shard", lambda d, i, key, n: object() if i in written else None)
    return e


def _run(e, n_shards=4) -> dict:
    model = types.SimpleNamespace(spec="m", name="m", fingerprint=lambda: "f")
    plan = {"lrp": (types.SimpleNamespace(label="lrp"), {}, "k", "d")}
    bounds = [(2 * i, 2 * i + 2) for i in range(n_shards)]
    errors: dict = {}
    e._run(model, plan, bounds, [("lrp", i) for i in range(n_shards)], errors, None, None)
    return errors


def test_a_shard_lost_after_its_file_was_written_is_kept(monkeypatch):
    a, b = _Actor(shards={0: [LOST]}), _Actor()
    e = _engine(monkeypatch, [a, b], written={0})
    assert _run(e) == {}
    assert (e.shards_computed, e.shards_retried) == (4, 0)
    assert sorted(a.ran + b.ran) == [0, 1, 2, 3]  # shard 0 ran once: not again after the loss
    assert a in e.lost  # not handed work until a probe answers


def test_a_lost_shard_runs_again_on_its_restarted_actor(monkeypatch):
    a = _Actor(shards={0: [LOST]}, probes=[RESTARTING, RESTARTING])  # no other actor: wait for its restart
    e = _engine(monkeypatch, [a])
    assert _run(e) == {}
    assert (e.shards_computed, e.shards_retried) == (4, 1)
    assert a.ran == [0, 0, 1, 2, 3] and not e.lost and e.actors == [a]
    assert any("waiting for Ray to restart a lost worker" in s for s in e.said), e.said
    assert any("shard 0 of m × lrp runs again" in s for s in e.said), e.said


def test_a_lost_shard_moves_to_another_actor(monkeypatch):
    a, b = _Actor(shards={0: [LOST]}, probes=[RESTARTING] * 50), _Actor()
    e = _engine(monkeypatch, [a, b])
    assert _run(e) == {}
    assert (e.shards_computed, e.shards_retried) == (4, 1)
    assert a.ran == [0] and sorted(b.ran) == [0, 1, 2, 3]


def test_a_shard_lost_too_often_fails_its_cell(monkeypatch):
    a = _Actor(shards={0: [LOST, LOST]})
    e = _engine(monkeypatch, [a], max_retries=1)
    errors = _run(e)
    assert errors["lrp"].startswith("shard 0 lost its Ray worker 2 times; the last: ActorUnavailableError")
    assert a.ran == [0, 0]  # the cell's other shards are not run once it failed


def test_every_actor_dead_for_good_fails_the_rest(monkeypatch):
    a = _Actor(shards={0: [LOST]}, probes=[DEAD])
    e = _engine(monkeypatch, [a])
    errors = _run(e)
    assert errors["lrp"].startswith("every Ray worker was lost; the last: ActorDiedError"), errors
    assert e.actors == [] and not e.lost and a.ran == [0]
    assert any("a Ray worker is gone for good, 0 left: ActorDiedError" in s for s in e.said), e.said


def test_why_lost_names_the_node_and_the_error_raised_there():
    """Ray's text for an actor whose creation failed on a node without relprop (Ray 2.60, shortened): the
    first line is Ray's preamble, the last the error the node raised."""

    class ActorDiedError(Exception):
        pass

    text = (
        "The actor died because of an error raised in its creation task, \x1b[36mray::_Worker.__init__()\x1b[39m "
        "(pid=1735, ip=10.1.2.3, actor_id=5c05)\n           ^^^^^\nRuntimeError: The actor with name _Worker "
        "failed to import on the worker. This may be because needed library dependencies are not installed in "
        'the worker environment:\n\n  File "/x/relprop/__init__.py", line 1, in <module>\n'
        "ModuleNotFoundError: No module named 'relprop'"
    )
    got = dist.why_lost(ActorDiedError(text))
    assert got == "ActorDiedError on node 10.1.2.3: ModuleNotFoundError: No module named 'relprop'"
    assert dist.why_lost(LOST).startswith("ActorUnavailableError: The actor None is unavailable")
