"""``koinon-operator``: run the kopf operator for AIJob and VolunteerNode."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# kube-apiserver's limit on the nesting of a JSON request body: what it stores, and then serves to
# every LIST and watch. spec.runtimeEnv is x-kubernetes-preserve-unknown-fields, so anyone who may
# create an AIJob can store one nested that deep (parse_spec refuses such a job; kopf must decode it
# first).
KUBE_API_MAX_NESTING = 10000
# Python's json decodes (and encodes, compares, prints) one level per recursion, and copy.deepcopy,
# which kopf runs on every object it processes (its diff base), takes two frames per level; the
# rest is for the stack they run under. With Python's default of 1000, kopf's watch failed on a
# runtimeEnv about 1000 levels deep and the operator exited, at every restart: no AIJob of any
# namespace was served, and the log named none. The C stack holds these walks: json's and
# equality's take about 200 bytes of it per level (deepcopy's Python frames none), 2 MiB for 10000
# levels, and the main thread (kopf decodes in it) and every thread Python starts (the kubernetes
# client's LISTs, in asyncio.to_thread) have 8 MiB under Linux's default `ulimit -s`. The cost: a
# recursion bug that goes through C at each level (map, sorted's key) now overflows that stack, a
# crash, before it reaches the limit; one on Python frames alone still raises RecursionError.
RECURSION_LIMIT = 3 * KUBE_API_MAX_NESTING


def raise_recursion_limit() -> None:
    """Lets the process decode and copy any object kube-apiserver stores (RECURSION_LIMIT)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="koinon-operator", description=__doc__)
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster or $KUBECONFIG)")
    parser.add_argument("--ray-dashboard", help="Ray dashboard URL (Job Submission API)")
    parser.add_argument("--poll-interval", type=float, help="seconds between reconciles of one AIJob")
    parser.add_argument(
        "--namespace", help="run the AIJobs of one namespace (default: all); one operator of a pool leads at a time"
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        help="seconds a deleted AIJob waits for an unreachable Ray to stop its job (default 120)",
    )
    parser.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    # Handlers read their configuration from the environment at import time (kopf decorators are
    # module-level), so flags are turned into environment variables before the import.
    if args.kubeconfig:
        # kopf would only say, in a traceback, that it ran out of credentials.
        try:
            with open(args.kubeconfig, "rb"):
                pass
        except OSError as error:
            print(f"koinon-operator: --kubeconfig {args.kubeconfig}: {error.strerror}", file=sys.stderr)
            sys.exit(2)
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.ray_dashboard:
        os.environ["KOINON_RAY_DASHBOARD"] = args.ray_dashboard
    if args.poll_interval is not None:  # 0 too, to be refused below rather than ignored
        os.environ["KOINON_POLL_INTERVAL"] = str(args.poll_interval)
    if args.namespace:
        os.environ["KOINON_NAMESPACE"] = args.namespace
    if args.stop_grace is not None:
        os.environ["KOINON_STOP_GRACE"] = str(args.stop_grace)

    # Checked before kopf starts: raised from its startup handler, kopf would retry every minute
    # and never reconcile, with the operator looking alive.
    from koinon_operator.config import OperatorConfig
    from koinon_operator.leadership import LeaseSettings

    try:
        # The OpenTelemetry SDK refuses a non-integer OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT on import.
        from koinon_operator.telemetry import exporter_settings_problem

        OperatorConfig.from_env()  # what the handlers will read at import
        LeaseSettings.from_env()
    except ValueError as error:
        print(f"koinon-operator: {error}", file=sys.stderr)
        sys.exit(2)
    problem = exporter_settings_problem()
    if problem is not None:
        print(f"koinon-operator: {problem}", file=sys.stderr)
        sys.exit(2)

    # Before kopf's first request: it decodes every AIJob it lists and watches, whole.
    raise_recursion_limit()
    import kopf

    from koinon_operator import handlers

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf logs every successful timer run at INFO: too much with hundreds of jobs.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        standalone=True,
        clusterwide=handlers.CONFIG.namespace is None,
        namespaces=[handlers.CONFIG.namespace] if handlers.CONFIG.namespace else [],
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
