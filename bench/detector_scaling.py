"""Time of the detector's batch score against the reference-set size R and the batch size B.

The score is the unbiased MMD^2 between a batch and the reference set; it needs three gram matrices of the
semantic kernel: batch x batch (B^2), reference x reference (R^2) and batch x reference (B R), each over the
flattened images (3,072-d at 32x32) and the features. Three figures per (R, B), in milliseconds:

- ``score_ms``: :meth:`~dad.detector.MMDDetector.score` given the batch's features (as in DAD inference when
  ``phi`` is the classifier: the features come with the logits); the detector computes the constant
  reference x reference gram once, so a score costs the batch x batch and batch x reference grams;
- ``score_with_features_ms``: the same with ``phi`` run on the batch;
- ``score_uncached_ms``: the same score with all three grams computed per call (the R^2 part included),
  for comparison.

Each call's work on ``--device`` is finished before its time is read. Writes ``bench/results/detector_scaling.json``
(with a Markdown table) and ``detector_scaling.png``.

    OMP_NUM_THREADS=1 python -m bench.detector_scaling --threads 1
    python -m bench.detector_scaling --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch


from bench.machine import RESULTS, configure_threads, machine_description, median_ms, write_result
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.mmd import mmd2_unbiased_unpaired
from dad.models import create_model, freeze


def measure(ref_sizes: list[int], batch_sizes: list[int], repeats: int, model: str,
            device: torch.device) -> list[dict[str, Any]]:
    """One row per (R, B) with the three timings of the module docstring, on ``device``."""
    gen = torch.Generator().manual_seed(0)  # on the CPU: the same images on every device
    phi = freeze(create_model(model).eval()).to(device)
    pool = torch.rand(max(ref_sizes) + max(batch_sizes), 3, 32, 32, generator=gen).to(device)
    kernel = SemanticKernel(phi).to(device)
    kernel.init_bandwidths(pool[:200], pool[200:400])
    rows = []
    with torch.inference_mode():
        for r in ref_sizes:
            detector = MMDDetector(kernel, pool[:r])
            for b in batch_sizes:
                x = pool[r : r + b]
                fx = kernel.features(x)

                def uncached() -> torch.Tensor:
                    return mmd2_unbiased_unpaired(
                        *kernel.gram_from_features(fx, detector.ref_features, x, detector.reference))

                assert torch.allclose(uncached(), detector.score(x, fx), rtol=1e-4, atol=1e-7)
                rows.append({
                    "reference_size": r,
                    "batch_size": b,
                    "score_ms": median_ms(lambda: detector.score(x, fx), repeats, device),
                    "score_with_features_ms": median_ms(lambda: detector.score(x), repeats, device),
                    "score_uncached_ms": median_ms(uncached, repeats, device),
                })
                print(rows[-1], flush=True)
    return rows


def markdown_table(rows: list[dict[str, Any]], key: str) -> str:
    """Rows: reference sizes; columns: batch sizes; cells: ``key`` in ms."""
    refs = sorted({row["reference_size"] for row in rows})
    batches = sorted({row["batch_size"] for row in rows})
    cell = {(row["reference_size"], row["batch_size"]): row[key] for row in rows}
    lines = ["| R \\ B | " + " | ".join(map(str, batches)) + " |", "| --- |" + " --- |" * len(batches)]
    lines += [f"| {r} | " + " | ".join(f"{cell[r, b]:.2f}" for b in batches) + " |" for r in refs]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Score time vs R (one line per B), and vs B at the largest R, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = sorted({row["reference_size"] for row in rows})
    batches = sorted({row["batch_size"] for row in rows})
    cell = {(row["reference_size"], row["batch_size"]): row for row in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in batches:
        left.plot(refs, [cell[r, b]["score_ms"] for r in refs], marker="o", label=f"B={b}")
    shown = 100 if 100 in batches else batches[-1]
    left.plot(refs, [cell[r, shown]["score_uncached_ms"] for r in refs], "k--",
              label=f"B={shown}, R x R gram recomputed per call")
    left.set(xscale="log", yscale="log", xlabel="reference-set size R", ylabel="score time (ms)",
             title="detector score vs R (features given)")
    left.legend(fontsize=8)
    for r in refs:
        right.plot(batches, [cell[r, b]["score_with_features_ms"] for b in batches], marker="o", label=f"R={r}")
    right.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="time (ms)",
              title="score incl. phi(batch) vs B")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-sizes", type=int, nargs="+", default=[50, 100, 200, 500, 1000, 2000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 50, 100, 200, 500])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="cifar_resnet18_small", help="phi (random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the networks and images live (cpu, cuda ...)")
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    rows = measure(args.reference_sizes, args.batch_sizes, args.repeats, args.model, device)
    result = {
        "machine": machine_description(device),
        "settings": {"image_shape": [3, 32, 32], "phi": args.model, "threads": threads, "repeats": args.repeats},
        "rows": rows,
        "table_score_ms_markdown": markdown_table(rows, "score_ms"),
        "table_score_uncached_ms_markdown": markdown_table(rows, "score_uncached_ms"),
        "wall_seconds": time.perf_counter() - start,
    }
    write_result("detector_scaling", result)
    plot(rows, RESULTS / "detector_scaling.png")
    print(result["table_score_ms_markdown"])
    return result


if __name__ == "__main__":
    main()
