#!/usr/bin/env python3
"""Time Flower's aggregation functions on the inputs of our benchmark and check
that our results match theirs.

    cargo bench -p agentmesh-federated --bench aggregators -- --quick --npy-dir /tmp/aggbench
    pip3 install flwr numpy
    python3 federated/scripts/flower_baseline.py /tmp/aggbench

The Rust benchmark writes `updates.npy` (30 x 1,000,000 float32, seed 42) and
our output for each rule (`ours_<rule>.npy`, plus the Krum/Bulyan selections).
This script runs both of Flower's APIs on the same updates, with the same
parameters (f = 6, Multi-Krum keeps 24, trimmed mean cuts 10% per side):

- legacy: `flwr.server.strategy.aggregate` (`aggregate`, `aggregate_krum`,
  `aggregate_median`, `aggregate_trimmed_avg`, `aggregate_bulyan` with Krum);
- new: the `flwr.serverapp.strategy` helpers the strategies call
  (`select_multikrum`, `aggregate_arrayrecords`, `trim_mean`,
  `aggregate_n_closest_weights`, and `np.median` as `FedMedian` does).

It prints the median time of each (one run for the slow legacy Bulyan) and
the largest difference from our output. Inputs are built before timing.
"""
import sys
import time
from importlib.metadata import version

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.server.strategy import aggregate as legacy
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

F = 6
M = 24
BETA = 0.1


def timed(fn, reps):
    out = fn()  # warm-up, and the result we compare
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return (times[len(times) // 2] if times else float("nan")), out


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/aggbench"
    updates = np.load(f"{d}/updates.npy")
    n = updates.shape[0]
    rows = [updates[i] for i in range(n)]
    results = [([r], 1) for r in rows]

    def contents():
        return [
            RecordDict(
                {"arrays": ArrayRecord([r]), "metrics": MetricRecord({"num-examples": 1})}
            )
            for r in rows
        ]

    def index_of(vec):
        for i, r in enumerate(rows):
            if np.array_equal(r, vec):
                return i
        return -1

    def new_fedavg(c):
        return aggregate_arrayrecords(c, "num-examples").to_numpy_ndarrays()[0]

    def new_krum(c, m):
        picked = select_multikrum(c, F, m)
        return aggregate_arrayrecords(picked, "num-examples").to_numpy_ndarrays()[0]

    def new_median(c):
        layers = [x["arrays"].to_numpy_ndarrays()[0] for x in c]
        return np.asarray(np.median(np.stack(layers), axis=0))

    def new_trimmed(c):
        layers = [x["arrays"].to_numpy_ndarrays()[0] for x in c]
        return trim_mean(np.stack(layers), BETA)

    def new_bulyan(c):
        theta = n - 2 * F
        picked = select_multikrum(c, F, theta)
        selected = [x["arrays"].to_numpy_ndarrays() for x in picked]
        median = [np.median(a, axis=0) for a in zip(*selected)]
        return aggregate_n_closest_weights(median, selected, theta - 2 * F)[0]

    rules = [
        ("fedavg", lambda: legacy.aggregate(results)[0], new_fedavg, 5),
        ("krum", lambda: legacy.aggregate_krum(results, F, 0)[0], lambda c: new_krum(c, 1), 3),
        ("multikrum", lambda: legacy.aggregate_krum(results, F, M)[0], lambda c: new_krum(c, M), 3),
        ("trimmed_mean", lambda: legacy.aggregate_trimmed_avg(results, BETA)[0], new_trimmed, 3),
        ("median", lambda: legacy.aggregate_median(results)[0], new_median, 3),
        (
            "bulyan",
            lambda: legacy.aggregate_bulyan(list(results), F, legacy.aggregate_krum, to_keep=0)[0],
            new_bulyan,
            0,
        ),
    ]
    print(f"flwr {version('flwr')}, numpy {np.__version__}; n = {n}, d = {updates.shape[1]}, f = {F}")
    print("| rule | Flower legacy (ms) | Flower new (ms) | max |ours − legacy| | max |ours − new| |")
    print("|---|---|---|---|---|")
    for name, old_fn, new_fn, reps in rules:
        ours = np.load(f"{d}/ours_{name}.npy")
        if reps > 0:
            t_old, out_old = timed(old_fn, reps)
            it = iter([contents() for _ in range(reps + 1)])
            t_new, out_new = timed(lambda: new_fn(next(it)), reps)
        else:  # too slow to repeat: one timed run each
            t = time.perf_counter()
            out_old = old_fn()
            t_old = time.perf_counter() - t
            c = contents()
            t = time.perf_counter()
            out_new = new_fn(c)
            t_new = time.perf_counter() - t
        diff_old = float(np.max(np.abs(ours - out_old)))
        diff_new = float(np.max(np.abs(ours - out_new)))
        print(f"| {name} | {1e3 * t_old:.0f} | {1e3 * t_new:.0f} | {diff_old:.2e} | {diff_new:.2e} |")
        if name == "krum":
            sel = np.load(f"{d}/ours_krum_selected.npy").astype(int).tolist()
            print(f"|   krum pick | legacy {index_of(out_old)} | new {index_of(out_new)} | ours {sel} | |")


if __name__ == "__main__":
    main()
