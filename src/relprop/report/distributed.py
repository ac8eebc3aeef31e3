"""The Ray engine of ``relprop compare --engine ray``: model x method x data shard on a pool of Ray actors.

Why an actor pool (and not Ray tasks or Ray Data): a worker must load a model once and keep it for every
method and shard of that model (loading a timm/HF model costs more than a shard's work); tasks would reload
it per call, and Ray Data's ``map_batches`` streams one function over one dataset, while a cell here is a
(model, method) pair with per-example metrics that need the whole shard at once. Fault tolerance: actors
have ``max_restarts``; a shard whose actor is lost (the worker process or its whole node died) goes back
to the driver's queue and runs again on any live actor, and the lost actor takes shards again once Ray has
restarted it (:meth:`RayEngine._run`). Not Ray's task retries: a retried task waits for its own actor's
restart, which never comes when the lost node's CPUs are nowhere else in the cluster (the run hung;
``tests/test_ray_nodes.py`` removes a node of a 3-node cluster mid-run). Nothing else is lost.

The unit of work is a shard of a cell's examples, aligned to ``--batch-size`` so that every explain call
sees the same batch as in the single-process engine. Each shard writes two files under
``OUT/shards/<model>__<method>__<cell key>/`` (or under ``RayOptions.shards``, any fsspec URL): ``NNNNN.pt`` (per-example curves, grid attributions; loaded
with ``weights_only=True``) and then ``NNNNN.parquet`` (one row per example in the schema of
``examples.parquet``, :func:`relprop.report.store.schema`), both written atomically. The Parquet file is the
commit mark: a shard whose Parquet reads back with this cell's key and row count is finished and is never
recomputed (a re-run after Ctrl-C resumes; ``--force`` recomputes). The driver assembles each cell from its
shards in shard order, with the same reductions as :meth:`relprop.report.compare.Job.compute_cell`, so the
numbers equal the single-process engine's bit for bit (``tests/test_ray_engine.py``; timings differ). That
needs every per-example value to depend on its own explain batch only: the perturbation metrics evaluate
one batch's copies at a time and the ``noise`` baseline draws per example
(:func:`relprop.report.cell_metrics.image_perturbation`, ``tests/test_sharding.py``).

Text data: the single-process engine pads every text of a model's samples to the longest of them, and the
padding length changes an explanation's bits (~1e-13 on a BERT), so the driver computes that length and
every shard pads its texts to it (``Job.prepare(pad_to=)``); the text metrics run one explain batch at a
time as the image metrics do (:func:`relprop.report.cell_metrics.text_perturbation`).

Data on a cluster: the workers never open the data's files. The driver, which reads the data anyway (its
labels, the cache key, the accuracy pass), reads each shard's stored items (file bytes, tar members, table
cells, texts: :meth:`relprop.specs.sources.Lazy.pack`) when it hands the shard out, puts them in Ray's
object store, and the worker decodes them with the decoder relprop uses in one process
(:func:`relprop.specs.sources.decode_member`), so a cluster needs the data on the driver's machine only and
the numbers stay the same. Why this and not Ray Data: Ray Data's readers (``read_binary_files``,
``read_parquet``, ...) run on the cluster's nodes and need the files there or at a shared URL, which is
the requirement this removes, and they cover only some of relprop's sources (not saved Hugging Face
datasets with relprop's column rules, nor WebDataset members chosen by relprop's order of preference);
``from_items`` would put the same items in the object store with a streaming executor between a shard
and its actor that the actor pool does not need. One mechanism serves every source kind; the driver
holds the items of the shards in flight only (one per worker), read one item at a time.

Model files on a cluster: the workers do not need them either. Loading a model on the driver notes the
files and folders the user named (``info["model_files"]``: an ``hf:`` folder, a checkpoint and its
``.json``, ``--weights``, a ``python:FILE.py``, ``--classes``; :func:`relprop.specs.loaders.model_path`);
the driver reads their bytes once per model (at most ``RayOptions.model_bytes``: past it, an error names
the file and the limit) and puts them in the object store, and each worker writes them to a private
temporary folder, runs the same loader on the copies (:func:`relprop.specs.loaders.placed`) and removes
the folder; the weights are the same bits, so are the numbers. The copies' paths differ from the
driver's, so a worker checks the weights' hash and the model classes' code against the driver's instead
of the files' paths. The Python source a spec imports from the user's folders (a ``python:MODULE:FUNCTION``
factory's module or its top-level package folder, a trusted pickle's class modules, the user modules
these import: ``info["model_modules"]``, :func:`relprop.specs.loaders.module_sources`) travels in the same bundle, under
the same limit, and is on the worker's ``sys.path`` only while the model loads; modules from an installed
environment (site-packages, the standard library) are not shipped, and compiled modules or namespace
packages over several folders are refused, naming the module and the fix. Why not Ray's ``runtime_env``
(``py_modules``, ``working_dir``): it is set for a whole job or actor (the actor pool serves every model of a
run) and uploads packages to the cluster's GCS under a size limit and a cache of its own, while a model's
bundle is already in the object store, read once, freed with the model, and under ``--model-files-limit``.
Not shipped: torchvision's/timm's cached pretrained weights (redirecting them would change process-wide hub
settings) and installed packages: those must be on every node. ``RayOptions(ship_models=False)``
(``--model-files shared``) loads from the paths as given and imports as the node finds, for files on storage
every node reaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..specs import LoadedModel, MethodSpec, SpecError
from ..specs.errors import extra_hint, shorten
from ..specs.loaders import MODEL_BYTES
from .compare import Job, Settings, cell_header, failed_cell, one_line, slug
from .store import Output

#: the Ray version the engine is tested with (requirements-test.txt)
RAY_VERSION = "2.60.0"
#: test hook: a path; the first shard started anywhere os._exit()s its worker after creating this file
CRASH_ENV = "RELPROP_RAY_CRASH_ONCE"
#: the metric keys each group of :func:`relprop.report.cell_metrics.wanted_groups` fills
_PERTURBATION = ("abpc", "insertion", "deletion", "insertion_minus_deletion")


@dataclass
class RayOptions:
    """How ``--engine ray`` runs. ``address``: join this cluster (``"auto"`` or ``ray://...``), else start a
    local instance with ``workers * cpus_per_worker`` CPUs; ``workers``: actors in the pool;
    ``gpus_per_worker``: GPUs each actor reserves (the model then runs on ``cuda``); ``shard_size``: examples
    per shard, a multiple of the batch size (default: the batch size); ``shards``: where the Parquet shards
    go, a folder or any fsspec URL (default ``OUT/shards``; the report itself is written to ``OUT``)."""

    address: str | None = None
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    shard_size: int | None = None
    #: a shard whose worker is lost (its process or node died) runs again at most this many times, and Ray
    #: restarts each actor at most this many times
    max_retries: int = 3
    shards: str | None = None
    #: ship the model files through the object store (False: every node reads them at the same paths)
    ship_models: bool = True
    #: the most bytes of one model's files that are shipped
    model_bytes: int = MODEL_BYTES


def _ray():
    try:
        import ray
    except ImportError:
        raise SpecError(f"--engine ray needs Ray: {extra_hint('ray')} (tested with ray=={RAY_VERSION})") from None
    return ray


def pad_length(job: Job, model: LoadedModel) -> int | None:
    """The token length the single-process engine pads ``model``'s samples to (``Job.prepare`` on all of
    ``job.indices``), for text data; None for images."""
    if job.data.kind != "text":
        return None
    from ..specs import text_batch

    texts = job.data.texts
    assert texts is not None
    return int(text_batch(model, [texts[i] for i in job.indices])["input_ids"].shape[1])


@dataclass
class _Loader:
    """Picklable spec -> LoadedModel for the workers: the driver's ``load`` callable, or ``load_model`` with
    the run's weights and class count; preprocessing overrides applied as in ``run_compare``. ``in_memory``:
    the specs ``load`` answers with a model it holds (the user's own, which travels pickled with it), whose
    files no worker reads."""

    load: Callable[[str], LoadedModel] | None = None
    weights: dict | None = None
    num_classes: int | None = None
    preprocess_overrides: dict | None = None
    in_memory: frozenset[str] = frozenset()

    def __call__(self, spec: str) -> LoadedModel:
        from ..specs import load_model, override_preprocess

        if self.load is not None:
            model = self.load(spec)
        else:
            model = load_model(spec, weights=(self.weights or {}).get(spec), num_classes=self.num_classes)
        if model.kind == "image" and self.preprocess_overrides:
            model.preprocess = override_preprocess(model.preprocess, **self.preprocess_overrides)
        return model


# ------------------------------------------------------------------------------------ shard files
def _names(index: int) -> tuple[str, str]:
    """The sidecar's and the Parquet table's names of shard ``index`` in its cell's folder."""
    return f"{index:05d}.pt", f"{index:05d}.parquet"


def read_shard(shard_dir: str | Path, index: int, key: str, n_rows: int) -> tuple[Any, dict] | None:
    """(Parquet table, sidecar dict) of a finished shard, or None when absent, unreadable, foreign or short.
    ``shard_dir``: a local folder or an fsspec URL."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .store import schema

    o = Output(shard_dir, flag="--shards")
    side, table_path = _names(index)
    try:
        if not o.exists(table_path) or not o.exists(side):
            return None
        table = pq.read_table(pa.BufferReader(o.read_bytes(table_path)))
        meta = json.loads((table.schema.metadata or {}).get(b"relprop_shard", b"{}"))
        extra = torch.load(io.BytesIO(o.read_bytes(side)), map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not table.schema.equals(schema()) or meta.get("key") != key or table.num_rows != n_rows:
        return None
    if not isinstance(extra, dict) or extra.get("key") != key:
        return None
    return table, extra


def write_shard(shard_dir: str | Path, index: int, key: str, rows: list[dict], extra: dict) -> None:
    """Shard ``index`` of a cell: the sidecar first, then the Parquet table (the commit mark)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .store import schema

    o = Output(shard_dir, flag="--shards")  # a folder (temporary file renamed) or a URL (one put per file)
    side, table_path = _names(index)
    buf = io.BytesIO()
    torch.save(dict(extra, key=key), buf)
    o.write_bytes(side, buf.getvalue())
    sch = schema().with_metadata({"relprop_shard": json.dumps({"key": key, "index": index})})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=sch), sink)
    o.write_bytes(table_path, sink.getvalue().to_pybytes())  # last: the commit mark


