"""Loopback load test of the Serve endpoint: batching on vs off, 1 vs 2 model replicas, in one run; or (--shed)
load shedding past capacity.

    python benchmarks/serve_load.py --requests 1000 --concurrency 16
    python benchmarks/serve_load.py --checkpoint runs/tiny/stage3/model --index runs/tiny/index
    python benchmarks/serve_load.py --shed --overload 1,2,4 --seconds 20 --bound-s 10

--shed: one model replica (batching on); its capacity is measured closed-loop (--concurrency clients, --requests
requests), then requests are sent open-loop (a fixed arrival rate, each on its own, whatever the answers) at each
--overload multiple of that capacity for --seconds. Every request must be answered 200, or 503 in the error shape
with Retry-After, within --bound-s seconds (the client's timeout); anything else (another status, a 503 of another
shape, a timeout, a refused connection) counts as an other error. It prints the table of docs/serving.md and exits
1 if any request was an other error.

Every configuration gets the same fixed number of requests (bounded also by --max-seconds) from an aiohttp
client to 127.0.0.1 only, at a fixed concurrency; it prints QPS, p50/p95/p99 latency and the error counts, then
the ratio of batching to no batching. Without --checkpoint/--index it makes a random-init tiny model and the
index of a small synthetic CIRR split in a temporary directory (the speed of serving, not of a trained model).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path


def tiny_model_and_index(root: Path) -> tuple[str, str, list[dict]]:
    import torch

    from detailfusion.library.config import EvalConfig
    from detailfusion.library.data.synthetic import write_synthetic
    from detailfusion.library.model import build_model, save_model
    from detailfusion.platform.eval.evaluate import build_index

    torch.manual_seed(0)
    save_model(*build_model("tiny"), root / "model")
    write_synthetic("cirr", root / "cirr", pairs=300, seed=0, image_size=64)
    build_index(EvalConfig(dataset="cirr", root=str(root / "cirr"), split="val", checkpoint=str(root / "model"),
                           out=str(root / "index"), cpus_per_actor=0.5))
    return str(root / "model"), str(root / "index"), queries_from(root / "cirr", "val")


def queries_from(cirr_root: Path, split: str) -> list[dict]:
    """JSON bodies: each caption's reference image (base64 PNG) + its text."""
    captions = json.loads((cirr_root / f"captions/cap.rc2.{split}.json").read_text())
    paths = json.loads((cirr_root / f"image_splits/split.rc2.{split}.json").read_text())
    return [{"image": base64.b64encode((cirr_root / paths[c["reference"]]).read_bytes()).decode(), "text": c["caption"],
             "top_k": 10} for c in captions[:64]]


async def load(url: str, bodies: list[dict], count: int, concurrency: int, max_seconds: float) -> dict:
    import aiohttp

    latencies, statuses, failures = [], {}, 0
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(count))

    async def worker(session):
        nonlocal failures
        for i in counter:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                async with session.post(url, json=bodies[i % len(bodies)]) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except aiohttp.ClientError:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    ok = statuses.get(200, 0)
    quantile = lambda q: 1000 * statistics.quantiles(latencies, n=100)[q - 1] if len(latencies) > 1 else float("nan")  # noqa: E731
    return {"requests": sum(statuses.values()) + failures, "ok": ok, "seconds": seconds, "qps": ok / seconds,
            "p50_ms": quantile(50), "p95_ms": quantile(95), "p99_ms": quantile(99),
            "server_errors": sum(n for s, n in statuses.items() if s >= 500) + failures,
            "client_errors": sum(n for s, n in statuses.items() if 400 <= s < 500)}


