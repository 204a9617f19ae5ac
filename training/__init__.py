"""Train ControlNets on controlset shards.

Heavy libraries (torch, diffusers, transformers) are imported by the modules
that need them, so ``import training`` and ``training.cli`` stay light.
"""
