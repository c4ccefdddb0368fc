"""The rating app's responsiveness: start time, time from a rating to the next pair, and a load test.

    python bench/app.py --json                      # embedded model + embedded-ppd, as `diffpref app` serves it

- ``start_s``: building the service (model, adapter, database) and launching the Gradio server with
  `diffpref app`'s defaults, until the URL answers (target: 30 s on 2 CPU cores).
- ``rating_to_next_pair_ms``: one person through gradio_client rates ``--ratings`` pairs. Each time,
  after ``--think`` seconds of looking at the pair (the background thread makes the next pairs
  meanwhile, as it does while a person decides), the clock runs from sending ``rate`` until
  ``next_pair`` has returned the next pair's images (target: 1 s). Median, 90th percentile and max.
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


def start_app(**config):
    from diffpref.app.config import AppConfig
    from diffpref.app.server import launch_app
    from diffpref.app.service import RatingService

    started = time.perf_counter()
    service = RatingService(AppConfig(**config))
    demo, url = launch_app(service, "127.0.0.1", None, prevent_thread_lock=True, quiet=True)
    return service, demo, url, time.perf_counter() - started


def rating_latencies(url: str, ratings: int, think: float) -> list[float]:
    from gradio_client import Client

    client = Client(url, verbose=False)
    pair = client.predict("bench", api_name="/next_pair")
    out = []
    for i in range(ratings):
        time.sleep(think)
        t0 = time.perf_counter()
        client.predict("bench", pair["pair_id"], ("left", "right")[i % 2], api_name="/rate")
        pair = client.predict("bench", api_name="/next_pair")
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", default="embedded-ppd")
    parser.add_argument("--ratings", type=int, default=12, help="timed ratings of one person")
    parser.add_argument("--think", type=float, default=2.0, help="seconds a person looks at a pair before rating")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default prints it too)")
    args = parser.parse_args(argv)
    if args.ratings < 1 or args.clients < 1 or args.per_client < 1 or args.think < 0:
        parser.error("--ratings, --clients and --per-client must be >= 1 and --think >= 0")

    import torch
    from bench_timing import device_label  # beside this script

    from diffpref.app.client_load import check_ratings, rate_concurrently

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what the app's default picks
    result: dict = {"model": args.model, "adapter": args.adapter, "device": device_label(device)}
    with tempfile.TemporaryDirectory() as tmp:
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
    print(json.dumps(result))
    return 0 if stored["stored"] == stored["expected"] and not stored["people_with_wrong_ratings"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
