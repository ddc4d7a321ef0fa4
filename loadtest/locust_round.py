"""One round of Locust, headless, through its library API, in a process of its own.

    python -m loadtest.locust_round --host URL --kind chat|stream|embed --users N \\
        --warmup S --duration S [--ramp S] --out FILE

Runs the user class of ``loadtest/locustfile.py`` for ``--kind`` (configured by the same
``LOAD_*`` environment variables as a plain ``locust`` run) and writes every sample that
ended inside the recording window to ``FILE`` (see :mod:`loadtest.samples`). The library API
rather than the ``locust`` command because the runner needs sub-second warm-up and window
control and exact timings, which the command line's CSV rounds away.
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401 (first: it monkey-patches the standard library for gevent)

# isort: on
import argparse
import sys

import gevent
from locust.env import Environment

from loadtest import locustfile
from loadtest.samples import Recorder, round_arguments

USER_CLASSES = {"chat": locustfile.ChatUser, "stream": locustfile.StreamingChatUser, "embed": locustfile.EmbeddingsUser}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return round_arguments("python -m loadtest.locust_round", sorted(USER_CLASSES), argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder()

    def on_request(name: str, response_time: float, exception: BaseException | None = None, **_: object) -> None:
        recorder.add(name, response_time, None if exception is None else f"{type(exception).__name__}: {exception}")

    env = Environment(user_classes=[USER_CLASSES[args.kind]], host=args.host)
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    rate = args.users / args.ramp if args.ramp > 0 else args.users * 100.0
    runner.start(args.users, spawn_rate=rate)
    gevent.sleep(args.ramp + args.warmup)
    recorder.start()
    gevent.sleep(args.duration)
    recorder.stop()
    runner.quit()
    recorder.dump(args.out, users=args.users, client="locust")
    return 0


if __name__ == "__main__":
    sys.exit(main())