async def open_loop(url: str, bodies: list[dict], rate: float, seconds: float, bound_s: float) -> dict:
    """``rate`` requests/s for ``seconds``, each started on schedule whatever the others' answers (an open loop: load
    does not back off when the server slows down) -> counts of 200 / 503 (error shape + Retry-After) / other, and
    latencies (s) of the 200s and of all answers."""
    import aiohttp

    ok, shed, other, answered = [], [], {}, []

    async def one(session, body):
        start = time.perf_counter()
        try:
            async with session.post(url, json=body) as response:
                data = await response.read()
                elapsed = time.perf_counter() - start
                answered.append(elapsed)
                if response.status == 200:
                    ok.append(elapsed)
                    return
                if response.status == 503 and response.headers.get("Retry-After", "").isdigit():
                    try:
                        if json.loads(data)["error"]["code"] == "overloaded":
                            shed.append(elapsed)
                            return
                    except (ValueError, KeyError, TypeError):
                        pass
                kind = f"HTTP {response.status}"
        except asyncio.TimeoutError:
            kind = f"no answer in {bound_s:g} s"
        except aiohttp.ClientError as exc:
            kind = type(exc).__name__
        other[kind] = other.get(kind, 0) + 1

    timeout = aiohttp.ClientTimeout(total=bound_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started, tasks = time.perf_counter(), []
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, bodies[i % len(bodies)])))
        sent_in = time.perf_counter() - started
        await asyncio.gather(*tasks)
    quantile = lambda xs, q: 1000 * statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else float("nan")  # noqa: E731
    return {"sent": len(tasks), "sent_in_s": sent_in, "ok": len(ok), "shed": len(shed),
            "other": sum(other.values()), "other_kinds": other, "p50_ms": quantile(ok, 50), "p99_ms": quantile(ok, 99),
            "shed_p99_ms": quantile(shed, 99), "max_answer_ms": 1000 * max(answered, default=float("nan"))}


