"""Research drivers that call the engine (the engine never imports them): run from a checkout, not installed.

python -m experiments.method      # the method experiment (make experiment) -> EXPERIMENTS.md
"""
