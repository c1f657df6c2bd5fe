"""Does sparsity make this model faster? Dense and sparse timed in one process.

:func:`run_bench` measures, for a model and a sparsity config:

- **prefill**: the latency of one forward pass over a prompt of ``T`` tokens (only the last
  position's logits, as generation needs), for each ``T``;
- **decode**: tokens per second of greedy decoding after a prompt, at each batch size, through a
  static KV cache.

Each in the modes users run: ``eager`` (an ordinary HF forward per call), ``graph`` (the
same forward captured once as a CUDA graph and replayed; decode uses HF's ``StaticCache``, and
the step's position and next token live on the GPU, so a replay is one whole step) and
``compile`` (the forward through ``torch.compile(fullgraph=True)``, then captured as a CUDA graph
like ``graph``: the way gpt-fast runs a model; on the CPU, compiled without a graph). Each
compile-mode case compiles afresh, for the dense and the sparse model alike. The dense
model is timed first, then the same weights sparsified, with the same inputs. Before timing,
every distinct sparse layer's fast path is checked against the PyTorch reference of the same
config (rows 1, 2 and 16), and the first logits of both are compared.

Models: anything :func:`actsparse.load_model` takes, or a random-weight shape preset
(:data:`PRESETS`: ``llama3-8b``, ``qwen2.5-7b`` and the small ``tiny-llama`` for CPU tests).
Timing uses CUDA events (host clock on the CPU), warm-up calls first, medians of repeats, and
fresh random token ids per repeat.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from actsparse._version import __version__
from actsparse.config import SparsityConfig
from actsparse.core.dispatch import GRAPH
from actsparse.core.shared_input import unlink_shared_input
from actsparse.core.tuning import fastest, tune_, tuned_from_dict
from actsparse.errors import ActsparseError
from actsparse.kernels import gemv_one
from actsparse.kernels.sparse_gemv import MAX_ROWS
from actsparse.sparsify import sparse_layers, sparsify_, unsparsify_
from actsparse.timing import Timer, capture_graph  # noqa: F401  (capture_graph: also imported from here)

PRESETS = {
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=32,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        vocab_size=152064,
        rope_theta=1000000.0,
    ),
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=512,
    ),
}
MODES = ("eager", "graph", "compile")
DEFAULT_MODES = ("eager", "graph")  # compile: opt in (it compiles the model once per case)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class BenchOptions:
    prefill: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    batches: tuple[int, ...] = (1, 2, 4)
    prompt: int = 128
    steps: int = 64
    modes: tuple[str, ...] = DEFAULT_MODES
    repeats: int = 5
    warmup: int = 2
    layers: int | None = None  # presets: fewer decoder layers (quick runs)
    seed: int = 0
    tune: bool = True  # on CUDA: time the fast paths per layer shape first (actsparse.tune_), then bench
    tune_table: str | None = None  # a tune_ table file: measurements kept across runs (per GPU and versions)
    share_selection: bool = True  # linked q/k/v and gate/up select once (core.shared_input); False: each layer alone
    compile_backend: str = "inductor"  # compile mode's torch.compile backend
    # programmatic dependent launch (Hopper and later), dense and sparse alike: inductor's kernels
    # (torch._inductor.config.triton.enable_pdl) and the one-token GEMV start while the kernel before
    # them finishes
    pdl: bool = False

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ActsparseError(f"unknown bench mode {bad[0]!r}; fix: use {', '.join(MODES)}")
        for name in ("prompt", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ActsparseError(f"bench {name} must be at least 1, got {getattr(self, name)}")
        if any(t < 1 for t in self.prefill) or any(b < 1 for b in self.batches):
            raise ActsparseError("prefill lengths and batch sizes must be positive integers")


@dataclass
class Measurement:
    phase: str  # prefill | decode
    mode: str
    size: int  # T for prefill, batch for decode
    dense: float  # ms per prefill, or tokens/s for decode
    sparse: float

    @property
    def speedup(self) -> float:
        """Dense time / sparse time (prefill), sparse tokens/s / dense tokens/s (decode)."""
        if self.phase == "prefill":
            return self.dense / self.sparse
        return self.sparse / self.dense


@dataclass
class BenchResult:
    model: str
    config: dict
    device: str
    versions: dict
    checks: dict = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tuning: list[dict] = field(default_factory=list)  # tune_'s measurements (sparse_ms, dense_ms per shape)
    options: dict = field(default_factory=dict)  # the BenchOptions of the run

    def to_dict(self) -> dict:
        out = asdict(self)
        for entry, m in zip(out["measurements"], self.measurements):
            entry["speedup"] = m.speedup
        return out

    def table(self) -> str:
        lines = [
            f"{self.model} on {self.device}; {self.config.get('pattern')} {self.config.get('criterion')} "
            f"{self.config.get('mitigation')}",
            f"{'phase':<8} {'mode':<7} {'size':>6} {'dense':>12} {'sparse':>12} {'speedup':>8}",
        ]
        for m in self.measurements:
            unit = "ms" if m.phase == "prefill" else "tok/s"
            lines.append(
                f"{m.phase:<8} {m.mode:<7} {m.size:>6} {m.dense:>9.2f} {unit:<2} {m.sparse:>9.2f} {unit:<2} {m.speedup:>7.2f}x"
            )
        lines += [f"skipped: {s}" for s in self.skipped]
        if self.tuning:
            shapes = chosen_paths(self.tuning)
            picked = ", ".join(f"{shape}: {kernel}" for shape, kernel in shapes.items() if kernel is not None)
            wins = sum(kernel is not None for kernel in shapes.values())
            lines.append(f"tuned {len(shapes)} shapes; a fast path won {wins}: {picked or 'none'}")
        return "\n".join(lines)


def chosen_paths(tuning: list[dict]) -> dict[str, str | None]:
    """Per tuned shape (phase, mode, rows, K -> O, linked layers), the fast path that ``tune_``
    recorded: the fastest kernel timed there when it beats the fallback, else None."""
    chosen = {}
    for row in fastest(tuned_from_dict(entry) for entry in tuning).values():
        linked = f" x{row.layers}" if row.layers > 1 else ""
        shape = f"{row.phase} {row.mode} {row.rows} {row.in_features}->{row.out_features}{linked}"
        chosen[shape] = row.kernel if row.sparse_wins else None
    return chosen


def preset_model(name: str, dtype: torch.dtype, device: torch.device, layers: int | None = None, seed: int = 0):
    """A random-weight causal LM of a named shape, built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in PRESETS:
        raise ActsparseError(f"unknown preset {name!r}; fix: use one of {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    if layers is not None:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class Decoder:
    """Greedy decoding of ``batch`` sequences after a prompt, one step per call, through a static cache."""

    def __init__(self, model, batch: int, prompt: int, steps: int, generator: torch.Generator, forward=None):
        from transformers import StaticCache

        self.model, self.batch, self.prompt, self.steps = model, batch, prompt, steps
        self.forward = model if forward is None else forward  # what a step calls (the compiled model in compile mode)
        device = next(model.parameters()).device
        vocab = model.config.vocab_size
        self.prompt_ids = torch.randint(0, vocab, (batch, prompt), generator=generator).to(device)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 4)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def start(self):
        """Reset the cache and run the prompt (eagerly): the next call decodes position ``prompt``."""
        self.cache.reset()
        positions = torch.arange(self.prompt, device=self.token.device)
        out = self.model(
            input_ids=self.prompt_ids, past_key_values=self.cache, cache_position=positions, use_cache=True, logits_to_keep=1
        )
        self.token.copy_(out.logits[:, -1:].argmax(dim=-1))
        self.position.fill_(self.prompt)

    @torch.no_grad()
    def step(self):
        out = self.forward(
            input_ids=self.token,
            past_key_values=self.cache,
            cache_position=self.position,
            position_ids=self.position.expand(self.batch, 1),
            use_cache=True,
        )
        self.token.copy_(out.logits[:, -1:].argmax(dim=-1))
        self.position.add_(1)


