"""genkit serve under load, on genkit-mini: coalescing, exactness, a soak. One command:

    python benchmarks/serve.py [--clients 32] [--steps 20] [--soak 500] [--soak-clients 8] [--threads N]

The server is the real command (`genkit serve`, a subprocess); clients are asyncio + httpx here.

1. throughput: 32 clients each ask one image (distinct prompts and seeds, the same settings) at
   once, so the server coalesces them; then the same 32 requests one at a time. Images/s and
   p50/p95 latency of both.
2. exactness: the served images (coalesced and alone) against `genkit generate` with the same
   prompts, seeds and settings, pixel for pixel.
3. soak: `--soak` requests from `--soak-clients` clients: valid A1111 and OpenAI bodies (text-to-image
   and edits), invalid ones (bad JSON, wrong types, unknown sampler, too large, unknown LoRA, bad
   images, masks and strengths...), clients that hang up, interrupts. Counts 5xx on valid input
   (must be 0), valid requests answered, invalid ones refused with 4xx, the queue empty at the end,
   and the server's RSS after the soak against after warm-up.
5. workers (`--only workers`): the same `--clients` one-image requests at once against `--workers 2` (two
   processes of one thread each) and `--workers 1` at two threads: images/s, p50/p95, and the two-worker
   images against `genkit generate` at one thread, pixel for pixel.
4. edits: `--edits` img2img and inpainting requests (each its own input image) at once, then one at
   a time, and the served images against `genkit generate --prompts-file edits.jsonl` (the same
   inputs, masks, strengths and seeds), pixel for pixel. `--only edits` runs this part alone.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
SAMPLERS = ("DPM++ 2M", "Euler a", "Euler", "DDIM", "UniPC", "DDPM")


def prompt(rng: random.Random) -> str:
    return f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(out: Path, args, flags=(), threads: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads or args.threads:
        env["OMP_NUM_THREADS"] = str(threads or args.threads)
    command = [sys.executable, "-m", "genkit", "serve", "--port", str(port), "--out", str(out), "--max-batch",
               str(args.max_batch), "--max-queue", "256", *flags]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(out.parent / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}: {(out.parent / 'server.log').read_text()}")
        try:
            answer = httpx.get(url + "/genkit/v1/status", timeout=2)
            if answer.status_code == 200 and all(w["ready"] for w in answer.json()["queue"].get("workers", [])):
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("the server did not start in 300 s")


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def timed_post(client, path: str, body: dict) -> tuple[float, object]:
    start = time.perf_counter()
    response = await client.post(path, json=body)
    return time.perf_counter() - start, response


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def client_for(url: str, requests: list):
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(requests) + 8))


def answered(seconds: float, answers: list) -> tuple:
    """(wall seconds, latencies, answers' JSON), every answer a 200."""
    for _, response in answers:
        assert response.status_code == 200, response.text
    return seconds, [s for s, _ in answers], [r.json() for _, r in answers]


async def throughput(url: str, requests: list[dict], path: str = "/sdapi/v1/txt2img") -> dict:
    async with client_for(url, requests) as client:
        start = time.perf_counter()
        together = await asyncio.gather(*(timed_post(client, path, body) for body in requests))
        together_s = time.perf_counter() - start
        start = time.perf_counter()
        alone = [await timed_post(client, path, body) for body in requests]
        alone_s = time.perf_counter() - start
    return {"together": answered(together_s, together), "alone": answered(alone_s, alone)}


async def together(url: str, requests: list[dict], path: str = "/sdapi/v1/txt2img") -> tuple:
    """All `requests` at once: (wall seconds, latencies, answers)."""
    async with client_for(url, requests) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(timed_post(client, path, body) for body in requests))
        return answered(time.perf_counter() - start, answers)


