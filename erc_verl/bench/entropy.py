"""Time the entropy functions on one (tokens x vocab) logits tensor, graph-free, interleaved, medians.

  verl            verl.utils.torch_functional.entropy_from_logits (whole tensor)
  verl_chunked    verl's entropy_from_logits_with_chunking, rows per chunk as ERC's read-only entropy uses
  erc             erc_verl.algorithm.entropy.entropy_from_logits_no_grad (what the ERC seam runs without torch.compile)

Also prints each one's largest deviation from a float64 reference on the first 64 rows.

Example:
  python scripts/bench_entropy.py --tokens 512 --vocab 151936
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", type=float, default=3.0, help="logit standard deviation")
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)

    import torch

    from verl.utils import torch_functional as verl_F

    from erc_verl.algorithm.entropy import default_chunk_rows, entropy_from_logits_no_grad

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, generator=g) * args.scale).to(args.device, dtype)
    rows = default_chunk_rows(logits)
    functions = {
        "verl": verl_F.entropy_from_logits,
        "verl_chunked": lambda x: verl_F.entropy_from_logits_with_chunking(x, chunk_size=rows),
        "erc": entropy_from_logits_no_grad,
    }
    head = logits[:64].double()
    reference = -(head.log_softmax(-1).exp() * head.log_softmax(-1)).sum(-1)

    def sync():
        if logits.device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in functions}
    with torch.no_grad():
        for fn in functions.values():  # warm-up
            fn(logits)
        for _ in range(args.reps):
            for name, fn in functions.items():
                sync()
                start = time.perf_counter()
                fn(logits)
                sync()
                times[name].append(time.perf_counter() - start)
        errors = {name: (fn(logits[:64]).double() - reference).abs().max().item() for name, fn in functions.items()}

    base = statistics.median(times["verl_chunked"])
    print(f"logits {args.tokens} x {args.vocab} {args.dtype} on {args.device}, {torch.get_num_threads()} thread(s), "
          f"{rows} rows per chunk, median of {args.reps}")
    for name in functions:
        median = statistics.median(times[name])
        print(f"  {name:<13} {median * 1e3:8.1f} ms  x{median / base:5.2f} vs verl_chunked   "
              f"max |error| {errors[name]:.1e}")


if __name__ == "__main__":
    main()