def compiled(model, options: BenchOptions):
    """``model`` through ``torch.compile(fullgraph=True)``, compiled afresh (earlier compilations dropped)."""
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, dynamic=False, backend=options.compile_backend)


def _graphed(mode: str, device: torch.device) -> bool:
    return mode == "graph" or (mode == "compile" and device.type == "cuda")


def decode_tokens_per_s(model, batch, options: BenchOptions, mode: str, timer: Timer, generator) -> float:
    forward = compiled(model, options) if mode == "compile" else model
    decoder = Decoder(model, batch, options.prompt, options.steps, generator, forward=forward)
    if _graphed(mode, decoder.token.device):
        decoder.start()
        graph = capture_graph(decoder.step)

        def run():
            for _ in range(options.steps):
                graph.replay()
    else:

        def run():
            for _ in range(options.steps):
                decoder.step()

    ms = timer(run, before=decoder.start)
    return batch * options.steps / (ms / 1e3)


def prefill_ms(model, length, mode: str, timer: Timer, generator, options: BenchOptions | None = None) -> float:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(device)
    fresh = lambda: ids.copy_(torch.randint(0, model.config.vocab_size, ids.shape, generator=generator))  # noqa: E731
    run = compiled(model, options or BenchOptions()) if mode == "compile" else model

    @torch.no_grad()
    def forward():
        run(input_ids=ids, use_cache=False, logits_to_keep=1)

    if _graphed(mode, device):
        graph = capture_graph(forward)
        return timer(graph.replay, before=fresh)
    return timer(forward, before=fresh)


