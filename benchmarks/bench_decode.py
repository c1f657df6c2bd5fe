"""Decode-time N:M sparse-input GEMV against dense cuBLAS (``F.linear``), on CUDA.

Per layer (default): Llama-3-8B shapes, bf16, batch 1/2/4, patterns 2:4, 8:16, 16:32 (50%
density). Inputs are fresh random rows (never zero) pruned by magnitude; every input is checked
against ``F.linear`` before timing. Each measured call is captured in a CUDA graph (one graph per
input, replays rotate among them) and timed with ``triton.testing.do_bench`` (median), which
clears the 50 MB L2 before every call, so weights are always read from HBM (this matters for
4096x4096: its 32 MiB bf16 weight would otherwise fit in L2). ``--eager`` times plain calls.

    python benchmarks/bench_decode.py                # per-layer table
    python benchmarks/bench_decode.py --sweep        # also try GEMV tile/split/warp choices
    python benchmarks/bench_decode.py --e2e          # Llama-3-8B-shaped decode loop, tokens/s

Columns: ``sparse`` = the fused kernel as a layer calls it (``nm_decode_linear``, one launch, with
its N:M check), ``nocheck`` = the same without the check. ``GB/s`` = weight bytes of the union of
kept rows over the batch / sparse time (what the kernel must read); ``dense GB/s`` = all weight
bytes / dense time. ``--sweep`` precompiles the tile choices in parallel processes, then times
them one by one (GEMV alone, CUDA graphs, L2 flushed) and prints the best per case.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from actsparse.timing import capture_graph

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]  # (in K, out O): gate/up, down, q/o
DEVICE = "cuda"


def parse_pattern(text: str) -> tuple[int, int]:
    n, m = text.split(":")
    return int(n), int(m)


# ----------------------------------------------------------------------------- timing


def graph_of(fn):
    """``fn`` captured in a CUDA graph (after a warm-up that compiles and allocates)."""
    return capture_graph(fn, warmup=3)


def time_us(fns, eager: bool, rep: int = 500) -> float:
    """Median µs of one call, rotating among ``fns`` (one per input); L2 flushed before each call."""
    from triton.testing import do_bench

    if eager:
        calls = itertools.cycle(fns)
        return do_bench(lambda: next(calls)(), warmup=50, rep=rep, return_mode="median") * 1e3
    graphs = itertools.cycle([graph_of(fn) for fn in fns])
    return do_bench(lambda: next(graphs).replay(), warmup=25, rep=rep, return_mode="median") * 1e3


# ----------------------------------------------------------------------------- per layer


def random_inputs(tokens, k, n, m, count):
    """``count`` fresh bf16 rows ``[tokens, k]`` (no zeros) pruned by magnitude to n:m, with their masks."""
    from actsparse.core.masks import keep_mask
    from actsparse.core.patterns import NM

    out = []
    for _ in range(count):
        x = torch.randn(tokens, k, device=DEVICE, dtype=torch.bfloat16)
        x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
        mask = keep_mask(x.abs(), NM(n, m))
        out.append((torch.where(mask, x, torch.zeros_like(x)), mask))
    return out


def bench_layer(k, o, tokens, n, m, args):
    from actsparse.kernels.decode import DecodeWeight, gemv_config, nm_decode_linear

    weight = torch.randn(o, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    dw = DecodeWeight.from_linear(weight)
    inputs = random_inputs(tokens, k, n, m, args.inputs)
    cfg = gemv_config(dw, tokens, m)
    nocheck = cfg._replace(check=False)
    worst = 0.0
    for x, _ in inputs:
        ref = F.linear(x.float(), weight.float())
        for c in (cfg, nocheck):
            out = torch.full((tokens, o), float("nan"), device=DEVICE, dtype=torch.bfloat16)
            nm_decode_linear(x, dw, n, m, out=out, config=c)
            worst = max(worst, ((out.float() - ref).norm() / ref.norm()).item())
    if not worst <= 1e-2:
        raise SystemExit(f"WRONG RESULT: {k}->{o} B={tokens} {n}:{m} relative error {worst:.2e}")
    dense = time_us([lambda x=x: F.linear(x, weight) for x, _ in inputs], args.eager)
    sparse = time_us([lambda x=x: nm_decode_linear(x, dw, n, m) for x, _ in inputs], args.eager)
    unchecked = time_us([lambda x=x: nm_decode_linear(x, dw, n, m, config=nocheck) for x, _ in inputs], args.eager)
    rows = sum(mask.any(0).sum().item() for _, mask in inputs) / len(inputs)
    gbps = rows * o * 2 / (sparse * 1e-6) / 1e9
    return dict(
        shape=f"{k}->{o}",
        B=tokens,
        pattern=f"{n}:{m}",
        dense=dense,
        sparse=sparse,
        nocheck=unchecked,
        ratio=dense / sparse,
        gbps=gbps,
        dense_gbps=k * o * 2 / (dense * 1e-6) / 1e9,
        err=worst,
        config=cfg,
    )


SWEEP_B1 = [  # (stages, block_o, num_warps, block_k, programs per SM)
    (s, bo, w, bk, p)
    for s, bk in ((0, 8), (0, 16), (2, 16), (2, 32), (3, 16), (4, 16))
    for bo, w in ((512, 2), (1024, 4))
    for p in (1, 2, 4)
]
SWEEP_BN = [(s, 1024, 4, bk, p) for s in (0, 3) for bk in (4, 8) for p in (1, 2)]
FINE_B1 = (
    [(s, bo, w, 16, p) for s in (3, 4) for bo, w in ((512, 2), (1024, 4), (2048, 8)) for p in (1, 2, 3)]
    + [(2, 1024, 4, 32, p) for p in (2, 3)]
    + [(0, 1024, 4, 8, p) for p in (4, 8)]
    + [(0, 1024, 4, 16, 8)]
)
FINE_BN = {
    2: [(3, 1024, 4, 8, 2), (3, 1024, 4, 16, 2), (0, 1024, 4, 8, 2), (0, 1024, 4, 8, 4)],
    4: [(3, 1024, 4, 4, 2), (3, 1024, 4, 8, 2), (3, 1024, 4, 4, 3), (3, 1024, 4, 8, 3), (4, 1024, 4, 8, 2)],
}
SWEEP_SET = ["coarse"]


def sweep_configs(k, o, tokens, m):
    from actsparse.kernels.decode import DecodeWeight, gemv_config

    fake = DecodeWeight(torch.empty(k, o, device=DEVICE, dtype=torch.bfloat16))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {}
    if SWEEP_SET[0] == "fine":
        choices = FINE_B1 if tokens == 1 else FINE_BN.get(tokens, SWEEP_BN)
    else:
        choices = SWEEP_B1 if tokens == 1 else SWEEP_BN
    for s, bo, w, bk, p in choices:
        split = max(1, round(p * sms / -(-o // bo)))
        cfg = gemv_config(fake, tokens, m, block_o=bo, num_warps=w, block_k=bk, stages=s, split=split)
        out[cfg] = (s, bo, w, bk, p)
    return list(out)


def _precompile(job):
    """Worker: run each config once (fills Triton's cache); returns failures."""
    k, o, tokens, n, m, configs = job
    from actsparse.kernels.decode import DecodeWeight, nm_decode_linear

    torch.manual_seed(0)
    dw = DecodeWeight.from_linear(torch.randn(o, k, device=DEVICE, dtype=torch.bfloat16))
    x = random_inputs(tokens, k, n, m, 1)[0][0]
    bad = []
    for cfg in configs:
        try:
            nm_decode_linear(x, dw, n, m, config=cfg)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and skip the config
            bad.append((cfg, repr(e)[:200]))
    return bad


def sweep(cases, args):
    """Time every sweep config of every case: {case: [(us, cfg)] best first}."""
    import multiprocessing as mp

    from actsparse.kernels.decode import DecodeWeight, nm_decode_linear

    jobs = []
    for k, o, tokens, n, m in cases:
        configs = sweep_configs(k, o, tokens, m)
        for i in range(0, len(configs), 6):
            jobs.append((k, o, tokens, n, m, configs[i : i + 6]))
    with mp.get_context("spawn").Pool(min(12, len(jobs))) as pool:
        failed = {c for bad in pool.map(_precompile, jobs) for c, _ in bad}
    results = {}
    for k, o, tokens, n, m in cases:
        weight = torch.randn(o, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
        dw = DecodeWeight.from_linear(weight)
        inputs = random_inputs(tokens, k, n, m, args.inputs)
        rows = []
        for cfg in sweep_configs(k, o, tokens, m):
            if cfg in failed:
                continue
            fns = [lambda x=x, c=cfg: nm_decode_linear(x, dw, n, m, config=c) for x, _ in inputs]
            rows.append((time_us(fns, args.eager, rep=100), cfg))
        results[(k, o, tokens)] = sorted(rows, key=lambda r: r[0])
        best = results[(k, o, tokens)]
        print(f"sweep {k}->{o} B={tokens}: " + "; ".join(f"{us:.1f}us {fmt(c)}" for us, c in best[:6]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                for us, c in best:
                    f.write(f"{k}->{o} B={tokens} {us:.2f} {fmt(c)}\n")
    return results


def fmt(cfg):
    return f"(s{cfg.stages} bo{cfg.block_o} w{cfg.num_warps} bk{cfg.block_k} chunk{cfg.chunk} split{cfg.split}{'' if cfg.check else ' nochk'})"


def probe(args):
    """Where the time goes: launch/timing floor, the kernel on dense rows vs cuBLAS, ``x @ Wt`` through cuBLAS."""
    from actsparse.kernels.decode import DecodeWeight, gemv_config, nm_decode_linear

    tiny = torch.zeros(1, device=DEVICE)
    print(f"probe: empty-ish graph (one 1-element add): {time_us([lambda: tiny.add_(1)], args.eager):.1f} us")
    for (k, o), tokens in itertools.product(SHAPES, args.batch):
        weight = torch.randn(o, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
        dw = DecodeWeight.from_linear(weight)
        xs = [torch.randn(tokens, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(args.inputs)]
        dense = time_us([lambda x=x: F.linear(x, weight) for x in xs], args.eager)
        mm_t = time_us([lambda x=x: torch.mm(x, dw.wt) for x in xs], args.eager)
        cfg = gemv_config(dw, tokens, 16, check=False)
        allrows = time_us([lambda x=x: nm_decode_linear(x, dw, 8, 16, config=cfg) for x in xs], args.eager)
        gb = k * o * 2 / 1e9
        print(
            f"probe {k}->{o} B={tokens}: dense F.linear {dense:.1f} us ({gb / dense * 1e6:.0f} GB/s); x @ Wt {mm_t:.1f} us; "
            f"kernel on all rows (no zeros, no check) {allrows:.1f} us ({gb / allrows * 1e6:.0f} GB/s)",
            flush=True,
        )


def stress(args, calls=150):
    """Repeated calls on fresh poisoned outputs, each checked against F.linear: the K-split hand-off must never race."""
    from actsparse.kernels.decode import DecodeWeight, nm_decode_linear

    bad = total = 0
    for (k, o), tokens in itertools.product(SHAPES + [(4096, 1024)], (1, 2, 4)):
        weight = torch.randn(o, k, device=DEVICE, dtype=torch.bfloat16)
        dw = DecodeWeight.from_linear(weight)
        inputs = random_inputs(tokens, k, 8, 16, 3)
        refs = [F.linear(x.double(), weight.double()) for x, _ in inputs]
        outs = [torch.empty(tokens, o, device=DEVICE, dtype=torch.bfloat16) for _ in range(calls)]
        for i, out in enumerate(outs):
            out.fill_(float("nan"))
            nm_decode_linear(inputs[i % 3][0], dw, 8, 16, out=out)
        for i, out in enumerate(outs):
            ref = refs[i % 3]
            err = ((out.double() - ref).norm() / ref.norm()).item()
            total += 1
            if not err < 1e-2:
                bad += 1
                print(f"stress: {k}->{o} B={tokens} call {i}: relative error {err:.3e}")
    print(f"stress: {bad} wrong of {total} back-to-back calls")


def per_layer(args):
    if args.stress:
        stress(args)
    if args.probe:
        probe(args)
    print(
        f"device: {torch.cuda.get_device_name()}, timing: {'eager' if args.eager else 'CUDA graphs'} + do_bench median, L2 flushed per call"
    )
    if args.sweep:
        cases = [(k, o, t, *parse_pattern(args.patterns[0])) for (k, o), t in itertools.product(SHAPES, args.batch)]
        sweep(cases, args)
    head = f"{'shape':>12} {'B':>2} {'pattern':>7} {'dense us':>9} {'sparse us':>9} {'nocheck us':>10} {'x(sparse)':>9} {'GB/s':>6} {'dense GB/s':>10} {'rel err':>8}  config"
    print(head)
    for (k, o), tokens, pattern in itertools.product(SHAPES, args.batch, args.patterns):
        n, m = parse_pattern(pattern)
        r = bench_layer(k, o, tokens, n, m, args)
        print(
            f"{r['shape']:>12} {r['B']:>2} {r['pattern']:>7} {r['dense']:9.1f} {r['sparse']:9.1f} {r['nocheck']:10.1f} "
            f"{r['ratio']:9.2f} {r['gbps']:6.0f} {r['dense_gbps']:10.0f} {r['err']:8.1e}  {fmt(r['config'])}",
            flush=True,
        )


# ----------------------------------------------------------------------------- end to end


class Projections:
    """The seven projections of every layer, run dense (``F.linear``) or through the sparse kernel.

    ``run(layer, x, names)`` applies several projections that share the input ``x``. Modes:
    ``dense``; ``dense32`` (fp32 product rounded to bf16: the same math, other rounding);
    ``pruned`` (reference: magnitude pruning, then ``F.linear``); ``pruned32`` (the same in fp32
    product); ``sparse`` (the layer's path: ``nm_sparsify`` once per shared input, then the fused
    kernel per projection); ``check`` (``pruned``, and the kernel on the same pruned input, one
    projection at a time: records the worst relative difference, no propagation).
    """

    def __init__(self, weights, mode, n=8, m=16, decode=None):
        from actsparse.kernels.decode import DecodeWeight

        self.weights, self.mode, self.n, self.m = weights, mode, n, m
        self.sparse = decode
        self.worst = 0.0
        if mode in ("sparse", "check") and decode is None:
            self.sparse = [{name: DecodeWeight.from_linear(w) for name, w in layer.items()} for layer in weights]

    def prune(self, x):
        from actsparse.core.masks import keep_mask
        from actsparse.core.patterns import NM

        return torch.where(keep_mask(x.abs(), NM(self.n, self.m)), x, torch.zeros_like(x))

    def run(self, layer, x, names):
        from actsparse.kernels.decode import nm_decode_linear

        ws = self.weights[layer]
        if self.mode == "dense":
            return [F.linear(x, ws[name]) for name in names]
        if self.mode == "dense32":
            return [F.linear(x.float(), ws[name].float()).to(x.dtype) for name in names]
        if self.mode in ("pruned", "pruned32", "check"):
            x = self.prune(x)
            if self.mode == "pruned32":
                return [F.linear(x.float(), ws[name].float()).to(x.dtype) for name in names]
            outs = [F.linear(x, ws[name]) for name in names]
            if self.mode == "check":
                for name, ref in zip(names, outs):
                    got = nm_decode_linear(x, self.sparse[layer][name], self.n, self.m).float()
                    err = ((got - ref.float()).norm() / ref.float().norm()).item()
                    self.worst = max(self.worst, err)
            return outs
        from actsparse.kernels.sparsify import nm_sparsify

        pruned = nm_sparsify(x.contiguous(), self.n, self.m)
        return [nm_decode_linear(pruned, self.sparse[layer][name], self.n, self.m) for name in names]


class TinyLlama:
    """A minimal Llama-3-8B-shaped decoder with random bf16 weights and a static KV cache."""

    def __init__(
        self,
        layers=32,
        hidden=4096,
        mlp=14336,
        heads=32,
        kv_heads=8,
        vocab=128256,
        max_len=256,
        batch=1,
        device="cuda",
        dtype=torch.bfloat16,
    ):
        dev, dt = device, dtype
        self.layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, hidden // heads
        kv = kv_heads * self.head_dim

        def w(o, i):
            return torch.randn(o, i, device=dev, dtype=dt) * 0.02

        self.weights = [
            dict(
                q=w(hidden, hidden),
                k=w(kv, hidden),
                v=w(kv, hidden),
                o=w(hidden, hidden),
                gate=w(mlp, hidden),
                up=w(mlp, hidden),
                down=w(hidden, mlp),
            )
            for _ in range(layers)
        ]
        self.embed = w(vocab, hidden)
        self.lm_head = w(vocab, hidden)
        self.cache_k = torch.zeros(layers, batch, kv_heads, max_len, self.head_dim, device=dev, dtype=dt)
        self.cache_v = torch.zeros_like(self.cache_k)
        inv = 1.0 / (500000.0 ** (torch.arange(0, self.head_dim, 2, device=dev).float() / self.head_dim))
        angles = torch.outer(torch.arange(max_len, device=dev).float(), inv)
        self.cos, self.sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        self.positions = torch.arange(max_len, device=dev)
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)

    def reset(self):
        self.cache_k.zero_()
        self.cache_v.zero_()
        self.token.fill_(1)
        self.pos.zero_()

    @staticmethod
    def rms_norm(x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)  # unit gains

    def rope(self, x):
        cos, sin = self.cos[self.pos].to(x.dtype), self.sin[self.pos].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def attention(self, layer, q, k, v):
        b, hd = q.shape[0], self.head_dim
        q = self.rope(q.view(b, self.kv_heads, self.heads // self.kv_heads, hd))
        k = self.rope(k.view(b, self.kv_heads, 1, hd))
        self.cache_k[layer].index_copy_(2, self.pos, k)
        self.cache_v[layer].index_copy_(2, self.pos, v.view(b, self.kv_heads, 1, hd))
        scores = (q.float() @ self.cache_k[layer].float().transpose(-1, -2)) / hd**0.5  # [b, kv, group, T]
        scores = scores.masked_fill(self.positions > self.pos, float("-inf"))
        out = scores.softmax(-1) @ self.cache_v[layer].float()
        return out.to(q.dtype).reshape(b, -1)

    def step(self, proj: Projections):
        """One decode step for the whole batch: logits of the next token; advances ``token`` and ``pos``."""
        h = self.embed[self.token]
        for layer in range(self.layers):
            q, k, v = proj.run(layer, self.rms_norm(h), ("q", "k", "v"))
            h = h + proj.run(layer, self.attention(layer, q, k, v), ("o",))[0]
            gate, up = proj.run(layer, self.rms_norm(h), ("gate", "up"))
            h = h + proj.run(layer, F.silu(gate) * up, ("down",))[0]
        logits = F.linear(self.rms_norm(h), self.lm_head).float()
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits


def decode_tokens_per_s(model, proj, steps):
    """Capture one decode step in a CUDA graph and replay it ``steps`` times from an empty cache: tokens/s."""
    model.reset()
    graph = graph_of(lambda: model.step(proj))
    for _ in range(3):  # warm replays
        graph.replay()
    model.reset()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return model.token.shape[0] * steps / (start.elapsed_time(end) / 1e3)


def end_to_end(args):
    batch = args.batch[0]
    steps = args.tokens
    print(
        f"e2e: Llama-3-8B-shaped decoder (32 layers, random bf16 weights), batch {batch}, {steps} generated tokens, "
        f"8:16 magnitude pruning on all seven projections, lm_head dense; one CUDA graph per step"
    )
    model = TinyLlama(batch=batch, max_len=steps + 8)
    dense = Projections(model.weights, "dense")
    sparse = Projections(model.weights, "sparse")
    print(f"memory after building: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")

    def first_logits(proj):
        model.reset()
        return model.step(proj)

    def cos(a, b):
        return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()

    check = Projections(model.weights, "check", decode=sparse.sparse)
    ref = first_logits(check)  # kernel vs F.linear on the same pruned inputs, projection by projection
    print(
        f"per projection (same pruned input, no propagation): worst relative difference kernel vs F.linear "
        f"{check.worst:.2e} over {32 * 7} projections"
    )
    got = first_logits(sparse)
    dense_logits = first_logits(dense)
    print(f"first-step logits cosine: sparse kernel vs pruned F.linear {cos(got, ref):.5f}")
    print(
        f"  amplification baselines: dense bf16 vs dense fp32-product {cos(dense_logits, first_logits(Projections(model.weights, 'dense32'))):.5f}; "
        f"pruned bf16 vs pruned fp32-product {cos(ref, first_logits(Projections(model.weights, 'pruned32'))):.5f}; "
        f"dense vs pruned {cos(dense_logits, ref):.5f}"
    )
    del check

    dense_tps = decode_tokens_per_s(model, dense, steps)
    sparse_tps = decode_tokens_per_s(model, sparse, steps)
    print(f"dense : {dense_tps:8.1f} tokens/s  ({1e3 * batch / dense_tps:.2f} ms/step)")
    print(f"sparse: {sparse_tps:8.1f} tokens/s  ({1e3 * batch / sparse_tps:.2f} ms/step)  speed-up {sparse_tps / dense_tps:.2f}x")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4], help="tokens per call (e2e uses the first)")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "8:16", "16:32"])
    parser.add_argument("--inputs", type=int, default=4, help="fresh inputs per case (a graph each, replays rotate)")
    parser.add_argument("--eager", action="store_true", help="time plain calls instead of CUDA graph replays")
    parser.add_argument(
        "--sweep", action="store_true", help="also time GEMV tile/split/rows/warp choices (first pattern only; ~4 min)"
    )
    parser.add_argument("--e2e", action="store_true", help="run the end-to-end decode loop instead")
    parser.add_argument("--stress", action="store_true", help="also check many back-to-back calls against F.linear")
    parser.add_argument("--probe", action="store_true", help="also print the timing floor and the kernel's rate on dense rows")
    parser.add_argument("--fine", action="store_true", help="--sweep: the narrower second-round set of choices")
    parser.add_argument("--out", default=None, help="--sweep: also append every timing to this file")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens in --e2e")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_decode: no CUDA device; this benchmark needs an NVIDIA GPU (the kernel's correctness tests run on CPU: pytest tests/test_kernel_decode.py)"
        )
        return 0
    torch.manual_seed(0)
    SWEEP_SET[0] = "fine" if args.fine else "coarse"
    if args.e2e:
        end_to_end(args)
    else:
        per_layer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
