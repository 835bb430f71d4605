"""Persistent layer chain vs per-op kernels: 32 LLaDA-8B layers (random bf16), M = 32, one CUDA graph (device only; experiment of docs/perf-notes.md 2026-11-24)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "scripts")
from bench_gemm import copy_gbs
from diffulex.kernels.fused_norm import add_rms_norm_triton
from diffulex.kernels.fused_ops import inverse_frequencies
from diffulex.kernels.layer_chain import layer_chain_reference, layer_chain_triton
from diffulex.kernels.skinny_gemm import skinny_gemm_triton
from diffulex.kernels.skinny_gemm_fused import gate_up_silu_triton, qkv_rope_triton

H, INTER, L, M, NH, D = 4096, 12288, 32, 32, 32, 128
EPS = 1e-5


def make_layers(n):
    def g(*s, scale):
        return torch.randn(*s, device="cuda", dtype=torch.bfloat16).mul_(scale)

    return [
        dict(
            wo=g(H, H, scale=H**-0.5),
            wgu=g(2 * INTER, H, scale=H**-0.5),
            wd=g(H, INTER, scale=INTER**-0.5),
            wqkv=g(3 * H, H, scale=H**-0.5),
            ffn=(1 + g(H, scale=0.1)),
            an=(1 + g(H, scale=0.1)),
        )
        for _ in range(n)
    ]


def perop(layer, attn, res, pos, inv):
    o = skinny_gemm_triton(attn, layer["wo"])
    n1, h = add_rms_norm_triton(o, res, layer["ffn"], EPS)
    d = skinny_gemm_triton(gate_up_silu_triton(n1, layer["wgu"]), layer["wd"])
    n2, h2 = add_rms_norm_triton(d, h, layer["an"], EPS)
    return h2, qkv_rope_triton(n2, layer["wqkv"], pos, inv, NH, NH, D)


def chain(layer, attn, res, pos, inv, **kw):
    return layer_chain_triton(
        attn,
        res,
        layer["wo"],
        layer["wgu"],
        layer["wd"],
        layer["ffn"],
        EPS,
        (layer["wqkv"], layer["an"], pos, inv, NH, NH, D),
        **kw,
    )


def forward_fn(layers, step, pos, inv):
    def fwd(attn, res):
        for layer in layers:
            res, qkv = step(layer, attn, res, pos, inv)
            attn = qkv[:, :H]
        return res, qkv

    return fwd


def time_graph(fwd, attn, res, replays):
    fwd(attn, res)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd(attn, res)
    times = []
    for i in range(replays + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e))
    res_out = (out[0].clone(), out[1].clone())
    del graph
    return times, res_out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--mode", default="check")
    p.add_argument("--replays", type=int, default=20)
    a = p.parse_args()
    torch.manual_seed(0)
    pos = torch.arange(1024, 1024 + M, device="cuda")
    inv = inverse_frequencies(D, 500000.0, "cuda")
    attn = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    out = {}
    if a.mode == "check":
        layers = make_layers(2)
        for m in (32, 7, 1):
            ref = perop(layers[0], attn[:m], res[:m], pos[:m], inv)
            t0 = time.time()
            got = chain(layers[0], attn[:m], res[:m], pos[:m], inv)
            torch.cuda.synchronize()
            got2 = chain(layers[0], attn[:m], res[:m], pos[:m], inv)
            hr, qr = layer_chain_reference(
                attn[:m],
                res[:m],
                layers[0]["wo"],
                layers[0]["wgu"],
                layers[0]["wd"],
                layers[0]["ffn"],
                EPS,
                (layers[0]["wqkv"], layers[0]["an"], pos[:m], inv, NH, NH, D),
            )
            row = dict(
                m=m,
                first_call_s=time.time() - t0,
                h2_vs_perop=(got[0].float() - ref[0].float()).abs().max().item(),
                qkv_vs_perop=(got[1].float() - ref[1].float()).abs().max().item(),
                qkv_equal_frac=(got[1] == ref[1]).float().mean().item(),
                h2_equal_frac=(got[0] == ref[0]).float().mean().item(),
                qkv_vs_ref=(got[1].float() - qr.float()).abs().max().item(),
                perop_vs_ref=(ref[1].float() - qr.float()).abs().max().item(),
                qkv_max=qr.abs().max().item(),
                deterministic=bool(torch.equal(got[0], got2[0]) and torch.equal(got[1], got2[1])),
            )
            print(row)
            out.setdefault("check", []).append(row)
        (a.out / "lc_check.json").write_text(json.dumps(out, indent=1))
        return
    bw = copy_gbs()
    layers = make_layers(L)
    wbytes = sum(w.numel() * 2 for layer in layers for k, w in layer.items() if k.startswith("w"))
    floor = wbytes / (bw * 1e9) * 1e3
    print(f"copy {bw:.0f} GB/s weights {wbytes / 1e9:.2f} GB floor {floor:.3f} ms", flush=True)
    variants = {"perop": perop}
    cfgs = [
        dict(),
        dict(block_k=128),
        dict(block_k=128, stages_residual=8, stages_paired=6),
        dict(programs=256, block_k=128, stages_residual=5, stages_paired=4),
        dict(programs=384, block_k=128, stages_residual=4, stages_paired=3),
        dict(programs=256, block_k=256, stages_residual=3, stages_paired=2),
    ]
    for c in cfgs:
        variants["chain " + (",".join(f"{k}={v}" for k, v in c.items()) or "default")] = (
            lambda cfg: lambda *x: chain(*x, **cfg)
        )(c)
    variants["perop again"] = perop
    rows = []
    ref = None
    for name, step in variants.items():
        try:
            times, r = time_graph(forward_fn(layers, step, pos, inv), attn, res, a.replays)
        except Exception as e:
            print(name, "FAILED", repr(e)[:300], flush=True)
            continue
        med = statistics.median(times)
        if ref is None:
            ref = r
        diff = (r[0].float() - ref[0].float()).abs().max().item()
        rows.append(
            dict(
                variant=name,
                ms=med,
                min_ms=min(times),
                ratio=med / floor,
                h2_diff_vs_perop=diff,
                per_layer_us=med / L * 1e3,
            )
        )
        print(
            f"{name:>36} {med:7.3f} ms (min {min(times):.3f}) {med / floor:5.3f}x floor {med / L * 1e3:6.1f} us/layer diff {diff:.3g}",
            flush=True,
        )
    (a.out / "lc_time.json").write_text(
        json.dumps(dict(copy_gbs=bw, weight_bytes=wbytes, floor_ms=floor, rows=rows), indent=1)
    )


if __name__ == "__main__":
    main()
