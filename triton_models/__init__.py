"""Triton serving stack for MGM: the `mgm-serve` launcher and the model repository."""
