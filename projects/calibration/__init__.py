"""Calibration: Chidambaram & Ge's overlap study and losses x calibrators on Fashion-MNIST."""
