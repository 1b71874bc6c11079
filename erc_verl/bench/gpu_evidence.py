"""The GPU evidence kit's measurements (``bash scripts/gpu_evidence.sh run``; the script's header says what travels).

Two parts, results into ``--out`` (at most 5 files: the device tool returns 8):

  check      one ERC update -- verl's ``FSDPEngineWithLMHead.forward_step`` with the plugin's detached-entropy seam,
             ``erc_verl.seams.actor_loss.ppo_loss_with_entropy`` (``loss_mode=grpo_erc``), ``loss.backward()`` -- on the
             device, at a small shape, in float32 and in bfloat16, against the same update of the same weights
             in float64 on the CPU (random weights rounded to bfloat16, so every dtype holds them exactly).
             Compared: the loss, the logits and their gradient, the gradients of five parameter tensors (relative
             L2 error, max abs error), and the ERC / PPO clip fractions.
             The old log-probs and old entropies are set from the float64 model's own log-probs and entropies so that
             every token's entropy ratio lies at least 0.04 from an edge of the band (0.95, 1.05) and every PPO ratio
             at least 0.1 from a clip edge: rounding on the device cannot flip a gate decision, and the expected ERC
             clip fraction is known in advance (the tokens given a ratio of 0.90 or 1.10).
             -> check.json
  bench      ``erc_verl.bench.overhead`` (scripts/bench_overhead.py): dapo vs erc vs graph_entropy, step time and peak
             memory (``torch.cuda.max_memory_allocated``); on CUDA at ``--preset r1-distill-1.5b`` (1.5B shape, random
             weights, bf16, 8192 tokens per micro-batch, gradient checkpointing, verl's torch.compile'd entropy). If
             that fails with the compiled entropy it is rerun once with ``--entropy-compile off`` and says so.
             -> overhead.json

Then evidence.json (versions, device, both parts' verdicts, wall times, Ray use) and evidence.md (docs/performance.md's
GPU table and the check's table), also printed. ``--device cpu`` runs both at a tiny shape (CI, seconds).

The float64 reference is float64 except where Hugging Face's Qwen2 computes in float32 itself (RMSNorm's variance,
the rotary tables) and where the plugin's read-only entropy works in float32 (the gate only reads it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

from erc_verl.bench import overhead

# Shapes of the update check. Real vocabulary on CUDA (the entropy and log-prob kernels see a production-sized row).
CHECK_SHAPES = {
    "cuda": dict(vocab=overhead.REAL_VOCAB, hidden_size=256, layers=2, heads=4, kv_heads=2, tokens=512, seqs=4),
    "cpu": dict(vocab=512, hidden_size=32, layers=1, heads=4, kv_heads=2, tokens=64, seqs=4),
}
CHECK_DTYPES = ("float32", "bfloat16")
# Pass bounds, per device dtype. Errors are relative L2 (||x - ref|| / ||ref||) for tensors; for the loss,
# |loss - ref| / mean |advantage| (the loss is a signed mean and can sit near 0, so it is scaled by its terms' size).
# float32: measured 1e-7 to 1e-6 on CPU (both shapes); the bounds leave two to three orders of headroom.
# bfloat16 (8-bit mantissa): measured on CPU at the CUDA shape, loss 2.2e-3, logits 5.8e-3, d loss/d logits 2.7e-2,
# worst parameter gradient 3.1e-2 (model.norm.weight); the bounds, ~3x that, catch a wrong mask, gate or scale
# (errors of order 1), they are no precision claim.
TOLERANCES = {
    "float32": dict(loss=1e-4, logits=1e-4, grad=1e-3),
    "bfloat16": dict(loss=3e-2, logits=3e-2, grad=1e-1),
}
TOLERANCE_NOTE = "bf16 bounds: sanity (catch a wrong gate/mask/scale), not a precision claim"
# Target ratios by token position (cycled): ERC entropy ratio rho (band 0.95 / 1.05) and PPO ratio (clip 0.8 / 1.28).
TARGET_RHO = (0.90, 0.99, 1.00, 1.01, 1.10)  # 0.90 and 1.10: ERC-clipped
TARGET_PPO_RATIO = (0.70, 0.95, 1.00, 1.05, 1.50, 1.00, 0.90)  # coprime cycle length: all combinations occur
PARAMS = ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
          "model.layers.{last}.mlp.down_proj.weight")
# overhead.py arguments of the tiny CPU run (the same as tests/bench/test_bench_overhead.py)
TINY_BENCH = ["--vocab", "512", "--hidden-size", "32", "--layers", "1", "--tokens", "64", "--reps", "1", "--warmup",
              "0", "--mem-steps", "1", "--mem-runs", "1", "--threads", "1"]
CUDA_BENCH = ["--preset", "r1-distill-1.5b"]
RAY_LOG_ENV = "ERC_KIT_RAY_STUB_LOG"  # the kit's ray stub appends every use to this file (all processes)


# ----------------------------------------------------------------------------------------------- update check


def _check_cfg(device: str, dtype: str) -> overhead.OverheadConfig:
    shape = CHECK_SHAPES[device]
    cfg = overhead.parse_args(["--device", device])
    return dataclasses.replace(cfg, **shape, dtype=dtype, intermediate_size=2 * shape["hidden_size"],
                               gradient_checkpointing=False, max_position_embeddings=max(4096, shape["tokens"]))


def _response_stats_f64(model64, td):
    """Per response token (seqs, response_len): log-prob of the sampled token and entropy, float64, plain HF forward
    of the float64 model on the padded batch (full sequences, no padding: the packed and padded forwards agree)."""
    import torch

    prompts, responses = td["prompts"], td["responses"]
    with torch.no_grad():
        logits = model64(input_ids=torch.cat([prompts, responses], dim=1)).logits.double()
    resp_logits = logits[:, prompts.shape[1] - 1 : -1]
    logp_all = torch.log_softmax(resp_logits, dim=-1)
    logp = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _cycled(values, shape, offset=0):
    import torch

    n = math.prod(shape)
    return torch.tensor([values[(i + offset) % len(values)] for i in range(n)], dtype=torch.float64).reshape(shape)


def _metric_value(value):
    if hasattr(value, "aggregate"):
        value = value.aggregate()
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def _one_update(cfg: "overhead.OverheadConfig", model, td):
    """One ERC micro-step as the bench's ``erc`` variant runs it, logits' gradient kept. Returns a dict of CPU
    float64 tensors / floats."""
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep_logits)
    try:
        engine, micro_batch, loss_fn = overhead.make_variant(cfg, "erc", model, td)
        for p in model.parameters():
            p.grad = None
        with overhead.device_context(cfg):
            loss, output = engine.forward_step(micro_batch, loss_function=loss_fn, forward_only=False)
        loss.backward()
        overhead.synchronize(cfg)
    finally:
        handle.remove()
    named = dict(model.named_parameters())
    last = cfg.layers - 1
    result = {
        "loss": float(loss.detach().double().cpu()),
        "logits": captured["logits"].detach().double().cpu(),
        "logits_grad": captured["logits"].grad.double().cpu(),
        "grads": {name.format(last=last): named[name.format(last=last)].grad.double().cpu() for name in PARAMS},
        "metrics": {k: _metric_value(v) for k, v in output["metrics"].items()},
    }
    return result


def _compare(x, ref) -> dict:
    import torch

    diff = (x - ref).abs()
    ref_norm = torch.linalg.vector_norm(ref).item()
    return {
        "rel_l2": torch.linalg.vector_norm(x - ref).item() / ref_norm if ref_norm > 0 else float("inf"),
        "max_abs": diff.max().item(),
        "max_abs_ref": ref.abs().max().item(),
        "finite": bool(torch.isfinite(x).all()),
    }


def update_check(device: str, dtypes=CHECK_DTYPES) -> dict:
    import torch

    results = {"device": device, "shape": CHECK_SHAPES[device], "tolerances": TOLERANCES, "note": TOLERANCE_NOTE,
               "target_rho": TARGET_RHO, "target_ppo_ratio": TARGET_PPO_RATIO, "runs": {}}
    started = time.time()
    # One set of random weights, rounded to bfloat16 so that every device dtype holds them exactly: one float64
    # reference (model, batch, targets) serves all dtypes.
    ref_cfg = dataclasses.replace(_check_cfg(device, "float32"), device="cpu", dtype="float64", entropy_compile="off")
    base = overhead.build_model(dataclasses.replace(ref_cfg, dtype="float32")).to(torch.bfloat16)
    model64 = copy.deepcopy(base).to(torch.float64)
    td = overhead.build_batch(ref_cfg, ref_cfg.tokens)
    logp, entropy = _response_stats_f64(model64, td)
    shape = tuple(logp.shape)
    rho, ratio = _cycled(TARGET_RHO, shape), _cycled(TARGET_PPO_RATIO, shape, offset=1)
    td["old_entropy"] = (entropy / rho).float()
    td["old_log_probs"] = (logp - ratio.log()).float()
    expected_erc_clipfrac = float(((rho < 0.95) | (rho > 1.05)).double().mean())
    ref = _one_update(ref_cfg, model64, td)
    del model64
    results["reference_wall_s"] = time.time() - started
    print(f"  float64 reference on cpu: loss {ref['loss']:.6g} ({results['reference_wall_s']:.0f} s)", flush=True)

    for dtype in dtypes:
        started = time.time()
        cfg = _check_cfg(device, dtype)
        model = copy.deepcopy(base).to(device=device, dtype=overhead.torch_dtype(dtype))
        compile_error = None
        try:
            dev = _one_update(cfg, model, td.to(device))
        except Exception as e:
            if cfg.entropy_compile != "on":
                raise
            # verl's torch.compile'd entropy did not build here: say so, and check the update without it
            compile_error = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"  check {dtype}: failed with the compiled entropy ({compile_error}); once more without", flush=True)
            cfg = dataclasses.replace(cfg, entropy_compile="off")
            dev = _one_update(cfg, model, td.to(device))
        scale = td["advantages"].abs().double().mean().item()
        tol = TOLERANCES[dtype]
        cmp = {
            "loss": {"device": dev["loss"], "reference": ref["loss"], "abs": abs(dev["loss"] - ref["loss"]),
                     "scaled": abs(dev["loss"] - ref["loss"]) / scale, "scale_mean_abs_advantage": scale},
            "logits": _compare(dev["logits"], ref["logits"]),
            "logits_grad": _compare(dev["logits_grad"], ref["logits_grad"]),
            "grads": {name: _compare(dev["grads"][name], g) for name, g in ref["grads"].items()},
        }
        worst_grad = max(cmp["grads"].items(), key=lambda kv: kv[1]["rel_l2"])
        metrics = {k: {"device": dev["metrics"].get(k), "reference": ref["metrics"].get(k)}
                   for k in ("actor/erc_clipfrac", "actor/pg_clipfrac", "actor/pg_clipfrac_lower")}
        criteria = {
            f"loss: |d| / mean|A| <= {tol['loss']:g}": cmp["loss"]["scaled"] <= tol["loss"],
            f"logits rel L2 <= {tol['logits']:g}": cmp["logits"]["rel_l2"] <= tol["logits"],
            f"d loss/d logits rel L2 <= {tol['grad']:g}": cmp["logits_grad"]["rel_l2"] <= tol["grad"],
            f"every parameter gradient rel L2 <= {tol['grad']:g}": worst_grad[1]["rel_l2"] <= tol["grad"],
            "all finite": all(c["finite"] for c in (cmp["logits"], cmp["logits_grad"], *cmp["grads"].values())),
            "ERC clip fraction: device == reference == expected": (
                metrics["actor/erc_clipfrac"]["device"] is not None
                and abs(metrics["actor/erc_clipfrac"]["device"] - expected_erc_clipfrac) < 1e-6
                and abs(metrics["actor/erc_clipfrac"]["reference"] - expected_erc_clipfrac) < 1e-6),
            "PPO clip fractions: device == reference": all(
                m["device"] is not None and m["reference"] is not None and abs(m["device"] - m["reference"]) < 1e-6
                for k, m in metrics.items() if k != "actor/erc_clipfrac"),
        }
        results["runs"][dtype] = {
            "pass": all(criteria.values()), "criteria": criteria, "compare": cmp,
            "worst_grad": {"param": worst_grad[0], **worst_grad[1]}, "metrics": metrics,
            "expected_erc_clipfrac": expected_erc_clipfrac, "entropy_compile": cfg.entropy_compile,
            "compile_error": compile_error,
            "wall_s": time.time() - started,
        }
        print(f"  check {dtype:<8} {'PASS' if results['runs'][dtype]['pass'] else 'FAIL'}: "
              f"loss {dev['loss']:.6g} vs {ref['loss']:.6g}, logits grad rel L2 {cmp['logits_grad']['rel_l2']:.2e}, "
              f"worst param grad rel L2 {worst_grad[1]['rel_l2']:.2e} ({worst_grad[0]}), erc clipfrac "
              f"{metrics['actor/erc_clipfrac']['device']} (expected {expected_erc_clipfrac:.4f})", flush=True)
        del model, dev
        if device == "cuda":
            torch.cuda.empty_cache()
    results["pass"] = all(r["pass"] for r in results["runs"].values())
    return results


# ----------------------------------------------------------------------------------------------- bench


def bench(device: str, out: Path, extra: list[str]) -> dict:
    base = (CUDA_BENCH + ["--device", "cuda"]) if device == "cuda" else (TINY_BENCH + ["--device", "cpu"])
    json_path = out / "overhead.json"
    attempts = []
    for compile_flag in ([] if device == "cuda" else ["--entropy-compile", "off"]), ["--entropy-compile", "off"]:
        argv = base + compile_flag + extra + ["--json", str(json_path)]
        started = time.time()
        try:
            rc = overhead.main(argv)
            error = None if rc == 0 else f"exit code {rc}"
        except (Exception, SystemExit) as e:  # a worker's failure arrives as RuntimeError
            error = "".join(traceback.format_exception_only(type(e), e)).strip()
        attempts.append({"argv": argv, "error": error, "wall_s": time.time() - started})
        if error is None or compile_flag == ["--entropy-compile", "off"]:
            break
        print(f"  bench failed ({error}); once more with --entropy-compile off", flush=True)
    result = {"attempts": attempts, "ok": attempts[-1]["error"] is None}
    if result["ok"]:
        result["result"] = json.loads(json_path.read_text())
    return result


# ----------------------------------------------------------------------------------------------- report


def ray_report() -> dict:
    """Which Ray this process imported (the kit's stub or a real one) and every use the stub saw, in any process."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    mod = sys.modules.get("ray")
    report = {"origin": spec.origin if spec else None,
              "stub": bool(mod is not None and mod.__dict__.get("IS_KIT_STUB")),
              "imported": mod is not None}
    log = os.environ.get(RAY_LOG_ENV)
    uses = Path(log).read_text().split() if log and Path(log).exists() else []
    report["uses"] = uses + [u for u in (mod.__dict__.get("ACCESSED", []) if mod else []) if u not in uses]
    return report


def versions() -> dict:
    import torch
    import transformers

    import tensordict
    import verl

    import erc_verl

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "verl": verl.__version__, "tensordict": tensordict.__version__,
            "erc_verl": erc_verl.__version__, "verl_file": verl.__file__, "erc_verl_file": erc_verl.__file__}


