"""genkit serve through Ray Serve on a local cluster: 2 replicas against 1, the same requests. One command:

    python benchmarks/serve_ray.py [--clients 32] [--steps 20] [--cpus N] [--max-batch 8]

A local Ray cluster of `--cpus` cores (default this machine's), Ray's HTTP proxy on a free port, genkit-mini
(genkit.serve.ray.deployment, one CPU replica with all the cores, then two with half each; torch's threads follow).
For each: 4 warm-up requests, then `--clients` one-image A1111 requests at once (distinct prompts and seeds, the same
settings: benchmarks/serve.py's requests), so each replica coalesces what it gets. Images/s, p50/p95 latency, how
many images each replica made (its file names: replica r numbers from r * INDEX_SPAN), and whether the two runs'
images are equal pixel for pixel (they may not be when the replicas' thread counts differ: each image records its
threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve import free_port, percentile, pixels, prompt, together  # noqa: E402


def run(replicas: int, requests: list[dict], out: Path, args) -> dict:
    """Deploy `replicas` replicas, time the requests at once, take the deployment down."""
    import base64

    from ray import serve

    from genkit.serve.ray import INDEX_SPAN, deployment

    started = time.perf_counter()
    serve.run(deployment(None, num_replicas=replicas, out=out, max_batch=args.max_batch, max_queue=256, device="cpu"),
              name="genkit", route_prefix="/")
    ready_s = time.perf_counter() - started
    try:
        asyncio.run(together(args.url, requests[:4]))  # warm-up: batch shapes seen, pages touched
        seconds, latencies, answers = asyncio.run(together(args.url, requests))
    finally:
        serve.delete("genkit")
    files = [json.loads(answer["info"])["files"][0] for answer in answers]
    made = Counter(int(name.split("-")[0]) // INDEX_SPAN for name in files)
    threads = {json.loads(line)["threads"] for path in out.glob("*/manifest.jsonl")
               for line in path.read_text().splitlines()}
    return {"replicas": replicas, "seconds": seconds, "latencies": latencies, "ready_s": ready_s,
            "per_replica": " ".join(f"r{rank}:{made[rank]}" for rank in sorted(made)), "threads": threads,
            "images": [pixels(base64.b64decode(answer["images"][0])) for answer in answers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps of each request (genkit-mini: 20)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="the local cluster's cores")
    args = parser.parse_args()
    import numpy as np
    import ray
    from ray import serve

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start; Ray {ray.__version__}")
    rng = random.Random(1)
    requests = [{"prompt": prompt(rng), "seed": 1000 + i, "steps": args.steps} for i in range(args.clients)]
    port, temp = free_port(), tempfile.mkdtemp(prefix="genkit-ray-", dir="/tmp")
    args.url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=temp, logging_level="WARNING",
             log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cluster_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            for replicas in (1, 2):
                rows.append(run(replicas, requests, Path(tmp) / f"out-{replicas}", args))
    finally:
        serve.shutdown()
        ray.shutdown()

    n = len(requests)
    print(f"\nRay Serve: {n} one-image A1111 requests at once through Ray's proxy, genkit-mini, {args.steps} steps, "
          f"--max-batch {args.max_batch}, a local cluster of {args.cpus} CPUs (started in {cluster_s:.1f} s)")
    print(f"{'':<26}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}{'wall s':>9}{'deploy s':>10}  images per replica")
    for row in rows:
        cpus = max(1, args.cpus // row["replicas"])
        label = f"{row['replicas']} replica{'s' if row['replicas'] > 1 else ''} x {cpus} CPU"
        print(f"{label:<26}{n / row['seconds']:>10.2f}{statistics.median(row['latencies']):>9.2f}"
              f"{percentile(row['latencies'], 0.95):>9.2f}{row['seconds']:>9.1f}{row['ready_s']:>10.1f}  "
              f"{row['per_replica']}")
    print(f"2 replicas against 1: {rows[0]['seconds'] / rows[1]['seconds']:.2f}x")
    same = sum(np.array_equal(a, b) for a, b in zip(rows[0]["images"], rows[1]["images"]))
    threads = " vs ".join(str(sorted(row["threads"])) for row in rows)
    print(f"images equal between the two runs: {same}/{n} (torch threads per replica: {threads})")
    print(f"machine load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
