"""gpu_worker: an openpi-compatible WebSocket model server that batches across connections.

Importing this package does not import torch: CUDA is initialised only inside
the server process, when the models load.
"""

__version__ = "0.1.0"
