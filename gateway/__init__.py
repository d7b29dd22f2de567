"""faktory-gateway: a Faktory proxy that enforces Enterprise batch invariants."""

__version__ = "0.1.0"
