"""Test and benchmark scaffolding: small models and adapters built offline (not part of the product)."""
