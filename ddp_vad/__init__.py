"""ddp_vad: distributed training toolkit for video anomaly detection.

The package follows the data (docs/architecture.md): ``data/`` reads clips (``sources/``), cuts and labels windows
and writes/reads shards; ``train/`` pretrains the GAN and fine-tunes the classifier fold-parallel; ``eval/`` runs the
baselines, metrics, report and predict; ``cli.py`` parses options declared once in the stages' configs
(``options.py``), ``pipeline.py`` chains the stages, ``models.py`` and ``presets.py`` hold the networks and sizes.
"""

__version__ = "0.1.0"
