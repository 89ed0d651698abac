"""Drivers above the trainer: the shipped demo (opd vs trd vs trd_splice) and pretraining of the shipped models."""
