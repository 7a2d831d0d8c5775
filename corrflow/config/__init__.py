"""Configuration: the one typed settings tree (:mod:`corrflow.config.settings`), validated once.

The ground floor of the house: every other room may import it; it imports no other corrflow room.
"""