def compare_workers(args, requests: list[dict]) -> bool:
    """--workers 2 (one thread each) against --workers 1 at two threads, the same requests at once."""
    import base64

    import httpx
    import numpy as np

    rows, served = [], None
    for label, flags, threads in (("1 worker x 2 threads", ["--workers", "1"], 2),
                                  ("2 workers x 1 thread", ["--workers", "2"], None)):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "out").mkdir()
            server, url = start_server(tmp / "out", args, flags, threads)
            try:
                asyncio.run(together(url, requests[:4]))  # warm-up
                seconds, latencies, answers = asyncio.run(together(url, requests))
                workers = httpx.get(url + "/genkit/v1/status").json()["queue"]["workers"]
            finally:
                server.terminate()
                server.wait(60)
        rows.append((label, len(requests) / seconds, statistics.median(latencies), percentile(latencies, 0.95),
                     seconds, " ".join(f"w{w['name']}:{w['images']}" for w in workers)))
        served = [pixels(base64.b64decode(a["images"][0])) for a in answers]
    with tempfile.TemporaryDirectory() as tmp:
        cli = cli_images(requests[:8], args.steps, Path(tmp), 1)
    print(f"\nworkers: {len(requests)} one-image requests at once, genkit-mini, {args.steps} steps, "
          f"--max-batch {args.max_batch}, {os.cpu_count()} cores")
    print(f"{'':<24}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}{'wall s':>9}  images per worker")
    for label, rate, p50, p95, seconds, per in rows:
        print(f"{label:<24}{rate:>10.2f}{p50:>9.2f}{p95:>9.2f}{seconds:>9.1f}  {per}")
    print(f"2 workers against 1: {rows[1][1] / rows[0][1]:.2f}x")
    same = sum(np.array_equal(a, b) for a, b in zip(served, cli))
    print(f"2 workers' images == genkit generate at one thread: {same}/{len(cli)}")
    return same == len(cli)


