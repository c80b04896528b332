"""Text generation at any TP x PP with a KV cache (``mtnlg/generate.py`` is the entry point).

``InferenceEngine.load(path, Groups.from_topology(topo))`` then ``engine.generate(requests)``
on every rank; ``SamplingParams`` says how each request samples.
"""

from mtnlg.inference.engine import Groups, InferenceEngine, broadcast_requests
from mtnlg.inference.params import Request, Result, SamplingParams
from mtnlg.inference.sampling import sample

__all__ = [
    "Groups",
    "InferenceEngine",
    "Request",
    "Result",
    "SamplingParams",
    "broadcast_requests",
    "sample",
]
