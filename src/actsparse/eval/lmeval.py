"""lm-evaluation-harness on a model object as it is now: dense, sparsified, weight-pruned or calibrated.

    from actsparse.eval.lmeval import TaskSettings, prepare_tasks, evaluate_tasks
    tasks = prepare_tasks(TaskSettings(tasks=("actsparse_lastword", "arc_easy")), eval_source)
    scores = evaluate_tasks(model, tokenizer, tasks)      # {"lm_eval_version": ..., "tasks": {name: {"acc": ...}}}

The model is wrapped, not copied (lm-eval's ``HFLM(pretrained=model)``), so whatever
``sparsify_`` / ``prune_weights_`` / ``load_state_`` did to it is what lm-eval measures.
Zero-shot, fixed batch size, BOS exactly as the tokenizer adds it by default (docs/methods.md, Zero-shot tasks).
``actsparse_lastword`` / ``actsparse_continuation`` name the offline proxy tasks of
``proxy_tasks``: they are built from the evaluation text into the task directory first.
lm-eval is imported only here and only when tasks are asked for (``pip install actsparse[eval]``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import actsparse.validate as validate
from actsparse.errors import ActsparseError
from actsparse.eval import proxy_tasks
from actsparse.models.loading import tokenizer_adds_bos
from actsparse.paths import cache_dir

INSTALL = "pip install 'actsparse[eval]'"
METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity")


def require_lm_eval():
    """Import lm_eval, or explain how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise ActsparseError(
            f"zero-shot tasks run through lm-evaluation-harness, which is not installed ({e}); fix: {INSTALL} "
            f"(or run without tasks)"
        ) from e
    return lm_eval


def lm_eval_version() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class TaskSettings:
    """Which lm-eval tasks to run and how (everything that changes their numbers).

    - ``tasks``: lm-eval task names; ``actsparse_lastword`` / ``actsparse_continuation`` are the
      offline proxies built from the evaluation text (also accepted with their corpus suffix).
    - ``task_dir``: where the proxy tasks are written (and any other local task YAMLs are found);
      default: a folder in the actsparse cache named after the text, seed and count.
    - ``batch_size``: lm-eval batch size (results change with it; recorded).
    - ``limit``: only the first N documents of each task (None: all).
    - ``proxy_seed`` / ``proxy_count``: seed and items per proxy task.
    """

    tasks: tuple[str, ...] = ()
    task_dir: str | None = None
    batch_size: int = 1
    limit: int | None = None
    proxy_seed: int = 0
    proxy_count: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "tasks", validate.names("tasks", self.tasks))
        validate.text("task_dir", self.task_dir, optional=True)
        validate.whole("task batch size", self.batch_size)
        validate.whole("task limit", self.limit, optional=True)
        validate.whole("proxy_seed", self.proxy_seed, minimum=None)
        validate.whole("proxy_count", self.proxy_count)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PreparedTasks:
    """Task names resolved for one evaluation text, and the directory lm-eval should also search."""

    names: tuple[str, ...]
    include: str | None
    settings: TaskSettings
    proxies: dict  # task name -> its entry in the proxy manifest (source, seed, items, sha256)


def _is_proxy(name: str) -> bool:
    return any(name == kind or name.startswith(kind + "_") for kind in proxy_tasks.KINDS)


def prepare_tasks(settings: TaskSettings, source) -> PreparedTasks:
    """Resolve proxy task names for the evaluation text ``source`` and write their files.

    Proxy tasks are always built from ``source`` — the evaluation text — never from calibration text.
    """
    names, include, proxies = [], settings.task_dir, {}
    if any(_is_proxy(name) for name in settings.tasks):
        directory = settings.task_dir or str(
            cache_dir() / "tasks" / f"{proxy_tasks.corpus_slug(source.spec)}-seed{settings.proxy_seed}-n{settings.proxy_count}"
        )
        written = proxy_tasks.write_proxy_tasks(source, directory, seed=settings.proxy_seed, count=settings.proxy_count)
        include = str(written.directory)
        for name, entry in written.manifest["tasks"].items():
            proxies[name] = {"source": written.manifest["source"], "seed": settings.proxy_seed, **entry}
    for name in settings.tasks:
        if _is_proxy(name):
            kind = next(k for k in proxy_tasks.KINDS if name == k or name.startswith(k + "_"))
            resolved = proxy_tasks.task_name(kind, source.spec)
            if name not in (kind, resolved):
                raise ActsparseError(
                    f"proxy task '{name}' is not built from the evaluation text {source.spec} (that one is '{resolved}'); "
                    f"ask for '{kind}' and it follows --data"
                )
            name = resolved
        if name not in names:
            names.append(name)
    return PreparedTasks(tuple(names), include, settings, proxies)


