"""Training, evaluation, metrics, baselines and the ``mobility`` command line."""
