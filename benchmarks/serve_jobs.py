"""Jobs that outlive their server: `genkit serve` killed with SIGKILL mid-run, started again, finishes every job.

    python benchmarks/serve_jobs.py [--jobs 16] [--images 2] [--steps 20] [--max-batch 4] [--kill-at 0.33]
                                    [--model genkit-mini] [--threads N]

1. A `genkit serve --out DIR` process (the real command) accepts `--jobs` jobs at once through
   `POST /genkit/v1/jobs` (A1111 bodies, half with a random seed, which the server fixes at acceptance;
   every third an OpenAI body), each `--images` images.
2. When `--kill-at` of the images are made, the process is killed with SIGKILL (no shutdown of any kind).
3. A new process on the same folder resumes what the job files say was queued or running; the jobs are
   polled until none is queued or running.
4. An unbroken run: a fresh server on another folder is given the same bodies with the seeds the first
   server fixed, and left alone until all are done.

Prints: jobs accepted, jobs left unfinished by the kill, jobs finished after the restart, images made,
images pixel-equal to the unbroken run's, and the times. Exit status 0 only when every job finished and
every image is equal.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(out: Path, args, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "genkit", "serve", "--port", str(port), "--out", str(out), "--max-batch",
               str(args.max_batch), "--max-queue", str(max(64, args.jobs * args.images))]
    if args.model:
        command += ["--model", args.model]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/genkit/v1/jobs", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start in 300 s")


def bodies(args) -> list[dict]:
    """Half with a random seed (fixed by the server at acceptance); every third an OpenAI body."""
    out = []
    for i in range(args.jobs):
        prompt = f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]}"
        seed = {"seed": 1000 + 10 * i} if i % 2 else {}
        if i % 3 == 2:
            out.append({"prompt": prompt, "n": args.images, "steps": args.steps, **seed})
        else:
            out.append({"prompt": prompt, "batch_size": args.images, "steps": args.steps, **seed})
    return out


def accept(client, body: dict) -> dict:
    response = client.post("/genkit/v1/jobs", json=body)
    if response.status_code != 202:
        raise SystemExit(f"a job was refused: {response.status_code} {response.text}")
    return response.json()


def poll(client, ids: list, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [client.get(f"/genkit/v1/jobs/{job_id}").json() for job_id in ids]
        if all(job["state"] not in ("queued", "running") for job in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


def pixels(client, job: dict) -> list:
    import httpx
    import numpy as np
    from PIL import Image

    arrays = []
    for image in job["images"]:
        with Image.open(io.BytesIO(client.get(httpx.URL(image["url"]).path).content)) as picture:
            arrays.append(np.asarray(picture.convert("RGB")))
    return arrays


def killed_run(args, folder: Path) -> dict:
    """Accept the jobs, SIGKILL the server mid-run, restart it and poll until every job has finished."""
    import httpx

    out, log = folder / "out", folder / "server.log"
    process, url = start_server(out, args, log)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            started = time.perf_counter()
            accepted = [accept(client, body) for body in bodies(args)]
            accept_s = time.perf_counter() - started
            total = sum(len(job["seeds"]) for job in accepted)
            while True:
                made = sum(len(client.get(f"/genkit/v1/jobs/{job['id']}").json()["images"]) for job in accepted)
                if made >= args.kill_at * total:
                    break
                time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(60)
    files = {job["id"]: json.loads((out / "jobs" / f"{job['id']}.json").read_text()) for job in accepted}
    left = sum(files[job["id"]]["state"] in ("queued", "running") for job in accepted)
    images_at_kill = sum(len(files[job["id"]]["images"]) for job in accepted)
    process, url = start_server(out, args, log)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            started = time.perf_counter()
            finished = poll(client, [job["id"] for job in accepted], args.timeout)
            resume_s = time.perf_counter() - started
            images = [pixels(client, job) for job in finished]
    finally:
        process.terminate()
        process.wait(60)
    return {"accepted": accepted, "accept_s": accept_s, "made_at_kill": made, "images_at_kill": images_at_kill,
            "left": left, "total": total, "finished": finished, "resume_s": resume_s, "images": images}


def unbroken_run(args, folder: Path, accepted: list) -> tuple[list, float]:
    """The same bodies with the seeds the killed server fixed, on a server left alone."""
    import httpx

    process, url = start_server(folder / "out", args, folder / "server.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            started = time.perf_counter()
            ids = [accept(client, {**body, "seed": job["seeds"][0]})["id"] for body, job in zip(bodies(args), accepted)]
            finished = poll(client, ids, args.timeout)
            seconds = time.perf_counter() - started
            return [pixels(client, job) for job in finished], seconds
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--images", type=int, default=2, help="images per job")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--kill-at", type=float, default=0.33, help="the share of images made when the kill comes")
    parser.add_argument("--model", default=None, help="what `genkit serve --model` gets (default: genkit-mini)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the servers")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the jobs after a start")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "killed").mkdir()
        (tmp / "unbroken").mkdir()
        run = killed_run(args, tmp / "killed")
        reference, unbroken_s = unbroken_run(args, tmp / "unbroken", run["accepted"])

    done = sum(job["state"] == "done" for job in run["finished"])
    made = sum(len(images) for images in run["images"])
    equal = sum(1 for a, b in zip(run["images"], reference)
                if a and len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)))
    equal_images = sum(int(np.array_equal(x, y)) for a, b in zip(run["images"], reference) for x, y in zip(a, b))
    resumed = sum(job["resumed"] > 0 for job in run["finished"])
    model = args.model or "genkit-mini"
    print(f"genkit serve jobs, SIGKILL mid-run ({model}, {args.jobs} jobs x {args.images} images, {args.steps} steps, "
          f"max batch {args.max_batch}, OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"  jobs accepted:                         {len(run['accepted'])} ({run['total']} images, "
          f"{run['accept_s'] * 1000 / len(run['accepted']):.1f} ms a job to accept)")
    print(f"  killed with SIGKILL after:             {run['made_at_kill']} images made "
          f"({run['images_at_kill']} recorded in the job files)")
    print(f"  jobs unfinished at the kill:           {run['left']} (queued or running in their files)")
    print(f"  jobs finished after the restart:       {done} of {len(run['accepted'])} "
          f"({resumed} resumed, {run['resume_s']:.1f} s from the restart's first answer)")
    print(f"  images:                                {made} of {run['total']}")
    print(f"  images pixel-equal to an unbroken run: {equal_images} of {run['total']} "
          f"({equal} of {len(run['accepted'])} jobs whole; the unbroken run took {unbroken_s:.1f} s)")
    failed = [job for job in run["finished"] if job["state"] != "done"]
    for job in failed:
        print(f"  not done: {job['id']} {job['state']} {job['error']}")
    raise SystemExit(0 if done == len(run["accepted"]) and equal_images == run["total"] else 1)


if __name__ == "__main__":
    main()