def shed_table(url: str, bodies: list[dict], args) -> int:
    """Capacity (closed loop), then each --overload multiple of it open-loop; prints the table, returns other errors."""
    capacity = asyncio.run(load(url, bodies, args.requests, args.concurrency, args.max_seconds))
    print(f"capacity: {capacity['qps']:.1f} QPS ({capacity['ok']}/{capacity['requests']} ok at concurrency "
          f"{args.concurrency}, p50 {capacity['p50_ms']:.0f} ms, p99 {capacity['p99_ms']:.0f} ms)", flush=True)
    rows = []
    for factor in (float(f) for f in args.overload.split(",")):
        rate = factor * capacity["qps"]
        result = asyncio.run(open_loop(url, bodies, rate, args.seconds, args.bound_s))
        rows.append({"factor": factor, "rate": rate, **result})
        print(f"{factor:g}x ({rate:.0f}/s, sent in {result['sent_in_s']:.1f} s): {result} ", flush=True)
        time.sleep(2)  # let the queue drain between rows
    print(f"\n{platform.machine()}, {args.num_cpus} CPUs for Ray, 1 model replica (batching on, max batch "
          f"{args.max_batch_size}), max_ongoing_requests {args.max_ongoing_requests or 2 * args.max_batch_size}, "
          f"max_queued_requests {args.max_queued_requests}; capacity {capacity['qps']:.1f} QPS; open loop "
          f"{args.seconds:g} s per row; bound {args.bound_s:g} s; {time.strftime('%Y-%m-%d')}\n")
    print("| offered load | requests/s | sent | 200 | 503 | other errors | p50 of 200s (ms) | p99 of 200s (ms) | "
          "p99 of 503s (ms) | slowest answer (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['factor']:g}x capacity | {r['rate']:.0f} | {r['sent']} | {r['ok']} | {r['shed']} | {r['other']} | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['shed_p99_ms']:.0f} | {r['max_answer_ms']:.0f} |")
    errors = sum(r["other"] for r in rows)
    print(f"other errors: {errors}" + (f" {[r['other_kinds'] for r in rows]}" if errors else ""))
    return errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--index")
    parser.add_argument("--cirr-root", help="synthetic or real CIRR root for the query bodies (with --checkpoint)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--requests", type=int, default=1000, help="per configuration")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per configuration")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--shed", action="store_true", help="the load-shedding table instead (see above)")
    parser.add_argument("--overload", default="1,2,4", help="--shed: offered loads, multiples of the capacity")
    parser.add_argument("--seconds", type=float, default=20.0, help="--shed: open-loop seconds per offered load")
    parser.add_argument("--bound-s", type=float, default=10.0, help="--shed: a request unanswered by then fails")
    parser.add_argument("--max-ongoing-requests", type=int, help="--shed: per model replica (default 2 x batch)")
    parser.add_argument("--max-queued-requests", type=int, default=64, help="--shed: at the Frontend replica")
    args = parser.parse_args()

    import ray
    from ray import serve

    from detailfusion.library.config import ServeConfig
    from detailfusion.platform.serving.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint and args.index and args.cirr_root:
            checkpoint, index, bodies = args.checkpoint, args.index, queries_from(Path(args.cirr_root), args.split)
        else:
            ray.init(num_cpus=args.num_cpus, include_dashboard=True)
            checkpoint, index, bodies = tiny_model_and_index(Path(tmp))
        if not ray.is_initialized():
            ray.init(num_cpus=args.num_cpus, include_dashboard=True)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/search"
        random.seed(0)
        if args.shed:
            config = ServeConfig(checkpoint=checkpoint, index=index, port=port, max_batch_size=args.max_batch_size,
                                 min_replicas=1, max_replicas=1, replica_cpus=0.5, frontend_cpus=0.25,
                                 max_ongoing_requests=args.max_ongoing_requests,
                                 max_queued_requests=args.max_queued_requests)
            serve.run(build_app(config), name="detailfusion", route_prefix="/")
            asyncio.run(load(url, bodies, 32, 4, 30))  # warm-up, not counted
            errors = shed_table(url, bodies, args)
            serve.shutdown()
            raise SystemExit(1 if errors else 0)
        rows = []
        for replicas in (1, 2):
            for batching in (True, False):
                config = ServeConfig(checkpoint=checkpoint, index=index, port=port, batching=batching,
                                     max_batch_size=args.max_batch_size, min_replicas=replicas, max_replicas=replicas,
                                     replica_cpus=0.5, frontend_cpus=0.25)
                serve.run(build_app(config), name="detailfusion", route_prefix="/")
                asyncio.run(load(url, bodies, 32, 4, 30))  # warm-up, not counted
                result = asyncio.run(load(url, bodies, args.requests, args.concurrency, args.max_seconds))
                rows.append({"replicas": replicas, "batching": batching, **result})
                print(f"replicas {replicas} batching {'on ' if batching else 'off'}: {result['ok']}/{result['requests']} ok "
                      f"in {result['seconds']:.1f} s, {result['qps']:.1f} QPS, p50 {result['p50_ms']:.0f} ms, "
                      f"p95 {result['p95_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
                      f"{result['server_errors']} server errors, {result['client_errors']} client errors", flush=True)
        serve.shutdown()
    print(f"\n{platform.machine()}, {args.num_cpus} CPUs for Ray, concurrency {args.concurrency}, "
          f"{args.requests} requests per configuration, max batch {args.max_batch_size}\n")
    print("| replicas | batching | requests | QPS | p50 ms | p95 ms | p99 ms | server errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['replicas']} | {'on' if r['batching'] else 'off'} | {r['requests']} | {r['qps']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['server_errors']} |")
    for replicas in (1, 2):
        on, off = (next(r for r in rows if r["replicas"] == replicas and r["batching"] == b) for b in (True, False))
        print(f"batching / no batching QPS, {replicas} replica(s): {on['qps'] / off['qps']:.2f}x")
    total = sum(r["requests"] for r in rows)
    errors = sum(r["server_errors"] for r in rows)
    print(f"total {total} requests, {errors} server errors")


if __name__ == "__main__":
    main()
