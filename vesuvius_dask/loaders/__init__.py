"""The PyTorch side.

With the viewer, the only modules that import torch at module level: the stream,
its batch reader, shared-memory batch buffers, throughput.
"""
