"""Evaluation: metrics with bootstrap CIs, baselines, scoring models on the test set, Grad-CAM."""
