"""ssvae-pl: semi-supervised VAEs (Kingma, Rezende, Mohamed and Welling, NeurIPS 2014) in PyTorch Lightning.

Layout: ``data/`` (files on disk -> mixed batches), ``elbo.py`` (the bounds), ``nets.py`` (plain networks),
``models/`` (LightningModules), ``cli.py`` (the ``ssvae`` command).
"""

__version__ = "0.1.0"