# ------------------------------------------------------------------------------------ one shard
def compute_shard(
    job: Job, model: LoadedModel, m: MethodSpec, a: int, b: int, run: str, pad_to: int | None = None
) -> tuple[list[dict], dict]:
    """Per-example rows and the sidecar of examples ``job.indices[a:b]`` (``a`` a multiple of the batch
    size): the computation of :meth:`Job.compute_cell` restricted to them. The class-sensitivity and
    randomisation examples (the first ``--sensitivity-samples``/``--randomisation-samples``) are computed
    by the shards that hold them. ``pad_to``: texts are padded to this length (:func:`pad_length`)."""
    from . import cell_metrics

    s = job.s
    opts = job.options(model, m)
    idx = job.indices[a:b]
    prep = job.prepare(model, idx, pad_to=pad_to)
    fn = job.explain_fn(model, m, opts)
    n = b - a
    x, target = prep.inputs, prep.target
    t0 = time.time()
    attr = fn(model.module, x, target)
    t_explain = time.time() - t0
    t1 = time.perf_counter()
    rows: dict[str, torch.Tensor] = {}
    text = job.data.kind == "text"
    if text:
        res = cell_metrics.text_perturbation(model.module, model.tokenizer, x, attr, target, s, rows=rows)
    else:
        res = cell_metrics.image_perturbation(model.module, x, attr, target, s, False, rows=rows, examples=list(idx))
    per = res["per_example"]
    groups = cell_metrics.wanted_groups(s)
    local = dataclasses.replace(
        s,
        sensitivity_samples=max(0, min(s.sensitivity_samples, b) - a),
        randomisation_samples=max(0, min(s.randomisation_samples, b) - a),
    )
    extra: dict[str, Any] = {}
    if {"sensitivity", "randomisation"} & cell_metrics.wanted_groups(local):
        module, xf, efn = job.sanity_setup(model, fn, x)
        sc = cell_metrics.sanity_checks(module, xf, efn, target, n, local, rows=rows)
        per.update(sc.pop("per_example"))
        if "randomisation_layers" in sc:
            extra["randomisation_layers"] = sc["randomisation_layers"]
    metric_seconds = time.perf_counter() - t1
    g = max(0, min(s.grid, b) - a)
    if text:  # each text's tokens without the padding, as Job._metrics keeps them
        grid: Any = [attr[i][x["attention_mask"][i].bool()].clone() for i in range(g)]
    else:
        grid = (attr[:g].sum(1) if attr.dim() == 4 else attr[:g]).detach().cpu().clone()
    values = {
        "example": [int(i) for i in idx],
        "label": [int(v) for v in prep.labels],
        "prediction": [int(v) for v in prep.pred],
        "target": [int(v) for v in target],
        **per,
        "explain_seconds": [t_explain / max(n, 1)] * n,
    }
    entry = {"spec": model.spec, "name": model.name}
    cell = {"method": m.label, "examples": values}
    from .store import example_rows

    out_rows = example_rows(run, entry, cell)
    extra.update(
        rows={k: v.detach().cpu() for k, v in rows.items()},
        grid=grid,
        curves={k: res["curves"][k] for k in ("unit", "region_fractions", "fractions")},
        perturbation=res["perturbation"],
        groups=sorted(groups & ({"sensitivity", "randomisation"} | {"perturbation"})),
        explain_seconds=t_explain,
        metric_seconds=metric_seconds,
        n=n,
    )
    if s.save_attributions:
        extra["attributions"] = attr.detach().float().cpu()
    return out_rows, extra


