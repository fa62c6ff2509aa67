"""`moela cost`: what a DeepSeek-family model costs to run, from its config and a chip's figures.

`formulas.py` holds the math (parameters, cache bytes, FLOPs, roofline, price), `catalog.py` the
public model configs and chip figures (models.json, hardware.json) and this machine, `measure.py`
what moela measures here (bandwidth, matmul rate, its own decode), `cli.py` the command.
"""
