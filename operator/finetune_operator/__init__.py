"""The FineTuneJob operator (kopf): turns each FineTuneJob into a gang of torchrun pods."""
