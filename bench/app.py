"""The rating app's responsiveness: start time, time from a rating to the next pair, and a load test.

    python bench/app.py --json                      # embedded model + embedded-ppd, as `diffpref app` serves it
    python bench/app.py --runs fast --json          # only the fast rater (about 3 minutes on 2 cores)

- ``start_s``: building the service (model, adapter, database) and launching the Gradio server with
  `diffpref app`'s defaults, until the URL answers (target: 30 s on 2 CPU cores).
- ``rating_to_next_pair_ms``: one person through gradio_client rates ``--ratings`` pairs. Each time,
  after ``--think`` seconds of looking at the pair (the background thread makes the next pairs
  meanwhile, as it does while a person decides), the clock runs from sending ``rate`` until
  ``next_pair`` has returned the next pair's images (target: 1 s). Median, 90th percentile and max.
- ``fast_rater``: the person who rates every ``--fast-think`` (1.5) seconds, ``--fast-ratings`` (30) times,
  on a fresh server that has done its idle work (``warm_pool_s``: start to a full pool and the profile's
  probe images).
  ``first_pair_ms``: a new person's first ``next_pair`` after signing in (target 3 s);
  ``rating_to_next_pair_ms``: p50 / p95 / max (target p95 1 s); ``profile_ms``: ``profile`` right after
  the last rating (target 2 s). ``loadavg`` is ``os.getloadavg()`` at the start and end: a shared machine's
  figures are only comparable at a similar load.
- ``load``: ``--clients`` people at once, ``--per-client`` ratings each, through the API
  (``diffpref.app.client_load``), against a second server on its own database whose pairs are
  clean world renders (``pair_images="render"``: the load test is about the server and the store,
  not about generation speed). ``stored`` must equal ``expected`` with nobody's ratings wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_START_S = 30.0
TARGET_NEXT_PAIR_MS = 1000.0
TARGET_FIRST_PAIR_MS = 3000.0
TARGET_PROFILE_MS = 2000.0
RUNS = ("fast", "steady", "load")


def start_app(**config):
    from diffpref.app.config import AppConfig
    from diffpref.app.server import launch_app
    from diffpref.app.service import RatingService

    started = time.perf_counter()
    service = RatingService(AppConfig(**config))
    demo, url = launch_app(service, "127.0.0.1", None, prevent_thread_lock=True, quiet=True)
    return service, demo, url, time.perf_counter() - started


def rate_in_turn(client, user: str, pair: dict, ratings: int, think: float) -> list[float]:
    """Seconds from each rating to the next pair on screen, for a person who looks ``think`` s at each pair."""
    out = []
    for i in range(ratings):
        time.sleep(think)
        t0 = time.perf_counter()
        client.predict(user, pair["pair_id"], ("left", "right")[i % 2], api_name="/rate")
        pair = client.predict(user, api_name="/next_pair")
        out.append(time.perf_counter() - t0)
    return out


def rating_latencies(url: str, ratings: int, think: float) -> list[float]:
    from gradio_client import Client

    client = Client(url, verbose=False)
    return rate_in_turn(client, "bench", client.predict("bench", api_name="/next_pair"), ratings, think)


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {"p50": round(statistics.median(ms), 1), "p95": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
            "max": round(ms[-1], 1), "n": len(ms)}


def fast_rater(model: str, adapter: str, db: str, ratings: int, think: float, warm_timeout: float) -> dict:
    """A new person on a server that has been idle long enough to fill its pool, rating every ``think`` s."""
    from gradio_client import Client

    loadavg = [round(x, 2) for x in os.getloadavg()]
    service, demo, url, start_s = start_app(model=model, adapter=adapter, db=db)
    try:
        started = time.perf_counter()
        while not service.warm and time.perf_counter() - started < warm_timeout:
            time.sleep(0.2)
        warm_s = time.perf_counter() - started + start_s
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        pair = client.predict("fast", api_name="/next_pair")
        first = time.perf_counter() - t0
        waits = rate_in_turn(client, "fast", pair, ratings, think)
        t0 = time.perf_counter()
        profile = client.predict("fast", api_name="/profile")
        profile_s = time.perf_counter() - t0
        pool = {"groups": len(service.pool), "max_groups": service.pool.max_groups}
    finally:
        demo.close()
        service.close()
    return {"ratings": ratings, "think_s": think, "start_s": round(start_s, 2), "warm_pool_s": round(warm_s, 1),
            "first_pair_ms": round(1000 * first, 1), "target_first_pair_ms": TARGET_FIRST_PAIR_MS,
            "rating_to_next_pair_ms": percentiles(waits), "target_p95_ms": TARGET_NEXT_PAIR_MS,
            "profile_ms": round(1000 * profile_s, 1), "profile_stale": profile.get("stale"),
            "target_profile_ms": TARGET_PROFILE_MS, "pool_at_end": pool,
            "loadavg": {"start": loadavg, "end": [round(x, 2) for x in os.getloadavg()]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", default="embedded-ppd")
    parser.add_argument("--ratings", type=int, default=12, help="timed ratings of one person")
    parser.add_argument("--think", type=float, default=2.0, help="seconds a person looks at a pair before rating")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--fast-ratings", type=int, default=30, help="fast rater: ratings")
    parser.add_argument("--fast-think", type=float, default=1.5, help="fast rater: seconds between ratings")
    parser.add_argument("--warm-timeout", type=float, default=600, help="fast rater: most seconds to wait for the pool")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default prints it too)")
    args = parser.parse_args(argv)
    if args.ratings < 1 or args.clients < 1 or args.per_client < 1 or args.think < 0:
        parser.error("--ratings, --clients and --per-client must be >= 1 and --think >= 0")
    runs = [r for r in args.runs.split(",") if r]
    if not runs or set(runs) - set(RUNS):
        parser.error(f"--runs {args.runs!r}: choose from {', '.join(RUNS)}")

    import torch
    from bench_timing import device_label  # beside this script

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what the app's default picks
    result: dict = {"model": args.model, "adapter": args.adapter, "device": device_label(device)}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if "fast" in runs:
            result["fast_rater"] = fast = fast_rater(args.model, args.adapter, f"{tmp}/fast.db", args.fast_ratings,
                                                     args.fast_think, args.warm_timeout)
            ok &= fast["pool_at_end"]["groups"] > 0
        if "steady" in runs:
            ok &= steady(args, result, tmp)
        if "load" in runs:
            ok &= load(args, result, tmp)
    print(json.dumps(result))
    return 0 if ok else 1


def steady(args, result: dict, tmp: str) -> bool:
    """One person rating every ``--think`` seconds on a server just started (its pool still filling)."""
    service, demo, url, start_s = start_app(model=args.model, adapter=args.adapter, db=f"{tmp}/ratings.db")
    try:
        latencies = sorted(rating_latencies(url, args.ratings, args.think))
    finally:
        demo.close()
        service.close()
    ms = [1000 * s for s in latencies]
    result.update({
        "start_s": round(start_s, 2), "target_start_s": TARGET_START_S,
        "rating_to_next_pair_ms": {"median": round(statistics.median(ms), 1),
                                   "p90": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1),
                                   "max": round(ms[-1], 1), "n": len(ms), "think_s": args.think},
        "target_next_pair_ms": TARGET_NEXT_PAIR_MS, "pair_mode": service.config.pair_mode,
        "candidates": service.config.candidates, "candidate_prompts": service.config.candidate_prompts,
    })
    return True


def load(args, result: dict, tmp: str) -> bool:
    """Many people at once through the API, on clean world renders: nothing lost, nothing duplicated."""
    from diffpref.app.client_load import check_ratings, rate_concurrently

    service, demo, url, _ = start_app(model=args.model, adapter=args.adapter, db=f"{tmp}/load.db",
                                      pair_images="render", pair_mode="random")
    try:
        run = rate_concurrently(url, args.clients, args.per_client)
        stored = check_ratings(service.store, args.clients, args.per_client)
    finally:
        demo.close()
        service.close()
    result["load"] = {**run, **stored, "seconds": round(run["seconds"], 1),
                      "ratings_per_s": round(stored["stored"] / run["seconds"], 1)}
    return stored["stored"] == stored["expected"] and not stored["people_with_wrong_ratings"]


if __name__ == "__main__":
    raise SystemExit(main())
