"""Calibration: the buffer of unlabeled observations, activation capture, ATM and OHB."""
