"""Tracked objects through real peers: shared once, then changes as ordered deltas."""

from __future__ import annotations

from peer.tracked import Tracked


class Model(metaclass=Tracked):
    def __init__(self) -> None:
        self.version = 0
        self.weights = [0.0] * 4
        self.labels = {"a": 1}
        self.seen = set()


def read_state(model):
    return (model.version, list(model.weights), dict(model.labels), sorted(model.seen))


def test_deltas_arrive_in_order_before_the_next_task(make_pool):
    model = Model()
    with make_pool(2) as pool:
        handle = pool.share(model)
        expected = []
        futures = []
        for step in range(40):
            model.version = step
            model.weights[step % 4] += 1.5
            model.labels[f"k{step}"] = step
            if step % 3 == 0:
                model.seen.add(step)
            if step % 5 == 4:
                del model.labels[f"k{step - 1}"]
            expected.append(read_state(model))
            futures.append(pool.submit(read_state, handle))
        got = [f.result(60) for f in futures]
        # Every task saw at least the state at its submission, never an older one,
        # and the last tasks see the final state.
        versions = [g[0] for g in got]
        assert all(v >= step for step, v in enumerate(versions))
        assert got[-1] == expected[-1]
        assert pool.submit(read_state, handle).result(30) == read_state(model)
        # Whole-map reads see the current replica on every worker.
        model.weights = [9.0, 8.0]
        assert list(pool.map(lambda h: read_state(h)[1], [handle] * 8)) == [[9.0, 8.0]] * 8