@functools.lru_cache(maxsize=8)
def _build_manager(include: str | None, defaults: bool):
    """Indexing lm-eval's built-in tasks takes seconds: once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def _task_manager(prepared: PreparedTasks):
    """lm-eval's TaskManager; its built-in tasks are indexed only when a requested task is not local."""
    local = set()
    if prepared.include:
        local = {p.stem for p in Path(prepared.include).glob("*.yaml")}
    manager = _build_manager(prepared.include, not set(prepared.names) <= local)
    known = set(manager.all_tasks)
    for name in prepared.names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise ActsparseError(
                f"lm-eval has no task '{name}'"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f"; proxies: {', '.join(proxy_tasks.KINDS)}"
            )
    return manager


@contextmanager
def _lm_eval_logging(progress: bool):
    """lm-eval's info and warnings (one per task and model) only when progress is shown."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not progress:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _scores(result: dict) -> dict:
    scores = {}
    for key, value in result.items():
        metric, _, flt = key.partition(",")
        if metric in METRICS and isinstance(value, (int, float)):
            scores[metric if flt == "none" else f"{metric},{flt}"] = float(value)
    return scores


def evaluate_tasks(model, tokenizer, prepared: PreparedTasks, progress: bool = False) -> dict:
    """Run the prepared tasks 0-shot on ``model`` as it is now; returns the record's ``tasks`` part.

    Per task: acc, acc_norm (multiple choice) or acc, perplexity (last word), the number of
    documents, lm-eval's task version, and ``proxy`` (what it was built from) for actsparse's own
    proxies. Also lm-eval's version, the batch size, the limit and whether BOS was added.
    """
    if not prepared.names:
        return {}
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(prepared)
    bos = tokenizer_adds_bos(tokenizer)
    settings = prepared.settings
    start = time.perf_counter()
    with _lm_eval_logging(progress):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, add_bos_token=bos)
        try:
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(prepared.names), task_manager=manager, num_fewshot=0, limit=settings.limit,
                bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                fewshot_random_seed=1234,
            )  # fmt: skip
        except ActsparseError:
            raise
        except (OSError, ConnectionError, ValueError, RuntimeError) as e:
            local = [n for n in prepared.names if n not in prepared.proxies]
            hint = (
                f"; the data of {', '.join(local)} comes from the Hugging Face hub, which may not be reachable here — the offline "
                f"proxies {', '.join(proxy_tasks.KINDS)} need no network"
                if local else ""
            )  # fmt: skip
            raise ActsparseError(f"lm-eval could not run {', '.join(prepared.names)}: {type(e).__name__}: {e}{hint}") from e
    results, versions, samples = output["results"], output.get("versions", {}), output.get("n-samples", {})
    tasks = {}
    for name in prepared.names:
        entry = {**_scores(results.get(name, {})), "version": versions.get(name)}
        count = samples.get(name, {})
        entry["documents"] = count.get("effective", count.get("original")) if isinstance(count, dict) else None
        if name in prepared.proxies:
            entry["proxy"] = prepared.proxies[name]
        tasks[name] = entry
    return {
        "tasks": tasks,
        "lm_eval": {
            "version": lm_eval_version(), "batch_size": settings.batch_size, "num_fewshot": 0, "limit": settings.limit,
            "add_bos_token": bos, "seconds": time.perf_counter() - start, "task_dir_sha256": _dir_hash(prepared),
        },
    }  # fmt: skip


def _dir_hash(prepared: PreparedTasks) -> str | None:
    """sha256 over the proxy tasks' data, so a record says exactly which items were scored."""
    if not prepared.proxies:
        return None
    digest = hashlib.sha256()
    for name in sorted(prepared.proxies):
        digest.update(f"{name}:{prepared.proxies[name]['sha256']}\n".encode())
    return digest.hexdigest()
