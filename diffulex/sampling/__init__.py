"""Unmasking policies: how logits become (token, confidence), and which positions a step commits."""
