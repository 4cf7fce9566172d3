"""Deprecated locations kept for one release: each command now lives beside its app
(``recap_embed.train.app``, ``recap_embed.plan.app``, ``recap_embed.tml.cli``)."""