@torch.no_grad()
def check_fast_path(model, config: SparsityConfig, generator) -> dict:
    """Every distinct sparse layer: fast path vs the PyTorch reference of its config, on fresh rows."""
    worst = {}
    seen = set()
    for layer in sparse_layers(model).values():
        key = (layer.in_features, layer.out_features, layer.bias is not None, layer.criterion.name)
        if key in seen or layer.backend == "torch":
            continue
        seen.add(key)
        for rows in (1, 2, 16):
            x = torch.randn(rows, layer.in_features, generator=generator).to(layer.weight)
            fast = layer(x).float()
            backend, layer.backend = layer.backend, "torch"
            try:
                ref = layer(x).float()
            finally:
                layer.backend = backend
            err = float((fast - ref).norm() / ref.norm().clamp_min(1e-12))
            worst[rows] = max(worst.get(rows, 0.0), err)
    tolerance = 2e-2 if next(model.parameters()).dtype != torch.float32 else 1e-4
    bad = {rows: err for rows, err in worst.items() if not err < tolerance}
    if bad:
        raise ActsparseError(
            f"the fast path disagrees with the reference (relative error {bad} > {tolerance}); "
            "fix: report this, and bench with --backend torch meanwhile"
        )
    return {"layer_rel_err": worst, "tolerance": tolerance, "layers_checked": len(seen)}


def _groups(model) -> list:
    return [layer.shared_input for layer in sparse_layers(model).values() if layer.shared_input is not None]


@contextmanager
def _launches(pdl: bool):
    """Inductor's and the one-token GEMV's programmatic dependent launch set to ``pdl`` for a run, then restored."""
    from torch._inductor import config as inductor_config

    before = inductor_config.triton.enable_pdl, gemv_one.PDL
    inductor_config.triton.enable_pdl, gemv_one.PDL = pdl, pdl
    try:
        yield
    finally:
        inductor_config.triton.enable_pdl, gemv_one.PDL = before


def run_bench(model, name: str, config: SparsityConfig, options: BenchOptions) -> BenchResult:
    """Dense, then sparse (``sparsify_`` with ``config``), prefill and decode in every mode; model left dense."""
    with _launches(options.pdl):
        return _run_bench(model, name, config, options)


def _run_bench(model, name: str, config: SparsityConfig, options: BenchOptions) -> BenchResult:
    import transformers

    device = next(model.parameters()).device
    result = BenchResult(
        model=name,
        config=config.to_dict(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        versions={
            "actsparse": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": str(next(model.parameters()).dtype),
        },
        options=asdict(options),
    )
    modes = list(options.modes)
    if device.type != "cuda" and "graph" in modes:
        modes.remove("graph")
        result.skipped.append("graph mode: needs CUDA")
    tune_modes = tuple(dict.fromkeys(GRAPH if m == "compile" else m for m in modes))  # compiled runs take graph choices
    timer = Timer(device, options.warmup, options.repeats)
    timings: dict[str, dict] = {}
    for label in ("dense", "sparse"):
        if label == "sparse":
            report = sparsify_(model, config)
            if not report.sparse:
                raise ActsparseError("the config sparsifies no layer of this model; fix: check --roles/--layers/--skip")
            if not options.share_selection:
                unlink_shared_input(sparse_layers(model).values())
            result.checks["shared_input_groups"] = len({id(g) for g in _groups(model)})
            result.checks.update(check_fast_path(model, config, torch.Generator().manual_seed(options.seed + 1)))
            result.checks["sparse_flop_fraction"] = report.sparse_flop_fraction
            if options.tune and device.type == "cuda":
                decode_rows = tuple(b for b in options.batches if b <= MAX_ROWS)
                tuned = tune_(
                    model, decode_rows=decode_rows, prefill_rows=options.prefill, modes=tune_modes, seed=options.seed,
                    table=options.tune_table,
                )  # fmt: skip
                result.tuning = [t.to_dict() for t in tuned]
        generator = torch.Generator().manual_seed(options.seed)
        for mode in modes:
            cases = [("prefill", t) for t in options.prefill] + [("decode", b) for b in options.batches]
            for phase, size in cases:
                try:
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=".*past_key_values.*")
                        if phase == "prefill":
                            value = prefill_ms(model, size, mode, timer, generator, options)
                        else:
                            value = decode_tokens_per_s(model, size, options, mode, timer, generator)
                except (RuntimeError, torch.OutOfMemoryError) as error:  # reported, not hidden: the row is left out
                    result.skipped.append(
                        f"{label} {phase} {mode} {size}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    )
                    continue
                timings.setdefault((phase, mode, size), {})[label] = value
        if "compile" in modes:
            torch._dynamo.reset()  # the compiled model holds on to its layers and graphs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    unsparsify_(model)
    for (phase, mode, size), pair in timings.items():
        if len(pair) == 2:
            result.measurements.append(Measurement(phase, mode, size, pair["dense"], pair["sparse"]))
    return result