def cli_images(requests: list[dict], steps: int, out: Path, threads: int | None) -> list:
    """`genkit generate` for the first requests: prompts in order from the first seed (image i: seed + i)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-m", "genkit", "generate", *[r["prompt"] for r in requests], "--seed",
               str(requests[0]["seed"]), "--steps", str(steps), "--out", str(out), "--quiet", "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    records = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda r: r["index"])
    return [pixels((out / r["file"]).read_bytes()) for r in records]


# -- edits -------------------------------------------------------------------------------------------

def noise_png(seed: int, size: int = 32) -> bytes:
    import numpy as np
    from PIL import Image

    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return png(Image.fromarray(array))


def half_mask_png(size: int = 32) -> bytes:
    from PIL import Image

    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    return png(mask)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def edit_requests(count: int, steps: int) -> list[dict]:
    """Half img2img at strength 0.6, half inpainting the right half at 0.75; each its own input and seed."""
    import base64

    rng, mask = random.Random(2), base64.b64encode(half_mask_png()).decode()
    requests = []
    for i in range(count):
        body = {"prompt": prompt(rng), "seed": 2000 + i, "steps": steps,
                "init_images": [base64.b64encode(noise_png(i)).decode()], "denoising_strength": 0.6}
        if i % 2:
            body.update(mask=mask, denoising_strength=0.75)
        requests.append(body)
    return requests


def cli_edit_images(requests: list[dict], steps: int, out: Path, threads: int | None) -> list:
    """`genkit generate --prompts-file edits.jsonl` for the edit requests: one line each, its input, mask, seed."""
    import base64

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, body in enumerate(requests):
        (out / f"in{i}.png").write_bytes(base64.b64decode(body["init_images"][0]))
        line = {"prompt": body["prompt"], "seed": body["seed"], "image": f"in{i}.png",
                "strength": body["denoising_strength"]}
        if "mask" in body:
            (out / f"mask{i}.png").write_bytes(base64.b64decode(body["mask"]))
            line["mask"] = f"mask{i}.png"
        lines.append(json.dumps(line))
    (out / "edits.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-m", "genkit", "generate", "--prompts-file", str(out / "edits.jsonl"), "--steps",
               str(steps), "--out", str(out / "made"), "--quiet", "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    records = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda r: r["index"])
    return [pixels((out / "made" / r["file"]).read_bytes()) for r in records]


def report_edits(runs: dict, cli: list, steps: int) -> bool:
    import base64

    import numpy as np

    n = len(cli)
    print(f"\nedits: {n} A1111 img2img requests (half inpainting), each its own 32x32 input, {steps} steps")
    print(f"{'':<22}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}{'wall s':>9}")
    for name, key in ((f"{n} at once (coalesced)", "together"), ("one at a time", "alone")):
        seconds, latencies, _ = runs[key]
        print(f"{name:<22}{n / seconds:>10.2f}{statistics.median(latencies):>9.2f}"
              f"{percentile(latencies, 0.95):>9.2f}{seconds:>9.1f}")
    ok = True
    for key, label in (("together", "coalesced"), ("alone", "alone")):
        served = [pixels(base64.b64decode(r["images"][0])) for r in runs[key][2]]
        same = sum(np.array_equal(a, b) for a, b in zip(served, cli))
        ok &= same == n
        print(f"server == genkit generate --prompts-file (edits, {label}): {'yes' if same == n else 'no'} ({same}/{n})")
    return ok


def pixels(data: bytes):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# -- the soak ---------------------------------------------------------------------------------------

def soak_case(rng: random.Random, steps: int) -> tuple[str, str, object]:
    """(kind, path, body): kind is valid, invalid, disconnect or interrupt."""
    roll = rng.random()
    a1111 = {"prompt": prompt(rng), "seed": rng.randrange(10**6), "steps": steps,
             "sampler_name": rng.choice(SAMPLERS), "cfg_scale": rng.choice((1.0, 3.0, 4.0)),
             "batch_size": rng.choice((1, 1, 2))}
    if roll < 0.47:
        return "valid", "/sdapi/v1/txt2img", a1111
    if roll < 0.55:
        edit = {**edit_requests(2, steps)[rng.randrange(2)], "seed": rng.randrange(10**6),
                "batch_size": rng.choice((1, 2))}
        return "valid", "/sdapi/v1/img2img", edit
    if roll < 0.67:
        return "valid", "/v1/images/generations", {"prompt": prompt(rng), "n": rng.choice((1, 2)), "size": "32x32",
                                                    "seed": rng.randrange(10**6), "steps": steps}
    if roll < 0.72:
        return "disconnect", "/sdapi/v1/txt2img", {**a1111, "batch_size": 2}
    if roll < 0.75:
        return "interrupt", "/sdapi/v1/interrupt", {}
    bad = rng.choice([
        b"{not json", b"[1, 2, 3]", b"", {"prompt": 5}, {"prompt": "x", "steps": "many"}, {"prompt": "x", "seed": -7},
        {"prompt": "x", "sampler_name": "Heun++ 9000"}, {"prompt": "x", "width": 33}, {"prompt": "x", "width": 10**6},
        {"prompt": "x", "batch_size": 99}, {"prompt": "x", "steps": 10**4}, {"prompt": "x", "cfg_scale": -3},
        {"prompt": ""}, {"prompt": "x <lora:nothing:1>"}, {"prompt": "x", "loras": "star"},
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "sd99"}}, {"prompt": "x" * (5 << 20)},
        {"prompt": "x", "enable_hr": True}, {"prompt": "x", "batch_size": 0},
    ])
    if rng.random() < 0.25:
        edit = edit_requests(2, steps)[1]
        return "invalid", "/sdapi/v1/img2img", rng.choice([
            {**edit, "init_images": ["not base64"]}, {**edit, "init_images": []}, {**edit, "denoising_strength": 0},
            {**edit, "mask": edit["init_images"][0][:400]}, {**edit, "mask_blur": 4}, {**edit, "resize_mode": 2},
            {**edit, "mask": base64_png(half_mask_png(16))}])
    openai_bad = rng.choice([{"prompt": "x", "n": "2"}, {"prompt": "x", "size": "huge"}, {"n": 1},
                             {"prompt": "x", "model": "dall-e-3"}, {"prompt": "x", "response_format": "gif"}])
    return ("invalid", "/v1/images/generations", openai_bad) if rng.random() < 0.3 else \
        ("invalid", "/sdapi/v1/txt2img", bad)


def base64_png(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


async def soak(url: str, total: int, clients: int, steps: int, seed: int = 0) -> dict:
    import httpx

    rng = random.Random(seed)
    cases = [soak_case(rng, steps) for _ in range(total)]
    counts = {"valid": 0, "valid answered": 0, "valid 5xx": 0, "valid interrupted": 0, "valid 429": 0, "invalid": 0,
              "invalid 4xx": 0, "invalid 5xx": 0, "disconnects": 0, "interrupts": 0, "other": 0}
    todo = list(enumerate(cases))

    async def client_loop(number: int):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while todo:
                _, (kind, path, body) = todo.pop(0)
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                headers = {"content-type": "application/json"}
                if kind == "disconnect":  # hang up a moment after sending: the server must drop its jobs
                    counts["disconnects"] += 1
                    async with httpx.AsyncClient(base_url=url, timeout=600) as once:
                        try:
                            await asyncio.wait_for(once.post(path, content=raw, headers=headers), 0.05)
                        except asyncio.TimeoutError:
                            pass
                    continue
                response = await client.post(path, content=raw, headers=headers)
                if kind == "interrupt":
                    counts["interrupts"] += 1
                    counts["other"] += response.status_code != 200
                elif kind == "valid":
                    counts["valid"] += 1
                    if response.status_code >= 500:
                        counts["valid 5xx"] += 1
                        print(f"  5xx on valid input: {response.status_code} {response.text[:200]}")
                    elif response.status_code == 429:
                        counts["valid 429"] += 1
                    elif response.status_code in (200, 409):
                        counts["valid answered"] += 1
                        data = response.json()
                        made = len(data.get("images", data.get("data", [])))
                        wanted = body.get("batch_size", body.get("n", 1))
                        counts["valid interrupted"] += made < wanted
                    else:
                        print(f"  unexpected answer to valid input: {response.status_code} {response.text[:200]}")
                else:
                    counts["invalid"] += 1
                    counts["invalid 4xx"] += 400 <= response.status_code < 500
                    counts["invalid 5xx"] += response.status_code >= 500

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    counts["seconds"] = time.perf_counter() - start
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps of the throughput requests (genkit-mini: 20)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--soak", type=int, default=500)
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--soak-steps", type=int, default=4, help="steps of the soak's valid requests")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server and the CLI")
    parser.add_argument("--edits", type=int, default=8, help="img2img/inpainting requests of the edit part")
    parser.add_argument("--only", choices=("all", "edits", "soak", "workers"), default="all")
    args = parser.parse_args()
    import numpy as np
    import httpx

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start")
    edits = edit_requests(args.edits, args.steps)
    rng = random.Random(1)
    requests = [{"prompt": prompt(rng), "seed": 1000 + i, "steps": args.steps} for i in range(args.clients)]
    if args.only == "workers":
        raise SystemExit(0 if compare_workers(args, requests) else 1)
    if args.only != "all":  # one part alone, on a server of its own
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "out").mkdir()
            server, url = start_server(tmp / "out", args)
            try:
                asyncio.run(throughput(url, edits[:2], "/sdapi/v1/img2img"))  # warm-up
                warm_rss = rss_mib(server.pid)
                if args.only == "edits":
                    runs = asyncio.run(throughput(url, edits, "/sdapi/v1/img2img"))
                else:
                    soaked, after, alive, soak_rss = run_soak(url, server, args)
            finally:
                server.terminate()
                server.wait(60)
            if args.only == "edits":
                ok = report_edits(runs, cli_edit_images(edits, args.steps, tmp / "cli-edits", args.threads), args.steps)
                print(f"machine load average at the end: {os.getloadavg()[0]:.2f}")
            else:
                ok = report_soak(args, soaked, after, alive, warm_rss, soak_rss)
        raise SystemExit(0 if ok else 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "out").mkdir()
        server, url = start_server(tmp / "out", args)
        try:
            asyncio.run(throughput(url, requests[:4]))  # warm-up: batch shapes seen, pages touched
            runs = asyncio.run(throughput(url, requests))
            warm_rss = rss_mib(server.pid)
            status = httpx.get(url + "/genkit/v1/status").json()["queue"]
            cli = cli_images(requests[:8], args.steps, tmp / "cli", args.threads)
            edit_runs = asyncio.run(throughput(url, edits, "/sdapi/v1/img2img"))
            cli_edits = cli_edit_images(edits, args.steps, tmp / "cli-edits", args.threads)
            soaked, after, alive, soak_rss = run_soak(url, server, args)
        finally:
            server.terminate()
            server.wait(60)

    import base64

    n = len(requests)
    print(f"\nthroughput: {n} requests of one image each, genkit-mini, {args.steps} steps, --max-batch {args.max_batch}")
    print(f"{'':<22}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}{'wall s':>9}")
    for name, key in (("32 at once (coalesced)".replace("32", str(n)), "together"), ("one at a time", "alone")):
        seconds, latencies, _ = runs[key]
        print(f"{name:<22}{n / seconds:>10.2f}{statistics.median(latencies):>9.2f}"
              f"{percentile(latencies, 0.95):>9.2f}{seconds:>9.1f}")
    ratio = runs["alone"][0] / runs["together"][0]
    print(f"coalescing speed-up: {ratio:.2f}x (target >= 3x); batches so far: {status['batches']}, "
          f"{status['shared_batches']} holding several requests, largest {status['largest_batch']} images")

    served = {key: [pixels(base64.b64decode(r["images"][0])) for r in runs[key][2][:len(cli)]] for key in runs}
    for key, label in (("together", "coalesced"), ("alone", "alone")):
        same = sum(np.array_equal(a, b) for a, b in zip(served[key], cli))
        print(f"server == genkit generate ({label}, same prompt/seed/settings): {'yes' if same == len(cli) else 'no'} "
              f"({same}/{len(cli)})")

    report_edits(edit_runs, cli_edits, args.steps)
    report_soak(args, soaked, after, alive, warm_rss, soak_rss)


def run_soak(url: str, server, args) -> tuple[dict, dict, bool, float]:
    """The soak's counts, the queue after it, whether the server still answers, and its RSS after."""
    import httpx

    soaked = asyncio.run(soak(url, args.soak, args.soak_clients, args.soak_steps))
    time.sleep(1)
    after = httpx.get(url + "/genkit/v1/status").json()["queue"]
    alive = httpx.get(url + "/sdapi/v1/progress").status_code == 200
    return soaked, after, alive, rss_mib(server.pid)


