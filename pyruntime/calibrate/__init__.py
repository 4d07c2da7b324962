"""Calibration: policies (bits, scales, exits) fitted on a few labelled images.

One module per method. Modules that need gradients (LampQ's Fisher information) import torch
inside their functions; the exit-threshold tools work from the runtime alone.
"""
