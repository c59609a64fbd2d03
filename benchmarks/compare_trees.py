"""Plain put/get of two source trees of pigeon, interleaved: is a change within noise?

Run:  python benchmarks/compare_trees.py OLD_TREE NEW_TREE [ROUNDS]
      (e.g. git worktree add /tmp/old <commit>, then build its C fast path there)

Each round starts a ``pigeon serve --memory`` from each tree and, from the same tree, one
client: 20,000 single confirmed puts then 20,000 gets of 64 B, 200 x put_many(100), and a
local queue's 200,000 puts then gets. Rounds alternate old/new and new/old; the table shows
medians and every run. opentelemetry is not loaded (NO_OTEL semantics), so the numbers are
those of a user without the extra.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from _serve import free_port, wait_listening

CLIENT = """
import json, time, pigeon
try:
    import pigeon._otel as o
    o._api = False
except ImportError:
    pass
q = pigeon.Queue("pigeon://127.0.0.1:{port}/b", serializer="raw")
N, p = 20000, b"x" * 64
t = time.perf_counter()
for _ in range(N): q.put(p)
put = N / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(N): q.get()
get = N / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(200): q.put_many([p] * 100)
many = 20000 / (time.perf_counter() - t)
q.get_many(10000); q.get_many(10000)
local = pigeon.Queue(serializer="raw")
t = time.perf_counter()
for _ in range(200000): local.put(p)
lput = 200000 / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(200000): local.get()
lget = 200000 / (time.perf_counter() - t)
print(json.dumps(dict(broker_put=put, broker_get=get, broker_put_x100=many,
                      local_put=lput, local_get=lget)))
"""


def run(tree: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{tree}/src")
    port = free_port()
    broker = subprocess.Popen(
        [sys.executable, "-m", "pigeon", "serve", "--memory", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port)
        out = subprocess.run(
            [sys.executable, "-c", CLIENT.replace("{port}", str(port))],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        result: dict[str, float] = json.loads(out.stdout)
        return result
    finally:
        broker.terminate()
        broker.wait()


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    trees = {"old": sys.argv[1], "new": sys.argv[2]}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            results[name].append(run(trees[name]))
    print(f"{'per second':<18}{'old (median)':>14}{'new (median)':>14}{'new/old':>9}   runs")
    for key in results["old"][0]:
        old = statistics.median(x[key] for x in results["old"])
        new = statistics.median(x[key] for x in results["new"])
        runs = (
            " ".join(f"{x[key]:,.0f}" for x in results["old"])
            + " | "
            + " ".join(f"{x[key]:,.0f}" for x in results["new"])
        )
        print(f"{key:<18}{old:>14,.0f}{new:>14,.0f}{new / old:>9.2f}   {runs}")


if __name__ == "__main__":
    main()
