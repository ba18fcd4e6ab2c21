"""Serving benchmark against a running server: see server/bench_serving.py.

    python benchmarks/serving.py --base-url http://127.0.0.1:8321 --request-rates 1,4,16
"""

from server.bench_serving import add_bench_serving_arguments, bench_serving, main

__all__ = ["add_bench_serving_arguments", "bench_serving", "main"]

if __name__ == "__main__":
    main()
