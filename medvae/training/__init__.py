"""Training: configs (``config.py``), data (``data.py``) and the loop (``loop.py``)."""
