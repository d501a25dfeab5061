"""Other ways to run ``neuroloc localize`` over many images (optional extras).

* :mod:`neuroloc.engines.ray_engine`: Ray Data, on one machine or a cluster (``pip install "neuroloc[ray]"``).
"""