def report_soak(args, soaked: dict, after: dict, alive: bool, warm_rss: float, soak_rss: float) -> bool:
    print(f"\nsoak: {args.soak} requests from {args.soak_clients} clients in {soaked['seconds']:.0f} s "
          f"({args.soak_steps} steps per valid image)")
    rows = [("valid requests", soaked["valid"]), ("  answered (200)", soaked["valid answered"]),
            ("  of them interrupted", soaked["valid interrupted"]), ("  429 (queue full)", soaked["valid 429"]),
            ("  5xx (must be 0)", soaked["valid 5xx"]), ("invalid requests", soaked["invalid"]),
            ("  refused with 4xx", soaked["invalid 4xx"]), ("  5xx", soaked["invalid 5xx"]),
            ("clients that hung up", soaked["disconnects"]), ("interrupts sent", soaked["interrupts"]),
            ("images waiting after", after["waiting"]), ("server alive after", "yes" if alive else "no")]
    for name, value in rows:
        print(f"  {name:<24}{value:>8}")
    growth = (soak_rss - warm_rss) / warm_rss * 100
    print(f"  {'RSS after warm-up':<24}{warm_rss:>8.0f} MiB")
    print(f"  {'RSS after soak':<24}{soak_rss:>8.0f} MiB ({growth:+.1f}%, limit +-10%)")
    print(f"machine load average at the end: {os.getloadavg()[0]:.2f}")
    ok = (soaked["valid 5xx"] == 0 and soaked["invalid 5xx"] == 0 and soaked["valid answered"] + soaked["valid 429"]
          == soaked["valid"] and after["waiting"] == 0 and alive and abs(growth) <= 10)
    print("soak: " + ("pass" if ok else "FAIL"))
    return ok


if __name__ == "__main__":
    main()
