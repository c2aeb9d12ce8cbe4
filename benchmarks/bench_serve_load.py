"""Load test of `ldmkit serve` over loopback: N concurrent text-to-image requests through Gradio's HTTP API.

    .venv/bin/python benchmarks/bench_serve_load.py [--n 100] [--steps 20] [--num 1]
        [--out benchmarks/results/serve_load.json]

Starts `ldmkit serve pretrained/fashion-mnist` (its default limits: one job samples at a time, 32 may wait),
fires N requests at once from N threads, and records how many were answered, how many were refused (and with
what message), p50 / p95 latency of the answered ones, whether the server still answers afterwards, and the
server's peak resident memory (VmHWM of its process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ldmkit.serve import FROM_PROMPT

ROOT = Path(__file__).resolve().parents[1]


def _post(url: str, payload: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def call(base: str, inputs: list, timeout: float) -> tuple[str, str]:
    """One text_to_image call -> ("answered" | "refused" | "error", detail)."""
    try:
        event = _post(f"{base}gradio_api/call/text_to_image", {"data": inputs}, timeout)["event_id"]
        with urllib.request.urlopen(f"{base}gradio_api/call/text_to_image/{event}", timeout=timeout) as r:
            kind = None
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind in ("complete", "error"):
                    data = line.split(":", 1)[1].strip()
                    if kind == "complete":
                        return "answered", ""
                    return ("refused", "queue_full") if "queue is full" in data.lower() else ("error", data[:200])
        return "error", "stream ended without a result"
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        if "queue is full" in body.lower():
            return "refused", "queue_full"
        return "error", f"HTTP {e.code}: {body[:200]}"
    except OSError as e:
        return "error", f"{type(e).__name__}: {e}"


def peak_rss_mib(pid: int | None) -> float | None:
    if pid is None or not Path(f"/proc/{pid}/status").exists():
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def load_test(base: str, n: int = 100, steps: int = 20, num: int = 1, timeout: float = 600,
              pid: int | None = None, pipeline: str = "fashion-mnist") -> dict:
    """Fire n requests at once; every outcome, latencies and the server's state afterwards."""
    inputs = [pipeline, "a photo of a sneaker", "", 3.0, 0.7, "", "cfg", 0, FROM_PROMPT,
              "pipeline default", steps, 0, num, "full denoiser"]
    results: list[tuple[str, str, float]] = [None] * n  # type: ignore[list-item]
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        t = time.perf_counter()
        kind, detail = call(base, [*inputs[:11], i, *inputs[12:]], timeout)
        results[i] = (kind, detail, time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    wall = time.perf_counter() - t0
    lat = sorted(r[2] for r in results if r and r[0] == "answered")
    try:
        with urllib.request.urlopen(base, timeout=10) as r:
            alive = r.status == 200
    except OSError:
        alive = False

    def pct(q: float):
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None
    return {
        "requests": n, "answered": sum(1 for r in results if r and r[0] == "answered"),
        "refused": sum(1 for r in results if r and r[0] == "refused"),
        "refused_messages": sorted({r[1] for r in results if r and r[0] == "refused"}),
        "other_errors": sum(1 for r in results if not r or r[0] == "error"),
        "error_examples": sorted({r[1] for r in results if r and r[0] == "error"})[:3],
        "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95), "wall_s": round(wall, 1),
        "server_answers_after": alive, "server_peak_rss_mib": peak_rss_mib(pid),
        "settings": {"steps": steps, "images_per_request": num, "pipeline": pipeline},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    from ldmkit.serve import background_server
    with background_server(["fashion-mnist"], cwd=ROOT) as (base, proc):
        r = load_test(base, args.n, args.steps, args.num, pid=proc.pid)
    r.update(machine=f"{platform.machine()}, {os.cpu_count()} cores", load_average=os.getloadavg(),
             command="benchmarks/bench_serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(json.dumps(r, indent=1))
    Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    return 0 if r["other_errors"] == 0 and r["server_answers_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
