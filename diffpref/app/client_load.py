"""Many people rating at once through the app's public API (gradio_client), and the check that nothing was lost.

Used by the load test (``tests/test_app.py``) and the app benchmark (``bench/app.py``): ``clients``
threads, each its own gradio client and person, call ``next_pair`` then ``rate`` ``per_client`` times
(choices cycle left, right, tie, skip). ``check_ratings`` then reads the store: every person must
have exactly ``per_client`` ratings, each of a different pair, with the choices in the order given.
"""

from __future__ import annotations

import threading
import time
from typing import Any

CHOICE_CYCLE = ("left", "right", "tie", "skip")


def load_user(k: int) -> str:
    return f"load{k:02d}"


def rate_concurrently(url: str, clients: int = 20, per_client: int = 50) -> dict[str, Any]:
    """Run the clients; returns ``{"clients", "per_client", "seconds", "errors"}`` (errors: first few reprs)."""
    from gradio_client import Client

    errors: list[str] = []

    def person(k: int) -> None:
        try:
            client = Client(url, verbose=False)
            for i in range(per_client):
                pair = client.predict(load_user(k), api_name="/next_pair")
                client.predict(load_user(k), pair["pair_id"], CHOICE_CYCLE[i % len(CHOICE_CYCLE)], api_name="/rate")
        except Exception as exc:  # collected: an exception in a thread would otherwise vanish
            errors.append(repr(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=person, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "per_client": per_client, "seconds": time.perf_counter() - started,
            "errors": errors[:5], "error_count": len(errors)}


def check_ratings(store, clients: int, per_client: int) -> dict[str, Any]:
    """What the store holds after ``rate_concurrently``: counts, and the people whose ratings are wrong."""
    wrong = []
    expected = [CHOICE_CYCLE[i % len(CHOICE_CYCLE)] for i in range(per_client)]
    for k in range(clients):
        rated = store.ratings_for(load_user(k))
        if (len(rated) != per_client or len({r["pair_id"] for r in rated}) != per_client
                or [r["choice"] for r in rated] != expected):
            wrong.append(load_user(k))
    return {"stored": store.count_ratings(), "expected": clients * per_client, "people_with_wrong_ratings": wrong}
