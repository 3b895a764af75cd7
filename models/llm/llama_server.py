"""llama.cpp's own HTTP server (llama-server), prebuilt, from the PyPI package ``xllamacpp``.

``python -m models.llm.llama_server --model FILE.gguf --port N`` serves the OpenAI-compatible
``/v1/completions`` and ``/v1/models`` on loopback until it is terminated. xllamacpp runs
llama.cpp's C++ server (HTTP included) inside this process; its Linux wheel is built for
generic x86-64 with AVX2 (no AVX-512, no AMX), so nothing is compiled at install time.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.llm.llama_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--n_threads", type=int, default=2)
    parser.add_argument("--n_parallel", type=int, default=1, help="server slots (concurrent sequences)")
    args = parser.parse_args(argv)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.n_parallel = args.n_parallel
    params.cpuparams.n_threads = args.n_threads
    params.cpuparams_batch.n_threads = args.n_threads
    server = xllamacpp.Server(params)  # loads the model and starts listening
    print(f"llama.cpp server listening on {server.listening_address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    raise SystemExit(main())