class _Worker:
    """One actor of the pool: the job and the model of the cells it is given, loaded once."""

    def __init__(self, methods, settings, out: str, loader: _Loader, threads: int, use_gpu: bool):
        torch.set_num_threads(max(1, threads))
        self.args = (list(methods), settings, out)  # a folder or URL; workers write nothing under it
        self.job: Job | None = None
        self.loader = loader
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it reserved for this actor (--gpus-per-worker); the model
        # goes to settings.device/dtype as run_compare places it (relprop.report.device)
        self.gpus = torch.cuda.device_count() if use_gpu else 0
        self.model: LoadedModel | None = None

    def _job(self, data_ref: list) -> Job:
        """The data arrive with the first shard, as a reference nested in a list (so Ray passes the reference
        and this actor fetches it once), not as a constructor argument that a restart would need pinned."""
        if self.job is None:
            import ray

            methods, settings, out = self.args
            data = ray.get(data_ref[0])
            self.job = Job(out, data, methods, settings, use_cache=False, progress=False, log=lambda _: None)
        return self.job

    def _model(self, spec: str, files: list, identity: dict) -> LoadedModel:
        """The model of ``spec``, loaded once. ``files``: ``[reference]`` to its shipped files
        (:func:`relprop.specs.loaders.read_model_files`) or ``[None]``; from shipped files, the model takes the
        driver's fingerprint when its weights and code are the driver's (its files' paths are not)."""
        if self.model is None or self.model.spec != spec:
            import ray

            from ..specs.loaders import placed
            from .device import place_loaded

            self.model = None  # one model at a time: the previous one is released first
            s = self.args[1]
            bundle = ray.get(files[0]) if files[0] is not None else None
            with placed(bundle):
                try:
                    model = place_loaded(self.loader(spec), s.device, s.dtype, copy=False)
                except Exception as ex:  # the driver loaded it: say which node could not, and what it lacks
                    hint = ""
                    if isinstance(ex, (ImportError, OSError)):  # a package, or hub weights (a download), not there
                        hint = (
                            "; installed packages (relprop's extras, the model's library) and cached pretrained "
                            "weights are not shipped: install or cache them on every node"
                        )
                    raise SpecError(
                        f"{spec} could not be loaded on Ray node {self.node()}: {one_line(ex)}{hint}"
                    ) from ex
                if bundle is not None:
                    assert self.job is not None
                    got = _identity(self.job, model, shipped=True)
                    if all(got[k] == identity.get(k) for k in got):
                        model._fingerprint = identity["fingerprint"]
            self.model = model
        return self.model

    def ready(self) -> bool:
        """The driver's probe of an actor it lost: answers once Ray has restarted it."""
        return True

    @staticmethod
    def node() -> str:
        """This worker's node, as errors name it: its IP address and the start of its Ray node id."""
        import ray

        return f"{ray.util.get_node_ip_address()} (id {ray.get_runtime_context().get_node_id()[:12]})"

    def run_shard(
        self,
        data_ref: list,
        files: list,
        items: dict | None,
        pad_to: int | None,
        spec: str,
        m: MethodSpec,
        key: str,
        identity: dict,
        a: int,
        b: int,
        shard_dir: str,
        index: int,
        run: str,
    ) -> int:
        """Compute and write shard ``index`` (examples ``a:b``) of the cell ``spec`` x ``m``; ``items``: the
        stored items of its examples (:func:`relprop.specs.sources.pack_items`; None: in-memory data);
        ``files``: ``[reference]`` to the model's shipped files, or ``[None]``."""
        from ..specs.sources import hold_items

        job = self._job(data_ref)
        hold_items(job.data, items)
        marker = os.environ.get(CRASH_ENV)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(f"worker {os.getpid()} killed on shard {index} of {spec} x {m.label}\n")
            os._exit(1)
        model = self._model(spec, files, identity)
        mine = job.cell_key(model, m, job.options(model, m))
        if mine != key:
            got = _identity(job, model, shipped=files[0] is not None)
            differ = [k for k in got if got[k] != identity.get(k)]
            differ = differ or ["method options or settings"]
            raise SpecError(
                f"a Ray worker on node {self.node()} computes a different cell key for {spec} x {m.label} than "
                f"the driver: its "
                f"{', '.join(differ)} differ(s) from the driver's (relprop source edited during the run, another "
                f"relprop or model code on this node, or other model files where they are not shipped; the data "
                f"travel with the shards); run again with the same relprop, libraries and model files on every node"
            )
        rows, extra = compute_shard(job, model, m, a, b, run, pad_to)
        write_shard(shard_dir, index, key, rows, extra)
        return index


