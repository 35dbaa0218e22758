"""Optical flow: TV-L1 and Farneback estimators (OpenCV and batched PyTorch) and dataset extraction."""
