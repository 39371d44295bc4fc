"""Adapters: the embedded defaults and the production backends behind the ports."""
