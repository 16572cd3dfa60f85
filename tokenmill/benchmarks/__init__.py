"""`tokenmill bench`: offline (in-process) and serving (any OpenAI-compatible server) benchmarks.

datasets.py builds the requests (random, prefix-repetition, ShareGPT), metrics.py turns per-request timings
into the figures vLLM's bench reports, throughput.py and serve.py drive the load, plots.py draws PNGs, cli.py
wires them to the command line.
"""
