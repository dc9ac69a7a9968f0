"""Models: the input pipeline, the networks, cross-validated training and epoch selection, where
training runs (devices), and the .keras file with its model card."""
