"""The bottom layer: errors, argument validation, image decoding, and the tensor utilities every layer uses
(layer capture, ragged batches, resampling, aggregation); ground truth. Imports nothing else of camframe."""
