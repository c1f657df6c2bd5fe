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

Columns: ``sparse`` = compaction + GEMV (what a layer costs), ``gemv`` = GEMV alone on a
precompacted input. ``GB/s`` = weight bytes of the union of kept rows over the batch (for B > 1
each token walks its own list; rows shared by tokens are served by cache) / GEMV time.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]  # (in K, out O): gate/up, down, q/o
DEVICE = "cuda"


def parse_pattern(text: str) -> tuple[int, int]:
    n, m = text.split(":")
    return int(n), int(m)


# ----------------------------------------------------------------------------- timing


def graph_of(fn):
    """``fn`` captured in a CUDA graph (after a warm-up that compiles and allocates)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_us(fns, eager: bool) -> float:
    """Median µs of one call, rotating among ``fns`` (one per input); L2 flushed before each call."""
    from triton.testing import do_bench

    if eager:
        calls = itertools.cycle(fns)
        return do_bench(lambda: next(calls)(), warmup=50, rep=500, return_mode="median") * 1e3
    graphs = itertools.cycle([graph_of(fn) for fn in fns])
    return do_bench(lambda: next(graphs).replay(), warmup=50, rep=500, return_mode="median") * 1e3


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
    from actsparse.kernels.decode import DecodeWeight, compact_nm, gemv_config, nm_decode_linear, nm_gemv

    weight = torch.randn(o, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    dw = DecodeWeight.from_linear(weight)
    inputs = random_inputs(tokens, k, n, m, args.inputs)
    worst = 0.0
    for x, _ in inputs:
        ref = F.linear(x.float(), weight.float())
        err = ((nm_decode_linear(x, dw, n, m).float() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
    if worst > 1e-2:
        raise SystemExit(f"WRONG RESULT: {k}->{o} B={tokens} {n}:{m} relative error {worst:.2e}")
    compacted = [compact_nm(x, n, m) for x, _ in inputs]
    dense = time_us([lambda x=x: F.linear(x, weight) for x, _ in inputs], args.eager)
    sparse = time_us([lambda x=x: nm_decode_linear(x, dw, n, m) for x, _ in inputs], args.eager)
    gemv = time_us([lambda c=c: nm_gemv(*c, dw) for c in compacted], args.eager)
    rows = sum(mask.any(0).sum().item() for _, mask in inputs) / len(inputs)
    gbps = rows * o * 2 / (gemv * 1e-6) / 1e9
    row = dict(shape=f"{k}->{o}", B=tokens, pattern=f"{n}:{m}", dense=dense, sparse=sparse, gemv=gemv,
               ratio=dense / sparse, ratio_gemv=dense / gemv, gbps=gbps, dense_gbps=k * o * 2 / (dense * 1e-6) / 1e9,
               err=worst, config=gemv_config(dw, tokens, k // m * n))
    if args.sweep and f"{n}:{m}" == args.patterns[0]:  # same kept count for every 50% pattern
        row["sweep"] = sweep(dw, compacted, tokens, k // m * n, args)
    return row


def sweep(dw, compacted, tokens, kept, args):
    """GEMV-alone µs for tile / split / rows-per-step / warp choices: ``[(µs, block_o, split, rows, warps)]`` best first."""
    from actsparse.kernels.decode import gemv_config, nm_gemv

    auto = gemv_config(dw, tokens, kept)[-1]
    results = []
    for block_o, factor, rows, warps in itertools.product((128, 256, 512), (0.5, 1, 2), (16, 32), (4, 8)):
        split = max(1, round(auto * factor * 256 / block_o))
        fns = [lambda c=c: nm_gemv(*c, dw, block_o=block_o, split=split, rows=rows, num_warps=warps) for c in compacted]
        results.append((time_us(fns, args.eager), block_o, split, rows, warps))
    return sorted(results)


def per_layer(args):
    print(f"device: {torch.cuda.get_device_name()}, timing: {'eager' if args.eager else 'CUDA graphs'} + do_bench median, L2 flushed per call")
    head = f"{'shape':>12} {'B':>2} {'pattern':>7} {'dense us':>9} {'sparse us':>9} {'gemv us':>8} {'x(sparse)':>9} {'x(gemv)':>8} {'GB/s':>6} {'dense GB/s':>10} {'rel err':>8}  (block_b, block_k, block_o, chunk, split)"
    print(head)
    for (k, o), tokens, pattern in itertools.product(SHAPES, args.batch, args.patterns):
        n, m = parse_pattern(pattern)
        r = bench_layer(k, o, tokens, n, m, args)
        print(f"{r['shape']:>12} {r['B']:>2} {r['pattern']:>7} {r['dense']:9.1f} {r['sparse']:9.1f} {r['gemv']:8.1f} "
              f"{r['ratio']:9.2f} {r['ratio_gemv']:8.2f} {r['gbps']:6.0f} {r['dense_gbps']:10.0f} {r['err']:8.1e}  {r['config']}", flush=True)
        for us, block_o, split, rows, warps in r.get("sweep", [])[:5]:
            print(f"{'':>30} sweep: gemv {us:7.1f} us  block_o={block_o} split={split} rows={rows} warps={warps}")


# ----------------------------------------------------------------------------- end to end


class Projections:
    """The seven projections of every layer, run dense (``F.linear``) or through the sparse kernel.

    ``run(layer, x, names)`` applies several projections that share the input ``x``; the sparse
    path compacts ``x`` once for all of them (q/k/v, gate/up).
    """

    def __init__(self, weights, mode, n=8, m=16):
        from actsparse.kernels.decode import DecodeWeight

        self.weights, self.mode, self.n, self.m = weights, mode, n, m
        self.sparse = None
        if mode == "sparse":
            self.sparse = [{name: DecodeWeight.from_linear(w) for name, w in layer.items()} for layer in weights]

    def run(self, layer, x, names):
        if self.mode == "dense":
            return [F.linear(x, self.weights[layer][name]) for name in names]
        if self.mode == "pruned":  # reference: explicit magnitude pruning, then dense F.linear
            from actsparse.core.masks import keep_mask
            from actsparse.core.patterns import NM

            x = torch.where(keep_mask(x.abs(), NM(self.n, self.m)), x, torch.zeros_like(x))
            return [F.linear(x, self.weights[layer][name]) for name in names]
        from actsparse.kernels.decode import compact_nm, nm_gemv

        idx, val = compact_nm(x, self.n, self.m)
        return [nm_gemv(idx, val, self.sparse[layer][name]) for name in names]


class TinyLlama:
    """A minimal Llama-3-8B-shaped decoder with random bf16 weights and a static KV cache."""

    def __init__(self, layers=32, hidden=4096, mlp=14336, heads=32, kv_heads=8, vocab=128256, max_len=256, batch=1,
                 device="cuda", dtype=torch.bfloat16):
        dev, dt = device, dtype
        self.layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, hidden // heads
        kv = kv_heads * self.head_dim

        def w(o, i):
            return torch.randn(o, i, device=dev, dtype=dt) * 0.02

        self.weights = [
            dict(q=w(hidden, hidden), k=w(kv, hidden), v=w(kv, hidden), o=w(hidden, hidden),
                 gate=w(mlp, hidden), up=w(mlp, hidden), down=w(hidden, mlp))
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
    print(f"e2e: Llama-3-8B-shaped decoder (32 layers, random bf16 weights), batch {batch}, {steps} generated tokens, "
          f"8:16 magnitude pruning on all seven projections, lm_head dense; one CUDA graph per step")
    model = TinyLlama(batch=batch, max_len=steps + 8)
    dense = Projections(model.weights, "dense")
    sparse = Projections(model.weights, "sparse")
    print(f"memory after building: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")

    model.reset()  # sanity: first-step logits of the kernel path vs explicit pruning + F.linear
    ref = model.step(Projections(model.weights, "pruned"))
    model.reset()
    got = model.step(sparse)
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    print(f"first-step logits, sparse kernel vs pruned F.linear: cosine {cos:.5f}")

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
    parser.add_argument("--sweep", action="store_true", help="also time GEMV tile/split/rows/warp choices (first pattern only; ~4 min)")
    parser.add_argument("--e2e", action="store_true", help="run the end-to-end decode loop instead")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens in --e2e")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device; this benchmark needs an NVIDIA GPU (the kernel's correctness tests run on CPU: pytest tests/test_kernel_decode.py)")
        return 0
    torch.manual_seed(0)
    if args.e2e:
        end_to_end(args)
    else:
        per_layer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