# ------------------------------------------------------------------------------------ the engine
class RayEngine:
    """The pool and the bookkeeping of one ``run_compare``: :meth:`cells` computes a model's cells."""

    def __init__(
        self,
        data,
        methods: Sequence[MethodSpec],
        settings: Settings,
        out: str | Path | Output,
        *,
        options: RayOptions | None = None,
        loader: _Loader | None = None,
        run: str = "",
        log: Callable[[str], None] = print,
    ):
        ray = _ray()
        self.ray = ray
        self.o = o = options or RayOptions()
        if o.workers < 1:
            raise SpecError(f"--workers must be at least 1, got {o.workers}")
        size = o.shard_size or settings.batch_size
        if size % settings.batch_size:
            raise SpecError(f"the shard size ({size}) must be a multiple of --batch-size ({settings.batch_size})")
        self.shard_size = size
        self.settings, self.out, self.log = settings, Output(out), log
        where, self.shards = shard_output(self.out, o.shards)  # a bad URL fails here, before Ray starts
        if where.in_process:
            raise SpecError(
                f"--shards {self.shards}: a memory:// file system lives in one process, and Ray's workers are "
                f"other processes; use a folder or a URL that every worker reaches"
            )
        self.run = run  # the run id of the rows (run_compare's, which its examples.parquet carries)
        self.started = False
        if not ray.is_initialized():
            # Usage stats: nothing set here (the environment is the process's, not ours). Ray's release wheels
            # turn them off themselves when ray.init starts a local instance, before starting its processes;
            # a cluster joined with --address reports (or not) as its owner configured it.
            kw: dict[str, Any] = dict(
                include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True
            )
            address = o.address or os.environ.get("RAY_ADDRESS")  # Ray's own variable (a job on a cluster)
            if address:
                from ..specs.address import check_ray_address

                check_ray_address(address)  # nothing listening: one line in seconds, not minutes of GCS retries
                ray.init(address=address, **kw)
            else:  # "local": a new instance, never one a past `ray start` left on record (stale or not)
                ray.init(address="local", num_cpus=o.workers * o.cpus_per_worker, **kw)
            self.started = True
        self.loader = loader or _Loader()
        env = {k: os.environ[k] for k in (CRASH_ENV,) if k in os.environ}
        remote = ray.remote(_Worker).options(
            num_cpus=o.cpus_per_worker,
            num_gpus=o.gpus_per_worker,
            max_restarts=o.max_retries,
            max_task_retries=0,  # the driver retries a lost shard itself, on any live actor (_run)
            runtime_env={"env_vars": env} if env else None,
        )
        self.data_ref: Any = None  # the run's data without its readers (sources.detach), put by the first cells()
        self.actors = [
            remote.remote(
                list(methods), settings, self.out.where(), self.loader, o.cpus_per_worker,
                o.gpus_per_worker > 0,
            )
            for _ in range(o.workers)
        ]  # fmt: skip
        self.shards_computed = 0
        self.shards_reused = 0
        self.shards_retried = 0  # shards run again because their actor was lost
        self.lost: dict[Any, float] = {}  # actors lost (restarting, or not yet known) -> when to probe next
        self.lost_reason = ""
        self.finished: dict[str, dict] = {}  # cells() interrupted: the cells whose every shard was done

    def info(self) -> dict:
        return {
            "name": "ray",
            "ray": self.ray.__version__,
            "address": self.o.address or "local",
            "workers": self.o.workers,
            "cpus_per_worker": self.o.cpus_per_worker,
            "gpus_per_worker": self.o.gpus_per_worker,
            "shard_size": self.shard_size,
            "shards": self.shards,
            "shards_computed": self.shards_computed,
            "shards_reused": self.shards_reused,
            "shards_retried": self.shards_retried,
        }

    def shard_dir(self, model: LoadedModel, m: MethodSpec, key: str) -> str:
        """The folder (or URL) of one cell's shards."""
        return f"{self.shards}/{slug(model.spec)}__{slug(m.label)}__{key}"

    def cells(self, model: LoadedModel, job: Job, methods: Sequence[MethodSpec]) -> dict[str, dict]:
        """Cells of ``model`` for ``methods`` (label -> the dict :meth:`Job.compute_cell` returns, or a
        failed cell), each saved in ``job``'s cache as the single-process engine does."""
        bounds = shard_bounds(min(self.settings.samples, len(job.indices)), self.shard_size)
        plan: dict[str, tuple[MethodSpec, dict, str, str]] = {}
        todo: list[tuple[str, int]] = []
        errors: dict[str, str] = {}
        for m in methods:
            try:
                opts = job.options(model, m)
            except Exception as ex:
                errors[m.label] = f"{type(ex).__name__}: {ex}"
                continue
            key = job.cell_key(model, m, opts)
            d = self.shard_dir(model, m, key)
            plan[m.label] = (m, opts, key, d)
            for i, (a, b) in enumerate(bounds):
                if not job.force and read_shard(d, i, key, b - a) is not None:
                    self.shards_reused += 1
                else:
                    todo.append((m.label, i))
        self.job_of_run = job
        if self.data_ref is None:
            from ..specs.sources import detach

            self.data_ref = self.ray.put(detach(job.data))
        pad = pad_length(job, model) if todo else None
        files: Any = None
        if todo:
            try:  # read once per model, freed when its cells are done
                bundle = model_bundle(model, self.loader, self.o)
                files = None if bundle is None else self.ray.put(bundle)
            except SpecError as ex:  # too large, or gone: the model's cells fail with the reason
                errors.update({label: f"SpecError: {ex}" for label, _ in todo})
        self.finished = {}
        try:
            self._run(model, plan, bounds, todo, errors, pad, files)
        except KeyboardInterrupt:  # keep the cells whose every shard is done, for the interrupted report
            for m in methods:
                if m.label in plan and m.label not in errors:
                    with contextlib.suppress(Exception):  # a shard not written yet: not finished
                        self.finished[m.label] = self._assemble(job, model, m, *plan[m.label][1:], bounds)
            raise
        out: dict[str, dict] = {}
        for m in methods:
            if m.label in errors:
                out[m.label] = failed_cell(m, errors[m.label])
                continue
            _, opts, key, d = plan[m.label]
            try:
                out[m.label] = self._assemble(job, model, m, opts, key, d, bounds)
            except Exception as ex:
                out[m.label] = failed_cell(m, ex)
        return out

    def _run(self, model, plan, bounds, todo, errors, pad: int | None, files: Any) -> None:
        """Hand ``todo``'s shards to free actors until each is written or its cell has failed.

        A shard whose actor is lost (its process or its whole node died: Ray's ``RayActorError``) goes back to
        the queue for any live actor, at most ``max_retries`` times, unless its Parquet file is there (it
        finished before the loss, and is not run again). The lost actor is probed (``ready``) until Ray has
        restarted it, then takes shards again. Ray's own task retries are off: a retried task waits for its
        actor's restart, which never comes when the lost node's CPUs are nowhere else, and the run hung
        (``tests/test_ray_nodes.py`` removes a node of a 3-node cluster mid-run)."""
        from ..specs.sources import pack_items

        ray = self.ray
        job = self.job_of_run
        ident = dict(_identity(job, model, shipped=files is not None), fingerprint=model.fingerprint())
        free = [a for a in self.actors if a not in self.lost]
        pending = list(todo)
        inflight: dict[Any, tuple[Any, str, int]] = {}
        probes: dict[Any, Any] = {}  # a ready() call -> the lost actor it probes
        tries: dict[tuple[str, int], int] = {}
        said = False
        try:
            while True:
                pending = [t for t in pending if t[0] not in errors]
                while free and pending:
                    label, i = pending.pop(0)
                    m, _, key, d = plan[label]
                    actor = free.pop(0)
                    a, b = bounds[i]
                    # the shard's stored items, read here and freed when it is done (job.indices[0] as well: a
                    # worker resolves input-dependent method options on the first sample)
                    got = pack_items(job.data, [*job.indices[a:b], job.indices[0]])
                    items = None if got is None else ray.put(got)
                    ref = actor.run_shard.remote(
                        [self.data_ref], [files], items, pad, model.spec, m, key, ident, a, b, d, i, self.run
                    )
                    inflight[ref] = (actor, label, i)
                if not pending and not inflight:
                    break
                now = time.monotonic()
                for actor, when in self.lost.items():
                    if when <= now and actor not in probes.values():
                        probes[actor.ready.remote()] = actor
                if not inflight and not self.lost:  # every actor is gone for good: nothing can run the rest
                    for label, _ in pending:
                        errors.setdefault(label, f"every Ray worker was lost; the last: {self.lost_reason}")
                    break
                if not inflight and not said:
                    said = True
                    self.log("  waiting for Ray to restart a lost worker (the cluster has no free CPUs/GPUs for it)")
                later = [w - now for a, w in self.lost.items() if a not in probes.values()]
                timeout = max(0.0, min(later)) if later else None
                waiting = [*inflight, *probes]
                if not waiting:
                    time.sleep(timeout or 0.0)
                    continue
                done, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
                if not done:
                    continue
                if done[0] in probes:
                    self._probed(probes.pop(done[0]), done[0], free)
                    continue
                actor, label, i = inflight.pop(done[0])
                try:
                    ray.get(done[0])
                except ray.exceptions.RayActorError as ex:
                    self.lost[actor] = 0.0  # probed at once: Ray may be restarting it already
                    self.lost_reason = why_lost(ex)
                    m, _, key, d = plan[label]
                    a, b = bounds[i]
                    if read_shard(d, i, key, b - a) is not None:  # written before the loss: kept
                        self.shards_computed += 1
                    elif tries.get((label, i), 0) >= self.o.max_retries:
                        errors.setdefault(
                            label,
                            f"shard {i} lost its Ray worker {tries[label, i] + 1} times; the last: {self.lost_reason}",
                        )
                    else:
                        tries[label, i] = tries.get((label, i), 0) + 1
                        self.shards_retried += 1
                        pending.insert(0, (label, i))
                        self.log(f"  a Ray worker was lost: shard {i} of {model.name} × {label} runs again")
                except Exception as ex:  # the method failed on this model: the cell fails
                    free.append(actor)
                    errors.setdefault(label, one_line(getattr(ex, "cause", None) or ex))
                else:
                    free.append(actor)
                    self.shards_computed += 1
        except BaseException:
            for ref in [*inflight, *probes]:
                ray.cancel(ref, force=False)
            raise

    def _probed(self, actor: Any, ref: Any, free: list) -> None:
        """The answer of a lost actor's probe: back in the pool, restarting still (probed again in a second),
        or dead for good (its restarts used up: out of the pool)."""
        try:
            self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError:
            self.lost[actor] = time.monotonic() + 1.0
        except self.ray.exceptions.RayActorError as ex:
            del self.lost[actor]
            self.actors.remove(actor)
            self.lost_reason = why_lost(ex)
            hint = ""
            if "ModuleNotFoundError" in self.lost_reason or "ImportError" in self.lost_reason:
                hint = " (relprop and the libraries it uses must be installed on every node)"
            self.log(f"  a Ray worker is gone for good, {len(self.actors)} left: {self.lost_reason}{hint}")
        else:
            del self.lost[actor]
            free.append(actor)

    def _assemble(self, job: Job, model, m: MethodSpec, opts: dict, key: str, d: str, bounds) -> dict:
        """One cell from its shards, reduced in shard order as :meth:`Job.compute_cell` reduces."""
        from ..metrics._utils import nanmean
        from . import cell_metrics

        s = self.settings
        parts = []
        for i, (a, b) in enumerate(bounds):
            got = read_shard(d, i, key, b - a)
            if got is None:
                raise RuntimeError(f"shard {i} of {model.spec} x {m.label} is missing or invalid in {d}")
            parts.append(got)
        n = bounds[-1][1] if bounds else 0
        first = parts[0][1]
        columns: dict[str, list] = {}
        for table, _ in parts:
            for name, vals in table.to_pydict().items():
                columns.setdefault(name, []).extend(vals)
        groups = set(first["groups"])
        keys = list(_PERTURBATION)
        if "sensitivity" in groups:
            keys.append("class_sensitivity")
        if "randomisation" in groups:
            keys.append("randomisation_similarity")
        per = {k: columns[k] for k in keys}
        per["explain_seconds"] = columns["explain_seconds"]
        t_explain = sum(e["explain_seconds"] for _, e in parts)

        def cat(name: str, dim: int = 0) -> torch.Tensor | None:
            got = [e["rows"][name] for _, e in parts if name in e["rows"]]
            return torch.cat(got, dim) if got else None

        def curve_rows(name: str) -> torch.Tensor:
            rows = cat(name)
            if rows is None:
                raise RuntimeError(f"the shards of {model.spec} x {m.label} hold no {name} curves")
            return rows

        def mean_curve(name: str) -> list:
            return cell_metrics._list(curve_rows(name).mean(0))  # the single-process reduction, same rows

        c = first["curves"]
        curves = {
            "unit": c["unit"],
            "region_fractions": c["region_fractions"],
            "morf": mean_curve("morf"),
            "lerf": mean_curve("lerf"),
            "fractions": c["fractions"],
            "insertion": mean_curve("insertion"),
            "deletion": mean_curve("deletion"),
        }
        res: dict[str, Any] = cell_header(m, opts, n, key)
        perturbation = dict(first["perturbation"])
        if job.data.kind == "text":  # the flag over all of the cell's curves, as text_perturbation sets it
            perturbation.pop("warning", None)
            flat = cell_metrics.flat_warning(*(curve_rows(k) for k in ("morf", "lerf", "insertion")))
            if flat:
                perturbation["warning"] = flat
        res.update({"curves": curves, "perturbation": perturbation})
        sim = cat("randomisation", 1)
        if sim is not None:
            res["randomisation_layers"] = first["randomisation_layers"]
            res["randomisation_curve"] = cell_metrics._list(
                torch.tensor([nanmean(r) for r in sim], dtype=torch.float64)
            )
        res["metric_seconds"] = round(sum(e["metric_seconds"] for _, e in parts), 3)
        res["examples"] = {k: columns[k] for k in ("example", "label", "prediction", "target")} | per
        res["summary"] = cell_metrics.summary_of(per, s)
        for k, v in res["summary"].items():
            res[k] = v["mean"]
        res["randomisation_check"] = cell_metrics.randomisation_verdict(res["summary"], s.randomisation_threshold)
        grids = [e["grid"] for _, e in parts]
        res["grid_attributions"] = (
            [g for grid in grids for g in grid] if isinstance(grids[0], list) else torch.cat(grids)
        )[: min(s.grid, n)]
        res["explain_seconds_per_sample"] = round(t_explain / max(n, 1), 6)
        if s.save_attributions:
            from .store import save_attributions

            attr = torch.cat([e["attributions"] for _, e in parts])
            res["attributions_file"] = save_attributions(self.out, model.spec, m.label, attr, s.save_attributions)
        res["seconds"] = round(t_explain + sum(e["metric_seconds"] for _, e in parts), 2)
        if job.use_cache:
            job.save_cell(model, m, key, res)
        res["reused"] = False
        return res

    def close(self) -> None:
        """Release the actors; shut Ray down when this engine started it."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self.actors = []
        self.data_ref = None
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def model_bundle(model: LoadedModel, loader: _Loader, options: RayOptions) -> dict | None:
    """The bytes of the files and Python modules the workers need to load ``model``
    (:func:`relprop.specs.loaders.read_model_files`), or None: nothing to ship (none, ``ship_models=False``,
    or a model the loader holds in memory)."""
    from ..specs.loaders import read_model_files

    files, modules = model.info.get("model_files"), model.info.get("model_modules")
    if not (files or modules) or not options.ship_models or model.spec in loader.in_memory:
        return None
    return read_model_files(files or {}, options.model_bytes, modules)


def why_lost(ex: BaseException) -> str:
    """A lost actor's error in one line: its type, the node's address where Ray's text names it, and the last
    line of that text, which for an actor that died in its creation task (relprop or a library it imports
    missing on that node) is the error raised there (``ModuleNotFoundError: ...``), not Ray's preamble."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(ex)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ip = re.search(r"\bip=([0-9A-Fa-f.:]+)", text)
    where = f" on node {ip.group(1)}" if ip else ""
    return shorten(f"{type(ex).__name__}{where}: {lines[-1] if lines else ''}")


