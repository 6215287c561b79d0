"""Is a 2:4 model faster? Its linear layers through torch's semi-structured sparse kernels
(``torch.sparse.to_sparse_semi_structured``: CUTLASS / cuSPARSELt, CUDA compute capability 8.0+,
float16 / bfloat16) against the same layers dense, in tokens per second.

Two measurements on the same 2:4 weights:
1. the prunable linears alone: each layer in turn on a (tokens, d_in) input, as a decoder pass
   runs them (what the kernels can speed up);
2. the whole decoder forward (attention, norms and the rest stay as they are).
The sparse outputs are checked against the dense ones first.

The 2:4 weights are the model's own, masked by magnitude 2:4 (the speed does not depend on which
weights are kept), or an exported 2:4 model (``--pruned DIR``, plain or compressed-tensors).
Without CUDA there is nothing to measure: torch has no semi-structured kernels for the CPU, and a
2:4 model runs at dense speed there (zeros are multiplied like any other weight). It says so and exits.

    python bench/sparse24_speed.py [--model default] [--pruned DIR] [--tokens 8192] [--seq-len 512]
                                   [--dtype float16] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

CPU_LINE = ("no speed-up on CPU: torch's semi-structured (2:4) sparse kernels run on CUDA only (compute capability "
            "8.0+); on a CPU a 2:4 model computes every zero like any other weight, at dense speed. Nothing measured.")


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest magnitudes in every group of four inputs."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return w * keep.reshape(w.shape)


def load(args):
    from prunesearch.models import load_model, prunable_linears

    if args.pruned:
        from prunesearch.models.compressed import load_compressed, read_format

        if read_format(args.pruned):
            model = load_compressed(args.pruned)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.pruned, dtype=torch.float32)
    else:
        model = load_model(args.model, device="cpu").model
    linears = [lin for lin in prunable_linears(model) if isinstance(lin.module, torch.nn.Linear) and lin.expert is None]
    with torch.no_grad():
        for lin in linears:
            w = lin.module.weight
            if not args.pruned:
                w.copy_(mask_24(w))
            if not bool(((w != 0).reshape(-1, 4).sum(-1) <= 2).all()):
                sys.exit(f"{lin.name} is not 2:4 sparse: give a 2:4 model (--pruned) or none")
    return model, linears


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--pruned", default=None, help="an exported 2:4 model directory (hf or compressed-tensors)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per pass (batch x sequence length)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not device.startswith("cuda") or not torch.cuda.is_available():
        print(CPU_LINE)
        return
    if torch.cuda.get_device_capability(device) < (8, 0):
        print(f"{torch.cuda.get_device_name(device)}: semi-structured sparse kernels need compute capability 8.0+. Nothing measured.")
        return
    from torch.sparse import to_sparse_semi_structured

    dtype = getattr(torch, args.dtype)
    model, linears = load(args)
    model = model.to(device=device, dtype=dtype).eval()
    tokens = args.tokens

    # 1. the linears alone
    inputs = {lin.name: torch.randn(tokens, lin.module.in_features, device=device, dtype=dtype) for lin in linears}
    dense_w = {lin.name: lin.module.weight.detach().clone() for lin in linears}
    sparse_w = {lin.name: to_sparse_semi_structured(dense_w[lin.name]) for lin in linears}
    worst = max(float((torch.nn.functional.linear(inputs[n], sparse_w[n]) - torch.nn.functional.linear(inputs[n], w))
                      .abs().max() / w.abs().max()) for n, w in dense_w.items())

    def run(weights):
        return lambda: [torch.nn.functional.linear(inputs[n], weights[n]) for n in weights]

    t_dense, t_sparse = timed(run(dense_w), args.repeats), timed(run(sparse_w), args.repeats)

    # 2. the whole decoder forward
    ids = torch.randint(0, model.config.vocab_size, (max(1, tokens // args.seq_len), args.seq_len), device=device)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model

    def forward():
        with torch.no_grad():
            decoder(input_ids=ids)

    f_dense = timed(forward, max(3, args.repeats // 4))
    for lin in linears:
        lin.module.weight = torch.nn.Parameter(sparse_w[lin.name], requires_grad=False)
    f_sparse = timed(forward, max(3, args.repeats // 4))

    n_tok = ids.numel()
    result = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": args.dtype,
        "linears": len(linears), "tokens_per_pass": tokens,
        "linears_dense_tok_s": tokens / t_dense, "linears_sparse_tok_s": tokens / t_sparse, "linears_speedup": t_dense / t_sparse,
        "decoder_dense_tok_s": n_tok / f_dense, "decoder_sparse_tok_s": n_tok / f_sparse, "decoder_speedup": f_dense / f_sparse,
        "max_rel_diff": worst,
    }
    print(f"{result['device']}, torch {torch.__version__}, {args.dtype}, {len(linears)} linears, {tokens} tokens per pass; "
          f"sparse vs dense outputs: max relative difference {worst:.2e}")
    print(f"linears only:   dense {result['linears_dense_tok_s']:,.0f} tok/s, 2:4 sparse {result['linears_sparse_tok_s']:,.0f} "
          f"tok/s: {result['linears_speedup']:.2f}x")
    print(f"decoder forward: dense {result['decoder_dense_tok_s']:,.0f} tok/s, 2:4 sparse {result['decoder_sparse_tok_s']:,.0f} "
          f"tok/s: {result['decoder_speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
