"""Models shipped with gpu_worker, hosted with ``--model NAME=gpu_worker.models.<module>:<Class>``."""
