"""Deprecated locations kept for one release: `recap_embed.cli.from_tml` (now `recap_embed.tml.cli`)
and `recap_embed.cli.hydra_guards` (now `recap_embed.hydra_guards`). The commands live beside their
apps: `recap_embed.train.app`, `recap_embed.plan.app`, `recap_embed.tml.cli`."""
