"""``flower-supernode`` with shorter waits, for loopback deployments and the benchmark.

    python -m flowerbed.simulation.supernode --poll 0.2 <flower-supernode arguments>

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) sleeps 3 s after every look
at the SuperLink that found no message, 0.5 s between looks for its ClientApp's reply, and
retries a message's missing arrays after 1 s, 2 s, ... (none of it configurable). On a loopback
deployment most of a round's non-training time is these waits: the next round's message
arrives while the SuperNode sleeps (about 1.5 s per round on average, measured with
``simulation/bench.py``). This launcher runs Flower's own ``flower-supernode`` entry point in
this process after capping those sleeps at ``--poll`` seconds and binding a 50 ms (doubling, at
most 0.5 s) backoff to its ``pull_objects``, the same as the ServerApp side does
(:func:`flowerbed.common.protocol._short_http_backoff`). Nothing else of the SuperNode changes.

Measured (README, benchmark at ``c19da9b``): with 0.2 s the message reached the ClientApp
1.4 s sooner, but the round was not faster then (the ClientApp waited longer for the arrays;
the SuperLink kept its state in SQLite then: SQL writes for every message and object). Since
``5d74286`` the deployment keeps the SuperLink's state in memory (Flower's default) and uses
0.2 s by default; the README's benchmark section has the measured effect. A SuperNode that
polls every 0.2 s sends ~15x more requests to the SuperLink while idle than Flower's: fine on
loopback and for a few nodes, not what a large deployment should do (``--poll 3`` gives
Flower's behaviour).
"""

from __future__ import annotations

import functools
import sys
import time as _time


class _CappedTime:
    """The ``time`` module as seen by the SuperNode loop: ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def patch(poll: float) -> None:
    """Cap the SuperNode loop's sleeps at ``poll`` s and shorten its object-pull backoff."""
    if not poll > 0:
        raise ValueError(f"--poll {poll}: must be > 0 seconds")
    import flwr.supernode.start_client_internal as sci

    sci.time = _CappedTime(poll)
    if not isinstance(sci.pull_objects, functools.partial):
        sci.pull_objects = functools.partial(
            sci.pull_objects, initial_backoff=0.05, backoff_cap=0.5
        )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    poll = 0.2
    if "--poll" in args:
        i = args.index("--poll")
        try:
            poll = float(args[i + 1])
        except (IndexError, ValueError):
            sys.exit("--poll: expected a number of seconds")
        del args[i : i + 2]
    try:
        patch(poll)
    except ValueError as err:
        sys.exit(str(err))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
