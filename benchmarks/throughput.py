"""Offline throughput against HF transformers (same as `llama-engine bench throughput`)."""
import argparse

from llama_engine.bench import throughput

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    throughput.add_arguments(parser)
    throughput.run(parser.parse_args())
