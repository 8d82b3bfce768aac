"""`llumnix-serve`: serve a model repository on one HTTP endpoint (and KServe gRPC beside it)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # about a million tokens of text: far past any context
# After the grace period, streams end with an error and connections close within this.
SHUTDOWN_BACKSTOP_S = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llumnix-serve",
        description="Serve every model of a model repository through Llumnix-scheduled vLLM instances.",
    )
    parser.add_argument("--model-repository", type=Path, required=True, help="folder with one sub-folder per model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001,
                        help="KServe v2 gRPC on this port, as Triton serves it (0: no gRPC)")
    parser.add_argument("--api-key", default=os.environ.get("LLUMNIX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLUMNIX_API_KEY)")
    parser.add_argument("--operations-api-key", default=os.environ.get("LLUMNIX_OPERATIONS_API_KEY"),
                        help="if set, only this key opens migrate, drain, resume, load and unload "
                             "(default: $LLUMNIX_OPERATIONS_API_KEY)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--max-parallel-starts", type=int, default=4,
                        help="engines started at the same time (they compete for CPU and memory)")
    parser.add_argument("--start-progress-s", type=float, default=15, metavar="SECONDS",
                        help="how often the terminal shows what a starting instance is doing")
    parser.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default="poll",
                        help="poll: serve every model folder and follow the repository as it changes; none: "
                             "serve the folders found at start, fixed; explicit: serve those named by "
                             "--load-model, and load/unload others through the repository API")
    parser.add_argument("--repository-quiet-s", type=float, default=0.5, metavar="SECONDS",
                        help="poll mode: act on a model folder once it has been unchanged this long")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="BYTES",
                        help="refuse (413) request bodies larger than this")
    parser.add_argument("--no-request-log", dest="request_log", action="store_false",
                        help="no log line per request (model, instance, tokens, TTFT, outcome)")
    parser.add_argument("--shutdown-grace-s", type=float, default=30, metavar="SECONDS",
                        help="on SIGTERM or SIGINT, how long running requests may take to finish before they "
                             "end with an error (new ones get 503 at once)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="place the instances on the nodes of this Ray cluster ('auto': the one this host "
                             "belongs to) instead of on this host; needs Ray (pip install 'llumnix-backend[ray]')")
    parser.add_argument("--load-model", action="append", default=[], metavar="NAME",
                        help="explicit mode: a model to load at start (repeatable; '*' for all)")
    args = parser.parse_args(argv)
    if args.repository_quiet_s <= 0:
        parser.error("--repository-quiet-s must be positive")
    if args.load_model and args.model_control_mode != "explicit":
        parser.error("--load-model needs --model-control-mode explicit")
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository} is not a folder")
    if args.max_request_bytes < 1:
        parser.error("--max-request-bytes must be positive")
    if not 0 <= args.grpc_port < 65536:
        parser.error("--grpc-port must be a port number (0: no gRPC)")
    if args.max_parallel_starts < 1:
        parser.error("--max-parallel-starts must be at least 1")
    if args.start_progress_s <= 0:
        parser.error("--start-progress-s must be positive")
    if args.ray_address is not None and importlib.util.find_spec("ray") is None:
        parser.error("--ray-address needs Ray, which is not installed: pip install 'llumnix-backend[ray]'")
    if args.shutdown_grace_s < 0:
        parser.error("--shutdown-grace-s must not be negative")
    return args


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # vLLM reads its level when first imported: keep its start-up chatter out of the terminal
    # unless asked for, but always show its warnings and errors.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if level == "debug" else "WARNING")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    logging.getLogger("llumnix.requests").disabled = not args.request_log

    import uvicorn

    from llumnix_backend.model_registry import ModelControlMode, ModelRegistry
    from llumnix_server.app import GracefulServer, create_app
    from llumnix_server.startup_report import StartupReport

    report = StartupReport(f"http://{args.host}:{args.port}", f"{args.host}:{args.grpc_port}" if args.grpc_port else None)
    registry = ModelRegistry(args.model_repository.resolve(), args.max_parallel_starts, report.instance_event,
                             ModelControlMode(args.model_control_mode), frozenset(args.load_model),
                             args.repository_quiet_s, args.ray_address, args.start_progress_s)
    app = create_app(registry, api_key=args.api_key, on_loaded=report.summary,
                     max_request_bytes=args.max_request_bytes, operations_key=args.operations_api_key,
                     grpc_address=(args.host, args.grpc_port) if args.grpc_port else None)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.log_level == "debug",
                            timeout_graceful_shutdown=int(args.shutdown_grace_s + SHUTDOWN_BACKSTOP_S))
    GracefulServer(config, lambda: registry.begin_shutdown(args.shutdown_grace_s)).run()


if __name__ == "__main__":
    main()
