"""Tensors in, maps out: the ``Explainer`` and its ``Result``, smoothing. Writes nothing to disk."""