def _identity(job: Job, model: LoadedModel, shipped: bool) -> dict[str, str]:
    """The parts of a cell key that a node can disagree on, to name the one that differs. For shipped model
    files (the driver's bytes under other paths): the weights and the code of the model's classes instead of
    the files' fingerprint, which hashes their paths."""
    from ..specs.hashing import module_code_hash, relprop_source_hash, state_hash

    ident = {"relprop source": relprop_source_hash(), "data": str(job.data.fingerprint())}
    if shipped:
        ident.update({"model weights": state_hash(model.module), "model code": module_code_hash(model.module)})
    else:
        ident["model files"] = str(model.fingerprint())
    return ident


def shard_output(out: Output, shards: str | None) -> tuple[Output, str]:
    """``(the file system, the folder)`` the shards go to: ``--shards`` or the report's ``shards`` folder, a
    local one as an absolute path (workers on a cluster joined with ``--address`` run in other working folders)."""
    if not shards:
        return out, out.where("shards").rstrip("/")
    where = Output(shards, flag="--shards")
    return where, where.where().rstrip("/")


def shard_folder(out: Output, shards: str | None) -> str:
    """The folder of :func:`shard_output` (for messages)."""
    return shard_output(out, shards)[1]


def shard_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in steps of ``size``."""
    return [(a, min(a + size, n)) for a in range(0, n, max(1, size))]


__all__ = ["CRASH_ENV", "RAY_VERSION", "RayEngine", "RayOptions", "compute_shard", "pad_length", "read_shard"]