def _mib(n):
    return "-" if n is None else f"{n / 2**20:.0f}"


def gpu_table(summary: dict, r: dict | None) -> str:
    """docs/performance.md's GPU table: one row per variant (bench result ``r``, overhead.json) and one per dtype (check)."""
    lines = []
    b = summary.get("bench") or {}
    if r:
        cfg = r["config"]
        lines.append(
            f"{r['device_name']}, torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, verl "
            f"{r['versions']['verl']}, {summary['date'][:10]}; `{cfg['preset'] or 'custom'}` shape "
            f"({cfg['layers']} layers, "
            f"hidden {cfg['hidden_size']}, vocab {cfg['vocab']}, random weights), {cfg['dtype']}, {r['tokens']} tokens "
            f"per micro-batch, gradient checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}, entropy "
            f"torch.compile {cfg['entropy_compile']}; medians of {cfg['reps']} interleaved rounds after "
            f"{cfg['warmup']} warm-up steps, memory: {r['memory_metric']} of one fresh process per variant:")
        lines.append("")
        lines.append("| variant | step time (median ms) | vs DAPO (paired) | peak memory (MiB) | vs DAPO |")
        lines.append("|---|---|---|---|---|")
        labels = {"dapo": "dapo", "erc": "erc (plugin)", "graph_entropy": "graph_entropy"}
        for name, v in r["variants"].items():
            tr = 1.0 if name == "dapo" else r.get(f"time_ratio_{name}")
            pr = 1.0 if name == "dapo" else r.get(f"time_ratio_paired_{name}")
            mr = 1.0 if name == "dapo" else r.get(f"mem_ratio_{name}")
            lines.append(f"| {labels.get(name, name)} | {v['median_wall_s'] * 1e3:.1f} | "
                         f"{tr:.3f} ({pr:.3f}) | {_mib(v.get('peak_mem_bytes'))} | "
                         f"{'-' if mr is None else f'{mr:.3f}'} |")
        if r.get("check"):
            lines.append("")
            lines.append("bench check: " + "; ".join(f"{k}: {'ok' if ok else 'NO'}"
                                                     for k, ok in r["check"]["criteria"].items())
                         + " [the targets are defined for --quick on cpu]")
    elif b:
        lines.append(f"bench FAILED: {b['attempts'][-1]['error'] if b.get('attempts') else b.get('error')}")
    c = summary.get("check")
    if c and c.get("runs"):
        shape = c["shape"]
        lines.append("")
        lines.append(f"ERC update on {summary.get('device_name')} vs float64 on CPU ({shape['layers']} layers, hidden "
                     f"{shape['hidden_size']}, vocab {shape['vocab']}, {shape['tokens']} tokens; {c['note']}):")
        lines.append("")
        lines.append("| dtype | loss (device / float64) | loss err / mean abs A | logits rel L2 "
                     "| d loss/d logits rel L2 "
                     "| worst param grad rel L2 | ERC clipfrac (expected) | pass |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for dtype, run in c["runs"].items():
            cmp, w, m = run["compare"], run["worst_grad"], run["metrics"]["actor/erc_clipfrac"]
            lines.append(
                f"| {dtype} | {cmp['loss']['device']:.6g} / {cmp['loss']['reference']:.6g} | "
                f"{cmp['loss']['scaled']:.1e} "
                f"(<= {TOLERANCES[dtype]['loss']:g}) | {cmp['logits']['rel_l2']:.1e} | "
                f"{cmp['logits_grad']['rel_l2']:.1e} | {w['rel_l2']:.1e} (`{w['param']}`) | "
                f"{m['device']:.4f} ({run['expected_erc_clipfrac']:.4f}) | {'PASS' if run['pass'] else 'FAIL'} |")
        for dtype, run in c["runs"].items():
            if run.get("compile_error"):
                lines.append(f"\n{dtype}: verl's torch.compile'd entropy failed ({run['compile_error']}); checked "
                             "without it")
    elif c:
        lines.append(f"update check FAILED: {c.get('error')}")
    return "\n".join(lines) + "\n"


class Terminated(BaseException):
    """SIGTERM arrived (not an Exception, so no stage's error handling swallows it)."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", required=True, help="folder for check.json, overhead.json, evidence.json, evidence.md")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--dtypes", default=",".join(CHECK_DTYPES), help="update-check dtypes on the device")
    p.add_argument("bench_args", nargs="*", help="after --: extra arguments for erc_verl.bench.overhead")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_evidence: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    summary = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": overhead.device_name(args.device),
        "versions": versions(),
    }
    summary["ray"] = ray_report()  # after `import verl` (versions): verl.protocol has imported ray by now
    print(f"gpu_evidence: {json.dumps(summary)}", flush=True)

    bench_result = None

    def write():
        summary["ray"] = ray_report()
        summary["wall_s"] = time.time() - started
        ok = [summary[k].get("pass", summary[k].get("ok")) for k in ("check", "bench") if k in summary]
        summary["pass"] = bool(ok) and all(ok) and not summary["ray"]["uses"] and "terminated" not in summary
        (out / "evidence.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "evidence.md").write_text(gpu_table(summary, bench_result))

    signal.signal(signal.SIGTERM, _terminate)  # the kit's `timeout`: stop, but still write what was measured
    try:
        if not args.skip_check:
            print("gpu_evidence: update check", flush=True)
            try:
                summary["check"] = update_check(args.device, [d for d in args.dtypes.split(",") if d])
            except Exception as e:
                traceback.print_exc()
                summary["check"] = {"pass": False,
                                    "error": "".join(traceback.format_exception_only(type(e), e)).strip()}
            (out / "check.json").write_text(json.dumps(summary["check"], indent=2, default=str))
            write()
        if not args.skip_bench:
            print("gpu_evidence: overhead benchmark", flush=True)
            summary["bench"] = {"ok": False, "error": "not finished"}
            summary["bench"] = bench(args.device, out, args.bench_args)
            bench_result = summary["bench"].pop("result", None)  # that is overhead.json; evidence.json: the verdict
            if bench_result:
                summary["bench"].update({k: bench_result.get(k) for k in (
                    "tokens", "time_ratio_erc", "time_ratio_paired_erc", "mem_ratio_erc", "time_ratio_graph_entropy",
                    "mem_ratio_graph_entropy")})
    except Terminated:
        summary["terminated"] = "SIGTERM (the kit's time limit): results so far"
        print("gpu_evidence: terminated (time limit); writing what was measured", flush=True)
    write()
    table = gpu_table(summary, bench_result)
    print("\n" + table)
    ray = summary["ray"]
    print(f"ray: {'the kit stub' if ray['stub'] else ray['origin']}, uses: {ray['uses'] or 'none'}")
    print(f"gpu_evidence: {'PASS' if summary['pass'] else 'FAIL'} in {summary['wall_s']:.0f} s; files in {out}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
