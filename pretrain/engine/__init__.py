"""Training engine: loop (``trainer``), LARS/SGD (``optim``), schedules, distributed setup,
atomic checkpoints and backbone export (``checkpoint``), stop signals, logging.

Entry point: ``python -m pretrain`` (:mod:`pretrain.train`).
"""
