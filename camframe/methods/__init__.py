"""Weighting methods (the Grad-CAM family, eigen), D-RISE (black-box) and guided-backprop rules."""
